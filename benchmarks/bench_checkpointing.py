"""--gradient_checkpointing across ZeRO stages and ranks (issue 31, item 1): for each cell a pair of runs, without
and with checkpointing, through the real launcher (benchmarks/gather_rank.py around train.py). Records per pair
the per-step train/loss of both and the largest difference of the losses and the exported tensors (the
acceptance: <= 1e-5), and per rank the all-gathers (calls and bytes) by phase: under ZeRO-3 the recomputed
forward gathers each layer's weights again, in the backward phase.

    python benchmarks/bench_checkpointing.py            # -> benchmarks/results/checkpointing.json

Cells: a tiny random Llama (decoder) on ZeRO-2/3 x 1/2 ranks, a tiny random BERT (encoder) on ZeRO-2 1 rank and
ZeRO-3 2 ranks, SmolLM2-135M (real weights, 30 layers) on ZeRO-3 2 ranks for a realistic gather count.
Synthetic two-class set, 3 steps, fp32 on CPU. A few minutes per cell on a loaded 2-core machine.
InfoPrompt (the default method) under ZeRO-3; vanilla prompt tuning under ZeRO-2, where InfoPrompt's
gradient diagnostics crash DeepSpeed 0.19.8 with or without checkpointing (IndexError in reduce_ipg_grads at
the first logging step; docs/benchmarks.md). `--merge` keeps the cells of the results file not re-run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from bench_scale import FILLER, NEG, POS, SMOLLM2, cache_root, free_port, random_llama, write_data  # noqa: E402
from common import RESULTS, ROOT, write_results  # noqa: E402

CELLS = [("llama-tiny", "zero2", 1), ("llama-tiny", "zero2", 2), ("llama-tiny", "zero3", 1), ("llama-tiny", "zero3", 2),
         ("bert-tiny", "zero2", 1), ("bert-tiny", "zero3", 2), ("smollm2-135m", "zero3", 2)]


def random_bert(cache: Path) -> str:
    """A 2-layer, 32-wide random BERT with a word-level vocabulary (the test fixture's shape)."""
    out = cache / "scale" / "bert-tiny-random"
    if (out / "DONE").is_file():
        return str(out)
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    tmp = Path(tempfile.mkdtemp(dir=cache))
    (tmp / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                             + sorted(set(POS + NEG + FILLER))) + "\n")
    tok = BertTokenizer(vocab=str(tmp / "vocab.txt"))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "DONE").write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return str(out)


def model_path(name: str) -> str:
    return {"llama-tiny": lambda: random_llama("tiny", cache_root()), "bert-tiny": lambda: random_bert(cache_root()),
            "smollm2-135m": lambda: SMOLLM2}[name]()


def run(model: str, ds: str, world: int, ckpt: bool, data: dict, work: Path, args) -> dict:
    out, counts = work / "run", work / "gathers"
    shutil.rmtree(work, ignore_errors=True)
    flags = {"model_name_or_path": model, **data, "label_words": "pos=good,neg=bad", "k_shot": "none",
             "deepspeed": ds, "output_dir": str(out), "n_virtual_tokens": 8, "max_length": 32,
             "per_device_train_batch_size": args.batch, "per_device_eval_batch_size": 8, "max_steps": args.steps,
             "logging_steps": 1, "eval_steps": args.steps, "learning_rate": 0.01, "mlflow_experiment": "ckpt",
             "gradient_checkpointing": str(ckpt).lower(), "method": "prompt" if ds == "zero2" else "infoprompt"}
    launcher = [sys.executable] if world == 1 else ["deepspeed", "--num_gpus", str(world), "--master_port",
                                                    str(free_port())]
    cmd = launcher + [str(HERE / "gather_rank.py")] + [x for k, v in flags.items() for x in (f"--{k}", str(v))]
    env = {**os.environ, "GATHER_COUNT_DIR": str(counts), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    t = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    row = {"gradient_checkpointing": ckpt, "returncode": proc.returncode, "job_wall_s": time.time() - t,
           "command": " ".join(cmd)}
    if proc.returncode != 0:
        row["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
        return row
    import mlflow
    from safetensors.torch import load_file

    run_id = json.loads((out / "metrics.json").read_text())["mlflow_run_id"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    row["train_loss"] = [m.value for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)]
    row["ranks"] = [json.loads((counts / f"rank{r}.json").read_text()) for r in range(world)]
    row["_export"] = load_file(str(out / "export" / "infoprompt.safetensors"))
    return row


def pair(name: str, ds: str, world: int, data: dict, work: Path, args) -> dict:
    model = model_path(name)
    plain = run(model, ds, world, False, data, work / "plain", args)
    ckpt = run(model, ds, world, True, data, work / "ckpt", args)
    cell = {"cell": f"{name}-{ds}-{world}", "model": name, "ds_config": ds, "world_size": world, "steps": args.steps,
            "method": "prompt" if ds == "zero2" else "infoprompt",
            "plain": plain, "checkpointed": ckpt}
    if plain["returncode"] or ckpt["returncode"]:
        print(f"[ckpt] {cell['cell']}: FAILED {plain.get('error') or ckpt.get('error')}", flush=True)
        return cell
    ea, eb = plain.pop("_export"), ckpt.pop("_export")
    cell["max_abs_loss_diff"] = max(abs(a - b) for a, b in zip(plain["train_loss"], ckpt["train_loss"]))
    cell["max_abs_export_diff"] = max((ea[k] - eb[k]).abs().max().item() for k in ea)
    cell["equal_within_1e-5"] = cell["max_abs_loss_diff"] <= 1e-5 and cell["max_abs_export_diff"] <= 1e-5
    r0p, r0c = plain["ranks"][0]["gathers"], ckpt["ranks"][0]["gathers"]
    per_step = {}
    for phase in ("forward", "backward"):
        for key in ("calls", "bytes"):
            a, b = r0p.get(phase, {}).get(key, 0), r0c.get(phase, {}).get(key, 0)
            per_step[f"{phase}_{key}_plain"], per_step[f"{phase}_{key}_ckpt"] = a / args.steps, b / args.steps
    cell["rank0_gathers_per_step"] = per_step
    cell["extra_gathers_per_step"] = per_step["backward_calls_ckpt"] - per_step["backward_calls_plain"]
    cell["extra_gathered_bytes_per_step"] = per_step["backward_bytes_ckpt"] - per_step["backward_bytes_plain"]
    cell["peak_rss_bytes_rank0"] = {"plain": plain["ranks"][0]["peak_rss_bytes"],
                                    "checkpointed": ckpt["ranks"][0]["peak_rss_bytes"]}
    print(f"[ckpt] {cell['cell']}: loss diff {cell['max_abs_loss_diff']:.2e}, export diff "
          f"{cell['max_abs_export_diff']:.2e}; rank-0 all-gathers per step fwd {per_step['forward_calls_plain']:.0f}, "
          f"bwd {per_step['backward_calls_plain']:.0f} -> {per_step['backward_calls_ckpt']:.0f} "
          f"(+{cell['extra_gathered_bytes_per_step'] / 2**20:.2f} MiB)", flush=True)
    return cell


def markdown_table(cells: list[dict]) -> str:
    lines = ["| cell | loss / export max diff | all-gathers per step, rank 0: forward, backward plain -> checkpointed "
             "| extra gathered per step |", "|---|---|---|---|"]
    for c in cells:
        if "rank0_gathers_per_step" not in c:
            lines.append(f"| {c['cell']} | failed | | |")
            continue
        g = c["rank0_gathers_per_step"]
        lines.append(f"| {c['cell']} | {c['max_abs_loss_diff']:.1e} / {c['max_abs_export_diff']:.1e} | "
                     f"{g['forward_calls_plain']:.0f}, {g['backward_calls_plain']:.0f} -> {g['backward_calls_ckpt']:.0f} "
                     f"| {c['extra_gathers_per_step']:.0f} calls, {c['extra_gathered_bytes_per_step'] / 2**20:.2f} MiB |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", default=",".join(f"{m}:{d}:{w}" for m, d, w in CELLS),
                   help="model:ds_config:ranks, comma separated")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--timeout", type=int, default=1200)
    p.add_argument("--out", default=str(RESULTS / "checkpointing.json"))
    p.add_argument("--merge", action="store_true", help="keep the cells of --out that this call does not run")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    data = write_data(work)
    cells = []
    try:
        for spec in args.cells.split(","):
            name, ds, world = spec.split(":")
            cells.append(pair(name, ds, int(world), data, work / spec.replace(":", "-"), args))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.merge and Path(args.out).is_file():
        done = {c["cell"] for c in cells}
        kept = [c for c in json.loads(Path(args.out).read_text())["cells"] if c["cell"] not in done]
        order = [f"{m}-{d}-{w}" for m, d, w in CELLS]
        cells = sorted(kept + cells, key=lambda c: order.index(c["cell"]) if c["cell"] in order else len(order))
    write_results(Path(args.out), {"cells": cells})
    print(markdown_table(cells))


if __name__ == "__main__":
    main()
