"""The model every training logs to MLflow: texts in, labels out.

    import mlflow
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")   # or the models:/<id> URI the UI shows
    model.predict(["a gripping, funny film", "a dull mess"])    # -> ["fresh", "rotten"]
    model.predict(pd.DataFrame({"text": [...], "text_pair": [...]}))   # a sentence-pair export

A wrapper of infoprompt_ds.predict.Predictor. The export (soft prompt + head of the weights that gave the
reported test metrics) is the model's artifact; the frozen backbone is not copied, it is named in
model_config["backbone"] (a path or hub name): where it moved, `load_model(uri, model_config={"backbone":
...})`. `log_predictor_model` logs it as "models from code" (pyfunc_entry.py, not a pickled object),
with a signature and an input example. Separate from the tracker (client.py, outbox.py) so that importing
the tracker does not import mlflow.pyfunc.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

# An input example per task family: what the UI shows, checked against the signature when logged; the
# run's closing summary (runtime/summary.py) predicts the same texts.
EXAMPLES = {"classification": "a gripping, funny film", "ner": "Alice flew from Paris to Berlin",
            "relation": "The {0}company{1} fabricates plastic {2}chairs{3} ."}
PAIR_EXAMPLE = ("A man is playing a guitar on stage.", "A person is making music.")


class PredictorModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from infoprompt_ds.predict import Predictor

        self.predictor = Predictor.load(context.artifacts["export"], context.model_config["backbone"])

    # The DataFrame hint: pyfunc hands one (the signature's columns); without a hint MLflow warns at every
    # load_model that the method has none.
    def predict(self, context, model_input: pd.DataFrame, params=None):
        if hasattr(model_input, "iloc"):  # first column: the texts; a second one: the pairs' second texts
            texts = model_input.iloc[:, 0].astype(str).tolist()
            pairs = model_input.iloc[:, 1].astype(str).tolist() if model_input.shape[1] > 1 else None
            return self.predictor.predict(texts, pairs)
        if isinstance(model_input, str):
            return self.predictor.predict([model_input])
        return self.predictor.predict([str(t) for t in list(model_input)])


def example_and_signature(export_dir: str, task_type: str):
    """(input example, signature) for the export: one text column, or text + text_pair for pairs."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    meta = json.loads((Path(export_dir) / "infoprompt_config.json").read_text(encoding="utf-8"))
    outputs = None if task_type == "ner" else Schema([ColSpec("string")])  # one label per text (NER: tags per word)
    if meta.get("text_pair_column"):
        inputs = Schema([ColSpec("string", "text"), ColSpec("string", "text_pair")])
        example = pd.DataFrame({"text": [PAIR_EXAMPLE[0]], "text_pair": [PAIR_EXAMPLE[1]]})
    else:
        markers = meta.get("entity_markers") or ["<e1>", "</e1>", "<e2>", "</e2>"]
        inputs, example = Schema([ColSpec("string")]), [EXAMPLES.get(task_type, EXAMPLES["classification"]).format(*markers)]
    return example, ModelSignature(inputs=inputs, outputs=outputs)


def log_predictor_model(uri: str, run_id: str, export_dir: str, backbone: str, task_type: str) -> None:
    """Log `export_dir` as this run's pyfunc model `model` (the tracker's outbox sends it at the end)."""
    import mlflow
    from importlib.metadata import version

    from infoprompt_ds.internals import log_pyfunc_model_unserved

    example, signature = example_and_signature(export_dir, task_type)
    # Explicit requirements: inferring them would import-trace the model in a subprocess (slow).
    reqs = [f"{p}=={version(p)}" for p in ("torch", "transformers", "mlflow", "safetensors")] + ["infoprompt-ds"]
    # Copying the export into the model shows "Downloading artifacts" bars: noise where the result is read.
    # Our process only (and a user's own setting wins).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(uri)
    active = mlflow.active_run()
    if active is not None and active.info.run_id != run_id:
        raise RuntimeError("another MLflow run is active in this process")
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    pyfunc_log.setLevel(logging.WARNING)  # its INFO line on checking the example: noise (warnings still show)
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        try:
            log_pyfunc_model_unserved(name="model", python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
                                      artifacts={"export": export_dir},
                                      model_config={"backbone": backbone}, signature=signature,
                                      input_example=example, pip_requirements=reqs)
        finally:
            pyfunc_log.setLevel(level)
