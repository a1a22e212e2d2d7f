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


def return_freed_memory(threshold: int = 1 << 20) -> None:
    """CPU training under ZeRO-3 (glibc only): allocations >= `threshold` bytes get their own mmap, so a
    freed buffer goes back to the OS. glibc's default threshold adapts upwards (to 32 MiB) after the first
    large free, after which ZeRO-3's per-step all-gather buffers (one per prefetch bucket: 0.9 d^2
    elements) come from the heap, and the heap keeps what they leave: measured at 2 ranks, a 304M model's
    ranks grew from 1.1 to 3.3 GiB anonymous memory over 3 steps instead of staying near 2.2
    (benchmarks/results/scale_memory.json). Setting the threshold explicitly also stops the adaptation."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD (malloc.h)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        pass


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
        return_freed_memory()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # torch deprecates the collective names DeepSpeed 0.19 still calls, once per call: pure noise.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+`? is deprecated", category=FutureWarning)


def hub_unreachable(timeout: float = 3.0) -> "str | None":
    """None when the Hugging Face hub (HF_ENDPOINT) accepts a TCP connection, else why not: one connect
    instead of the hub client's retries (tens of seconds of noise) when the machine is offline."""
    from urllib.parse import urlparse

    offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
               if os.environ.get(v, "").lower() in ("1", "true", "yes", "on")]
    if offline:
        return f"{offline[0]} is set"
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return None
    except OSError as e:
        return f"{url.hostname} is unreachable ({e.strerror or type(e).__name__})"
