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
