"""Item 2 of issue 8: our vanilla prompt tuning vs the peer users would otherwise pick, Hugging Face PEFT
(PromptTuningConfig) trained by the HF Trainer with the same DeepSpeed ZeRO-3 json.

    python benchmarks/bench_peft.py [--pairs 3] [--warmup 3] [--steps 15]

Same backbone (MiniLM; AutoModelForSequenceClassification for PEFT, AutoModel + our head for us), same
n virtual tokens (16), same micro-batch (16), same training examples (Rotten Tomatoes, k_shot 64, seed 42,
tokenized by the project's own data code, max_length 128, dynamic padding with DataCollatorWithPadding),
same ds_configs/zero3.json (the HF Trainer fills its "auto" values itself), one rank.

Ours is the real product: `python train.py --method prompt ...`; its per-window throughput is read back
from MLflow (train/samples_per_s, logged every --warmup steps; the first window, which holds the first
steps, is dropped; evaluation only runs after the last window). PEFT: a TrainerCallback takes the time at
every on_step_end; the first --warmup steps are dropped. Both figures are wall time between step ends
(data collation, forward, backward, optimizer, logging included). The two jobs alternate as separate
processes (ours, PEFT, PEFT, ours, ...) --pairs times, and the ratio is taken per adjacent pair.
Peak memory: each process's peak RSS (ru_maxrss from wait4), i.e. what the user's job costs in all.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import MINILM, RESULTS, ROOT, summarize, write_results  # noqa: E402


def peft_worker(args) -> None:
    from infoprompt_ds.env import setup_environment

    setup_environment()  # before torch and DeepSpeed are imported
    import torch
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from transformers import (AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)

    from infoprompt_ds.config import TrainConfig
    from infoprompt_ds.data.load import prepare_data
    from infoprompt_ds.internals import full_numel
    from infoprompt_ds.method.model import load_tokenizer
    from infoprompt_ds.backbone import resolve_model_path

    cfg = TrainConfig(model_name_or_path=args.model, method="prompt", n_virtual_tokens=args.n_virtual,
                      per_device_train_batch_size=args.batch, max_length=args.max_length,
                      k_shot=None if str(args.k_shot).lower() == "none" else int(args.k_shot),
                      seed=42, output_dir=tempfile.mkdtemp(), **({"train_file": args.train_file} if args.train_file else {}))
    tok = load_tokenizer(cfg)
    data = prepare_data(cfg, tok)
    keep = [c for c in ("input_ids", "attention_mask", "token_type_ids", "labels") if c in data.splits["train"].column_names]
    train = data.splits["train"].select_columns(keep)
    on_gpu = torch.cuda.is_available() and not args.cpu
    targs = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch,
                              max_steps=args.warmup + args.steps, learning_rate=1e-2, logging_steps=10_000,
                              save_strategy="no", eval_strategy="no", report_to=[], deepspeed=args.ds_config,
                              dataloader_num_workers=0, seed=42, bf16=on_gpu, use_cpu=not on_gpu,
                              disable_tqdm=True, warmup_steps=1)
    # TrainingArguments(deepspeed=...) is alive now: from_pretrained partitions under ZeRO-3 (zero.Init).
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(args.model),
                                                               num_labels=len(data.label_names))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    model = get_peft_model(model, PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=args.n_virtual,
                                                     prompt_tuning_init=PromptTuningInit.RANDOM))
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            stamps.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            if on_gpu:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=DataCollatorWithPadding(tok),
                      callbacks=[Clock()])
    trainer.train()
    steps = [b - a for a, b in zip(stamps, stamps[1:])][args.warmup:]
    n_trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
    if int(os.environ.get("RANK", 0)) == 0:
        Path(args.out).write_text(json.dumps({
            "step_s": steps, "samples_per_s": args.batch * int(os.environ.get("WORLD_SIZE", 1)) * len(steps) / sum(steps),
            "trainable_params": n_trainable, "model_class": type(model.get_base_model()).__name__}))


def ours(args, out_dir: Path) -> dict:
    from mlflow.tracking import MlflowClient

    run_dir = out_dir / f"ours-{time.time_ns()}"
    flags = {"model_name_or_path": args.model, "method": "prompt", "n_virtual_tokens": args.n_virtual,
             "per_device_train_batch_size": args.batch, "max_length": args.max_length, "k_shot": args.k_shot,
             "seed": 42, "max_steps": args.warmup + args.steps, "logging_steps": args.warmup,
             "eval_steps": 10_000, "max_eval_samples": 16, "output_dir": run_dir, "deepspeed": args.ds_config,
             "learning_rate": 1e-2, "mlflow_experiment": "bench-peft"}
    if args.train_file:
        flags["train_file"] = args.train_file
    cmd = [sys.executable, str(ROOT / "train.py")] + [x for k, v in flags.items() for x in (f"--{k}", str(v))]
    res, rss, wall = _run(cmd, args)
    if res["rc"] != 0:
        return {"status": "failed", "command": cmd, **res}
    m = json.loads((run_dir / "metrics.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    hist = sorted((x.step, x.value) for x in client.get_metric_history(m["mlflow_run_id"], "train/samples_per_s"))
    windows = [v for s, v in hist if s > args.warmup]  # the window ending at step `warmup` holds the first steps
    # equal-sized windows: overall samples/s is the harmonic mean of the window rates
    sps = len(windows) / sum(1 / v for v in windows)
    return {"status": "ok", "impl": "ours", "command": cmd, "samples_per_s": sps, "window_samples_per_s": windows,
            "peak_rss_bytes": rss, "wall_s": wall}


def peft(args, out_dir: Path) -> dict:
    out = out_dir / f"peft-{time.time_ns()}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--out", str(out), "--model", args.model,
           "--n_virtual", str(args.n_virtual), "--batch", str(args.batch), "--max_length", str(args.max_length),
           "--k_shot", str(args.k_shot), "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--ds_config", args.ds_config] + (["--train_file", args.train_file] if args.train_file else []) \
        + (["--cpu"] if args.cpu else [])
    res, rss, wall = _run(cmd, args)
    if res["rc"] != 0 or not out.is_file():
        return {"status": "failed", "command": cmd, **res}
    w = json.loads(out.read_text())
    return {"status": "ok", "impl": "peft", "command": cmd, "samples_per_s": w["samples_per_s"],
            "step_s": summarize(w["step_s"]), "trainable_params": w["trainable_params"],
            "model_class": w["model_class"], "peak_rss_bytes": rss, "wall_s": wall}


def _run(cmd, args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.threads > 0:
        env["OMP_NUM_THREADS"] = str(args.threads)
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        text = log.read()
    tail = text.strip().splitlines()[-6:]
    if p.returncode != 0:
        print(f"[bench_peft] FAILED rc={p.returncode}: {tail}", flush=True)
    return {"rc": p.returncode, "log_tail": tail}, usage.ru_maxrss * 1024, time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=MINILM)
    ap.add_argument("--n_virtual", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max_length", type=int, default=128)
    ap.add_argument("--k_shot", default="64")
    ap.add_argument("--train_file", default=None, help="local csv instead of Rotten Tomatoes (tests)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each job on CPU (0: project default)")
    ap.add_argument("--ds_config", default=str(ROOT / "ds_configs" / "zero3.json"))
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--results", default=str(RESULTS / "peft.json"))
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.worker:
        return peft_worker(args)
    work = Path(tempfile.mkdtemp(prefix="bench_peft_"))
    t0 = time.perf_counter()
    runs, pairs = [], []
    for i in range(args.pairs):
        order = (ours, peft) if i % 2 == 0 else (peft, ours)
        got = {}
        for fn in order:
            r = fn(args, work)
            r["pair"] = i
            runs.append(r)
            got[fn.__name__] = r
            print(f"[bench_peft] pair {i} {fn.__name__}: {r['status']} "
                  f"{r.get('samples_per_s', float('nan')):.2f} samples/s, peak RSS "
                  f"{r.get('peak_rss_bytes', 0) / 2**20:.0f} MiB", flush=True)
        if all(r["status"] == "ok" for r in got.values()):
            pairs.append({"pair": i, "order": [f.__name__ for f in order],
                          "speed_ratio_ours_over_peft": got["ours"]["samples_per_s"] / got["peft"]["samples_per_s"],
                          "rss_ratio_ours_over_peft": got["ours"]["peak_rss_bytes"] / got["peft"]["peak_rss_bytes"]})
    ratios = [p["speed_ratio_ours_over_peft"] for p in pairs]
    summary = {"speed_ratio_ours_over_peft": summarize(ratios),
               "rss_ratio_ours_over_peft": summarize([p["rss_ratio_ours_over_peft"] for p in pairs]),
               "ours_samples_per_s": summarize([r["samples_per_s"] for r in runs if r["status"] == "ok" and r["impl"] == "ours"]),
               "peft_samples_per_s": summarize([r["samples_per_s"] for r in runs if r["status"] == "ok" and r["impl"] == "peft"]),
               "ours_peak_rss_mib": summarize([r["peak_rss_bytes"] / 2**20 for r in runs if r["status"] == "ok" and r["impl"] == "ours"]),
               "peft_peak_rss_mib": summarize([r["peak_rss_bytes"] / 2**20 for r in runs if r["status"] == "ok" and r["impl"] == "peft"])}
    write_results(Path(args.results), {"benchmark": "peft", "settings": {k: v for k, v in vars(args).items()
                                                                      if k not in ("worker", "out")},
                                       "wall_s_total": time.perf_counter() - t0, "summary": summary,
                                       "pairs": pairs, "runs": runs})
    print(json.dumps(summary, indent=1))
    print(f"[bench_peft] wrote {args.results}")


if __name__ == "__main__":
    main()
