"""cli/_output.py: the library's log records reach the user as the CLI's own lines."""

from __future__ import annotations

import logging

import typer
from typer.testing import CliRunner

from mergeguard.cli import app as mergeguard_app
from mergeguard.cli._cli_utils import QuietOpt
from mergeguard.cli._errors import handle_errors
from mergeguard.cli._output import LogBridge, install_log_bridge

runner = CliRunner()


def logging_command(quiet: QuietOpt = False) -> None:
    log = logging.getLogger("mergeguard.somewhere")
    log.info("stage one of two")
    log.warning("only 12 shadow images [fewer than 1,000]")


def run(*args: str):
    one = typer.Typer()
    one.command()(handle_errors(logging_command))
    return runner.invoke(one, list(args))


def test_the_cli_installs_the_bridge_once():
    for _ in range(2):
        assert runner.invoke(mergeguard_app, ["inspect", "--help"]).exit_code == 0
    bridges = [h for h in logging.getLogger("mergeguard").handlers if isinstance(h, LogBridge)]
    assert len(bridges) == 1


def test_warnings_look_like_the_clis_and_info_lines_are_plain():
    install_log_bridge()
    result = run()
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert "stage one of two" in lines
    assert "warning: only 12 shadow images [fewer than 1,000]" in lines  # markup in a message stays text


def test_quiet_keeps_only_warnings():
    install_log_bridge()
    result = run("--quiet")
    assert result.exit_code == 0, result.output
    assert "stage one of two" not in result.stderr
    assert "warning: only 12 shadow images" in result.stderr
    bridge = install_log_bridge()
    assert bridge.level == logging.INFO  # --quiet lasts as long as its command


def test_progress_lines_reach_a_log_while_the_work_runs(tmp_path):
    """With stderr not a terminal (a CI log), progress comes as plain lines as it happens: the first lines
    are read from the pipe while the process still waits for this test's go-ahead to finish."""
    import os
    import subprocess
    import sys

    go = tmp_path / "go"
    script = f"""
import pathlib, time
from mergeguard.cli._output import RichProgress
with RichProgress() as progress:
    progress.stage("merging", 4)
    progress.advance()
    progress.advance()
    while not pathlib.Path({str(go)!r}).exists():
        time.sleep(0.05)
    progress.advance(2)
"""
    env = {**os.environ, "MERGEGUARD_PROGRESS_INTERVAL": "0"}
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, env=env)
    try:
        early = [proc.stderr.readline() for _ in range(3)]
        assert proc.poll() is None  # still running: these lines were not held back to the end
        assert early[0].strip() == "merging: started (4 steps)"
        assert early[1].startswith("merging: 1/4 (25%)") and "elapsed" in early[1] and "steps/s" in early[1]
        assert early[2].startswith("merging: 2/4 (50%)")
        go.touch()
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    assert "merging: 4/4 (100%)" in rest and "merging: done, 4 steps in" in rest


def test_progress_lines_come_at_the_interval():
    import io

    from rich.console import Console

    from mergeguard.cli._output import LineProgress

    now = [0.0]
    buf = io.StringIO()
    lines = LineProgress(Console(file=buf, width=200), interval=30, clock=lambda: now[0])
    lines.stage("LFPM", 100)
    for _ in range(100):
        now[0] += 1.0  # one step a second: a line every 30 steps
        lines.advance()
    lines.close(finished=True)
    out = buf.getvalue().splitlines()
    assert out[0] == "LFPM: started (100 steps)"
    assert [line.split(",")[0] for line in out[1:-1]] == ["LFPM: 30/100 (30%)", "LFPM: 60/100 (60%)",
                                                          "LFPM: 90/100 (90%)"]
    assert "0:00:30 elapsed, 1 steps/s, about 0:01:10 left" in out[1]
    assert out[-1] == "LFPM: done, 100 steps in 0:01:40"
