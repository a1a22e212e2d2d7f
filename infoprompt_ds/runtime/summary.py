"""The block a training prints last: what came out, where it is, and the next two commands.

Printed after the MLflow run has ended (the pyfunc model is logged as the run ends), so it is the last thing
on the screen, where a user looks for the result.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any, Optional

from infoprompt_ds.config import TrainConfig
# the logged model's input examples: the printed predict command runs on the same texts
from infoprompt_ds.tracking.mlflow_model import EXAMPLES as EXAMPLE_TEXT, PAIR_EXAMPLE as PAIR_TEXT
from infoprompt_ds.tracking.run_metadata import tested_weights
from infoprompt_ds.tracking.store import default_tracking_uri



def predict_command(weights: Path) -> str:
    """`infoprompt predict` on the tested weights with an input of the export's own kind."""
    meta = json.loads((weights / "infoprompt_config.json").read_text(encoding="utf-8"))
    cmd = f"infoprompt predict --export {shlex.quote(str(weights))} --text "
    if meta.get("text_pair_column"):
        return cmd + f"{shlex.quote(PAIR_TEXT[0])} --text_pair {shlex.quote(PAIR_TEXT[1])}"
    markers = meta.get("entity_markers") or ["<e1>", "</e1>", "<e2>", "</e2>"]
    text = EXAMPLE_TEXT.get(meta.get("task_type"), EXAMPLE_TEXT["classification"]).format(*markers)
    return cmd + shlex.quote(text)


def _metrics(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in values.items())


def summary_lines(cfg: TrainConfig, result: dict[str, Any], uri: Optional[str]) -> list[str]:
    """The block's lines; `uri` is the MLflow store the run went to (None: tracking off)."""
    out = Path(cfg.output_dir)
    weights = tested_weights(out, result)
    best = next((k for k in result if k.startswith("best_validation_")), None)
    best_text = f"step {result.get('best_step')}"
    if best and result.get(best) is not None:
        best_text += f" (validation {best[len('best_validation_'):]}={result[best]:.4f})"
    run_id = result.get("mlflow_run_id")
    data = cfg.train_file or cfg.task or cfg.dataset
    lines = [f"== done: {cfg.method} on {data}, {result.get('global_step')} steps ==",
             f"best      {best_text}",
             f"test      {_metrics(result.get('test') or {})} ({result.get('test_weights')} weights: {weights})",
             f"outputs   {out}/ (metrics.json, export/, best/)"]
    if uri and run_id:
        lines.append(f"MLflow    run {run_id} in {uri} (model: runs:/{run_id}/model)")
    elif uri:
        lines.append(f"MLflow    run not created yet (store {uri} unreachable; see the warning above)")
    lines.append(f"predict   {predict_command(weights)}")
    if uri:
        lines.append(f"compare   infoprompt compare --experiment {shlex.quote(cfg.mlflow_experiment)} "
                     f"--tracking_uri {shlex.quote(uri)}")
    return lines


def print_summary(cfg: TrainConfig, result: dict[str, Any], tracking: bool = True) -> None:
    uri = default_tracking_uri(cfg.output_dir)[0] if tracking else None
    print("\n" + "\n".join(summary_lines(cfg, result, uri)), flush=True)
