"""bf16 vs fp32 step time on CPU (issue 31, item 3): is `--bf16 true` worth it on a CPU with bf16 units?

    python benchmarks/bench_bf16.py                     # -> benchmarks/results/bf16.json (~8 min here)
    python benchmarks/bench_bf16.py --models minilm     # one model

Per model, one worker process builds two DeepSpeed engines with the project's own code (build_model, the
shipped zero3.json filled as a run fills it, 1 rank): one in fp32, one with --bf16 true (frozen weights
loaded in bf16, bf16 compute copies of the trainables, DeepSpeed's fp32 masters). It then times the
product's own `train_loop.train_step` (InfoPrompt, the default method, with the unprompted cache) on one
fixed batch, in ALTERNATING PAIRS: a block of fp32 steps then a block of bf16 steps, the order flipped
every pair, so each pair's two blocks run seconds apart under the same background load (this machine is
shared). Reported per model: the median step time of each dtype and the bf16/fp32 ratio of every pair
(block medians), with their median and range. Also the torch matmul rate of each dtype (n x n, one
process), the first step's loss in both (bf16 rounding moves it a little) and the weight bytes.

Models: all-MiniLM-L6-v2 (the default backbone, 22.7M), SmolLM2-135M-Instruct (real weights, through
the GGUF resolver), and a random Llama of TinyLlama-1.1B's shape (bench_scale.py builds and caches it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import MINILM, RESULTS, ROOT, matmul_peak, write_results  # noqa: E402

# name -> (model, batch, seq_len, n_virtual_tokens, timed steps per block, pairs)
MODELS = {
    "minilm": (MINILM, 8, 64, 16, 3, 9),
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", 2, 48, 16, 3, 7),
    "llama-1.1b-random": ("1.1b", 2, 32, 8, 1, 3),
}
RT_LABELS, RT_WORDS = ["rotten", "fresh"], {"rotten": "bad", "fresh": "good"}


def worker(args) -> None:
    from infoprompt_ds.env import setup_environment

    setup_environment()  # before torch and DeepSpeed are imported
    import deepspeed
    import torch

    from infoprompt_ds.config import TrainConfig
    from infoprompt_ds.data import readout as readouts
    from infoprompt_ds.data.load import resolve_task
    from infoprompt_ds.internals import full_numel
    from infoprompt_ds.method.loss import Diagnostics
    from infoprompt_ds.method.model import build_model, load_model_config, load_tokenizer
    from infoprompt_ds.runtime.distributed import retrace_zero3
    from infoprompt_ds.runtime.ds_config import fill_ds_config, load_ds_config
    from infoprompt_ds.runtime.setup import Run
    from infoprompt_ds.runtime.train_loop import train_step

    ds_path = str(ROOT / "ds_configs" / "zero3.json")

    def config(bf16: bool) -> TrainConfig:
        return TrainConfig(model_name_or_path=args.model, per_device_train_batch_size=args.batch, bf16=bf16,
                           deepspeed=ds_path, learning_rate=1e-3, output_dir=tempfile.mkdtemp(), max_length=args.seq_len,
                           n_virtual_tokens=args.n_virtual, label_words=RT_WORDS, readout="linear")

    cfgs = {"fp32": config(False), "bf16": config(True)}
    mc = load_model_config(cfgs["fp32"])
    filled = {k: fill_ds_config(load_ds_config(ds_path), c, 1, 100_000, mc.hidden_size) for k, c in cfgs.items()}
    deepspeed.init_distributed(dist_backend="gloo")
    dev = torch.device("cpu")
    rates = {k: matmul_peak(dev, dt, n=1024, seconds=1.0)["flops_per_s"]
             for k, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}

    engines, load_s = {}, {}
    for k, cfg in cfgs.items():
        t = time.perf_counter()
        tok = load_tokenizer(cfg)
        task = resolve_task(cfg, RT_LABELS)
        ro = readouts.resolve("linear", mc, task.type, task.label_words, pair=False)
        torch.manual_seed(0)
        model = build_model(cfg, mc, tok, task, torch.bfloat16 if cfg.bf16 else torch.float32, filled[k], ro)
        trainable = [p for p in model.parameters() if p.requires_grad]
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=filled[k])
        engine.train()
        engines[k] = engine
        load_s[k] = time.perf_counter() - t

    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(5, mc.vocab_size - 1, (args.batch, args.seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (args.batch,), generator=g),
             "idx": torch.arange(args.batch)}
    if getattr(mc, "type_vocab_size", 0):
        batch["token_type_ids"] = torch.zeros_like(ids)

    def step_fn(k):
        eng, cfg = engines[k], cfgs[k]
        eng.eval()
        retrace_zero3(eng)
        with torch.no_grad():  # the unprompted cache, as train_loop.fit computes it before training
            z = eng(**{n: batch[n] for n in ("input_ids", "attention_mask", "token_type_ids") if n in batch},
                    unprompted_only=True)["z"]
        eng.module.set_z_stats(z)
        eng.train()
        retrace_zero3(eng)
        run = Run(cfg=cfg, rank=0, world=1, device=dev, engine=eng, data=None, collate=None, tokenizer=None,
                  tracker=None, out=Path(cfg.output_dir), total_steps=100_000, micro_per_epoch=1, start_step=0,
                  export_meta={}, stop=None, client={}, identity={}, diag=Diagnostics(cfg, eng.module), z_cache=z)
        return lambda: train_step(run, batch, 0)

    fns = {k: step_fn(k) for k in engines}
    first_loss = {k: fns[k]().loss for k in fns}  # also the warm-up step (records the ZeRO-3 fetch trace)
    blocks = {k: [] for k in fns}
    for pair in range(args.pairs):
        for k in (("fp32", "bf16") if pair % 2 == 0 else ("bf16", "fp32")):
            ts = []
            for _ in range(args.steps):
                t = time.perf_counter()
                out = fns[k]()
                ts.append(time.perf_counter() - t)
                assert out.finite, (k, out.loss)
            blocks[k].append(statistics.median(ts))
    ratios = [b / f for b, f in zip(blocks["bf16"], blocks["fp32"])]
    bb = engines["bf16"].module.backbone
    row = {"model": args.label, "model_name_or_path": args.model, "backbone_params": sum(full_numel(p) for p in bb.parameters()),
           "batch": args.batch, "seq_len": args.seq_len, "n_virtual_tokens": args.n_virtual, "method": "infoprompt",
           "ds_config": "zero3", "world_size": 1, "torch_threads": torch.get_num_threads(),
           "steps_per_block": args.steps, "pairs": args.pairs,
           "step_s_fp32_blocks": blocks["fp32"], "step_s_bf16_blocks": blocks["bf16"],
           "step_s_fp32": statistics.median(blocks["fp32"]), "step_s_bf16": statistics.median(blocks["bf16"]),
           "ratio_bf16_to_fp32_pairs": ratios, "ratio_median": statistics.median(ratios),
           "ratio_min": min(ratios), "ratio_max": max(ratios),
           "first_step_loss": first_loss, "load_s": load_s,
           "backbone_dtypes": {k: sorted({str(p.dtype) for p in e.module.backbone.parameters()}) for k, e in engines.items()},
           "matmul_flops_per_s_1024": rates, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    Path(args.out).write_text(json.dumps(row, indent=1))


def model_path(spec: str) -> str:
    if spec in ("1.1b", "300m", "tiny"):
        from bench_scale import cache_root, random_llama

        return random_llama(spec, cache_root())
    return spec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma separated, of {', '.join(MODELS)}")
    p.add_argument("--out", default=str(RESULTS / "bf16.json"))
    p.add_argument("--model_path", help="time this model folder instead (batch 2, 8 tokens, 1 step, 2 pairs: a smoke run)")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--merge", action="store_true", help="keep the rows of --out for models this call does not run")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--label", help=argparse.SUPPRESS)
    for name in ("batch", "seq_len", "n_virtual", "steps", "pairs"):
        p.add_argument(f"--{name}", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    rows, t0 = [], time.time()
    models = {"custom": (args.model_path, 2, 8, 2, 1, 2)} if args.model_path else \
        {name: MODELS[name] for name in args.models.split(",")}
    for name, (model, batch, seq_len, n_virtual, steps, pairs) in models.items():
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, __file__, "--worker", "--model", model_path(model), "--label", name, "--out", f.name,
                   "--batch", str(batch), "--seq_len", str(seq_len), "--n_virtual", str(n_virtual),
                   "--steps", str(steps), "--pairs", str(pairs)]
            t = time.time()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            if proc.returncode != 0:
                rows.append({"model": name, "returncode": proc.returncode,
                             "error": (proc.stderr or proc.stdout).strip().splitlines()[-8:]})
                print(f"[bf16] {name}: FAILED {rows[-1]['error']}", flush=True)
                continue
            row = json.loads(Path(f.name).read_text())
        row["worker_wall_s"] = time.time() - t
        rows.append(row)
        print(f"[bf16] {name}: fp32 {row['step_s_fp32']:.3f} s/step, bf16 {row['step_s_bf16']:.3f} s/step, "
              f"bf16/fp32 median {row['ratio_median']:.2f} (range {row['ratio_min']:.2f}-{row['ratio_max']:.2f}, "
              f"{row['pairs']} pairs) in {row['worker_wall_s']:.0f} s", flush=True)
    if args.merge and Path(args.out).is_file():
        done = {r["model"] for r in rows}
        kept = [r for r in json.loads(Path(args.out).read_text())["rows"] if r["model"] not in done]
        rows = sorted(kept + rows, key=lambda r: list(MODELS).index(r["model"]) if r["model"] in MODELS else 99)
    write_results(Path(args.out), {"rows": rows, "total_wall_s": time.time() - t0})
    print(markdown_table(rows))


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model (backbone params) | batch x tokens | fp32 s/step | bf16 s/step | bf16/fp32, median of pairs "
             "(range) | matmul GFLOP/s fp32 / bf16 |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "ratio_median" not in r:
            lines.append(f"| {r['model']} | failed | | | | |")
            continue
        m = r["matmul_flops_per_s_1024"]
        lines.append(f"| {r['model']} ({r['backbone_params'] / 1e6:.1f}M) | {r['batch']} x {r['n_virtual_tokens']}+"
                     f"{r['seq_len']} | {r['step_s_fp32']:.3f} | {r['step_s_bf16']:.3f} | {r['ratio_median']:.2f} "
                     f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f}, {r['pairs']} pairs) | "
                     f"{m['fp32'] / 1e9:.0f} / {m['bf16'] / 1e9:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
