"""What every MLflow run carries: its name, tags, package versions, the resolved values it logs as params,
its datasets (with a digest of the token ids trained on), and which config fields identify a run.
The tracker (tracking.py) sends these; this module only decides what they are. Names are an API:
docs/tracking.md lists each one (tests/unit/test_tracking.py checks it).

Hooks for launchers (the sweep uses them; they work through the plain CLI):
  MLFLOW_RUN_ID                  log into this existing run (MLflow's own variable)
  INFOPROMPT_MLFLOW_PARENT_RUN_ID  make the run a child of this run (nested runs in the UI)
  INFOPROMPT_MLFLOW_TAGS         JSON object of extra tags for the run
  MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=true  log system/* (CPU, memory, GPU) metrics
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional

from infoprompt_ds.config import one_line

PARENT_TAG = "mlflow.parentRunId"
ENV_PARENT = "INFOPROMPT_MLFLOW_PARENT_RUN_ID"
ENV_TAGS = "INFOPROMPT_MLFLOW_TAGS"


_TASK_SHORT = {"rotten_tomatoes": "rt", "semeval2010_task8": "semeval", "wnut_tweets": "wnut"}
VERSIONED = ("torch", "deepspeed", "transformers", "datasets", "peft", "mlflow", "infoprompt-ds")


def non_identity_fields() -> set[str]:
    """Config fields that do not change what a run computes (where it writes, how often it logs, system
    metrics, caches): marked `"identity": False` in TrainConfig's field metadata. They never split a
    comparison group (compare) nor make a finished sweep cell new (sweep)."""
    from dataclasses import fields

    from infoprompt_ds.config import TrainConfig

    return {f.name for f in fields(TrainConfig) if f.metadata.get("identity", True) is False}


def task_name(cfg) -> str:
    """What the run was trained on, as a person names it: the preset, the dataset, or the train file."""
    if cfg.task:
        return cfg.task
    if cfg.train_file:
        return Path(cfg.train_file).stem
    return str(cfg.dataset)


def run_name_for(cfg, extra: tuple[str, ...] = ()) -> str:
    """The parts that tell runs apart first, so the UI's cut-short names still show them: method, seed,
    k-shot, any `extra` parts (a sweep's other grid values), then backbone and task:
    infoprompt-s0-k64-minilm-rt (an explicit run_name wins)."""
    if cfg.run_name:
        return cfg.run_name
    words = [w for w in re.split(r"[-_/.]+", Path(str(cfg.model_name_or_path)).name.lower()) if w]
    backbone = next((w for w in words if w not in ("all", "sentence", "transformers")), "model")
    task = task_name(cfg).split("/")[-1]
    task = _TASK_SHORT.get(task, task)
    k = f"k{cfg.k_shot}" if cfg.k_shot else "full"
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "-".join([cfg.method, f"s{cfg.seed}", k, *extra, backbone, task]))


def run_tags(cfg) -> dict[str, str]:
    """The run's own tags (the standard mlflow.* ones come from MLflow's context providers in start)."""
    return {"method": cfg.method, "backbone": str(cfg.model_name_or_path), "task": task_name(cfg),
            "seed": str(cfg.seed), "k_shot": str(cfg.k_shot)}


def standard_tags() -> dict[str, str]:
    """mlflow.user, mlflow.source.name/type, mlflow.source.git.commit (MLflow's own context providers, as
    mlflow.start_run sets them) and the versions of the packages that decide the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    tags: dict[str, str] = {}
    try:
        from mlflow.tracking.context.registry import resolve_tags

        tags.update(resolve_tags({}))
    except Exception as e:  # noqa: BLE001 - a context provider failing must not stop the training
        print(f"warning: MLflow run context tags unavailable: {one_line(e)}", file=sys.stderr, flush=True)
    if tags.get("mlflow.source.name") in (None, "", "-"):
        tags["mlflow.source.name"] = str(Path(sys.argv[0]).resolve()) if sys.argv and sys.argv[0] else "python"
    tags.setdefault("mlflow.source.type", "LOCAL")
    if "mlflow.source.git.commit" not in tags:
        commit = _git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
    for pkg in VERSIONED:
        try:
            tags[f"version.{pkg}"] = version(pkg)
        except PackageNotFoundError:
            pass
    tags["version.python"] = sys.version.split()[0]
    return tags


def _git_commit() -> Optional[str]:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[2],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def env_tags() -> dict[str, str]:
    """Extra run tags a launcher passed through the environment (INFOPROMPT_MLFLOW_TAGS, ..._PARENT_RUN_ID)."""
    tags: dict[str, str] = {}
    raw = os.environ.get(ENV_TAGS)
    if raw:
        try:
            tags.update({str(k): str(v) for k, v in json.loads(raw).items()})
        except (ValueError, AttributeError):
            print(f"warning: {ENV_TAGS} is not a JSON object; ignored", file=sys.stderr, flush=True)
    if os.environ.get(ENV_PARENT):
        tags[PARENT_TAG] = os.environ[ENV_PARENT]
    return tags


# --- what a training logs beyond its config ------------------------------------------------------------

def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not k.endswith("label_words"):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:6000]  # MLflow's param value limit
    return out


def dataset_entity(name: str, split, source: str) -> dict[str, str]:
    """An MLflow dataset (the UI's Datasets column) for a tokenized split: the digest hashes the token ids
    and labels actually trained on, so two runs on different k-shot samples show different digests."""
    import hashlib

    h = hashlib.sha256()
    for col in ("input_ids", "labels"):
        if col in split.column_names:
            h.update(json.dumps(list(split[col])).encode())
    profile = {"num_rows": len(split)}
    schema = {"mlflow_colspec": [{"name": c, "type": "string"} for c in split.column_names]}
    return {"name": name, "digest": h.hexdigest()[:16], "source_type": "local",
            "source": json.dumps({"uri": source}), "schema": json.dumps(schema), "profile": json.dumps(profile)}


def resolved_params(cfg, data, pooling: str, ds_config: dict[str, Any]) -> dict[str, Any]:
    """What the run actually used where the config says `auto`/None (pooling, task, task type, metric,
    warmup steps, labels): logged before the config itself, so that these values win over `auto`."""
    sched = (ds_config.get("scheduler") or {}).get("params") or {}
    return {"pooling": pooling, "task": task_name(cfg), "task_type": data.task.type,
            "metric_for_best_model": data.task.metric, "labels": list(data.label_names),
            "label_words": data.task.label_words, "text_column": data.task.text_column,
            "text_pair_column": data.task.text_pair_column, "label_column": data.task.label_column,
            "no_relation_label": data.task.no_relation_label,
            "warmup_steps": sched.get("warmup_num_steps", cfg.warmup_steps),
            "deepspeed": cfg.deepspeed or "ds_configs/zero3.json",
            # the read-out auto resolved to, and the cloze template / lm_label cue the run applied
            **{k: v for k, v in getattr(data, "readout", None).meta().items() if v is not None}}


def dataset_inputs(cfg, data) -> list[dict[str, Any]]:
    """The train/validation/test splits as MLflow dataset inputs ({"context": split, "dataset": entity})."""
    files = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}
    datasets = []
    for split in ("train", "validation", "test"):
        if split in data.splits:
            source = str(Path(files[split]).resolve()) if files[split] else f"{cfg.dataset}:{split}"
            name = f"{task_name(cfg).split('/')[-1]}-{split}"
            datasets.append({"context": split, "dataset": dataset_entity(name, data.splits[split], source)})
    return datasets


def best_metrics(result: dict[str, Any]) -> dict[str, float]:
    """best_step and the best validation value of a finished run's result (what metrics.json holds)."""
    return {k: float(v) for k, v in result.items() if (k == "best_step" or k.startswith("best_validation_"))
            and v is not None}


def summary_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The run's headline numbers under best/, which sorts before eval/, system/, test/ and train/ in the
    UI's alphabetical metric lists: best/step, best/validation_<metric> and, when the best validation
    weights were the ones tested, best/test_<metric> (the task's selection metric only: few and obvious)."""
    metric = next((k.removeprefix("best_validation_") for k in result if k.startswith("best_validation_")), None)
    out = {"best/step": result.get("best_step")}
    if metric is not None:
        out[f"best/validation_{metric}"] = result[f"best_validation_{metric}"]
        if result.get("test_weights") == "best":
            out[f"best/test_{metric}"] = (result.get("test") or {}).get(metric)
    return {k: float(v) for k, v in out.items() if v is not None}


def summary_note(result: dict[str, Any]) -> str:
    """The run's description (tag mlflow.note.content, the run page's Description): its headline in words,
    e.g. "test accuracy 0.6899, validation accuracy 0.7166, best step 180"."""
    m = summary_metrics(result)
    parts = [f"{k.removeprefix('best/').replace('_', ' ')} {v:.4f}" for k, v in sorted(m.items()) if k != "best/step"]
    return ", ".join(parts + ([f"best step {int(m['best/step'])}"] if "best/step" in m else []))


def tested_weights(output_dir: str | Path, result: dict[str, Any]) -> Path:
    """The weights behind the reported test metrics: `best/`, or `export/` when the last step was tested."""
    out = Path(output_dir)
    return out / ("best" if result.get("test_weights") == "best" and (out / "best").is_dir() else "export")
