"""Models for testing the CDL model contract, logged with MLflow's models-from-code; the
`behaviour` in the model config picks what `predict` does."""

import mlflow
import numpy as np
import pandas as pd


class ContractProbe(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        behaviour = context.model_config["behaviour"]
        count = len(model_input)
        if behaviour == "constant":  # the same label for everything
            return {"label": [context.model_config["label"]] * count, "score": [0.5] * count}
        if behaviour == "describe":  # what the model was given, as its label
            if isinstance(model_input, pd.DataFrame):
                described = [f"text:{t.split()[0]}" for t in model_input["text"]]
            else:
                array = np.asarray(model_input)
                described = [f"{array.dtype}{list(array.shape[1:])}"] * count
            return pd.DataFrame({"label": described, "score": [1.0] * count})
        if behaviour == "no-label":
            return pd.DataFrame({"class": ["x"] * count})
        raise RuntimeError("the model broke")


mlflow.models.set_model(ContractProbe())
