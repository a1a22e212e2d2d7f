"""Runs train.py in this process, exactly as `python train.py ...` would, and on exit writes what only
the rank itself can see to $SCALE_PROBE_DIR/rank<RANK>.json: its peak RSS (getrusage, the kernel's
high-water mark), its wall time, and its load time (process start -> output_dir/ranks/rank<R>.json,
which train.py writes right after deepspeed.initialize: imports, data, from_pretrained, sharding).

    deepspeed --num_gpus 2 benchmarks/scale_rank.py --deepspeed ds_configs/zero3.json [train.py flags]

Used by bench_scale.py, so train.py and train_loop.py need no measuring code of their own.
"""

import atexit
import json
import os
import resource
import runpy
import sys
import time
from pathlib import Path

T0 = time.time()
ROOT = Path(__file__).resolve().parents[1]


def _report():
    rank = int(os.environ.get("RANK", "0"))
    argv = sys.argv[1:]
    out_dir = Path(argv[argv.index("--output_dir") + 1]) if "--output_dir" in argv else None
    ready = out_dir / "ranks" / f"rank{rank}.json" if out_dir else None
    row = {"rank": rank, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "wall_s": time.time() - T0,
           "load_s": ready.stat().st_mtime - T0 if ready is not None and ready.is_file() else None}
    probe = Path(os.environ.get("SCALE_PROBE_DIR", "."))
    probe.mkdir(parents=True, exist_ok=True)
    (probe / f"rank{rank}.json").write_text(json.dumps(row))


if __name__ == "__main__":
    atexit.register(_report)
    sys.path.insert(0, str(ROOT))  # this checkout's infoprompt_ds
    sys.argv = [str(ROOT / "train.py"), *sys.argv[1:]]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
