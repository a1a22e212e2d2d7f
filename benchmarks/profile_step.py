"""Issue 37 item 4: where one training step's milliseconds go outside the backbone's matmuls (default job:
InfoPrompt, MiniLM, Rotten Tomatoes k=64, batch 16, 1 rank, ZeRO-3).

    python benchmarks/profile_step.py [--config zero3] [--steps 6]

The engine and batches are the product's (bench_gathers.build, train_loop.batch_at / train_step). Two views
of the same steps (after 2 warm-up steps): torch.profiler's per-op self CPU time (matmul ops vs the rest),
and cProfile's per-function time grouped by owner (infoprompt_ds, deepspeed, torch, transformers, other), so
Python time in our code, DeepSpeed's ZeRO-3 hooks and the ops can be told apart. Writes
benchmarks/results/profile_step.json.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import MINILM, RESULTS, ROOT, write_results  # noqa: E402

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm",
          "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention")
OWNERS = ("infoprompt_ds", "deepspeed", "transformers", "torch", "mlflow")


def owner(filename: str) -> str:
    for o in OWNERS:
        if f"/{o}/" in filename:
            return o
    return "other" if filename != "~" else "builtins/C"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="zero3", help="ds_configs/<name>.json")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--model", default=MINILM)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--method", default="infoprompt")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--results", default=str(RESULTS / "profile_step.json"))
    args = ap.parse_args(argv)

    from infoprompt_ds.env import setup_environment

    setup_environment()
    import deepspeed
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench_gathers import build
    from infoprompt_ds.config import TrainConfig
    from infoprompt_ds.data.load import prepare_data
    from infoprompt_ds.method.model import load_model_config, load_tokenizer
    from infoprompt_ds.runtime.train_loop import batch_at, train_step

    deepspeed.init_distributed(dist_backend="gloo")
    path = ROOT / "ds_configs" / f"{args.config}.json"
    cfg = TrainConfig(model_name_or_path=args.model, per_device_train_batch_size=args.batch, method=args.method,
                      bf16=args.bf16,
                      output_dir=tempfile.mkdtemp(prefix="profile_step_"), deepspeed=str(path))
    tok, mc = load_tokenizer(cfg), load_model_config(cfg)
    run, _ = build(cfg, str(path), prepare_data(cfg, tok, mc), tok, mc)
    cache, micro = {}, 0

    def steps(n):
        nonlocal micro
        for _ in range(n):
            batch = batch_at(run, micro, cache)
            assert train_step(run, batch, micro).finite
            micro += 1

    steps(2)  # the first records ZeRO-3's trace
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        steps(args.steps)
    prof_s = time.perf_counter() - t
    ops = [(e.key, e.self_cpu_time_total / 1e3 / args.steps, e.count / args.steps) for e in prof.key_averages()]
    ops.sort(key=lambda x: -x[1])
    op_ms = sum(ms for _, ms, _ in ops)
    mm_ms = sum(ms for k, ms, _ in ops if k in MATMUL)

    t = time.perf_counter()
    steps(args.steps)
    plain_s = time.perf_counter() - t
    pr = cProfile.Profile()
    t = time.perf_counter()
    pr.enable()
    steps(args.steps)
    pr.disable()
    cprof_s = time.perf_counter() - t
    st = pstats.Stats(pr)
    by_owner, funcs = {}, []
    for (fn, line, name), (cc, nc, tt, ct, callers) in st.stats.items():
        o = owner(fn)
        by_owner[o] = by_owner.get(o, 0.0) + tt
        funcs.append({"function": f"{Path(fn).name}:{line}({name})", "owner": o, "calls_per_step": nc / args.steps,
                      "self_ms_per_step": tt * 1e3 / args.steps, "cum_ms_per_step": ct * 1e3 / args.steps})
    ours = sorted((f for f in funcs if f["owner"] == "infoprompt_ds"), key=lambda f: -f["cum_ms_per_step"])[:15]
    top_self = sorted(funcs, key=lambda f: -f["self_ms_per_step"])[:20]
    result = {
        "config": str(path.relative_to(ROOT)), "steps": args.steps, "batch": args.batch,
        "torch_threads": torch.get_num_threads(),
        "step_ms_unprofiled": plain_s * 1e3 / args.steps, "step_ms_under_torch_profiler": prof_s * 1e3 / args.steps,
        "step_ms_under_cprofile": cprof_s * 1e3 / args.steps,
        "ops_self_cpu_ms_per_step": op_ms, "matmul_ops_ms_per_step": mm_ms,
        "non_matmul_ops_ms_per_step": op_ms - mm_ms,
        "top_ops": [{"op": k, "self_ms_per_step": ms, "calls_per_step": c} for k, ms, c in ops[:25]],
        "python_self_ms_per_step_by_owner": {k: v * 1e3 / args.steps for k, v in sorted(by_owner.items(), key=lambda x: -x[1])},
        "ours_by_cumulative_ms": ours, "top_functions_by_self_ms": top_self}
    write_results(Path(args.results), {"benchmark": "profile_step", "settings": vars(args), **result})
    print(json.dumps({k: v for k, v in result.items() if k not in ("top_functions_by_self_ms",)}, indent=1))
    print(f"[profile_step] wrote {args.results}")


if __name__ == "__main__":
    main()
