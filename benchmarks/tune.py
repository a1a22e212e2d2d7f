"""Issue 13: hyper-parameters chosen on validation only, test read once per final configuration.

    python benchmarks/tune.py --datasets rt --backbones minilm --k_shots 64 --tune_seeds 0,1,2 --final_seeds 0,1,2,3,4 \
        --arm infoprompt --grid gamma=0.05,0.1,0.3 --grid beta=0.1,0.2,0.5 --grid tau=0.05,0.1 \
        --grid learning_rate=3e-3,1e-2,3e-2 --control prompt --control_grid learning_rate=3e-3,1e-2,3e-2 \
        --max_configs 12 --tag tune_rt_minilm

One cell (dataset, backbone, k) per command. The arm's configs are the product of its --grid values, the
control's the product of its --control_grid values (none: the control's defaults). Budget rule: each side
gets min(its grid size, --max_configs) configs, a seeded random subset (--grid_seed) kept in grid order when
the grid is larger, each run on every --tune_seeds seed. So the two sides get the same number of configs
(and runs) whenever both grids hold at least --max_configs; a smaller grid (vanilla's 3 learning rates vs
InfoPrompt's 12 of 54 configs) is run whole and gets fewer. The budget actually spent is in the results
(`budget`).

Every tuning run is a study.py run (study.run_one: a real `python train.py` job, reused when its
output_dir holds metrics.json) in its own work folder per config. A config's score is the mean over
tune seeds of the best validation value of the task's metric (study.best_validation); the highest wins,
ties go to the config earlier in grid order. Tuning runs' test values are dropped before anything is
written: only validation (best value, step, history) is kept.

The chosen arm config and the chosen control config then run on --final_seeds, each as one study.py cell
(tag <tag>_final_<arm>, <tag>_final_<control>; the same seeds give the same k-shot samples, prompt inits
and data order, so the two pair by seed as study.py pairs them). The exact `python benchmarks/study.py ...`
command of each final cell is in the results (`final.commands`): it reuses these runs and writes the same
numbers to study_<that tag>.json. The final summary is study.summarise's, plus study.paired_vs of the arm
against the control (paired test difference, seeds up, t-test, convergence).

Writes benchmarks/results/tune_<tag>.json (<tag>.json when the tag starts with "tune"; common.write_results: meta
block with the command), and convergence_<that file's name>_final.png: the final pair's validation curves.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shlex
import sys
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study
from common import RESULTS, repo_relative, summarize, write_results


def parse_grid(items: list[str], side: str) -> dict[str, list[str]]:
    """`key=v1,v2` flags -> {key: [v1, v2]}, keys checked against TrainConfig's fields, values parsed."""
    from infoprompt_ds.config import ConfigError, TrainConfig
    from infoprompt_ds.config_load import _convert

    names = {f.name for f in fields(TrainConfig)}
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ConfigError(side, f"{item!r} is not key=v1,v2,...")
        if key not in names:
            raise ConfigError(side, f"{key!r} is not a train.py field (TrainConfig); e.g. gamma, beta, tau, learning_rate")
        if key in grid:
            raise ConfigError(side, f"{key!r} given twice; give all its values in one {side} {key}=v1,v2")
        grid[key] = [v.strip() for v in values.split(",")]
        for v in grid[key]:
            _convert(key, v)  # ConfigError naming the field when a value does not parse
    return grid


def configs(grid: dict[str, list[str]], max_configs: int, seed: int) -> list[dict[str, str]]:
    """The grid's product, in order; a seeded random subset of max_configs (kept in grid order) when larger."""
    allc = [dict(zip(grid, vs)) for vs in itertools.product(*grid.values())]
    if len(allc) > max_configs:
        keep = sorted(random.Random(seed).sample(range(len(allc)), max_configs))
        allc = [allc[i] for i in keep]
    return allc


def check_config(arm: str, config: dict[str, str], fixed: list[str]) -> None:
    """The full TrainConfig check of the arm's flags + the config (e.g. gamma for method=prompt is an error),
    before any training; a grid key the arm or --set already fixes would be silently overridden."""
    from infoprompt_ds.config import ConfigError, TrainConfig
    from infoprompt_ds.config_load import _convert

    arm_flags = study.arm_flags(arm)
    for key in config:
        if key in arm_flags or key in fixed:
            raise ConfigError(key, f"is fixed by arm {arm!r} or --set/--set_infoprompt; drop it from one of them")
    TrainConfig(**{k: _convert(k, v) for k, v in {**arm_flags, **config}.items()})


def label(config: dict[str, str]) -> str:
    # also the config's work folder name
    return ",".join(f"{k}={v}".replace("/", "_") for k, v in config.items()) or "defaults"


def ns(args, tag: str, config: dict[str, str]) -> argparse.Namespace:
    """The namespace study.run_one reads, as study.main would parse it from study_command's flags."""
    return argparse.Namespace(cache=args.cache, max_steps=args.max_steps, eval_steps=args.eval_steps,
                              max_eval_samples=args.max_eval_samples, tag=tag,
                              set=args.set + [f"{k}={v}" for k, v in config.items()],
                              set_infoprompt=args.set_infoprompt, rerun=args.rerun, jobs=args.jobs)


def study_command(args, arm: str, config: dict[str, str], tag: str) -> str:
    cmd = ["python", "benchmarks/study.py", "--datasets", args.datasets, "--backbones", args.backbones,
           "--k_shots", str(args.k_shots), "--seeds", args.final_seeds, "--methods", arm,
           "--max_steps", str(args.max_steps), "--eval_steps", str(args.eval_steps),
           "--max_eval_samples", str(args.max_eval_samples)]
    for kv in ns(args, tag, config).set:
        cmd += ["--set", kv]
    for kv in args.set_infoprompt:
        cmd += ["--set_infoprompt", kv]
    cmd += ["--tag", tag, "--work_dir", args.work_dir] + (["--cache", args.cache] if args.cache else [])
    return shlex.join(cmd)


def tune_side(args, arm: str, cfgs: list[dict[str, str]]) -> tuple[list[dict], list[dict]]:
    """Every config on every tune seed; rows of mean ± std best validation value, and the runs without test."""
    seeds = [int(s) for s in args.tune_seeds.split(",")]
    cell = {"dataset": args.datasets, "backbone": args.backbones, "k": args.k_shots}
    jobs = [({**cell, "seed": s, "method": arm}, ns(args, f"{args.tag}-tune", c),
             Path(args.work_dir) / args.tag / "tune" / arm / label(c)) for c in cfgs for s in seeds]
    runs = study.run_many(jobs, args.jobs)
    rows = []
    for i, c in enumerate(cfgs):
        rs = [r for r in runs[i * len(seeds):(i + 1) * len(seeds)] if r["status"] == "finished"]
        vals = [study.best_validation(r) for r in rs]
        rows.append({"config": c, "label": label(c), "seeds": [r["seed"] for r in rs],
                     "metric": study.metric_of(rs[0]) if rs else None,
                     "best_validation": summarize(vals), "n_failed": len(seeds) - len(rs)})
    for (_, _, work), r in zip(jobs, runs):
        r.pop("test", None)  # test is never read for tuning: it must not reach the results either
        r["config"] = work.name
    return rows, runs


def choose(rows: list[dict]) -> dict:
    """Highest mean best-validation value; ties (and equal means) go to the earlier config in grid order."""
    best = None
    for row in rows:
        mean = row["best_validation"].get("mean")
        if mean is not None and (best is None or mean > best["best_validation"]["mean"]):
            best = row
    if best is None:
        raise SystemExit(f"[tune] every tuning run failed ({rows[0]['label']} ...); see the logs in the work folder")
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="rt", help=f"one of {', '.join(study.DATASETS)}")
    ap.add_argument("--backbones", default="minilm")
    ap.add_argument("--k_shots", type=int, default=64)
    ap.add_argument("--tune_seeds", default="0,1,2")
    ap.add_argument("--final_seeds", default="0,1,2,3,4")
    ap.add_argument("--arm", default="infoprompt", help=f"one of {', '.join(study.ARMS)}")
    ap.add_argument("--grid", action="append", default=[], help="key=v1,v2,... for the arm (repeat per key)")
    ap.add_argument("--control", default=None, help="default: study.CONTROL's control of the arm (prompt)")
    ap.add_argument("--control_grid", action="append", default=[], help="key=v1,v2,... for the control")
    ap.add_argument("--max_configs", type=int, default=12, help="configs per side at most")
    ap.add_argument("--grid_seed", type=int, default=0, help="seed of the random subset of a larger grid")
    study.add_run_args(ap, tag="tune", results="tune_<tag>.json")
    args = ap.parse_args(argv)
    control = args.control or study.CONTROL.get(args.arm, "prompt")

    # All input checks before any training: one line naming the field, exit 2 (as train.py).
    from infoprompt_ds.config import ConfigError
    try:
        if args.max_configs < 1:
            raise ConfigError("max_configs", f"must be >= 1, got {args.max_configs}")
        if "," in args.datasets + args.backbones:
            raise ConfigError("datasets", "tune.py tunes one cell: give one dataset and one backbone per command")
        if control in (None, args.arm):
            raise ConfigError("control", f"arm {args.arm!r} needs a control other than itself; give --control")
        for s in (args.tune_seeds, args.final_seeds):
            if not all(x.strip().isdigit() for x in s.split(",")):
                raise ConfigError("seeds", f"{s!r} is not a comma-separated list of integers")
        fixed = [kv.split("=", 1)[0] for kv in args.set + args.set_infoprompt]
        sides = {}
        for arm, items, flag in ((args.arm, args.grid, "--grid"), (control, args.control_grid, "--control_grid")):
            grid = parse_grid(items, flag)
            cfgs = configs(grid, args.max_configs, args.grid_seed)
            for c in cfgs:
                check_config(arm, c, fixed)
            sides[arm] = (grid, cfgs)
    except (ConfigError, SystemExit) as e:
        if isinstance(e, SystemExit) and not isinstance(e.code, str):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)

    tuning, tune_runs, chosen = {}, [], {}
    for arm, (grid, cfgs) in sides.items():
        rows, runs = tune_side(args, arm, cfgs)
        tuning[arm], chosen[arm] = rows, choose(rows)
        tune_runs += runs
        c = chosen[arm]
        print(f"[tune] {arm}: chose {c['label']} (validation {c['metric']} "
              f"{c['best_validation']['mean']:.4f} ± {c['best_validation']['std']:.4f} over seeds {c['seeds']}; "
              f"{len(cfgs)} configs x {len(args.tune_seeds.split(','))} seeds)", flush=True)

    # The chosen configs on the final seeds: each side one study.py cell, test read once here.
    final_seeds = [int(s) for s in args.final_seeds.split(",")]
    cell = {"dataset": args.datasets, "backbone": args.backbones, "k": args.k_shots}
    commands, jobs = {}, []
    for arm in sides:
        tag = f"{args.tag}_final_{arm}"
        commands[arm] = study_command(args, arm, chosen[arm]["config"], tag)
        jobs += [({**cell, "seed": s, "method": arm}, ns(args, tag, chosen[arm]["config"]), Path(args.work_dir) / tag)
                 for s in final_seeds]
    final_runs = study.run_many(jobs, args.jobs)
    done = [r for r in final_runs if r["status"] == "finished"]
    paired = study.paired_vs([r for r in done if r["method"] == args.arm], [r for r in done if r["method"] == control])

    # tune_<tag>.json, without doubling the prefix of a tag that already says it (the documented tune_rt_minilm)
    name = args.tag if args.tag.startswith("tune") else f"tune_{args.tag}"
    results_path = Path(args.results) if args.results else RESULTS / f"{name}.json"
    # the two final configs' validation curves side by side (each final cell's own study.py run plots one arm)
    plot_path = results_path.with_name(f"convergence_{results_path.stem}_final.png")
    study.plot(done, plot_path)
    write_results(results_path, {
        "benchmark": "tune",
        "cell": cell, "arm": args.arm, "control": control,
        "grid": {arm: grid for arm, (grid, _) in sides.items()},
        "settings": {k: getattr(args, k) for k in ("tune_seeds", "final_seeds", "max_configs", "grid_seed",
                                                   "max_steps", "eval_steps", "max_eval_samples", "set",
                                                   "set_infoprompt")},
        "budget": {arm: {"configs": len(cfgs), "tune_runs": len(cfgs) * len(args.tune_seeds.split(","))}
                   for arm, (_, cfgs) in sides.items()},
        "tuning": tuning,
        "chosen": {arm: c["config"] for arm, c in chosen.items()},
        "final": {"commands": commands, "summary": study.summarise(done), "paired": {f"{args.arm} - {control}": paired},
                  "plot": repo_relative(plot_path)},
        "tune_runs": tune_runs, "final_runs": final_runs})
    for arm, cmd in commands.items():
        print(f"[tune] final {arm}: {cmd}")
    print(json.dumps(paired, indent=1, default=str)[:2000])
    print(f"[tune] wrote {results_path}")


if __name__ == "__main__":
    main()
