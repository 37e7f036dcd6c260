"""The students' MLflow pyfunc models, logged as "models from code" by :mod:`flexkd.tracking.models`.

Each module here is copied into the logged model and run by MLflow when the model loads, wherever it is
served: it imports mlflow, torch, transformers and pandas only, never flexkd, and ends by naming its model
with ``mlflow.models.set_model``. ``text_classifier``: text -> label, score; ``text_generator``: prompt -> text.
"""
