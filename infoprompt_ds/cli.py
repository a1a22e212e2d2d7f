"""Console entry points. Bad input ends as one line on stderr and exit code 2, never a traceback.

Exit codes of `train.py`: 0 finished; 2 bad input (one line `error: <field>: ...`); 3 training diverged
(max_nonfinite_steps NaN/inf steps in a row, one line `error: training diverged: ...`, the last good
checkpoint kept); 75 stopped by SIGTERM/SIGUSR1 after saving a checkpoint (resumable). Anything else is
a crash (a rank killed, a collective timed out).
"""

from __future__ import annotations

import os
import sys

EXIT_BAD_INPUT = 2


def _fail(e: Exception) -> None:
    # one line for the job, not one per rank (a stray RANK without WORLD_SIZE is no job: say it)
    if os.environ.get("RANK", "0") == "0" or "WORLD_SIZE" not in os.environ:
        print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)


def train_main(argv=None) -> None:
    from .config import ConfigError, parse_config

    try:
        cfg = parse_config(sys.argv[1:] if argv is None else argv)
        from .train_loop import EXIT_DIVERGED, EXIT_PREEMPTED, StopRequested, TrainingDiverged, run

        try:
            run(cfg)
        except StopRequested:
            # Every rank agreed to stop at this step; leave together: a launcher that sees one rank exit
            # non-zero terminates the others, which must not happen while a peer is still tearing down.
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()
            sys.exit(EXIT_PREEMPTED)
        except TrainingDiverged as e:
            if os.environ.get("RANK", "0") == "0":
                print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(EXIT_DIVERGED)
    except ConfigError as e:
        _fail(e)


def predict_main(argv=None) -> None:
    from .config import ConfigError

    try:
        from .predict import main

        main(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        _fail(e)
