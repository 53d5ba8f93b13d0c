"""The bars `bench/defense_table.py` marks met / NOT met, on hand-made rows (the table itself
takes ten minutes; its verdicts are plain arithmetic, checked here against numbers worked by hand)."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPT = BENCH / "defense_table.py"


@pytest.fixture(scope="module")
def table():
    sys.path.insert(0, str(BENCH))  # as `python bench/defense_table.py` has it: its harness beside it
    spec = importlib.util.spec_from_file_location("defense_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(ca, asr_t, no_trigger, asr_n, asr_n_no_trigger=None):
    return {"ca_avg": ca, "asr_t": asr_t, "asr_t_no_trigger": no_trigger, "asr_n": asr_n,
            "asr_n_no_trigger": asr_n_no_trigger}


def rows(**override):
    base = {
        "clean merge TA (control)": row(0.717, 0.016, 0.010, 0.085),
        "clean merge TA + LFPM": row(0.697, 0.010, 0.005, 0.073),  # −2.0 points: on the bar, met
        "clean merge TIES (control)": row(0.687, 0.099, 0.068, 0.043),
        "poisoned TIES": row(0.597, 0.896, 0.266, 0.071),
        "poisoned TIES + LFPM": row(0.587, 0.276, 0.219, 0.024),
        "poisoned TA λ 0.3": row(0.643, 0.917, 0.047, 0.290),
        "poisoned TA + LFPM": row(0.638, 0.036, 0.016, 0.085),
        "poisoned TA + IBVS": row(0.490, 0.396, 0.302, 0.106),
        "λ-shrink: poisoned TA λ 0.2": row(0.664, 0.979, 0.286, 0.153),
        "λ-shrink: poisoned TA λ 0.1": row(0.615, 0.776, 0.375, 0.069),
    }
    base.update(override)
    return base


def line(checks, start):
    (found,) = [c for c in checks if c.startswith(start)]
    return found


def test_bars_met_and_not_met(table):
    checks = table.issue_checks(rows(), 0.3)
    ta = line(checks, "task arithmetic: ASR(T)")
    assert "≤ 5%: met" in ta and "share is 2.0 points" in ta  # 3.6 − 1.6
    ties = line(checks, "TIES: ASR(T)")
    assert "≤ 5%: NOT met" in ties and "share is 5.7 points" in ties and "share 3.1 points" in ties
    assert "loses ≤ 3 points: met" in line(checks, "TIES: CA")  # 59.7 → 58.7
    # 71.7 → 69.7 is exactly the 2-point limit; float subtraction gives 2.0000000000000018
    assert "(-2.0 points) within 2 points: met" in line(checks, "clean merge:")
    assert "NOT met" not in line(checks, "task arithmetic: ASR(N)")
    assert not any(c.startswith("LoBAM") for c in checks)  # no LoBAM rows, no LoBAM bars


def test_asr_n_above_the_undefended_merge_says_the_triggers_share(table):
    """Like the small zoo: the defended merge's ASR(N) is above the undefended one's, all of it the other
    tasks' own confusion into the target index (with these rounded rows the trigger adds 0.1 points after,
    −0.4 before)."""
    checks = table.issue_checks(rows(**{"poisoned TA λ 0.3": row(0.603, 0.979, 0.008, 0.071, 0.075),
                                        "poisoned TA + LFPM": row(0.631, 0.010, 0.008, 0.101, 0.100)}), 0.3)
    asr_n = line(checks, "task arithmetic: ASR(N)")
    assert "undefended 7.1%: NOT met" in asr_n and asr_n.endswith("-0.4 points before, 0.1 points after)")


def test_failing_rows_are_marked(table):
    checks = table.issue_checks(rows(**{
        "clean merge TA + LFPM": row(0.690, 0.010, 0.005, 0.090),  # −2.7 points, ASR(N) up
        "poisoned TA + LFPM": row(0.600, 0.060, None, 0.300),  # CA −4.3, ASR(N) above the undefended
    }), 0.3)
    assert "≤ 5%: NOT met" in line(checks, "task arithmetic: ASR(T)")
    assert "share is -" in line(checks, "task arithmetic: ASR(T)")  # no count without the trigger
    assert "loses ≤ 3 points: NOT met" in line(checks, "task arithmetic: CA")
    asr_n = line(checks, "task arithmetic: ASR(N)")
    assert "+ 2 points: NOT met" in asr_n and "undefended 29.0%: NOT met" in asr_n
    clean = line(checks, "clean merge:")
    assert "within 2 points: NOT met" in clean and "8.5% → 9.0%: NOT met (the trigger's share of ASR(N): -" in clean
    # λ 0.2 does not reach 6.0%, λ 0.1 neither: the line says no λ reaches it
    assert line(checks, "λ-shrink").startswith("λ-shrink: no λ tried reaches LFPM's ASR(T) 6.0%")


def test_shrink_that_keeps_more_ca_is_not_met(table):
    checks = table.issue_checks(rows(**{"λ-shrink: poisoned TA λ 0.05": row(0.660, 0.030, 0.020, 0.05)}), 0.3)
    assert line(checks, "λ-shrink").endswith("LFPM 63.8%: NOT met")


def test_a_merge_the_attack_does_not_survive_is_named(table):
    """The bars are for merges with ASR(T) ≥ 90% before (the paper's own attack reaches 45% on the small
    zoo's TIES merge); the rows' TIES merge has 89.6%, task arithmetic 91.7%."""
    checks = table.issue_checks(rows(), 0.3)
    assert "TIES: the bars below are for a merge with ASR(T) ≥ 90% before; this one has 89.6%" in line(
        checks, "TIES: the bars")
    assert not any(c.startswith("task arithmetic: the bars") for c in checks)
