"""Shared pieces of the benchmarks: provenance (machine, versions, commit, command), the device choice,
a measured matmul peak, and writing results files.

Every results file written here carries a `meta` block that names the machine, the package versions, the
git commit (and whether the tree was dirty) and the exact command that produced it, so a figure in
docs/benchmarks.md can be traced back and re-made by one command.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:  # the scripts run from a checkout: use its package
    sys.path.insert(0, str(ROOT))
from infoprompt_ds.io import atomic_dir, atomic_file, write_text_atomic  # noqa: E402,F401 (re-exported)
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def git_info() -> dict[str, Any]:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return ""
    # "unknown" outside a git checkout (a release archive): the results still record where they came from
    return {"commit": git("rev-parse", "HEAD") or "unknown",
            # results files are outputs, not code: a cell re-run with one more arm rewrites its own tracked plot
            # just before its json, which must not mark the code it ran as modified
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".",
                              f":(exclude){RESULTS.relative_to(ROOT)}"))}


def versions() -> dict[str, Optional[str]]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "deepspeed", "transformers", "peft", "accelerate", "mlflow", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"hostname": socket.gethostname(), "platform": platform.platform(),
                            "processor": platform.processor() or platform.machine(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_total_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    else:
        info["gpu"] = None
    return info


def meta(command: Optional[list[str]] = None) -> dict[str, Any]:
    return {"command": " ".join(shlex.quote(a) for a in (command or [sys.executable, *sys.argv])),
            "cwd": str(Path.cwd()), "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine(), "versions": versions(), "git": git_info(),
            "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "DS_ACCELERATOR")
                    if k in os.environ}}


def device_and_dtype(force_cpu: bool = False):
    """cuda + bf16 when a GPU is there (the speed benchmarks' GPU mode), else cpu + fp32."""
    import torch

    if torch.cuda.is_available() and not force_cpu:
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def matmul_peak(device=None, dtype=None, n: int = 2048, seconds: float = 2.0) -> dict[str, Any]:
    """Achievable matmul FLOP/s on this device and dtype, measured with torch (best of several timed
    batches of n x n @ n x n). The 'limit' that step efficiency is a fraction of."""
    import torch

    if device is None:
        device, dtype = device_and_dtype()
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    best, reps, t_end = float("inf"), 0, time.perf_counter() + seconds
    while time.perf_counter() < t_end or reps < 3:
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - t) / 4)
        reps += 1
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "device": device.type,
            "best_s": best, "flops_per_s": 2 * n ** 3 / best, "repetitions": reps}


def repo_relative(path: Path) -> str:
    """How a results file names another file: repo-relative inside the repo (portable), else as given."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def write_results(path: Path, payload: dict[str, Any], command: Optional[list[str]] = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"meta": meta(command), **payload}
    return write_text_atomic(path, json.dumps(body, indent=2, default=str) + "\n")


def summarize(xs: list[float]) -> dict[str, float]:
    import statistics

    xs = [float(x) for x in xs]
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "median": statistics.median(xs), "mean": statistics.fmean(xs),
            "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "min": min(xs), "max": max(xs)}
