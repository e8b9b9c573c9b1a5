"""CDL: continuous deep learning pipelines (data, model, deployment) as code."""

__version__ = "0.1.0"
