"""An exponential moving average of a model's weights, for the training loop (``TrainConfig.ema_decay``)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from flexkd.errors import ProvenanceError


class WeightAverage:
    """An exponential moving average of a model's weights (``TrainConfig.ema_decay``; Polyak averaging, as in
    timm's ModelEmaV2 and TensorFlow's ExponentialMovingAverage with num_updates): after the n-th optimizer step
    every floating-point parameter's average moves towards it by 1 - min(decay, (1 + n) / (10 + n)), so that the
    first steps do not stay tied to the initial weights. :meth:`applied` swaps the averages in (validation, the
    saved weights) and the raw weights back."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.params = [p for p in model.parameters() if p.is_floating_point()]
        self.shadow = [p.detach().clone() for p in self.params]

    def rate(self) -> float:
        """The decay of the next update."""
        n = self.updates + 1
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, self.params, 1.0 - self.rate())
        self.updates += 1

    @contextmanager
    def applied(self):
        """The model holds the averaged weights inside the block, its own again after it."""
        raw = [p.detach().clone() for p in self.params]
        self.copy_to()
        try:
            yield
        finally:
            self._load(raw)

    def copy_to(self) -> None:
        """Leave the averaged weights in the model."""
        self._load(self.shadow)

    @torch.no_grad()
    def _load(self, values: list[torch.Tensor]) -> None:
        torch._foreach_copy_(self.params, values)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": [t.detach().cpu() for t in self.shadow]}

    def load_state_dict(self, saved: dict) -> None:
        if len(saved["shadow"]) != len(self.shadow) or any(
                a.shape != b.shape for a, b in zip(saved["shadow"], self.shadow)):
            raise ProvenanceError("the checkpoint's weight average does not fit the model; delete the checkpoint "
                                  "to start over")
        self.updates = saved["updates"]
        self.shadow = [t.to(device=p.device, dtype=p.dtype) for t, p in zip(saved["shadow"], self.params)]
