"""Item 2 of issue 8: our vanilla prompt tuning vs the peer users would otherwise pick, Hugging Face PEFT
(PromptTuningConfig) trained by the HF Trainer with the same DeepSpeed ZeRO-3 json.

    python benchmarks/bench_peft.py [--min_pairs 3] [--max_pairs 8] [--budget_s 660] [--warmup 3] [--steps 15]

Same backbone (MiniLM by default; --model HuggingFaceTB/SmolLM2-135M-Instruct for the decoder), the same
read-out as our default for it: MiniLM -> readout linear, PEFT's AutoModelForSequenceClassification (SEQ_CLS)
against our AutoModel + head; SmolLM2 -> readout lm_label, PEFT's causal-LM tutorial recipe
(AutoModelForCausalLM, CAUSAL_LM, the answer token's LM loss: benchmarks/peft_prompt.py's) against ours
(the C label rows of the LM head at the last token). Same
n virtual tokens (16), same micro-batch (16), same training examples (Rotten Tomatoes, k_shot 64, seed 42,
tokenized by the project's own data code, max_length 128, dynamic padding with DataCollatorWithPadding),
same ds_configs/zero3.json (the HF Trainer fills its "auto" values itself), one rank.

Ours is the real product: `python train.py --method prompt ...`; its per-window throughput is read back
from MLflow (train/samples_per_s, logged every --warmup steps; the first window, which holds the first
steps, is dropped; evaluation only runs after the last window). PEFT: a TrainerCallback takes the time at
every on_step_end; the first --warmup steps are dropped. Both figures are wall time between step ends
(data collation, forward, backward, optimizer, logging included). The two jobs alternate as separate
processes, one round = ours and each PEFT arm, the order reversed every round, and the ratios are taken
per round. Rounds continue until the distribution-free 95% interval of each ratio's median (order statistics
of the rounds' ratios) is within +-0.1 of the median, at least --min_pairs and at most --max_pairs rounds,
and no new round starts once --budget_s has passed (a shared machine: the file says which stop applied).
Peak memory: each process's peak RSS (ru_maxrss from wait4), i.e. what the user's job costs in all.

Arms (issue 37): ours = train.py's defaults for this job (fp32 here, the default data order); ours_best = the
same with --bf16 true --group_by_length true (PEFT-best's two switches; not in the default --arms); peft = PEFT +
the Trainer with their defaults (fp32 on CPU, random order); peft_best = the same with the best the Trainer
offers here: length-grouped batches (group_by_length=True; transformers 5 spells it
train_sampling_strategy="group_by_length") and bf16=True (this CPU has avx512_bf16; on a GPU bf16 as well).

Evaluation (item 6 of issue 37): each job evaluates --eval_samples validation examples once, after its last
step (ours: --eval_steps past the end and --eval_on_start false, so only that pass; eval/examples_per_s, which
every run logs to MLflow; PEFT: trainer.evaluate on the same split, timed around the call). Eval batch: ours
64 (our default, length-sorted); PEFT-default the Trainer's 8; PEFT-best 64. Ratios eval_speed_ratio_*.

FLOP/s (our arms): 4·N·(useful positions per second), N = the backbone's parameters without the input
embedding matrix, useful positions = real tokens + virtual tokens (read from the run's train/tokens_per_s;
padding is computed but not counted, so less padding shows as more useful FLOP/s); the fraction is of the
best n x n matmul peak (fp32 for ours, bf16 for ours_best) on the jobs' thread count, taken before and after
the rounds in this process.
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
from common import MINILM, RESULTS, ROOT, matmul_peak, summarize, write_results  # noqa: E402


def peft_worker(args) -> None:
    from infoprompt_ds.env import setup_environment

    setup_environment()  # before torch and DeepSpeed are imported
    import torch
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, DataCollatorForSeq2Seq,
                              DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments)

    from infoprompt_ds.config_load import parse_config
    from infoprompt_ds.data.load import prepare_data
    from infoprompt_ds.internals import full_numel
    from infoprompt_ds.method.model import load_model_config, load_tokenizer
    from infoprompt_ds.backbone import resolve_model_path
    from infoprompt_ds.data.readout import first_token
    from peft_prompt import IGNORE, label_word_logits, lm_label_split  # the study's PEFT arm: the same causal-LM recipe

    # our job's own flags through train.py's parser: the same data, k-shot sample, label words and eval split
    cfg = parse_config(argv_of(job_flags(args, Path(tempfile.mkdtemp()))))
    tok = load_tokenizer(cfg)
    data = prepare_data(cfg, tok, load_model_config(cfg))
    # our readout for this backbone (auto): linear -> PEFT's SEQ_CLS; lm_label (decoders with an LM head,
    # e.g. SmolLM2) -> PEFT's CAUSAL_LM tutorial recipe, the answer token's LM loss (peft_prompt.py)
    causal = data.readout.kind == "lm_label"
    keep = [c for c in ("input_ids", "attention_mask", "token_type_ids", "labels")
            if c in data.splits["train"].column_names and not (causal and c == "token_type_ids")]
    train, val = (data.splits[k].select_columns(keep) for k in ("train", "validation"))
    word_ids = [first_token(tok, w) for w in data.task.words()] if causal else []
    if causal:
        train, val = lm_label_split(train, word_ids), lm_label_split(val, word_ids)
    on_gpu = torch.cuda.is_available() and not args.cpu
    targs = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch,
                              max_steps=args.warmup + args.steps, learning_rate=1e-2, logging_steps=10_000,
                              save_strategy="no", eval_strategy="no", report_to=[], deepspeed=args.ds_config,
                              dataloader_num_workers=0, seed=42, bf16=on_gpu or args.bf16, use_cpu=not on_gpu,
                              disable_tqdm=True, warmup_steps=1,
                              # eval: the Trainer's default batch (8) for PEFT-default, ours (64) for PEFT-best
                              per_device_eval_batch_size=64 if args.bf16 else 8,
                              # transformers 5's name for the Trainer's group_by_length=True
                              train_sampling_strategy="group_by_length" if args.group_by_length else "random")
    # TrainingArguments(deepspeed=...) is alive now: from_pretrained partitions under ZeRO-3 (zero.Init).
    if causal:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.model))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(args.model),
                                                                   num_labels=len(data.label_names))
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
    model = get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM if causal else TaskType.SEQ_CLS,
                                                     num_virtual_tokens=args.n_virtual,
                                                     prompt_tuning_init=PromptTuningInit.RANDOM))
    if targs.bf16:
        # The prompt PEFT adds after from_pretrained is fp32 while zero.Init made the rest bf16, and DeepSpeed's
        # ZeRO-3 optimizer refuses mixed dtypes (zero/utils.py defragment): the one line a user adds for bf16.
        model.prompt_encoder.to(torch.bfloat16)
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            stamps.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            if on_gpu:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    collate = DataCollatorForSeq2Seq(tok, label_pad_token_id=IGNORE) if causal else DataCollatorWithPadding(tok)
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=collate, callbacks=[Clock()],
                      # what peft_prompt.py (the study's arm) does for a causal LM: the label words' logits
                      # only, not (B, T, vocab) per batch
                      preprocess_logits_for_metrics=label_word_logits(word_ids) if causal else None)
    trainer.train()
    t = time.perf_counter()
    trainer.evaluate(val)  # the validation split our run evaluates (max_eval_samples), after training
    eval_s = time.perf_counter() - t
    steps = [b - a for a, b in zip(stamps, stamps[1:])][args.warmup:]
    n_trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
    if int(os.environ.get("RANK", 0)) == 0:
        Path(args.out).write_text(json.dumps({
            "step_s": steps, "samples_per_s": args.batch * int(os.environ.get("WORLD_SIZE", 1)) * len(steps) / sum(steps),
            "trainable_params": n_trainable, "model_class": type(model.get_base_model()).__name__,
            "peft_task_type": "CAUSAL_LM" if causal else "SEQ_CLS",
            "eval_examples_per_s": len(val) / eval_s, "eval_batch": targs.per_device_eval_batch_size,
            "bf16": targs.bf16, "group_by_length": targs.train_sampling_strategy == "group_by_length"}))


def job_flags(args, run_dir: Path) -> dict:
    """train.py's flags for this job: our arms' command line, and what the PEFT worker parses its data from."""
    flags = {"model_name_or_path": args.model, "method": "prompt", "n_virtual_tokens": args.n_virtual,
             "per_device_train_batch_size": args.batch, "max_length": args.max_length, "k_shot": args.k_shot,
             "seed": 42, "max_steps": args.warmup + args.steps, "logging_steps": args.warmup,
             "eval_steps": 10_000, "max_eval_samples": args.eval_samples, "output_dir": run_dir,
             "deepspeed": args.ds_config, "eval_on_start": "false",
             "learning_rate": 1e-2, "mlflow_experiment": "bench-peft"}
    if args.train_file:
        flags["train_file"] = args.train_file
    if args.label_words:
        flags["label_words"] = args.label_words
    return flags


def argv_of(flags: dict) -> list[str]:
    return [x for k, v in flags.items() for x in (f"--{k}", str(v))]


def ours(args, out_dir: Path, best: bool = False) -> dict:
    from mlflow.tracking import MlflowClient

    run_dir = out_dir / f"ours-{time.time_ns()}"
    flags = job_flags(args, run_dir)
    if best:  # the same two switches PEFT-best gets from the Trainer
        flags.update(bf16="true", group_by_length="true")
    cmd = [sys.executable, str(ROOT / "train.py")] + argv_of(flags)
    res, rss, wall = _run(cmd, args)
    if res["rc"] != 0:
        return {"status": "failed", "command": cmd, **res}
    m = json.loads((run_dir / "metrics.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    hist = sorted((x.step, x.value) for x in client.get_metric_history(m["mlflow_run_id"], "train/samples_per_s"))
    windows = [v for s, v in hist if s > args.warmup]  # the window ending at step `warmup` holds the first steps
    # equal-sized windows: overall samples/s is the harmonic mean of the window rates
    sps = len(windows) / sum(1 / v for v in windows)
    toks = [v for s, v in sorted((x.step, x.value) for x in client.get_metric_history(m["mlflow_run_id"],
                                                                                     "train/tokens_per_s"))
            if s > args.warmup]
    # useful positions per second: the real tokens and the virtual ones (padding is computed but not counted),
    # time-weighted over the windows like sps; FLOP/s = 4·N·positions/s (docs/benchmarks.md §3's 4NT)
    positions_s = sum(t / v for t, v in zip(toks, windows)) / sum(1 / v for v in windows) + args.n_virtual * sps
    # the validation pass after the last step (eval_steps > max_steps: that one only), as the PEFT worker's
    eval_sps = client.get_metric_history(m["mlflow_run_id"], "eval/examples_per_s")[-1].value
    return {"status": "ok", "impl": "ours_best" if best else "ours", "command": cmd, "samples_per_s": sps,
            "window_samples_per_s": windows, "useful_positions_per_s": positions_s,
            "achieved_flops_per_s": 4 * args.n_matmul * positions_s, "eval_examples_per_s": eval_sps,
            "peak_rss_bytes": rss, "wall_s": wall}


# what defines the job both arms run (the worker gets them all; job_flags turns them into train.py's flags)
JOB_ARGS = ("model", "n_virtual", "batch", "max_length", "k_shot", "train_file", "label_words", "eval_samples",
            "warmup", "steps", "ds_config")


def peft(args, out_dir: Path, best: bool = False) -> dict:
    out = out_dir / f"peft-{time.time_ns()}.json"
    # the job's arguments forwarded by name, all of them: a hand-written list once left out --eval_samples
    job = {k: getattr(args, k) for k in JOB_ARGS if getattr(args, k) is not None}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--out", str(out)] + argv_of(job) \
        + (["--cpu"] if args.cpu else []) + (["--bf16", "--group_by_length"] if best else [])
    res, rss, wall = _run(cmd, args)
    if res["rc"] != 0 or not out.is_file():
        return {"status": "failed", "command": cmd, **res}
    w = json.loads(out.read_text())
    return {"status": "ok", "impl": "peft_best" if best else "peft", "command": cmd, "samples_per_s": w["samples_per_s"],
            "bf16": w["bf16"], "group_by_length": w["group_by_length"], "eval_examples_per_s": w["eval_examples_per_s"],
            "eval_batch": w["eval_batch"],
            "step_s": summarize(w["step_s"]), "trainable_params": w["trainable_params"],
            "model_class": w["model_class"], "peft_task_type": w["peft_task_type"], "peak_rss_bytes": rss,
            "wall_s": wall}


def matmul_params(model: str) -> int:
    """N of 4NT: the backbone's parameters without the input embedding matrix (a lookup, not a matmul)."""
    import torch
    from transformers import AutoConfig, AutoModel

    from infoprompt_ds.backbone import resolve_model_path

    with torch.device("meta"):  # shapes only: nothing allocated or initialised
        m = AutoModel.from_config(AutoConfig.from_pretrained(resolve_model_path(model)))
    return sum(p.numel() for p in m.parameters()) - m.get_input_embeddings().weight.numel()


def matmul_peaks(args) -> dict:
    """The n x n matmul peak in fp32 and bf16 on the jobs' thread count (common.matmul_peak), taken before and
    after the rounds: the best of the two is the limit."""
    import torch

    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return {k: matmul_peak(torch.device("cpu"), dt, n=1024, seconds=1.0)["flops_per_s"]
                for k, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    finally:
        torch.set_num_threads(threads)


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


def median_interval(xs: list[float]) -> tuple[float, float, float]:
    """(median, lower, upper): the distribution-free 95% interval of the median from order statistics (the
    largest k with P(Binomial(n, 1/2) < k) <= 0.025 gives [x_(k), x_(n-k+1)]; below 6 values: [min, max],
    which covers 1 - 2^(1-n))."""
    import statistics
    from math import comb

    xs, n = sorted(xs), len(xs)
    k, below = 1, 0.0
    while True:
        below += comb(n, k - 1) / 2 ** n  # P(Binomial < k) after adding P(= k - 1)
        if below > 0.025 or k >= (n + 1) // 2:
            break
        k += 1
    k = max(1, k - 1)
    return statistics.median(xs), xs[k - 1], xs[n - k]


def settings_of(args) -> dict:
    task = "SEQ_CLS for readout linear, CAUSAL_LM for lm_label"  # each run records which (peft_task_type)
    shared = {"model": args.model, "n_virtual_tokens": args.n_virtual, "per_device_train_batch_size": args.batch,
              "max_length": args.max_length, "k_shot": args.k_shot, "ds_config": args.ds_config, "ranks": 1,
              "OMP_NUM_THREADS": args.threads or "project default", "timed_steps": args.steps,
              "warmup_steps_dropped": args.warmup}
    return {"ours": {**shared, "impl": "train.py --method prompt (our defaults)", "precision": "fp32",
                     "group_by_length": False},
            "ours_best": {**shared, "impl": "train.py --method prompt --bf16 true --group_by_length true",
                          "precision": "bf16", "group_by_length": True},
            "peft": {**shared, "impl": f"PEFT PromptTuningConfig({task}) + HF Trainer (defaults)",
                     "precision": "bf16" if not args.cpu and _has_gpu() else "fp32", "group_by_length": False},
            "peft_best": {**shared, "impl": f"PEFT PromptTuningConfig({task}) + HF Trainer (best settings)",
                          "precision": "bf16", "group_by_length": True}}


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=MINILM)
    ap.add_argument("--n_virtual", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max_length", type=int, default=128)
    ap.add_argument("--k_shot", default="64")
    ap.add_argument("--train_file", default=None, help="local csv instead of Rotten Tomatoes (tests)")
    ap.add_argument("--label_words", default=None, help="label=word,...: a local csv's words (lm_label in tests)")
    ap.add_argument("--eval_samples", type=int, default=256, help="validation examples, evaluated once after training")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--min_pairs", type=int, default=3)
    ap.add_argument("--max_pairs", type=int, default=8)
    ap.add_argument("--budget_s", type=float, default=660, help="no new round after this many seconds")
    ap.add_argument("--ci_halfwidth", type=float, default=0.1)
    ap.add_argument("--arms", default="ours,peft,peft_best")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each job on CPU (0: project default)")
    ap.add_argument("--ds_config", default=str(ROOT / "ds_configs" / "zero3.json"))
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--results", default=str(RESULTS / "peft.json"))
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--bf16", action="store_true", help="worker: Trainer bf16=True")
    ap.add_argument("--group_by_length", action="store_true", help="worker: Trainer group_by_length=True")
    args = ap.parse_args(argv)
    if args.worker:
        return peft_worker(args)
    arms = args.arms.split(",")
    fns = {"ours": ours, "ours_best": lambda a, w: ours(a, w, best=True), "peft": peft,
           "peft_best": lambda a, w: peft(a, w, best=True)}
    settings = {k: v for k, v in settings_of(args).items() if k in arms}
    for arm, st in settings.items():
        print(f"[bench_peft] {arm}: " + ", ".join(f"{k}={v}" for k, v in st.items()), flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench_peft_"))
    args.n_matmul = matmul_params(args.model)
    peaks = {"before": matmul_peaks(args)}
    t0 = time.perf_counter()
    runs, pairs, stop = [], [], "max_pairs"
    # each of our arms over each PEFT arm; the two figures are ours/peft and ours/peft_best
    ratios = [(a, b) for a in arms if a.startswith("ours") for b in arms if b.startswith("peft")]
    for i in range(args.max_pairs):
        if i >= args.min_pairs and time.perf_counter() - t0 > args.budget_s:
            stop = "budget_s"
            break
        order = arms if i % 2 == 0 else arms[::-1]
        got = {}
        for arm in order:
            r = fns[arm](args, work)
            r["pair"] = i
            runs.append(r)
            got[arm] = r
            print(f"[bench_peft] round {i} {arm}: {r['status']} {r.get('samples_per_s', float('nan')):.2f} samples/s, "
                  f"peak RSS {r.get('peak_rss_bytes', 0) / 2**20:.0f} MiB", flush=True)
        if all(r["status"] == "ok" for r in got.values()) and ratios:
            pairs.append({"pair": i, "order": order, **{
                f"{m}_{a}_over_{b}": got[a][f] / got[b][f]
                for a, b in ratios for m, f in (("speed_ratio", "samples_per_s"), ("rss_ratio", "peak_rss_bytes"),
                                                 ("eval_speed_ratio", "eval_examples_per_s"))}})
        if len(pairs) >= args.min_pairs and all(
                max(hi - med, med - lo) <= args.ci_halfwidth
                for med, lo, hi in (median_interval([p[f"speed_ratio_{a}_over_{b}"] for p in pairs]) for a, b in ratios)):
            stop = "ci_halfwidth"
            break
    summary = {"rounds": len(pairs), "stopped_by": stop}
    for a, b in ratios:
        for m in ("speed_ratio", "rss_ratio", "eval_speed_ratio"):
            key = f"{m}_{a}_over_{b}"
            xs = [p[key] for p in pairs]
            summary[key] = {k: v for k, v in summarize(xs).items() if k in ("n", "median", "min", "max")}
            if xs:
                _, lo, hi = median_interval(xs)
                summary[key]["median_ci95"] = [lo, hi]
    peaks["after"] = matmul_peaks(args)
    for arm in arms:
        ok = [r for r in runs if r["status"] == "ok" and r["impl"] == arm]
        summary[f"{arm}_samples_per_s"] = summarize([r["samples_per_s"] for r in ok])
        summary[f"{arm}_peak_rss_mib"] = summarize([r["peak_rss_bytes"] / 2**20 for r in ok])
        summary[f"{arm}_eval_examples_per_s"] = summarize([r["eval_examples_per_s"] for r in ok])
        if arm.startswith("ours") and ok:  # achieved FLOP/s against the best matmul peak of its precision
            flops = summarize([r["achieved_flops_per_s"] for r in ok])
            peak = max(p["bf16" if arm == "ours_best" else "fp32"] for p in peaks.values())
            summary[f"{arm}_achieved_flops_per_s"] = flops
            summary[f"{arm}_fraction_of_matmul_peak"] = flops["median"] / peak
    summary["matmul_peak_flops_per_s"] = peaks
    write_results(Path(args.results), {"benchmark": "peft", "settings": {k: v for k, v in vars(args).items()
                                                                      if k not in ("worker", "out", "bf16", "group_by_length")},
                                       "arms": settings, "wall_s_total": time.perf_counter() - t0, "summary": summary,
                                       "pairs": pairs, "runs": runs})
    print(json.dumps(summary, indent=1))
    print(f"[bench_peft] wrote {args.results}")


if __name__ == "__main__":
    main()
