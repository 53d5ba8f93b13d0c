"""The documentation says what the code does: docs/cli.md is what the CLI generates, every `mergeguard ...`
line in the README's (and the guides') code blocks and in each command's --help examples parses with the
real CLI (unknown options, missing required ones and bad values fail), and the README's Python example runs."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import typer

from mergeguard.cli import app

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "docs" / "lfpm.md", REPO / "docs" / "cli.md", REPO / "docs" / "gate.md"]


def _gen_cli():
    spec = importlib.util.spec_from_file_location("gen_cli", REPO / "docs" / "gen_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_generated_from_the_cli():
    assert (REPO / "docs" / "cli.md").read_text() == _gen_cli().render(), \
        "docs/cli.md is out of date: run python docs/gen_cli.py"


def code_blocks(text: str, languages=("bash", "")) -> list[str]:
    return [body for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S) if lang in languages]


def mergeguard_lines(block: str) -> list[list[str]]:
    """Each `mergeguard ...` command of a shell block, as argv after `mergeguard` (continuations joined,
    `$VAR` given a placeholder value, `&&`/`||`/`;`/`|` separating commands, comments dropped)."""
    commands = []
    joined = re.sub(r"\\\n\s*", " ", block)
    for line in joined.splitlines():
        line = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", "X", line)
        for piece in re.split(r"&&|\|\||;|\|", line.split(" #")[0]):
            words = shlex.split(piece, comments=True)
            if "mergeguard" in words:
                commands.append(words[words.index("mergeguard") + 1:])
    return commands


def parse(argv: list[str]) -> None:
    """Parse `argv` as the CLI would, down to the command, without running it (its callbacks, such as
    --json's folder check, run)."""
    root = typer.main.get_command(app)
    ctx = root.make_context("mergeguard", list(argv))
    command = root
    while hasattr(command, "list_commands"):
        protected = getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", None) or []
        rest = [*protected, *ctx.args]  # the subcommand's name, then its arguments (click 8 and typer's own)
        name, command, rest = command.resolve_command(ctx, rest)
        ctx = command.make_context(name, rest, parent=ctx)


def _documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for doc in DOCS:
        for block in code_blocks(doc.read_text()):
            found += [(f"{doc.name}: mergeguard {' '.join(argv)}", argv) for argv in mergeguard_lines(block)]
    return found


def test_the_docs_name_commands():
    names = {argv[0] for _, argv in _documented_commands() if argv}
    assert {"extract-tv", "merge", "inspect", "heads", "eval", "defend", "demo"} <= names


@pytest.mark.parametrize("where, argv", _documented_commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_documented_command_parses(where, argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a --json FILE's folder must exist: the docs' relative ones are made here
    for i, word in enumerate(argv[:-1]):
        if word == "--json" and argv[i + 1] != "-":
            Path(argv[i + 1]).parent.mkdir(parents=True, exist_ok=True)
    parse(argv)


def test_a_wrong_flag_fails_the_parse():
    """The check above can fail: an option no command has, a missing required one, a bad number."""
    for argv in (["merge", "a", "b", "-o", "c", "--lamda", "0.3"], ["eval", "m"],
                 ["defend", "lfpm", "--merged", "m", "--base", "b", "--shadow", "s", "-o", "o", "--epochs", "x"]):
        with pytest.raises(Exception) as err:
            parse(argv)
        assert type(err.value).__name__ in ("NoSuchOption", "MissingParameter", "BadParameter", "UsageError")


@pytest.mark.slow
def test_the_readme_python_example_runs(tiny_zoo, tmp_path, monkeypatch, capsys):
    """The README's Python block, run as written (in a fresh folder; the zoo the session already built)."""
    import mergeguard.workflows.zoo as zoo_module

    (block,) = code_blocks((REPO / "README.md").read_text(), languages=("python",))
    monkeypatch.setattr(zoo_module, "build_zoo", lambda *a, **k: tiny_zoo)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    before, after = (float(re.search(rf"CA {w}: ([0-9.]+)", printed).group(1)) for w in ("before", "after"))
    assert 0.25 < before <= 1 and abs(after - before) < 0.2, printed
    assert (tmp_path / "merged" / "model.safetensors").exists()
