"""Rewrite the CLI reference in README.md from `main.py --help` (tests fail when the two differ).

    python scripts/update_cli_reference.py          # rewrite README.md
    python scripts/update_cli_reference.py --check  # exit 1 if README.md is out of date
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
START, END = "<!-- cli-reference:start -->", "<!-- cli-reference:end -->"
HELP_WIDTH = "100"  # argparse wraps to $COLUMNS; fix it so the text does not depend on the terminal


def help_text() -> str:
    os.environ["COLUMNS"] = HELP_WIDTH
    sys.path.insert(0, str(REPO))
    from detr_ssl.config import build_parser

    return build_parser().format_help()


def rendered_readme(readme: str) -> str:
    """README text with the block between the markers replaced by the current --help."""
    if START not in readme or END not in readme:
        raise SystemExit(f"{README}: markers {START} / {END} not found")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n```text\n{help_text()}```\n{END}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check, do not write")
    check = parser.parse_args().check
    current = README.read_text()
    wanted = rendered_readme(current)
    if check:
        if current != wanted:
            raise SystemExit("README.md's CLI reference is out of date: run python scripts/update_cli_reference.py")
        print("README.md CLI reference is up to date")
    elif current != wanted:
        README.write_text(wanted)
        print("README.md CLI reference updated")


if __name__ == "__main__":
    main()
