"""MLflow tracking, on rank 0 only (other ranks get a tracker whose calls do nothing).

Default store: a sqlite file `mlflow.db` beside output_dir (in its parent), artifacts in `mlartifacts/`
there; MLFLOW_TRACKING_URI (e.g. http://127.0.0.1:5000) selects a server instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional


def default_tracking_uri(output_dir: str) -> tuple[str, Optional[str]]:
    """(tracking URI, artifact location for a new experiment)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    parent = Path(output_dir).resolve().parent
    return f"sqlite:///{parent / 'mlflow.db'}", (parent / "mlartifacts").as_uri()


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not k.endswith("label_words"):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:6000]  # MLflow's param value limit
    return out


class Tracker:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.run_id: Optional[str] = None

    def start(self, experiment: str, output_dir: str, run_name: str, run_id: Optional[str],
              tags: dict[str, str]) -> Optional[str]:
        """Open a new run, or reopen `run_id` (a resumed training continues its MLflow run)."""
        if not self.enabled:
            return None
        import mlflow

        uri, artifact_location = default_tracking_uri(output_dir)
        mlflow.set_tracking_uri(uri)
        if mlflow.get_experiment_by_name(experiment) is None:
            try:
                mlflow.create_experiment(experiment, artifact_location=artifact_location)
            except mlflow.exceptions.MlflowException:
                pass  # created meanwhile by a concurrent run
        mlflow.set_experiment(experiment)
        run = mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        if self.enabled:
            import mlflow

            flat = flatten(params)
            items = list(flat.items())
            for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
                mlflow.log_params(dict(items[i:i + 100]))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        if self.enabled:
            import mlflow

            if Path(path).is_dir():
                mlflow.log_artifacts(str(path), artifact_path)
            else:
                mlflow.log_artifact(str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            import mlflow

            mlflow.end_run(status=status)
            self.run_id = None
