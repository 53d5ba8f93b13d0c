"""`python -m mergeguard` and the `mergeguard` console script: run the command-line tool.

This module is all that runs before the CLI is imported, so a Ctrl-C during start-up (imports take a
moment) is one line and exit 130 here, as it is once a command runs (`cli._errors.handle_errors`).
"""

import sys


def run() -> None:
    try:
        from mergeguard.cli import main

        main()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: nothing was written.\n")
        sys.exit(130)


if __name__ == "__main__":
    run()
