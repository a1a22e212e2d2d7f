"""Console entry points. Bad input ends as one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import os
import sys

EXIT_BAD_INPUT = 2


def _fail(e: Exception) -> None:
    if os.environ.get("RANK", "0") == "0":  # one line for the job, not one per rank
        print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)


def train_main(argv=None) -> None:
    from .config import ConfigError, parse_config

    try:
        cfg = parse_config(sys.argv[1:] if argv is None else argv)
        from .train_loop import EXIT_PREEMPTED, StopRequested, run

        try:
            run(cfg)
        except StopRequested:
            sys.exit(EXIT_PREEMPTED)
    except ConfigError as e:
        _fail(e)


def predict_main(argv=None) -> None:
    from .config import ConfigError

    try:
        from .predict import main

        main(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        _fail(e)
