"""Runs train.py in this process, exactly as `python train.py ...` would, and on exit writes what only
the rank itself can see to $SCALE_PROBE_DIR/rank<RANK>.json: its peak RSS (getrusage, the kernel's
high-water mark), its wall time, and its load time (process start -> output_dir/ranks/rank<R>.json,
which train.py writes right after deepspeed.initialize: imports, data, from_pretrained, sharding).
A sampler thread also reads /proc/self/status every 0.2 s, so the peak is split into the load phase and
the rest (unprompted cache, steps, eval, save), and anonymous memory (what the OOM killer counts) from
file-backed pages (the mmapped safetensors files, which the kernel can drop); a 1 s timeline is kept.

    deepspeed --num_gpus 2 benchmarks/scale_rank.py --deepspeed ds_configs/zero3.json [train.py flags]

Used by bench_scale.py, so train.py and train_loop.py need no measuring code of their own.
"""

import atexit
import json
import os
import resource
import runpy
import sys
import threading
import time
from pathlib import Path

T0 = time.time()
ROOT = Path(__file__).resolve().parents[1]


PEAKS = {"load": {}, "train": {}}  # phase -> {RssAnon, RssFile, VmRSS: max bytes seen}
TIMELINE = []  # [s since start, phase, RssAnon MiB, RssFile MiB], one per second
GATHERED = []  # SCALE_PROBE_PARAMS=1: at each new training peak, what ZeRO-3 has gathered (see _zero3_census)


def _zero3_census() -> dict:
    """ZeRO-3 parameters whose full values are present now (status not NOT_AVAILABLE, or data larger than
    the empty placeholder): tells gathered-and-kept weights apart from memory DeepSpeed does not track."""
    import gc

    import torch

    n = numel = data = 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.nn.Parameter) and hasattr(obj, "ds_status") and not getattr(obj, "ds_persist", False):
            if obj.ds_status.name != "NOT_AVAILABLE":
                n, numel = n + 1, numel + obj.ds_numel
            data += obj.data.numel()
    return {"available_params": n, "available_numel": numel, "data_numel": data}


def _ready_file() -> Path | None:
    rank = int(os.environ.get("RANK", "0"))
    argv = sys.argv[1:]
    out_dir = Path(argv[argv.index("--output_dir") + 1]) if "--output_dir" in argv else None
    return out_dir / "ranks" / f"rank{rank}.json" if out_dir else None


def _status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)
                if k in ("VmRSS", "RssAnon", "RssFile")}


def _sample(ready: Path | None) -> None:
    last = -1.0
    while True:
        phase = "train" if ready is not None and ready.is_file() else "load"
        now = _status()
        peak = PEAKS[phase]
        for k, v in now.items():
            peak[k] = max(peak.get(k, 0), v)
        t = time.time() - T0
        if (os.environ.get("SCALE_PROBE_PARAMS") and phase == "train"
                and now.get("RssAnon", 0) > (GATHERED[-1][1] if GATHERED else 0) + (64 << 20)):
            GATHERED.append([round(t, 1), now["RssAnon"], _zero3_census()])
        if t - last >= 1.0:
            TIMELINE.append([round(t, 1), phase, now.get("RssAnon", 0) >> 20, now.get("RssFile", 0) >> 20])
            last = t
        time.sleep(0.2)


def _report():
    rank = int(os.environ.get("RANK", "0"))
    ready = _ready_file()
    row = {"rank": rank, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "wall_s": time.time() - T0,
           "load_s": ready.stat().st_mtime - T0 if ready is not None and ready.is_file() else None,
           "peak_anon_bytes_load": PEAKS["load"].get("RssAnon"), "peak_anon_bytes_train": PEAKS["train"].get("RssAnon"),
           "peak_rss_bytes_load": PEAKS["load"].get("VmRSS"), "peak_rss_bytes_train": PEAKS["train"].get("VmRSS"),
           "rss_timeline_mib": TIMELINE, **({"zero3_census": GATHERED} if GATHERED else {})}
    probe = Path(os.environ.get("SCALE_PROBE_DIR", "."))
    probe.mkdir(parents=True, exist_ok=True)
    (probe / f"rank{rank}.json").write_text(json.dumps(row))


if __name__ == "__main__":
    atexit.register(_report)
    threading.Thread(target=_sample, args=(_ready_file(),), daemon=True).start()
    sys.path.insert(0, str(ROOT))  # this checkout's infoprompt_ds
    sys.argv = [str(ROOT / "train.py"), *sys.argv[1:]]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
