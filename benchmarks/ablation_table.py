"""The ablation table of docs/benchmarks.md (issue 8, item 5), from the study results files.

    python benchmarks/ablation_table.py                      # markdown to stdout
    python benchmarks/ablation_table.py --base rt_minilm --k 64 --seeds 0,1,2
    python benchmarks/ablation_table.py --base rt_minilm --k 256 --seeds 0,1,2,3,4 --variants study_rt_minilm_noclamp.json
    python benchmarks/ablation_table.py --arms benchmarks/results/study_v2_rt_minilm_ablate.json

--arms: study file(s) (merged run by run); a row per arm against its own control (study.py CONTROL), paired by
seed, plus any --pair ARM:CONTROL, e.g. the read-out ablation against the cell it ablates:

    python benchmarks/ablation_table.py --arms benchmarks/results/study_v2_rt_smollm2_readout.json \
        benchmarks/results/study_v2_rt_smollm2_lm_label.json --pair prompt:prompt_linear --pair infoprompt:infoprompt_linear

Each ablation is a `study.py --tag ablate_<name>` run on the same cell (dataset, backbone, k) and seeds as
the base grid. A row pairs the ablated InfoPrompt with vanilla prompt tuning *of the same seeds*: from the
ablation's own prompt runs when the ablation changed a shared setting (lr, n, init), else from the base
grid (the ablation changed only InfoPrompt's loss weights). Differences are per seed, then averaged, so
the seed-to-seed spread of the k-shot sample cancels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402
from study import steps_to_reach  # noqa: E402


def by_seed(runs: list[dict], method: str, k: int) -> dict[int, dict]:
    return {r["seed"]: r for r in runs if r["status"] == "finished" and r["method"] == method and r["k"] == k}


def fmt(xs: list[float]) -> str:
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.3f} ± {sd:.3f}"


def row(name: str, ip: dict[int, dict], pt: dict[int, dict], seeds: list[int], source: str) -> str:
    seeds = [s for s in seeds if s in ip and s in pt]
    acc = lambda rs: [rs[s]["test"]["accuracy"] for s in seeds]  # noqa: E731
    early = lambda rs: [rs[s]["eval_history"][0][1] for s in seeds]  # noqa: E731 - the first evaluation
    diff = [a - b for a, b in zip(acc(ip), acc(pt))]
    wins = sum(d > 0 for d in diff)
    # convergence: steps InfoPrompt needs to reach the best validation accuracy prompt tuning reaches
    reach = [(steps_to_reach(ip[s]["eval_history"], pt[s]["best_validation_accuracy"]),
              steps_to_reach(pt[s]["eval_history"], pt[s]["best_validation_accuracy"])) for s in seeds]
    hit = [(a, b) for a, b in reach if a is not None]
    steps = (f"{len(hit)}/{len(seeds)}" + (f"; {statistics.median(a for a, _ in hit):g} vs {statistics.median(b for _, b in hit):g}"
                                          if hit else ""))
    return (f"| {name} | {len(seeds)} | {fmt(acc(ip))} | {fmt(acc(pt))} | {fmt(diff)} ({wins}/{len(seeds)} up) | "
            f"{fmt(early(ip))} vs {fmt(early(pt))} | {steps} | {source} |")


def arms_table(paths: list[Path], pairs: tuple[tuple[str, str], ...] = ()) -> list[str]:
    """Each arm of the study files against its control (study.py CONTROL), and any extra (arm, control) `pairs`,
    paired by seed. Several files are merged run by run (the first file's run wins where two hold the same
    cell, arm and seed), so an arm can be paired with a control trained by another command, e.g. a read-out
    ablation with the cell it ablates. Means are over the paired seeds."""
    from study import ARMS, CONTROL, SCRIPTS, paired_vs

    docs = [json.loads(p.read_text()) for p in paths]
    cells: dict[tuple, dict[str, dict[int, dict]]] = {}
    for doc in docs:
        for r in doc["runs"]:
            if r["status"] == "finished":
                arm = cells.setdefault((r["dataset"], r["backbone"], r["k"]), {}).setdefault(r["method"], {})
                arm.setdefault(r["seed"], r)  # the first file's run wins
    lines = [f"from {p.name} (trained at {(d['meta']['git']['commit'] or 'unknown')[:7]})" for p, d in zip(paths, docs)] + [""]
    for (dataset, backbone, k), by in sorted(cells.items()):
        lines += [f"{dataset} / {backbone} / k={k}", "",
                  "| arm | flags | seeds | test (mean ± std) | control | control test | paired diff (seeds up) | "
                  "paired t-test p | best validation diff (p) | reached the control's best validation |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for arm, control in [(a, CONTROL.get(a, "prompt")) for a in sorted(by)] + list(pairs):
            if control in (None, arm) or arm not in by or control not in by:
                continue
            vs = paired_vs(list(by[arm].values()), list(by[control].values()))
            if vs is None:
                continue
            metric, seeds = vs["metric"], vs["seeds"]
            mean_sd = lambda m: fmt([by[m][s]["test"][metric] for s in seeds])  # noqa: E731
            p = lambda key: f"{vs[key]['p']:.3f}" if key in vs else "-"  # noqa: E731
            reached = [s for s in vs["steps_to_control_best"] if s is not None]
            flags = " ".join(f"{k}={v}" for k, v in ARMS.get(arm, {}).items())
            if arm in SCRIPTS:  # e.g. peft: method=prompt alone would read as our own vanilla arm
                flags = f"{Path(SCRIPTS[arm]).name} {flags}"
            lines.append(f"| {arm} | {flags} | {len(seeds)} | {mean_sd(arm)} | {control} | {mean_sd(control)} | "
                         f"{vs['test_acc_diff']['mean']:+.3f} ± {vs['test_acc_diff']['std']:.3f} ({vs['up']}) | "
                         f"{p('paired_t')} | {vs['best_val_diff']['mean']:+.3f} ({p('best_val_paired_t')}) | "
                         f"{len(reached)}/{len(seeds)} |")
        lines.append("")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="rt_minilm", help="tag of the base grid")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--results_dir", default=str(RESULTS))
    ap.add_argument("--variants", default="study_ablate_*.json", help="glob of the variants' results files")
    ap.add_argument("--arms", nargs="+", default=None,
                    help="study results file(s), merged: each arm against its control (study.py CONTROL)")
    ap.add_argument("--pair", action="append", default=[], metavar="ARM:CONTROL",
                    help="with --arms: an extra comparison, e.g. infoprompt:infoprompt_linear (repeatable)")
    args = ap.parse_args(argv)
    pairs = []
    for pair in args.pair:
        arm, sep, control = pair.partition(":")
        if not (sep and arm and control):
            ap.error(f"--pair: expected ARM:CONTROL, got {pair!r}")
        pairs.append((arm, control))
    if args.arms:
        print("\n".join(arms_table([Path(p) for p in args.arms], tuple(pairs))))
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    results = Path(args.results_dir)
    base_doc = json.loads((results / f"study_{args.base}.json").read_text())
    base, cell = base_doc["runs"], {k: base_doc["grid"][k] for k in ("datasets", "backbones")}
    base_pt = by_seed(base, "prompt", args.k)
    print("| InfoPrompt variant | seeds | InfoPrompt test acc | prompt tuning test acc | paired diff | "
          "val acc at the first eval (InfoPrompt vs prompt) | reached prompt's best val; median steps (InfoPrompt vs prompt) "
          "| prompt runs from |")
    print("|---|---|---|---|---|---|---|---|")
    print(row("defaults (γ=0.1, β=0.2, KL 0.1, n=16, lr 1e-2, vocab init)", by_seed(base, "infoprompt", args.k),
              base_pt, seeds, args.base))
    for path in sorted(results.glob(args.variants)):
        data = json.loads(path.read_text())
        grid = data["grid"]
        if {k: grid[k] for k in cell} != cell:  # an ablation of another dataset/backbone cell
            continue
        extra = [kv for kv in grid["set"] if kv not in base_doc["grid"]["set"]]  # what the ablation changed
        change = ", ".join(extra + [f"{kv} (InfoPrompt only)" for kv in grid["set_infoprompt"]])
        runs = data["runs"]
        own_pt = by_seed(runs, "prompt", args.k)
        pt, source = (own_pt, path.stem[len("study_"):]) if own_pt else (base_pt, args.base)
        if not by_seed(runs, "infoprompt", args.k):
            continue
        print(row(change, by_seed(runs, "infoprompt", args.k), pt, seeds, source))


if __name__ == "__main__":
    main()
