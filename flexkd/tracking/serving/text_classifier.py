"""Text classifier served by MLflow pyfunc: a save_pretrained checkpoint -> label names and probabilities.

Logged as an MLflow "model from code" by :mod:`flexkd.tracking.models`: MLflow copies this file into the
model and runs it on load, where ``mlflow.models.set_model`` at the end names the model. It imports mlflow,
torch, transformers and pandas only, never flexkd, so the served model needs no flexkd.
"""

import mlflow
import pandas as pd


class TextClassifierModel(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame with "text" (and optionally "text_pair"). Output: "label" (name) and "score"."""

    batch_size = 32

    def load_context(self, context):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        checkpoint = context.artifacts["checkpoint"]
        config = dict(context.model_config or {})
        self.max_length = int(config.get("max_length", 512))
        label_map = config.get("label_map") or {}
        self.id2label = {int(i): str(name) for name, i in label_map.items()}
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.model = AutoModelForSequenceClassification.from_pretrained(checkpoint).to(self.device).eval()
        if not self.id2label:
            self.id2label = {int(i): str(n) for i, n in self.model.config.id2label.items()}

    def predict(self, context, model_input, params=None):
        import torch

        if isinstance(model_input, pd.DataFrame):
            frame = model_input
        elif isinstance(model_input, dict):
            frame = pd.DataFrame(model_input)
        else:
            frame = pd.DataFrame({"text": list(model_input)})
        texts = [str(t) for t in frame["text"].tolist()]
        pairs = None
        if "text_pair" in frame.columns:
            pairs = [None if v is None or v != v else str(v) for v in frame["text_pair"].tolist()]
            if all(p is None for p in pairs):
                pairs = None
        labels, scores = [], []
        for start in range(0, len(texts), self.batch_size):
            batch = texts[start : start + self.batch_size]
            pair_batch = pairs[start : start + self.batch_size] if pairs is not None else None
            encoded = self.tokenizer(
                batch, pair_batch, truncation=True, max_length=self.max_length, padding=True,
                return_tensors="pt",
            ).to(self.device)
            with torch.no_grad():
                probs = torch.softmax(self.model(**encoded).logits.float(), dim=-1)
            best, index = probs.max(dim=-1)
            labels += [self.id2label.get(int(i), str(int(i))) for i in index.tolist()]
            scores += [float(p) for p in best.tolist()]
        return pd.DataFrame({"label": labels, "score": scores})


mlflow.models.set_model(TextClassifierModel())
