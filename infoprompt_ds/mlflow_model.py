"""The model every training logs to MLflow: texts in, labels out.

    import mlflow
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")   # or the models:/<id> URI the UI shows
    model.predict(["a gripping, funny film", "a dull mess"])    # -> ["fresh", "rotten"]

A wrapper of infoprompt_ds.predict.Predictor. The export (soft prompt + head of the weights that gave the
reported test metrics) is the model's artifact; the frozen backbone is not copied, it is named in
model_config["backbone"] (a path or hub name): where it moved, `load_model(uri, model_config={"backbone":
...})`. Separate from tracking.py so that importing the tracker does not import mlflow.pyfunc.
"""

from __future__ import annotations

import mlflow.pyfunc


class PredictorModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from .predict import Predictor

        self.predictor = Predictor.load(context.artifacts["export"], context.model_config["backbone"])

    def predict(self, context, model_input, params=None):
        if hasattr(model_input, "iloc"):  # pyfunc hands a DataFrame: its first column holds the texts
            texts = model_input.iloc[:, 0].astype(str).tolist()
        elif isinstance(model_input, str):
            texts = [model_input]
        else:
            texts = [str(t) for t in list(model_input)]
        return self.predictor.predict(texts)
