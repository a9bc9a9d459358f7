"""Command-line entry point: ``python -m detr_ssl``, ``python main.py`` and ``detr-ssl``."""
from __future__ import annotations

import sys

from .config import DEMO_CONFIG, REPO_ROOT, parse_args


def main(argv: list[str] | None = None) -> None:
    """Parse flags and run; with no arguments at all, run the demo configuration."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(f"No arguments given: running the demo ({DEMO_CONFIG.relative_to(DEMO_CONFIG.parents[1])}). "
              "See `python main.py --help` for real runs.", flush=True)
        argv = ["--config", str(DEMO_CONFIG), "--data_path", str(REPO_ROOT / "data" / "sample")]
    args = parse_args(argv)
    from .engine.runner import run  # imported after parsing so that --help answers instantly

    try:
        run(args)
    except KeyboardInterrupt:
        sys.exit(130)  # 128 + SIGINT, the shell's code for a run stopped by Ctrl-C


if __name__ == "__main__":
    main()
