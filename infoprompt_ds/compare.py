"""Compare methods across seeds from what is in MLflow.

    python -m infoprompt_ds.compare --sweep NAME_OR_FOLDER          # what a sweep prints at its end
    python -m infoprompt_ds.compare --experiment NAME [--tracking_uri URI] [--target 0.8] [--metric M]

The store is tracking.default_store's (MLFLOW_TRACKING_URI, else the sweep folder's mlflow.db), so a
sweep and its comparison need no flags. Reads the experiment's runs (mlflow.search_runs), groups the
FINISHED ones by every param but the seed and the fields marked `"identity": False` in TrainConfig
(where a run wrote, how often it logged, system metrics, caches), and prints one row per group: mean ± std over seeds of the best
validation metric and the test metric, steps and seconds to reach --target on validation, throughput.
Methods that share everything else are compared with a paired t-test over seeds. Plots (validation
metric and loss components vs step, one line per method, a ±std band over seeds) and the tables (CSV and
Markdown) are written to --output_dir and logged as artifacts of a comparison run in the same
experiment. Runs that failed, were killed or are still running are listed, never averaged in.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .config import ConfigError, TrainConfig
from .errors import fail
from .tracking import DB_NAME, SWEEPS_ROOT, default_store, non_identity_fields

# Params that differ between runs of the same configuration without changing what is compared: the seed
# (the replicate axis) and every config field marked "identity": False.
IGNORED_PARAMS = {"seed"} | non_identity_fields()
# Params that only the method sets (prompt tuning forces the MI weights to 0 and has no estimators): they
# are part of a method's arm, not of the cell in which two methods are compared.
METHOD_PARAMS = {"gamma", "beta", "kl_weight", "k_negatives", "bottleneck_dim", "mi_decay", "mi_clamp", "estimator", "tau", "cache_unprompted",
                 "trainable_params"}
LOSS_KEYS = ("train/loss", "train/ce", "train/head", "train/repr", "train/kl")
COMPARISON_TAG = "infoprompt.role"


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
class RunStats:
    run_id: str
    name: str
    cell: tuple  # values of the cell columns: what two methods must share to be compared
    arm: str  # the method, plus its own params where runs of one method differ in them
    seed: str
    best_val: float
    test: float
    steps_to_target: float  # nan: never reached
    seconds_to_target: float
    samples_per_s: float
    history: dict[str, Any] = field(default_factory=dict)  # metric key -> DataFrame(step, value, timestamp)


@dataclass
class Comparison:
    table: Any  # pandas DataFrame, one row per group
    significance: Any  # pandas DataFrame, one row per method pair and cell
    excluded: Any  # pandas DataFrame of runs not averaged in, with the reason
    plots: list[Path]
    cell_columns: list[str]
    metric: str
    run_id: Optional[str] = None


# --- reading MLflow ------------------------------------------------------------------------------------

def find_store(tracking_uri: Optional[str], sweep: Optional[str]) -> tuple[str, Optional[str]]:
    """(tracking URI, sweep name) through tracking.default_store, the rule every entry point shares:
    --tracking_uri, else MLFLOW_TRACKING_URI, else the sweep folder's mlflow.db (--sweep a folder, or a
    name under outputs/sweeps/), else the default training's store (outputs/run/mlflow.db)."""
    given = Path(sweep).expanduser() if sweep else None
    if tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return tracking_uri or os.environ["MLFLOW_TRACKING_URI"], (None if given and given.is_dir() else sweep)
    if sweep:
        folder = given if given.is_dir() else SWEEPS_ROOT / sweep
        if not (folder / DB_NAME).is_file():
            raise ConfigError("sweep", f"no sweep store at {folder / DB_NAME}; pass the sweep's name (run where the "
                              f"sweep ran) or its output_root folder, or --tracking_uri")
        # A folder names the sweep only through its store: the name is read from its parent run.
        return default_store(folder).uri, (None if given.is_dir() else sweep)
    uri = default_store(TrainConfig.output_dir).uri
    if not Path(uri[len("sqlite:///"):]).is_file():
        raise ConfigError("tracking_uri", f"no MLflow store at {uri}; pass --sweep NAME_OR_FOLDER, --tracking_uri, "
                          f"or set MLFLOW_TRACKING_URI")
    return uri, None


def find_experiment(opts: Options):
    """The experiment named by --experiment; else the one holding the sweep; else the store's only one."""
    import mlflow

    if opts.experiment:
        exp = mlflow.get_experiment_by_name(opts.experiment)
        if exp is None:
            names = [e.name for e in mlflow.search_experiments()]
            raise ConfigError("experiment", f"no experiment named {opts.experiment!r} at {opts.tracking_uri}; "
                              f"it has: {', '.join(names) or 'none'}")
        return exp
    role = "tags.`sweep.role` = 'parent'"
    parents = mlflow.search_runs(search_all_experiments=True, output_format="list", filter_string=role
                                 + (f" and tags.`sweep.name` = '{opts.sweep}'" if opts.sweep else ""))
    if parents:
        if not opts.sweep:
            names = sorted({r.data.tags["sweep.name"] for r in parents})
            if len(names) > 1:
                raise ConfigError("sweep", f"{opts.tracking_uri} holds sweeps {', '.join(names)}; name one")
            opts.sweep = names[0]
        return mlflow.get_experiment(parents[0].info.experiment_id)
    if opts.sweep:
        raise ConfigError("sweep", f"no sweep named {opts.sweep!r} at {opts.tracking_uri}")
    exps = [e for e in mlflow.search_experiments() if mlflow.search_runs([e.experiment_id], max_results=1,
                                                                          output_format="list")]
    if len(exps) != 1:
        raise ConfigError("experiment", f"pass --experiment; {opts.tracking_uri} has "
                          f"{', '.join(e.name for e in exps) or 'no runs'}")
    return exps[0]


def load_runs(opts: Options):
    import mlflow

    mlflow.set_tracking_uri(opts.tracking_uri)
    try:
        exp = find_experiment(opts)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - unreachable server or bad URI: one line for the user
        raise ConfigError("tracking_uri", f"cannot read MLflow at {opts.tracking_uri}: {str(e).splitlines()[0][:200]}")
    opts.experiment = exp.name
    df = mlflow.search_runs(experiment_ids=[exp.experiment_id], output_format="pandas", max_results=50000)
    if df.empty:
        return df, exp
    for col in (f"tags.{COMPARISON_TAG}", "tags.sweep.role", "tags.sweep.name", "tags.mlflow.runName"):
        if col not in df:
            df[col] = None
    df = df[(df[f"tags.{COMPARISON_TAG}"] != "comparison") & (df["tags.sweep.role"] != "parent")]
    if opts.sweep:
        df = df[df["tags.sweep.name"] == opts.sweep]
    return df.reset_index(drop=True), exp


def history(client, run_id: str, key: str):
    import pandas as pd

    rows = [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key)]
    h = pd.DataFrame(rows, columns=["step", "value", "timestamp"])
    # A resumed run may log a step twice; the later value is the one that counts.
    return h.sort_values(["step", "timestamp"]).drop_duplicates("step", keep="last").reset_index(drop=True)


def _param_columns(df) -> list[str]:
    return [c for c in df.columns if c.startswith("params.") and c[len("params."):] not in IGNORED_PARAMS]


def split_runs(df, metric: str):
    """(finished runs with results, excluded runs with a reason)."""
    import pandas as pd

    test_col = f"metrics.test/{metric}"
    reasons = []
    for _, r in df.iterrows():
        if r["status"] != "FINISHED":
            reasons.append(r["status"].lower())
        elif test_col not in df or pd.isna(r.get(test_col)) or pd.isna(r.get("params.method")):
            reasons.append(f"finished without test/{metric} or params")
        else:
            reasons.append(None)
    df = df.assign(_reason=reasons)
    return df[df["_reason"].isna()].drop(columns="_reason"), df[df["_reason"].notna()]


def run_stats(client, r, cell_cols: list[str], arm: str, metric: str, target: float) -> RunStats:
    import numpy as np

    hist = {}
    for key in (f"eval/{metric}", "train/samples_per_s", *LOSS_KEYS):
        if f"metrics.{key}" in r.index and not _isnan(r[f"metrics.{key}"]):
            hist[key] = history(client, r["run_id"], key)
    ev = hist.get(f"eval/{metric}")
    best = float(ev["value"].max()) if ev is not None and len(ev) else math.nan
    steps = seconds = math.nan
    if ev is not None:
        hit = ev[ev["value"] >= target]
        if len(hit):
            steps = float(hit["step"].iloc[0])
            start_ms = r["start_time"].timestamp() * 1000
            seconds = (float(hit["timestamp"].iloc[0]) - start_ms) / 1000
    sps = hist.get("train/samples_per_s")
    return RunStats(run_id=r["run_id"], name=str(r.get("tags.mlflow.runName") or ""),
                    cell=tuple(str(r[c]) for c in cell_cols), arm=arm,
                    seed=str(r.get("params.seed")), best_val=best, test=float(r[f"metrics.test/{metric}"]),
                    steps_to_target=steps, seconds_to_target=seconds,
                    samples_per_s=float(np.mean(sps["value"])) if sps is not None and len(sps) else math.nan,
                    history=hist)


def arm_name(finished, r, method_cols: list[str]) -> str:
    """The method, plus the method's own params (gamma, beta, ...) that differ between runs of that method."""
    same = finished[finished["params.method"] == r["params.method"]]
    varying = [c for c in method_cols if same[c].astype(str).nunique() > 1]
    extra = ",".join(f"{c.removeprefix('params.')}={r[c]}" for c in varying)
    return f"{r['params.method']}({extra})" if extra else str(r["params.method"])


def _isnan(v) -> bool:
    try:
        return v is None or math.isnan(float(v))
    except (TypeError, ValueError):
        return False


# --- statistics ------------------------------------------------------------------------------------------

def mean_std(values: list[float]) -> tuple[float, float, int]:
    """(mean, sample std, n) over the values that exist; std is 0 for a single value."""
    import numpy as np

    v = [x for x in values if not _isnan(x)]
    if not v:
        return math.nan, math.nan, 0
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)


def fmt(mean: float, std: float, digits: int = 4, n: int = 2) -> str:
    """mean ± sample std; one seed has no spread to show, so just the value."""
    if _isnan(mean):
        return "—"
    if n < 2 or _isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def paired_test(a: dict[str, float], b: dict[str, float]) -> tuple[int, float, float]:
    """(paired seeds, mean of a - b, two-sided paired t-test p) over the seeds both have."""
    import numpy as np
    from scipy import stats

    seeds = sorted(set(a) & set(b))
    if not seeds:
        return 0, math.nan, math.nan
    diff = np.array([a[s] - b[s] for s in seeds])
    mean = float(diff.mean())
    if len(seeds) < 2:
        return len(seeds), mean, math.nan
    if np.allclose(diff, diff[0]):
        # Constant differences: the t statistic is infinite (or undefined at 0): no spread to test against.
        return len(seeds), mean, 1.0 if abs(mean) < 1e-12 else 0.0
    return len(seeds), mean, float(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)


def _by_cell(stats_: list[RunStats]) -> dict[tuple, dict[str, list[RunStats]]]:
    cells: dict[tuple, dict[str, list[RunStats]]] = {}
    for s in stats_:
        cells.setdefault(s.cell, {}).setdefault(s.arm, []).append(s)
    return cells


def _natural(values: tuple) -> tuple:
    """Sort key: numbers as numbers (k_shot 64 before 256), the rest as text."""
    out = []
    for v in values:
        try:
            out.append((0, float(v), ""))
        except ValueError:
            out.append((1, 0.0, str(v)))
    return tuple(out)


def _arm_order(arms) -> list[str]:
    return sorted(arms, key=lambda m: (not m.startswith("infoprompt"), m))


def build_tables(stats_: list[RunStats], cell_cols: list[str], show_cols: list[str], metric: str, alpha: float):
    """(one row per cell and arm, one row per pair of arms in a cell with its paired test)."""
    import pandas as pd

    rows, sig_rows = [], []
    for cell, arms in sorted(_by_cell(stats_).items(), key=lambda kv: _natural(kv[0])):
        where = {c.removeprefix("params."): v for c, v in zip(cell_cols, cell) if c in show_cols}
        for arm in _arm_order(arms):
            runs = arms[arm]
            bv, test = mean_std([r.best_val for r in runs]), mean_std([r.test for r in runs])
            st, sec = mean_std([r.steps_to_target for r in runs]), mean_std([r.seconds_to_target for r in runs])
            sps = mean_std([r.samples_per_s for r in runs])
            rows.append({"method": arm, **where, "seeds": len(runs),
                         f"best_val_{metric}_mean": bv[0], f"best_val_{metric}_std": bv[1],
                         f"test_{metric}_mean": test[0], f"test_{metric}_std": test[1],
                         "steps_to_target_mean": st[0], "steps_to_target_std": st[1], "reached_target": st[2],
                         "seconds_to_target_mean": sec[0], "seconds_to_target_std": sec[1],
                         "samples_per_s_mean": sps[0], "samples_per_s_std": sps[1],
                         "run_ids": " ".join(r.run_id for r in runs)})
        order = _arm_order(arms)
        for i, a in enumerate(order):
            for b in order[i + 1:]:
                row = {**where, "method_a": a, "method_b": b}
                for label, attr in ((f"test_{metric}", "test"), (f"best_val_{metric}", "best_val")):
                    n, diff, p = paired_test({r.seed: getattr(r, attr) for r in arms[a]},
                                             {r.seed: getattr(r, attr) for r in arms[b]})
                    row.update({f"{label}_paired_seeds": n, f"{label}_mean_diff": diff, f"{label}_p": p,
                                f"{label}_significant": (p < alpha) if not _isnan(p) else None})
                sig_rows.append(row)
    return pd.DataFrame(rows), pd.DataFrame(sig_rows)


# --- plots -----------------------------------------------------------------------------------------------

# What each curve measures, for the y axis: every loss here is a mean per example in nats (natural log).
METRIC_UNITS = {"accuracy": "fraction correct", "macro_f1": "macro-F1, 0–1", "mcc": "MCC, −1 to 1",
                "f1": "F1, 0–1", "relation_f1": "macro-F1 w/o no-relation, 0–1", "entity_f1": "entity F1, 0–1"}
LOSS_TITLES = {"train/ce": "classification cross-entropy", "train/head": "L_head (InfoNCE, unweighted)",
               "train/repr": "L_repr (InfoNCE, unweighted)", "train/kl": "bottleneck KL (unweighted)"}
BAND = "shaded band: ± 1 sample std over seeds (none for n = 1)"


def _tasks(finished) -> str:
    for col in ("params.task", "tags.task"):
        if col in finished and finished[col].notna().any():
            return ", ".join(sorted(set(finished[col].dropna().astype(str))))
    return "task not recorded"


def _band(ax, runs: list[RunStats], key: str, label: str, color) -> bool:
    """Mean over seeds as a line, ± 1 sample std as a band; the legend names the method and its n."""
    import pandas as pd

    curves = [r.history[key].set_index("step")["value"].rename(r.run_id) for r in runs if key in r.history]
    if not curves:
        return False
    wide = pd.concat(curves, axis=1).sort_index()
    n = wide.shape[1]
    mean, std = wide.mean(axis=1), wide.std(axis=1, ddof=1)
    ax.plot(mean.index, mean.values, label=f"{label} (n={n} seed{'s' if n > 1 else ''})", color=color, lw=1.6)
    if n > 1:
        ax.fill_between(mean.index, (mean - std).values, (mean + std).values, color=color, alpha=0.2, lw=0)
    return True


def _finish(fig, path_stem: Path, caption: str) -> list[Path]:
    fig.text(0.01, 0.005, caption, fontsize=8, ha="left", va="bottom", style="italic")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    paths = []
    for ext in ("png", "svg"):
        paths.append(path_stem.with_suffix(f".{ext}"))
        fig.savefig(paths[-1], dpi=150)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return paths


def plot_cells(stats_: list[RunStats], cell_cols: list[str], show_cols: list[str], metric: str,
               out: Path, experiment: str = "", task: str = "") -> list[Path]:
    """Figures for a paper, PNG (to look at) and SVG (text kept as text, for editing and for the tests):

    * val_<metric>: the validation metric vs optimizer step, one panel per cell (e.g. per k_shot), one
      line per method with its n seeds, a ± std band;
    * losses__<cell>: per cell, one panel per loss: the cross-entropy (the one objective every method
      shares) with all methods on one axis; each method's total loss on its own panel (different
      objectives, not comparable); the MI terms of InfoPrompt on theirs.
    Titles name the experiment and task; captions say what the band is."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "font.size": 10})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    cells = sorted(_by_cell(stats_).items(), key=lambda kv: _natural(kv[0]))
    all_arms = _arm_order({a for _, arms in cells for a in arms})
    color = {a: colors[i % len(colors)] for i, a in enumerate(all_arms)}
    head = f"{experiment} — {task}" if experiment else task

    def cell_title(cell) -> str:
        shown = [(c.removeprefix("params."), v) for c, v in zip(cell_cols, cell) if c in show_cols]
        return ", ".join(f"{k}={v}" for k, v in shown)

    paths: list[Path] = []
    unit = METRIC_UNITS.get(metric, metric)
    fig, axes = plt.subplots(1, len(cells), figsize=(4.8 * len(cells) + 0.6, 3.8), squeeze=False, sharey=True)
    for ax, (cell, arms) in zip(axes[0], cells):
        for m in _arm_order(arms):
            _band(ax, arms[m], f"eval/{metric}", m, color[m])
        ax.set_xlabel("optimizer step")
        ax.set_title(cell_title(cell) or "all runs of the comparison", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[0][0].set_ylabel(f"validation {metric} ({unit})")
    fig.suptitle(f"{head}: validation {metric} during training")
    paths += _finish(fig, out / f"val_{metric}", f"Lines: mean over seeds; {BAND}.")

    for cell, arms in cells:
        order = _arm_order(arms)
        panels = []  # (title, [(arm, key)])
        if any("train/ce" in r.history for rs in arms.values() for r in rs):
            panels.append((LOSS_TITLES["train/ce"], [(m, "train/ce") for m in order]))
        for m in order:
            if any("train/loss" in r.history for r in arms[m]):
                panels.append((f"total loss of {m} (its own objective)", [(m, "train/loss")]))
        for key in ("train/head", "train/repr", "train/kl"):
            users = [m for m in order if any(key in r.history for r in arms[m])]
            if users:
                panels.append((LOSS_TITLES[key], [(m, key) for m in users]))
        if not panels:
            continue
        ncols = min(3, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.3 * ncols, 3.3 * nrows + 0.6), squeeze=False)
        for ax, (title, lines) in zip(axes.flat, panels):
            for m, key in lines:
                _band(ax, arms[m], key, m, color[m])
            ax.set(title=title, xlabel="optimizer step", ylabel="loss (nats per example)")
            ax.title.set_fontsize(10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="best")
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        where = cell_title(cell)
        fig.suptitle(f"{head}: training losses" + (f" ({where})" if where else ""))
        slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", where.replace(", ", "__")) or "all"
        paths += _finish(fig, out / f"losses__{slug}", f"Mean over seeds of the per-window training mean; {BAND}. "
                         "Total losses of different methods are different objectives: separate panels.")
    return paths


def ui_link(uri: str, experiment_id: str, sweep: Optional[str]) -> str:
    """A link that opens the MLflow UI (3.x routes: #/experiments/<id>/runs) on the training runs, flat:
    a search filter lists matching child runs directly instead of under their collapsed sweep parent."""
    from urllib.parse import quote

    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    query = f"tags.`sweep.name` = '{sweep}' AND tags.`sweep.role` = 'child'" if sweep \
        else "tags.method LIKE '%'"
    link = f"{base}/#/experiments/{experiment_id}/runs?searchFilter={quote(query)}&orderByKey={quote('attributes.run_name')}&orderByAsc=true"
    if not uri.startswith("http"):
        link += f"   (after: mlflow ui --backend-store-uri {uri})"
    return link


# --- output ----------------------------------------------------------------------------------------------

def markdown(df) -> str:
    """A GitHub-style table (pandas' to_markdown needs the optional `tabulate`)."""
    if df is None or df.empty:
        return "(none)\n"
    cols = list(df.columns)

    def cell(v):
        if isinstance(v, float):
            return "—" if math.isnan(v) else f"{v:.4g}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def display_table(table, show_cols: list[str], metric: str):
    """The table as people read it: one 'mean ± std' cell per quantity."""
    import pandas as pd

    if table.empty:
        return table
    out = table[["method"] + [c.removeprefix("params.") for c in show_cols] + ["seeds"]].copy()
    n = table["seeds"]
    out[f"best val {metric}"] = [fmt(m, s, 4, k) for m, s, k in zip(table[f"best_val_{metric}_mean"], table[f"best_val_{metric}_std"], n)]
    out[f"test {metric}"] = [fmt(m, s, 4, k) for m, s, k in zip(table[f"test_{metric}_mean"], table[f"test_{metric}_std"], n)]
    out["steps to target"] = [f"{fmt(m, s, 1, k)} ({k}/{t})" for m, s, k, t in
                              zip(table["steps_to_target_mean"], table["steps_to_target_std"], table["reached_target"], n)]
    out["seconds to target"] = [fmt(m, s, 1, k) for m, s, k in zip(table["seconds_to_target_mean"], table["seconds_to_target_std"], table["reached_target"])]
    out["samples/s"] = [fmt(m, s, 1, k) for m, s, k in zip(table["samples_per_s_mean"], table["samples_per_s_std"], n)]
    return pd.DataFrame(out)


def significance_lines(sig, metric: str, alpha: float) -> list[str]:
    lines = []
    for _, r in sig.iterrows():
        where = ", ".join(f"{k}={r[k]}" for k in sig.columns if k not in ("method_a", "method_b")
                          and not k.startswith(("test_", "best_val_")))
        key = f"test_{metric}"
        n, d, p = r[f"{key}_paired_seeds"], r[f"{key}_mean_diff"], r[f"{key}_p"]
        if _isnan(p):
            verdict = f"not testable (need >= 2 paired seeds, have {n})"
        else:
            verdict = ("significant" if p < alpha else "not significant") + f" at alpha={alpha} (paired t-test p={p:.3g})"
        lines.append(f"{r['method_a']} vs {r['method_b']}" + (f" [{where}]" if where else "")
                     + f": test {metric} difference {d:+.4f} over {n} paired seeds: {verdict}")
    return lines


def compare(opts: Options, echo=print) -> Comparison:
    import pandas as pd
    from mlflow import MlflowClient

    df, exp = load_runs(opts)
    if df.empty:
        raise ConfigError("experiment", f"experiment {opts.experiment!r} has no training runs"
                          + (f" of sweep {opts.sweep!r}" if opts.sweep else ""))
    metric = opts.metric
    if metric is None:
        col = df.get("params.metric_for_best_model")
        values = set(col.dropna()) if col is not None else set()
        metric = values.pop() if len(values) == 1 else "accuracy"
    available = sorted(c.removeprefix("metrics.test/") for c in df.columns if c.startswith("metrics.test/"))
    if metric not in available:
        raise ConfigError("metric", f"no run of {opts.experiment!r} has test/{metric}; available: "
                          f"{', '.join(available) or 'none (no run finished with test metrics)'}")
    finished, excluded = split_runs(df, metric)
    params = sorted(_param_columns(finished)) if not finished.empty else []
    cell_cols = [c for c in params if c != "params.method" and c[len("params."):] not in METHOD_PARAMS]
    method_cols = [c for c in params if c[len("params."):] in METHOD_PARAMS]
    # Shown: the cell columns that differ between cells (k_shot, backbone, ...); the rest is shared.
    show_cols = [c for c in cell_cols if finished[c].astype(str).nunique() > 1]

    client = MlflowClient(opts.tracking_uri)
    stats_ = [run_stats(client, r, cell_cols, arm_name(finished, r, method_cols), metric, opts.target)
              for _, r in finished.iterrows()]
    # One result per (cell, arm, seed): a cell trained twice counts once (the newest run).
    newest: dict[tuple, RunStats] = {}
    start = dict(zip(finished["run_id"], finished["start_time"]))
    dupes = []
    for s in sorted(stats_, key=lambda s: start[s.run_id]):
        key = (s.cell, s.arm, s.seed)
        if key in newest:
            dupes.append(newest[key].run_id)
        newest[key] = s
    stats_ = list(newest.values())
    excl = pd.DataFrame({"run_id": excluded["run_id"], "name": excluded["tags.mlflow.runName"],
                         "status": excluded["status"], "reason": excluded["_reason"]})
    if dupes:
        excl = pd.concat([excl, pd.DataFrame({"run_id": dupes, "name": "", "status": "FINISHED",
                                              "reason": "older duplicate of a newer run with the same params and seed"})])

    out = Path(opts.output_dir or Path("outputs") / "compare" / re.sub(r"[^A-Za-z0-9_.-]+", "_", opts.experiment))
    out.mkdir(parents=True, exist_ok=True)
    if stats_:
        table, sig = build_tables(stats_, cell_cols, show_cols, metric, opts.alpha)
        plots = plot_cells(stats_, cell_cols, show_cols, metric, out, opts.experiment, _tasks(finished))
    else:
        table, sig, plots = pd.DataFrame(), pd.DataFrame(), []
    shown = display_table(table, show_cols, metric)

    table.to_csv(out / "comparison.csv", index=False)
    sig.to_csv(out / "significance.csv", index=False)
    sig_text = significance_lines(sig, metric, opts.alpha) if not sig.empty else ["no method pairs to test"]
    report = [f"# {opts.experiment}: {len(stats_)} finished runs" + (f" (sweep {opts.sweep})" if opts.sweep else ""),
              "", f"metric: {metric}; target: validation {metric} >= {opts.target}; mean ± std over seeds", "",
              markdown(shown), "## Significance (paired over seeds)", "", *[f"- {x}" for x in sig_text], "",
              "## Not included", "", markdown(excl)]
    (out / "comparison.md").write_text("\n".join(report), encoding="utf-8")
    echo("\n".join(report))
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
