"""`python -m mergeguard` runs the command-line tool."""

from mergeguard.cli import main

if __name__ == "__main__":
    main()
