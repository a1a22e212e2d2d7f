"""Exit codes and the one way a console entry turns an expected error into one line and an exit code.

Exit codes of `infoprompt train` / `train.py`: 0 finished; 2 bad input (one line `error: <field>: ...`);
3 training diverged (max_nonfinite_steps NaN/inf steps in a row, the last good checkpoint kept); 75
stopped by SIGTERM/SIGUSR1 after saving a checkpoint (resumable). Anything else is a crash.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from infoprompt_ds.config import ConfigError

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
# EX_TEMPFAIL ("try again"): SLURM scripts requeue on it, `--resume_from_checkpoint latest` continues.
EXIT_PREEMPTED = 75


_early_signal = 0


def catch_stop_signals_early() -> None:
    """From the first line of a training: SIGTERM/SIGUSR1/SIGHUP during start-up (imports, pre-flight, weight
    loading) used to kill the process silently (rc -10 for SIGUSR1) instead of the documented stop. They are
    remembered here and handed to the training loop's stop flag (runtime/setup._StopFlag), which stops at
    the first step boundary: a checkpoint, exit 75. (Ctrl-C keeps aborting at once: nothing to save yet.)"""
    import signal

    def remember(signum, frame):
        global _early_signal
        _early_signal = signum

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP):
        signal.signal(sig, remember)


def early_signal() -> int:
    """The stop signal caught during start-up (0: none)."""
    return _early_signal


class StopRequested(Exception):
    """Raised after a graceful stop (SIGTERM/SIGUSR1) has saved its checkpoint."""


class TrainingDiverged(Exception):
    """max_nonfinite_steps non-finite losses/gradients in a row; nothing was saved after the streak began."""


def fail(message: object, code: int = EXIT_BAD_INPUT, *, rank0_only: bool = False) -> NoReturn:
    """Print `error: <message>` on stderr and exit with `code`. rank0_only (training): one line for the
    job, not one per rank."""
    # a stray RANK without WORLD_SIZE is no job: say it on every process
    if not rank0_only or os.environ.get("RANK", "0") == "0" or "WORLD_SIZE" not in os.environ:
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def exit_on_config_error(fn, *args, rank0_only: bool = False, **kwargs):
    """Run fn; a ConfigError ends as one line and exit code 2, never a traceback."""
    try:
        return fn(*args, **kwargs)
    except ConfigError as e:
        fail(e, rank0_only=rank0_only)


__all__ = ["ConfigError", "EXIT_BAD_INPUT", "EXIT_DIVERGED", "EXIT_PREEMPTED", "StopRequested",
           "TrainingDiverged", "fail", "exit_on_config_error"]
