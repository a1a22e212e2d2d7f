"""Process environment defaults. Imports no torch at the top: setup_environment must run before torch
and DeepSpeed are first imported (OMP_NUM_THREADS is read when torch loads, DS_ACCELERATOR when
DeepSpeed does), so the CLI calls it first and imports the training loop only afterwards."""

from __future__ import annotations

import os
import socket
import warnings


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (rendezvous, local MLflow servers, tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_environment() -> None:
    """Environment defaults that must be in place before torch/deepspeed are imported. Idempotent."""
    # A plain `python train.py` is a one-rank job: give torch.distributed what a launcher would.
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(free_port())
    os.environ.setdefault("LOCAL_RANK", "0")
    # The deepspeed launcher does not split the cores between ranks; oversubscribed ranks run 2-3x slower.
    if "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // local))
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # torch deprecates the collective names DeepSpeed 0.19 still calls, once per call: pure noise.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+`? is deprecated", category=FutureWarning)
