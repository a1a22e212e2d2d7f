"""The model every training logs to MLflow: texts in, labels out.

    import mlflow
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")   # or the models:/<id> URI the UI shows
    model.predict(["a gripping, funny film", "a dull mess"])    # -> ["fresh", "rotten"]

A wrapper of infoprompt_ds.predict.Predictor. The export (soft prompt + head of the weights that gave the
reported test metrics) is the model's artifact; the frozen backbone is not copied, it is named in
model_config["backbone"] (a path or hub name): where it moved, `load_model(uri, model_config={"backbone":
...})`. `log_predictor_model` logs it. Separate from the tracker (tracking.py, tracking_outbox.py) so
that importing the tracker does not import mlflow.pyfunc.
"""

from __future__ import annotations

import mlflow.pyfunc


class PredictorModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from infoprompt_ds.predict import Predictor

        self.predictor = Predictor.load(context.artifacts["export"], context.model_config["backbone"])

    def predict(self, context, model_input, params=None):
        if hasattr(model_input, "iloc"):  # pyfunc hands a DataFrame: its first column holds the texts
            texts = model_input.iloc[:, 0].astype(str).tolist()
        elif isinstance(model_input, str):
            texts = [model_input]
        else:
            texts = [str(t) for t in list(model_input)]
        return self.predictor.predict(texts)


def log_predictor_model(uri: str, run_id: str, export_dir: str, backbone: str, task_type: str) -> None:
    """Log `export_dir` as this run's pyfunc model `model` (the tracker's outbox sends it at the end)."""
    import mlflow
    from importlib.metadata import version
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    outputs = None if task_type == "ner" else Schema([ColSpec("string")])  # one label per text
    signature = ModelSignature(inputs=Schema([ColSpec("string")]), outputs=outputs)  # a list of texts
    # Explicit requirements: inferring them would import-trace the model in a subprocess (slow).
    reqs = [f"{p}=={version(p)}" for p in ("torch", "transformers", "mlflow", "safetensors")] + ["infoprompt-ds"]
    mlflow.set_tracking_uri(uri)
    active = mlflow.active_run()
    if active is not None and active.info.run_id != run_id:
        raise RuntimeError("another MLflow run is active in this process")
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        mlflow.pyfunc.log_model(name="model", python_model=PredictorModel(), artifacts={"export": export_dir},
                                model_config={"backbone": backbone}, signature=signature, pip_requirements=reqs)
