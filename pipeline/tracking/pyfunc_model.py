"""The code of the registered model (MLflow "models from code"): loading the model runs this file, which names
the pyfunc class (`pipeline.tracking.model.ItrModel`); nothing is unpickled."""
import mlflow

from pipeline.tracking.model import ItrModel

mlflow.models.set_model(ItrModel())
