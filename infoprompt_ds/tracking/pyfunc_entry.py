"""MLflow "models from code" entry of the logged pyfunc model (mlflow_model.py): MLflow copies this file
into the model and runs it at load time, instead of unpickling an object (MLflow warns on a pickled one)."""

import mlflow

from infoprompt_ds.tracking.mlflow_model import PredictorModel

mlflow.models.set_model(PredictorModel())
