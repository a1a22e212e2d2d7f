"""Cost vs backbone size: the real train.py on a 135M and a 1.1B-parameter decoder, ZeRO-3 on 1 and 2
ranks and ZeRO-3 + CPU offload on 2 ranks, InfoPrompt and vanilla prompt tuning (issue 17).

    python benchmarks/bench_scale.py                  # SmolLM2-135M + random 1.1B Llama -> results/scale.{json,csv,png}
    python benchmarks/bench_scale.py --tiny --out DIR # a 2-layer random Llama, for the test

Each cell is one `train.py` job (through benchmarks/scale_rank.py, which adds each rank's peak RSS and
load time) with a tiny synthetic sentiment set: max_length 32, batch 2 per rank, 3 steps, eval on 8
examples. Per cell it records: the backbone elements and bytes each rank holds (output_dir/ranks/*.json)
and that share of the full model, peak RSS per rank, load time (process start -> engine ready), median
step time (from MLflow's train/samples_per_s, step 1 dropped), the DeepSpeed checkpoint's size and how
many frozen-backbone tensors it holds (must be 0), and the exact command. Cells run one after another.

The 1.1B model is a LlamaModel with TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads, 4 KV heads,
intermediate 5632, vocab 32000) and random weights, saved once in bf16 (2.1 GiB) under
$INFOPROMPT_CACHE/scale/ with a 32000-entry word-level tokenizer; it is never committed. Training computes
in fp32 on CPU (no bf16 matmul units on this machine), so each rank holds its share at 4 bytes/param.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import RESULTS, ROOT, summarize, write_results  # noqa: E402

# name -> LlamaConfig fields. "1.1b" = TinyLlama-1.1B's shape; "tiny" = the test fixture's scale.
SHAPES = {
    "1.1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                 intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048),
    # a stand-in between the two (304M backbone): to see how per-rank memory scales with ranks cheaply
    "300m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=4,
                 intermediate_size=2816, vocab_size=32000, max_position_embeddings=2048),
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                 intermediate_size=64, vocab_size=256, max_position_embeddings=128),
}
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
POS, NEG = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "sad"]
FILLER = "the a movie film plot actor scene story was is very quite this that it and but so".split()
GRID = "zero3:1,zero3:2,zero3_offload:2"  # ds_configs/<name>.json : ranks


def cache_root() -> Path:
    return Path(os.environ.get("INFOPROMPT_CACHE", Path.home() / ".cache" / "infoprompt_ds"))


def random_llama(shape: str, cache: Path) -> str:
    """A random-weight LlamaModel of `shape`, saved once in bf16 with a word-level tokenizer whose
    vocabulary is the sentiment words plus filler entries up to vocab_size (so ids never exceed it)."""
    out = cache / "scale" / f"llama-{shape}-random"
    if (out / "DONE").is_file():
        return str(out)
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    fields = SHAPES[shape]
    words = ["<unk>", "<pad>", "</s>"] + sorted(set(POS + NEG + FILLER))
    words += [f"<w{i}>" for i in range(fields["vocab_size"] - len(words))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    config = LlamaConfig(**fields, pad_token_id=1, eos_token_id=2, bos_token_id=2)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built and initialised in bf16: half the memory of fp32
    try:
        model = LlamaModel(config)
    finally:
        torch.set_default_dtype(torch.float32)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # Small weight files: under ZeRO-3 every rank reads each file whole before taking its 1/N, so the
    # largest file sets each rank's load-time peak (one 2 GB file OOM-killed the 2-rank runs here).
    model.save_pretrained(tmp, max_shard_size="200MB")
    tok.save_pretrained(tmp)
    (tmp / "DONE").write_text(f"{sum(p.numel() for p in model.parameters())} parameters\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return str(out)


def write_data(work: Path) -> dict[str, str]:
    """A synthetic sentiment set (the label is one word): 16 train, 8 validation, 8 test rows."""
    files = {}
    for split, n, seed in (("train", 8, 0), ("validation", 4, 1), ("test", 4, 2)):
        rng = random.Random(seed)
        rows = []
        for label, words in (("pos", POS), ("neg", NEG)):
            for _ in range(n):
                toks = [rng.choice(FILLER) for _ in range(rng.randint(6, 16))]
                toks.insert(rng.randrange(len(toks) + 1), rng.choice(words))
                rows.append({"text": " ".join(toks), "label": label})
        rng.shuffle(rows)
        path = work / f"{split}.csv"
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["text", "label"])
            w.writeheader()
            w.writerows(rows)
        files[f"{split}_file"] = str(path)
    return files


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cell_command(model: str, ds: str, world: int, method: str, data: dict[str, str], out: Path,
                 args) -> list[str]:
    launcher = [sys.executable] if world == 1 else \
        ["deepspeed", "--num_gpus", str(world), "--master_port", str(free_port())]
    flags = {"model_name_or_path": model, **data, "label_words": "pos=good,neg=bad", "k_shot": "none",
             "method": method, "deepspeed": str(ROOT / "ds_configs" / f"{ds}.json"), "output_dir": str(out),
             "n_virtual_tokens": args.n_virtual_tokens, "max_length": args.max_length,
             "per_device_train_batch_size": args.batch, "per_device_eval_batch_size": 8,
             "max_steps": args.steps, "logging_steps": 1, "eval_steps": args.steps, "learning_rate": 0.01,
             "mlflow_experiment": "scale", "overwrite_output_dir": "true"}
    if args.bf16:
        flags["bf16"] = "true"
    return launcher + [str(HERE / "scale_rank.py")] + [x for k, v in flags.items() for x in (f"--{k}", str(v))]


def step_times(out: Path, run_id: str, global_batch: int) -> list[float]:
    """Seconds per optimizer step from the run's own train/samples_per_s (logged every step)."""
    from mlflow.tracking import MlflowClient

    from infoprompt_ds.tracking.store import default_store

    client = MlflowClient(tracking_uri=default_store(out).uri)  # where the run logged (its output_dir)
    hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/samples_per_s"))
    return [global_batch / v for _, v in hist]


def checkpoint_audit(out: Path) -> dict:
    """Size of the DeepSpeed checkpoint and the number of frozen-backbone tensors with data in it."""
    import torch

    tags = [d for d in (out / "checkpoints").iterdir() if d.is_dir()] if (out / "checkpoints").is_dir() else []
    if not tags:
        return {"checkpoint_bytes": None, "checkpoint_backbone_tensors": None}
    tag = max(tags, key=lambda d: d.stat().st_mtime)
    size = sum(p.stat().st_size for p in tag.rglob("*") if p.is_file())
    backbone = 0
    for path in tag.glob("*model_states.pt"):  # our own run's files, read back to audit them
        state = torch.load(path, map_location="cpu", weights_only=False)
        backbone += sum(1 for k, v in (state.get("module") or {}).items()
                        if k.startswith("backbone.") and hasattr(v, "numel") and v.numel() > 0)
    export = out / "export"
    return {"checkpoint": str(tag), "checkpoint_bytes": size, "checkpoint_backbone_tensors": backbone,
            "export_bytes": sum(p.stat().st_size for p in export.rglob("*") if p.is_file()) if export.is_dir() else None}


def run_cell(name: str, model: str, params_hint: str, ds: str, world: int, method: str, data, work: Path,
             args) -> dict:
    cell_dir = work / name
    out, probe = cell_dir / "run", cell_dir / "probe"
    shutil.rmtree(cell_dir, ignore_errors=True)
    probe.mkdir(parents=True)
    cmd = cell_command(model, ds, world, method, data, out, args)
    env = {**os.environ, "SCALE_PROBE_DIR": str(probe), "OMP_NUM_THREADS": str(args.threads),
           "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    print(f"[scale] {name}: {' '.join(cmd)}", flush=True)
    t = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0 and "EADDRINUSE" in proc.stderr + proc.stdout:  # the free port was taken meanwhile
        cmd = cell_command(model, ds, world, method, data, out, args)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.time() - t
    (cell_dir / "log.txt").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    row = {"cell": name, "model": params_hint, "model_path": model, "ds_config": ds, "world_size": world,
           "method": method, "returncode": proc.returncode, "job_wall_s": wall, "command": " ".join(cmd),
           "threads_per_rank": args.threads, "compute_dtype": "bfloat16" if args.bf16 else "float32",
           "bytes_per_param": 2 if args.bf16 else 4, "device": "cuda" if _cuda() else "cpu"}
    if proc.returncode != 0:
        row["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        print(f"[scale] {name} FAILED rc={proc.returncode}: {row['error']}", flush=True)
        return row
    ranks = []
    for r in range(world):
        shard = json.loads((out / "ranks" / f"rank{r}.json").read_text())
        probe_row = json.loads((probe / f"rank{r}.json").read_text())
        ranks.append({**shard, **probe_row, "backbone_bytes_local": shard["backbone_params_local"] * row["bytes_per_param"],
                      "backbone_fraction": shard["backbone_params_local"] / shard["backbone_params_total"]})
    metrics = json.loads((out / "metrics.json").read_text())
    steps = step_times(out, metrics["mlflow_run_id"], args.batch * world)
    row.update({"ranks": ranks, "backbone_params_total": ranks[0]["backbone_params_total"],
                "backbone_bytes_total": ranks[0]["backbone_params_total"] * row["bytes_per_param"],
                "backbone_fraction_max": max(r["backbone_fraction"] for r in ranks),
                "backbone_fraction_goal": 1 / world + 0.05,
                "peak_rss_bytes_max": max(r["peak_rss_bytes"] for r in ranks),
                "load_s_max": max(r["load_s"] for r in ranks if r["load_s"] is not None),
                "step_s_all": steps, "step_s": summarize(steps[1:] or steps)["median"],
                "test_accuracy": metrics["test"].get("accuracy"), **checkpoint_audit(out)})
    print(f"[scale] {name}: backbone share {row['backbone_fraction_max']:.3f} (goal <= "
          f"{row['backbone_fraction_goal']:.3f}), peak RSS {row['peak_rss_bytes_max'] / 2**30:.2f} GiB, "
          f"load {row['load_s_max']:.0f} s, step {row['step_s']:.2f} s, checkpoint "
          f"{row['checkpoint_bytes'] / 2**20:.2f} MiB ({row['checkpoint_backbone_tensors']} backbone tensors)",
          flush=True)
    if not args.keep:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return row


CSV_FIELDS = ["cell", "model", "backbone_params_total", "ds_config", "world_size", "method", "returncode",
              "backbone_fraction_max", "backbone_fraction_goal", "peak_rss_bytes_max", "load_s_max", "step_s",
              "checkpoint_bytes", "checkpoint_backbone_tensors", "export_bytes", "job_wall_s", "command"]


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["returncode"] == 0]
    models = sorted({r["model"] for r in ok}, key=lambda m: min(r["backbone_params_total"] for r in ok if r["model"] == m))
    setups = sorted({(r["ds_config"], r["world_size"], r["method"]) for r in ok})
    panels = [("backbone held per rank (GiB)", lambda r: max(x["backbone_bytes_local"] for x in r["ranks"]) / 2**30),
              ("peak RSS per rank (GiB)", lambda r: r["peak_rss_bytes_max"] / 2**30),
              ("step time (s)", lambda r: r["step_s"]),
              ("load time (s)", lambda r: r["load_s_max"])]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.5))
    width = 0.8 / max(1, len(setups))
    for ax, (title, get) in zip(axes, panels):
        for j, s in enumerate(setups):
            ys = [next((get(r) for r in ok if (r["ds_config"], r["world_size"], r["method"]) == s and r["model"] == m),
                       0.0) for m in models]
            ax.bar([i + j * width for i in range(len(models))], ys, width, label=f"{s[0]} x{s[1]} {s[2]}")
        ax.set_xticks([i + width * (len(setups) - 1) / 2 for i in range(len(models))])
        ax.set_xticklabels(models)
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"InfoPrompt / prompt tuning cost vs backbone size ({ok[0]['compute_dtype'] if ok else ''}, "
                 f"batch 2/rank, max_length 32; {'GPU' if ok and ok[0].get('device') == 'cuda' else 'CPU'})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown_table(rows: list[dict]) -> str:
    """The docs/scaling.md table: one line per cell."""
    out = ["| model (backbone params) | DeepSpeed json | ranks | method | backbone held per rank (share; goal <= 1/N + 5%) "
           "| peak RSS per rank | peak anon, training | load | step | checkpoint (backbone tensors) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r.get("backbone_params_total") or 0, r["model"], r["ds_config"],
                                         r["world_size"], r["method"])):
        if r["returncode"] != 0:
            out.append(f"| {r['model']} | {r['ds_config']} | {r['world_size']} | {r['method']} | failed: "
                       f"{str(r.get('error', ''))[-120:]} | | | | | |")
            continue
        held = max(x["backbone_bytes_local"] for x in r["ranks"]) / 2**30
        rss = " / ".join(f"{x['peak_rss_bytes'] / 2**30:.2f}" for x in r["ranks"])
        anon = " / ".join(f"{x['peak_anon_bytes_train'] / 2**30:.2f}" if x.get("peak_anon_bytes_train") else "-"
                          for x in r["ranks"])  # older cells were measured before scale_rank.py sampled it
        out.append(f"| {r['model']} ({r['backbone_params_total'] / 1e6:.0f}M) | {r['ds_config']} | {r['world_size']} "
                   f"| {r['method']} | {held:.2f} GiB ({r['backbone_fraction_max']:.3f}) | {rss} GiB | {anon} GiB "
                   f"| {r['load_s_max']:.0f} s | {r['step_s']:.1f} s | {r['checkpoint_bytes'] / 2**20:.2f} MiB "
                   f"({r['checkpoint_backbone_tensors']}) |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer random Llama only (the test)")
    ap.add_argument("--models", default="smollm2,1.1b", help="smollm2 | 1.1b | tiny | a folder")
    ap.add_argument("--grid", default=GRID, help="ds_config:ranks, comma-separated")
    ap.add_argument("--methods", default="infoprompt,prompt")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--max_length", type=int, default=32)
    ap.add_argument("--n_virtual_tokens", type=int, default=8)
    ap.add_argument("--bf16", action="store_true", help="train in bf16 (GPU); default fp32 (CPU)")
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    ap.add_argument("--timeout", type=int, default=3600, help="per cell, seconds")
    ap.add_argument("--out", default=str(RESULTS), help="folder for scale[_tiny].{json,csv,png}")
    ap.add_argument("--work", default=None, help="scratch folder for the runs (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--resume", action="store_true", help="reuse the successful cells of an existing results file")
    ap.add_argument("--replot", default=None, help="only redraw the PNG of an existing results json and print its table")
    args = ap.parse_args(argv)
    if args.replot:
        rows = json.loads(Path(args.replot).read_text())["cells"]
        plot(rows, Path(args.replot).with_suffix(".png"))
        print(markdown_table(rows))
        return 0
    if args.tiny:
        args.models = "tiny"
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    data = write_data(work)
    models = []
    for m in args.models.split(","):
        if m == "smollm2":
            models.append(("smollm2-135m", SMOLLM2))  # train.py resolves the name (GGUF cache)
        elif m in SHAPES:
            models.append((f"llama-{m}-random", random_llama(m, cache_root())))
        else:
            models.append((Path(m).name, m))
    out = Path(args.out)
    stem = "scale_tiny" if args.tiny else "scale"
    done = {}
    if args.resume and (out / f"{stem}.json").is_file():  # keep the finished cells of an earlier run
        done = {r["cell"]: r for r in json.loads((out / f"{stem}.json").read_text())["cells"] if r["returncode"] == 0}
    grid = {f"{label}-{spec.replace(':', '-w')}-{method}" for label, _ in models for spec in args.grid.split(",")
            for method in args.methods.split(",")}
    rows = []  # an earlier run's other cells (not in this grid) stay in the file
    for label, model in models:
        for spec in args.grid.split(","):
            ds, world = spec.split(":")
            for method in args.methods.split(","):
                name = f"{label}-{ds}-w{world}-{method}"
                rows.append(done.get(name) or run_cell(name, model, label, ds, int(world), method, data, work, args))
                rows += [r for c, r in done.items() if c not in {x["cell"] for x in rows} and c not in grid]
                # after every cell: a long grid stopped half-way still leaves its finished cells
                write_results(out / f"{stem}.json", {"settings": {k: v for k, v in vars(args).items() if k != "out"},
                                                     "cells": rows})
                write_csv(out / f"{stem}.csv", rows)
    plot(rows, out / f"{stem}.png")
    print(json.dumps({"results": str(out / f"{stem}.json"), "failed": [r["cell"] for r in rows if r["returncode"]]}))
    return 1 if any(r["returncode"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
