"""Runs train.py in this process, exactly as `python train.py ...` would, counting every all-gather this rank
issues (torch.distributed.all_gather_into_tensor / _all_gather_base / all_gather, patched before DeepSpeed
binds them) with the bytes it gathered, split by phase: `forward` (a training forward, engine.forward in
train mode), `backward` (engine.backward: ZeRO-3 gathers each weight again for its backward, and with
--gradient_checkpointing once more for the recomputed forward), `eval` (engine.forward in eval mode: the
unprompted pass and validation) and `other` (export, checkpoint). On exit writes
$GATHER_COUNT_DIR/rank<RANK>.json, with the peak RSS (getrusage).

    deepspeed --num_gpus 2 benchmarks/gather_rank.py --deepspeed zero3 [train.py flags]

Used by bench_checkpointing.py.
"""

import atexit
import json
import os
import resource
import runpy
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
T0 = time.time()
COUNTS = defaultdict(lambda: {"calls": 0, "bytes": 0})
PHASE = ["other"]
STEPS = {"forward": 0, "backward": 0}


def _count(fn):
    def counted(*args, **kwargs):
        out = args[0] if args else kwargs.get("output_tensor", kwargs.get("tensor_list"))
        tensors = out if isinstance(out, (list, tuple)) else [out]
        c = COUNTS[PHASE[0]]
        c["calls"] += 1
        c["bytes"] += sum(t.numel() * t.element_size() for t in tensors if hasattr(t, "numel"))
        return fn(*args, **kwargs)
    return counted


def _patch_collectives():
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    for name in ("all_gather_into_tensor", "_all_gather_base", "all_gather"):
        for mod in (dist, c10d):
            if hasattr(mod, name):
                setattr(mod, name, _count(getattr(c10d, name)))


def _patch_engine():
    from deepspeed.runtime.engine import DeepSpeedEngine

    forward, backward = DeepSpeedEngine.forward, DeepSpeedEngine.backward

    def phased_forward(self, *a, **k):
        before, PHASE[0] = PHASE[0], "forward" if self.module.training else "eval"
        STEPS["forward"] += PHASE[0] == "forward"
        try:
            return forward(self, *a, **k)
        finally:
            PHASE[0] = before

    def phased_backward(self, *a, **k):
        before, PHASE[0] = PHASE[0], "backward"
        STEPS["backward"] += 1
        try:
            return backward(self, *a, **k)
        finally:
            PHASE[0] = before

    DeepSpeedEngine.forward, DeepSpeedEngine.backward = phased_forward, phased_backward


def _report():
    rank = int(os.environ.get("RANK", "0"))
    row = {"rank": rank, "wall_s": time.time() - T0, "train_forwards": STEPS["forward"],
           "backwards": STEPS["backward"], "gathers": dict(COUNTS),
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    out = Path(os.environ.get("GATHER_COUNT_DIR", "."))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(row))


if __name__ == "__main__":
    _patch_collectives()  # before DeepSpeed's comm backend binds torch's functions
    _patch_engine()
    atexit.register(_report)
    sys.path.insert(0, str(ROOT))
    sys.argv = [str(ROOT / "train.py"), *sys.argv[1:]]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
