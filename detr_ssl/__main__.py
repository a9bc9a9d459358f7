"""Command-line entry point: ``python -m detr_ssl``, ``python main.py`` and ``detr-ssl``."""
from __future__ import annotations

import sys

from .config import DEMO_CONFIG, REPO_ROOT, parse_args
from .utils.errors import UserError, one_line

USAGE_ERROR = 2  # as argparse: the run could not start (or stopped) because of its input


def main(argv: list[str] | None = None) -> None:
    """Parse flags and run; with no arguments at all, run the demo configuration.

    An expected mistake (a missing or unreadable file, data that cannot be used, a checkpoint that
    does not fit, weights that cannot be downloaded...) ends the run with one line on stderr,
    ``error: <what and where>: <what to do>``, and exit code 2; ``--debug`` adds the traceback.
    """
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
    except UserError as err:
        if args.debug:
            raise
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        sys.exit(USAGE_ERROR)


if __name__ == "__main__":
    main()
