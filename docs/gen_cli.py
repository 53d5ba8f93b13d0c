"""Write docs/cli.md from the CLI itself, so the reference cannot drift from the code.

    python docs/gen_cli.py            # rewrite docs/cli.md
    python docs/gen_cli.py --check    # exit 1 if docs/cli.md is not what the CLI says (tests/test_docs.py)
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

HERE = Path(__file__).resolve().parent
HEADER = """# Command reference

Generated from the CLI by `python docs/gen_cli.py`; do not edit by hand (`tests/test_docs.py` fails when
it differs from what `mergeguard --help` says). The user's guide is the README; each command's `--help`
says the same as its section here.

Every command: `--json FILE` (`-` for stdout) writes every number as JSON, `--quiet` drops progress bars
and tables, and an existing output (a non-empty `--out`, an existing `--json FILE`) is refused unless
`--overwrite`. Exit codes: 0 success, 1 a threshold crossed (`eval --max-asr/--min-ca`), 2 bad input
(one sentence, nothing written), 3 internal error, 130 interrupted, 143 terminated.
"""


def _is_argument(param) -> bool:
    return param.param_type_name == "argument"


def _commands(group, prefix: str) -> list[tuple[str, object]]:
    """Every leaf command under `group` (typer's click objects: typer ≥ 0.20 vendors its own click)."""
    found = []
    ctx = typer.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        full = f"{prefix} {name}"
        if hasattr(cmd, "list_commands"):
            found.extend(_commands(cmd, full))
        else:
            found.append((full, cmd))
    return found


def _clean(text: str | None) -> str:
    return " ".join((text or "").replace("\b", "").split())


def _param_row(param) -> str:
    if _is_argument(param):
        name = f"`{param.name.upper()}`"
    else:
        flags = [*param.opts, *param.secondary_opts]
        name = ", ".join(f"`{f}`" for f in flags)
        if not getattr(param, "is_flag", False) and param.metavar:
            name += f" `{param.metavar}`"
    default = param.default
    hidden = default is None or callable(default) or default in ((), [])
    if isinstance(default, bool):  # a --x/--no-x switch names the side it is on; a lone flag is off by default
        shown = f"`{(param.opts if default else param.secondary_opts)[0]}`" if param.secondary_opts else ""
    else:
        shown = "" if hidden else f"`{default}`"
    multiple = " (repeatable)" if getattr(param, "multiple", False) else ""
    required = " **required**" if param.required else ""
    help_text = _clean(getattr(param, "help", None)).replace("|", "\\|")
    return f"| {name}{required} | {help_text}{multiple} | {shown} |"


def _usage(arg) -> str:
    text = arg.name.upper() + ("..." if arg.nargs == -1 else "")
    return text if arg.required else f"[{text}]"


def render() -> str:
    from mergeguard.cli import app

    root = typer.main.get_command(app)
    parts = [HEADER]
    commands = _commands(root, "mergeguard")
    parts.append("## Commands\n\n" + "\n".join(
        f"- [`{name}`](#{name.replace(' ', '-')}): {_clean(cmd.help).split('. ')[0].rstrip('.')}."
        for name, cmd in commands) + "\n")
    for name, cmd in commands:
        usage = " ".join(["[OPTIONS]", *(_usage(p) for p in cmd.params if _is_argument(p))])
        body = [f"## {name}\n", f"```text\n{name} {usage}\n```\n", _clean(cmd.help) + "\n"]
        params = [p for p in cmd.params if p.name not in ("help",) and not getattr(p, "hidden", False)]
        if params:
            body.append("| argument / option | what it does | default |\n|---|---|---|")
            body.append("\n".join(_param_row(p) for p in params) + "\n")
        if cmd.epilog:
            examples = [line.strip().removeprefix("$ ") for line in cmd.epilog.replace("\b", "").splitlines()
                        if line.strip().startswith("$ ")]
            if examples:
                body.append("Examples:\n\n```bash\n" + "\n".join(examples) + "\n```\n")
        parts.append("\n".join(body))
    return "\n".join(parts)


def main(argv: list[str]) -> int:
    target = HERE / "cli.md"
    text = render()
    if "--check" in argv:
        if not target.exists() or target.read_text() != text:
            print(f"{target} is out of date: run python docs/gen_cli.py", file=sys.stderr)
            return 1
        return 0
    target.write_text(text)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
