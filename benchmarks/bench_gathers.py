"""Issue 37 items 2 and 6: ZeRO-3 parameter gathers per training step and per evaluation pass, and what they
cost, on the default job (InfoPrompt, MiniLM, Rotten Tomatoes k=64, batch 16, 1 rank).

    python benchmarks/bench_gathers.py [--pairs 5] [--steps 4]

One process builds one DeepSpeed engine per json with the product's code (build_model, fill_ds_config,
the unprompted pass, train_loop.train_step on the product's own batches, train_loop.predictions) and counts
ZeRO-3 fetches with a counter around DeepSpeed's PartitionedParameterCoordinator.__all_gather_params_
(benchmark only, not the product): `gathers` = all_gather_coalesced launches that had a partitioned
parameter to fetch, `params` / `numel` = what they fetched. On 1 rank DeepSpeed skips the communication
itself but runs the same fetch/release logic; on N ranks each of these is an all-gather over N ranks.

Arms (--configs): zero3 = the shipped zero3.json (prefetch 0, max_reuse_distance 0: the memory fix of
docs/scaling.md); zero3_fast = ds_configs/zero3_fast.json (persistence threshold 1e9: a frozen backbone
that fits whole on every rank is gathered once, at initialize); zero3_reuse = zero3.json with DeepSpeed's
own prefetch/reuse defaults. Training step times are taken in alternating blocks (arm order flipped every
pair; the median step of each block), ratios per pair against the shipped json.

Evaluation: the validation split through the eval loop as it was (the split's order in batches of
per_device_eval_batch_size, one collate of per-example rows; `before`) and as it is (distributed.no_grad_pass:
sorted by length, token budget; `after`), alternating; the predictions must be identical.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import MINILM, RESULTS, ROOT, summarize, write_results  # noqa: E402

COUNTS = {"gathers": 0, "params": 0, "numel": 0}


def count_gathers() -> None:
    """Wrap DeepSpeed's fetch so every launch that fetches a partitioned parameter is counted."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as C

    name = "_PartitionedParameterCoordinator__all_gather_params_"
    orig = getattr(C, name)

    def counted(self, params, forward, quantize=False):
        todo = [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        if todo:
            COUNTS["gathers"] += 1
            COUNTS["params"] += len(todo)
            COUNTS["numel"] += sum(p.ds_numel for p in todo)
        return orig(self, params, forward, quantize)

    setattr(C, name, counted)


def counted(fn):
    before = dict(COUNTS)
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t, {k: COUNTS[k] - before[k] for k in COUNTS}


def build(cfg, ds_path, data, tok, mc):
    import deepspeed
    import torch

    from infoprompt_ds.method.loss import Diagnostics
    from infoprompt_ds.method.model import build_model, backbone_dtype, pick_attention_kernel
    from infoprompt_ds.runtime.ds_config import fill_ds_config, load_ds_config
    from infoprompt_ds.runtime.prepare import plan_steps
    from infoprompt_ds.runtime.setup import Run
    from infoprompt_ds.runtime.unprompted_cache import compute_unprompted
    from transformers import DataCollatorWithPadding

    micro_per_epoch, total = plan_steps(cfg, len(data.splits["train"]), 1)
    ds = fill_ds_config(load_ds_config(ds_path), cfg, 1, total, mc.hidden_size)
    torch.manual_seed(cfg.seed)
    dtype = backbone_dtype(cfg)
    pick_attention_kernel(dtype, torch.device("cpu"))
    model = build_model(cfg, mc, tok, data.task, dtype, ds, data.readout)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds)
    collate = DataCollatorWithPadding(tok, return_tensors="pt")
    dev = torch.device("cpu")
    z = compute_unprompted(engine, data.splits["train"], collate, cfg, 1, 0, dev, tok, None, 0)
    engine.module.set_z_stats(z)
    return Run(cfg=cfg, rank=0, world=1, device=dev, engine=engine, data=data, collate=collate, tokenizer=tok,
               tracker=None, out=Path(cfg.output_dir), total_steps=total, micro_per_epoch=micro_per_epoch,
               start_step=0, export_meta={}, stop=None, client={}, identity={}, diag=Diagnostics(cfg, engine.module),
               z_cache=z), ds


def eval_before(run):
    """The eval loop as it was before issue 37 (distributed.no_grad_pass at b6a2414), for the comparison:
    idx -> predicted class."""
    import torch

    from infoprompt_ds.method.model import model_inputs
    from infoprompt_ds.runtime.distributed import retrace_zero3, shard_batches, to_device

    split, engine = run.data.splits["validation"], run.engine
    engine.eval()
    retrace_zero3(engine)
    rows = []
    with torch.no_grad():
        for idx in shard_batches(len(split), run.cfg.per_device_eval_batch_size, 1, 0, False, 0, 0):
            batch = to_device(run.collate([split[i] for i in idx]), run.device)
            preds = engine(**model_inputs(batch))["logits"].argmax(-1)
            rows += list(zip(batch["idx"].tolist(), preds.tolist()))
    engine.train()
    retrace_zero3(engine)
    return dict(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="zero3,zero3_fast,zero3_reuse")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="training steps per timed block")
    ap.add_argument("--eval_pairs", type=int, default=3)
    ap.add_argument("--model", default=MINILM)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--results", default=str(RESULTS / "gathers.json"))
    args = ap.parse_args(argv)

    from infoprompt_ds.env import setup_environment

    setup_environment()
    import deepspeed
    import torch

    from infoprompt_ds.config import TrainConfig
    from infoprompt_ds.data.load import prepare_data
    from infoprompt_ds.method.model import load_model_config, load_tokenizer
    from infoprompt_ds.runtime.ds_config import load_ds_config
    from infoprompt_ds.runtime.train_loop import batch_at, train_step

    count_gathers()
    deepspeed.init_distributed(dist_backend="gloo")
    work = Path(tempfile.mkdtemp(prefix="bench_gathers_"))
    shipped = ROOT / "ds_configs" / "zero3.json"
    reuse = json.loads(shipped.read_text())
    for k in ("stage3_prefetch_bucket_size", "stage3_max_reuse_distance"):
        reuse["zero_optimization"].pop(k)  # DeepSpeed's defaults (prefetch 5e7 -> 'auto' sizing, reuse 1e9)
    (work / "zero3_reuse.json").write_text(json.dumps(reuse))
    paths = {"zero3": shipped, "zero3_fast": ROOT / "ds_configs" / "zero3_fast.json", "zero3_reuse": work / "zero3_reuse.json"}
    arms = args.configs.split(",")

    base = TrainConfig(model_name_or_path=args.model, per_device_train_batch_size=args.batch,
                       output_dir=str(work / "out"), deepspeed=str(shipped))
    tok, mc = load_tokenizer(base), load_model_config(base)
    data = prepare_data(base, tok, mc)
    runs, rows = {}, {}
    for arm in arms:
        cfg = TrainConfig(**{**base.to_dict(), "deepspeed": str(paths[arm])})
        (run, ds), secs, init_counts = counted(lambda: build(cfg, str(paths[arm]), data, tok, mc))
        runs[arm] = run
        rows[arm] = {"ds_config": str(paths[arm].relative_to(ROOT)) if paths[arm].is_relative_to(ROOT) else arm,
                     "zero_optimization": {k: v for k, v in ds["zero_optimization"].items() if k.startswith("stage3")},
                     "init_and_unprompted_pass": init_counts}
    cache = {arm: {} for arm in arms}
    micro = {arm: 0 for arm in arms}

    def step(arm):
        run = runs[arm]
        out = train_step(run, batch_at(run, micro[arm], cache[arm]), micro[arm])
        micro[arm] += 1
        assert out.finite
        return out

    for arm in arms:  # the first step records ZeRO-3's fetch trace; the second is a steady one
        step(arm)
        _, _, rows[arm]["train_step"] = counted(lambda: step(arm))
    times = {arm: [] for arm in arms}
    for pair in range(args.pairs):
        for arm in (arms if pair % 2 == 0 else arms[::-1]):
            ts = []
            for _ in range(args.steps):
                _, t, _ = counted(lambda: step(arm))
                ts.append(t)
            times[arm].append(statistics.median(ts))
    for arm in arms:
        rows[arm]["step_s_blocks"] = times[arm]
        rows[arm]["step_s"] = summarize(times[arm])
        rows[arm]["step_ratio_to_zero3"] = summarize([a / b for a, b in zip(times[arm], times["zero3"])])

    # evaluation: before/after on the shipped json; predictions compared as idx -> prediction maps
    from infoprompt_ds.method.model import model_inputs
    from infoprompt_ds.runtime.distributed import no_grad_pass

    run = runs["zero3"]
    split = run.data.splits["validation"]

    def eval_now():
        def rows_of(batch):
            return list(zip(batch["idx"].tolist(), run.engine(**model_inputs(batch))["logits"].argmax(-1).tolist()))

        return dict(no_grad_pass(run.engine, split, run.collate, run.cfg.per_device_eval_batch_size, 1, 0,
                                 run.device, rows_of, extra=run.cfg.n_virtual_tokens))

    ev, ev_counts, got = {"before": [], "after": []}, {}, {}
    for pair in range(args.eval_pairs):
        for which in (("before", "after") if pair % 2 == 0 else ("after", "before")):
            got[which], t, ev_counts[which] = counted(lambda: eval_before(run) if which == "before" else eval_now())
            ev[which].append(len(split) / t)
    evaluation = {"n_validation": len(split), "per_device_eval_batch_size": run.cfg.per_device_eval_batch_size,
                  "examples_per_s_before": summarize(ev["before"]), "examples_per_s_after": summarize(ev["after"]),
                  "speedup_pairs": [a / b for a, b in zip(ev["after"], ev["before"])],
                  "gathers_before": ev_counts["before"], "gathers_after": ev_counts["after"],
                  "predictions_identical": got["before"] == got["after"]}
    write_results(Path(args.results), {"benchmark": "gathers", "settings": vars(args),
                                       "torch_threads": torch.get_num_threads(), "train": rows,
                                       "evaluation": evaluation})
    print(json.dumps({"train": {a: {k: rows[a][k] for k in ("train_step", "step_s", "step_ratio_to_zero3")}
                                for a in arms}, "evaluation": evaluation}, indent=1, default=str))
    print(f"[bench_gathers] wrote {args.results}")


if __name__ == "__main__":
    main()
