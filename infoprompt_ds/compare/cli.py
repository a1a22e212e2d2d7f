"""Compare methods across seeds from what is in MLflow.

    python -m infoprompt_ds.compare --sweep NAME_OR_FOLDER          # what a sweep prints at its end
    python -m infoprompt_ds.compare --experiment NAME [--tracking_uri URI] [--target 0.8] [--metric M]

The store is tracking_store.default_store's (MLFLOW_TRACKING_URI, else the sweep folder's mlflow.db), so a
sweep and its comparison need no flags. Reads the experiment's runs (mlflow.search_runs), groups the
FINISHED ones by every param but the seed and the fields marked `"identity": False` in TrainConfig
(where a run wrote, how often it logged, system metrics, caches), and prints one row per group: mean ± std over seeds of the best
validation metric and the test metric, steps and seconds to reach --target on validation, throughput.
Methods that share everything else are compared with a paired t-test over seeds. Plots (validation
metric and loss components vs step, one line per method, a ±std band over seeds) and the tables (CSV and
Markdown) are written to --output_dir and logged as artifacts of a comparison run in the same
experiment. Runs that failed, were killed or are still running are listed, never averaged in.

Where each step lives: compare_runs.py reads the runs from MLflow, compare_stats.py computes mean ± std
and the paired tests, compare_plots.py draws the figures, compare_report.py writes the tables; this module
is the command that runs them in that order and logs the comparison run.
"""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from infoprompt_ds.compare.plots import plot_cells
from infoprompt_ds.compare.report import ui_link, write_report
from infoprompt_ds.compare.runs import (COMPARISON_TAG, arm_name, choose_metric, excluded_runs, find_store, load_runs, newest_per_seed, param_roles, run_stats, split_runs, task_names)
from infoprompt_ds.compare.stats import build_tables
from infoprompt_ds.config import ConfigError
from infoprompt_ds.errors import fail


@dataclass
class Options:
    experiment: Optional[str]  # None: the sweep's experiment, or the store's only one
    tracking_uri: str
    metric: Optional[str] = None  # default: the runs' metric_for_best_model
    target: float = 0.8
    alpha: float = 0.05
    sweep: Optional[str] = None
    output_dir: Optional[Path] = None
    log_to_mlflow: bool = True


@dataclass
class Comparison:
    table: Any  # pandas DataFrame, one row per group
    significance: Any  # pandas DataFrame, one row per method pair and cell
    excluded: Any  # pandas DataFrame of runs not averaged in, with the reason
    plots: list[Path]
    cell_columns: list[str]
    metric: str
    run_id: Optional[str] = None


def compare(opts: Options, echo=print) -> Comparison:
    """Read the runs, compute the tables and tests, draw the figures, write and print the report, and log
    it all as a comparison run (tag infoprompt.role=comparison) unless opts.log_to_mlflow is off."""
    import pandas as pd
    from mlflow import MlflowClient

    df, exp, opts.sweep = load_runs(opts.tracking_uri, opts.experiment, opts.sweep)
    opts.experiment = exp.name
    if df.empty:
        raise ConfigError("experiment", f"experiment {opts.experiment!r} has no training runs"
                          + (f" of sweep {opts.sweep!r}" if opts.sweep else ""))
    metric = choose_metric(df, opts.metric, opts.experiment)
    finished, excluded = split_runs(df, metric)
    cell_cols, method_cols, show_cols = param_roles(finished)

    client = MlflowClient(opts.tracking_uri)
    stats_ = [run_stats(client, r, cell_cols, arm_name(finished, r, method_cols), metric, opts.target)
              for _, r in finished.iterrows()]
    stats_, dupes = newest_per_seed(stats_, finished)
    excl = excluded_runs(excluded, dupes)

    out = Path(opts.output_dir or Path("outputs") / "compare" / re.sub(r"[^A-Za-z0-9_.-]+", "_", opts.experiment))
    out.mkdir(parents=True, exist_ok=True)
    if stats_:
        table, sig = build_tables(stats_, cell_cols, show_cols, metric, opts.alpha)
        plots = plot_cells(stats_, cell_cols, show_cols, metric, out, opts.experiment, task_names(finished))
    else:
        table, sig, plots = pd.DataFrame(), pd.DataFrame(), []
    title = f"# {opts.experiment}: {len(stats_)} finished runs" + (f" (sweep {opts.sweep})" if opts.sweep else "")
    echo(write_report(out, title, table, sig, excl, show_cols, metric, opts.target, opts.alpha))
    echo(f"plots: {', '.join(str(p) for p in plots) or '(none)'}")
    echo(f"MLflow UI: {ui_link(opts.tracking_uri, exp.experiment_id, opts.sweep)}")

    result = Comparison(table=table, significance=sig, excluded=excl, plots=plots, cell_columns=cell_cols,
                        metric=metric)
    if opts.log_to_mlflow:
        try:
            result.run_id = log_comparison(client, exp.experiment_id, opts, metric, out, plots, len(stats_))
        except Exception as e:  # noqa: BLE001 - the table is printed and saved; say what is missing
            raise LoggingFailed(f"the comparison is in {out} but could not be logged to MLflow: "
                                f"{str(e).splitlines()[0][:300]}") from e
        echo(f"logged as run {result.run_id} (tag {COMPARISON_TAG}=comparison) in experiment {opts.experiment!r}")
    return result


class LoggingFailed(RuntimeError):
    """The comparison was computed and saved, but MLflow did not take the comparison run."""


def log_comparison(client, exp_id: str, opts: Options, metric: str, out: Path, plots: list[Path], n: int) -> str:
    from mlflow.entities import Param

    name = f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    run = client.create_run(exp_id, tags={COMPARISON_TAG: "comparison", **({"sweep.name": opts.sweep} if opts.sweep else {})},
                            run_name=name)
    rid = run.info.run_id
    client.log_batch(rid, params=[Param(k, str(v)) for k, v in
                                  {"metric": metric, "target": opts.target, "alpha": opts.alpha, "runs": n,
                                   "sweep": opts.sweep}.items()])
    for f in ("comparison.csv", "comparison.md", "significance.csv"):
        client.log_artifact(rid, str(out / f))
    for p in plots:
        client.log_artifact(rid, str(p), "plots")
    client.set_terminated(rid)
    return rid


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m infoprompt_ds.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default=None,
                        help="MLflow experiment name (default: the sweep's, or the store's only experiment)")
    parser.add_argument("--tracking_uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI, else the "
                        "sweep folder's mlflow.db, else outputs/run/mlflow.db)")
    parser.add_argument("--metric", default=None, help="accuracy, macro_f1, mcc, f1, relation_f1, entity_f1 (default: the runs' metric_for_best_model)")
    parser.add_argument("--target", type=float, default=0.8, help="validation metric value for 'steps to target'")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level of the paired test")
    parser.add_argument("--sweep", default=None, help="a sweep's name (its store: outputs/sweeps/NAME/mlflow.db) or "
                        "its output_root folder; only that sweep's runs are compared")
    parser.add_argument("--output_dir", default=None, help="tables and plots (default: outputs/compare/<experiment>)")
    parser.add_argument("--no_log", action="store_true", help="do not log a comparison run to MLflow")
    args = parser.parse_args(argv)
    try:
        if args.metric is not None and not re.fullmatch(r"\w+", args.metric):
            raise ConfigError("metric", f"must be a metric name such as accuracy, macro_f1, entity_f1; got {args.metric!r}")
        if not 0 < args.alpha < 1:
            raise ConfigError("alpha", f"must be in (0, 1), got {args.alpha}")
        uri, sweep = find_store(args.tracking_uri, args.sweep)
        compare(Options(experiment=args.experiment, tracking_uri=uri, metric=args.metric, target=args.target,
                        alpha=args.alpha, sweep=sweep, output_dir=Path(args.output_dir) if args.output_dir else None,
                        log_to_mlflow=not args.no_log))
    except ConfigError as e:
        fail(e)
    except LoggingFailed as e:
        fail(e, 1)


if __name__ == "__main__":
    main()
