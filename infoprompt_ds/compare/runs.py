"""compare, step 1: the training runs of an experiment (or of one sweep) as MLflow holds them.

Finds the store (`find_store`, through tracking_store.default_store) and the experiment, reads its runs
(mlflow.search_runs; comparison runs and sweep parents left out), separates FINISHED runs with a test
metric from the rest (`split_runs`), decides which params form a comparison cell and which belong to a
method (`param_roles`), and reads each run's metric histories into a `RunStats`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from infoprompt_ds.config import ConfigError, TrainConfig
from infoprompt_ds.tracking.run_metadata import non_identity_fields
from infoprompt_ds.tracking.store import DB_NAME, SWEEPS_ROOT, default_store

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


def find_experiment(uri: str, experiment: Optional[str], sweep: Optional[str]):
    """(experiment, sweep name): the experiment named by --experiment; else the one holding the sweep (the
    sweep's name read from its parent run when there is one sweep and none was named); else the store's
    only one."""
    import mlflow

    if experiment:
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is None:
            names = [e.name for e in mlflow.search_experiments()]
            raise ConfigError("experiment", f"no experiment named {experiment!r} at {uri}; "
                              f"it has: {', '.join(names) or 'none'}")
        return exp, sweep
    role = "tags.`sweep.role` = 'parent'"
    parents = mlflow.search_runs(search_all_experiments=True, output_format="list", filter_string=role
                                 + (f" and tags.`sweep.name` = '{sweep}'" if sweep else ""))
    if parents:
        if not sweep:
            names = sorted({r.data.tags["sweep.name"] for r in parents})
            if len(names) > 1:
                raise ConfigError("sweep", f"{uri} holds sweeps {', '.join(names)}; name one")
            sweep = names[0]
        return mlflow.get_experiment(parents[0].info.experiment_id), sweep
    if sweep:
        raise ConfigError("sweep", f"no sweep named {sweep!r} at {uri}")
    exps = [e for e in mlflow.search_experiments() if mlflow.search_runs([e.experiment_id], max_results=1,
                                                                          output_format="list")]
    if len(exps) != 1:
        raise ConfigError("experiment", f"pass --experiment; {uri} has "
                          f"{', '.join(e.name for e in exps) or 'no runs'}")
    return exps[0], sweep


def load_runs(uri: str, experiment: Optional[str], sweep: Optional[str]):
    """(the training runs as a DataFrame, the experiment, the sweep name): see find_experiment."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    try:
        exp, sweep = find_experiment(uri, experiment, sweep)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - unreachable server or bad URI: one line for the user
        raise ConfigError("tracking_uri", f"cannot read MLflow at {uri}: {str(e).splitlines()[0][:200]}")
    df = mlflow.search_runs(experiment_ids=[exp.experiment_id], output_format="pandas", max_results=50000)
    if df.empty:
        return df, exp, sweep
    for col in (f"tags.{COMPARISON_TAG}", "tags.sweep.role", "tags.sweep.name", "tags.mlflow.runName"):
        if col not in df:
            df[col] = None
    df = df[(df[f"tags.{COMPARISON_TAG}"] != "comparison") & (df["tags.sweep.role"] != "parent")]
    if sweep:
        df = df[df["tags.sweep.name"] == sweep]
    return df.reset_index(drop=True), exp, sweep


def history(client, run_id: str, key: str):
    import pandas as pd

    rows = [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key)]
    h = pd.DataFrame(rows, columns=["step", "value", "timestamp"])
    # A resumed run may log a step twice; the later value is the one that counts.
    return h.sort_values(["step", "timestamp"]).drop_duplicates("step", keep="last").reset_index(drop=True)


def _param_columns(df) -> list[str]:
    return [c for c in df.columns if c.startswith("params.") and c[len("params."):] not in IGNORED_PARAMS]


def choose_metric(df, metric: Optional[str], experiment: str) -> str:
    """The metric to compare on: the one asked for, else the runs' metric_for_best_model when they agree,
    else accuracy; it must be a test/<metric> some run logged."""
    if metric is None:
        col = df.get("params.metric_for_best_model")
        values = set(col.dropna()) if col is not None else set()
        metric = values.pop() if len(values) == 1 else "accuracy"
    available = sorted(c.removeprefix("metrics.test/") for c in df.columns if c.startswith("metrics.test/"))
    if metric not in available:
        raise ConfigError("metric", f"no run of {experiment!r} has test/{metric}; available: "
                          f"{', '.join(available) or 'none (no run finished with test metrics)'}")
    return metric


def param_roles(finished) -> tuple[list[str], list[str], list[str]]:
    """(cell columns: what two methods must share to be compared; method columns: a method's own params;
    shown columns: the cell columns that differ between cells, e.g. k_shot or backbone)."""
    params = sorted(_param_columns(finished)) if not finished.empty else []
    cell_cols = [c for c in params if c != "params.method" and c[len("params."):] not in METHOD_PARAMS]
    method_cols = [c for c in params if c[len("params."):] in METHOD_PARAMS]
    # Shown: the cell columns that differ between cells (k_shot, backbone, ...); the rest is shared.
    show_cols = [c for c in cell_cols if finished[c].astype(str).nunique() > 1]
    return cell_cols, method_cols, show_cols


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
        if f"metrics.{key}" in r.index and not is_nan(r[f"metrics.{key}"]):
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


def newest_per_seed(stats_: list[RunStats], finished) -> tuple[list[RunStats], list[str]]:
    """One result per (cell, arm, seed): a cell trained twice counts once (the newest run). Returns (the
    results kept, the run ids of the older duplicates)."""
    newest: dict[tuple, RunStats] = {}
    start = dict(zip(finished["run_id"], finished["start_time"]))
    dupes = []
    for s in sorted(stats_, key=lambda s: start[s.run_id]):
        key = (s.cell, s.arm, s.seed)
        if key in newest:
            dupes.append(newest[key].run_id)
        newest[key] = s
    return list(newest.values()), dupes


def excluded_runs(excluded, dupes: list[str]):
    """The runs not averaged in, with the reason: not FINISHED, no test metric, or an older duplicate."""
    import pandas as pd

    excl = pd.DataFrame({"run_id": excluded["run_id"], "name": excluded["tags.mlflow.runName"],
                         "status": excluded["status"], "reason": excluded["_reason"]})
    if dupes:
        excl = pd.concat([excl, pd.DataFrame({"run_id": dupes, "name": "", "status": "FINISHED",
                                              "reason": "older duplicate of a newer run with the same params and seed"})])
    return excl


def task_names(finished) -> str:
    """The tasks the runs were trained on, for the figures' titles."""
    for col in ("params.task", "tags.task"):
        if col in finished and finished[col].notna().any():
            return ", ".join(sorted(set(finished[col].dropna().astype(str))))
    return "task not recorded"


def is_nan(v) -> bool:
    """None or NaN (a value that is not there); False for anything that is not a number."""
    try:
        return v is None or math.isnan(float(v))
    except (TypeError, ValueError):
        return False
