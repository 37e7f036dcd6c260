"""Relevance of the teacher's hidden units, the d_S units Flex-KD distils, and the RelevanceIndex artifact.

Stage 2 and 3 of docs/METHOD.md. The scored tensor H is ``outputs.hidden_states[-1]`` of a Hugging Face model:
the tensor that feeds the task head. Checked on transformers 5.24:
- BERT (``BertForSequenceClassification``): ``hidden_states[-1]`` is the very tensor the encoder returns as
  ``last_hidden_state``, which the pooler (token 0 -> dense -> tanh) and classifier consume. Only position 0
  (``[CLS]``) receives gradient; the other non-pad positions contribute zero, as the method specifies.
- Llama (``LlamaForCausalLM``): ``capture_outputs(tie_last_hidden_states=True)`` replaces ``hidden_states[-1]``
  with ``last_hidden_state``, i.e. the output of the final RMSNorm, which is exactly what ``lm_head`` consumes
  (not the last decoder layer's pre-norm output).
``score_units`` differentiates the loss w.r.t. that tensor and refuses (FlexKDError) a model whose
``hidden_states[-1]`` is not in the autograd graph of the logits.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from flexkd.errors import ConfigError, FlexKDError, ProvenanceError
from flexkd.provenance import atomic_write_text, sha256_bytes

SCORE_METHODS = ("grad", "grad_x_act", "fisher")
TASKS = ("classification", "causal_lm")
ORDERS = ("index", "score")
LAYER = "hidden_states[-1]"
IGNORE_INDEX = -100
# Batch keys passed to the model; anything else (labels, ids, lengths) is not a model input.
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


# --------------------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------------------


def _unit_importance(grad: torch.Tensor, hidden: torch.Tensor, method: str) -> torch.Tensor:
    if method == "grad":
        return grad.abs()
    if method == "grad_x_act":
        return (grad * hidden).abs()
    return grad.pow(2)  # fisher


def _slice_batch(batch: Mapping[str, torch.Tensor], n: int) -> dict:
    return {key: value[:n] if torch.is_tensor(value) else value for key, value in batch.items()}


def _require_grad_hook(module, inputs, output):
    # Frozen models have no parameter that requires grad, so nothing downstream of the embeddings would be in
    # an autograd graph. Marking the embedding output as requiring grad puts H in one without touching the
    # parameters; torch.autograd.grad(loss, H) then only walks the head, never the layers below H.
    if torch.is_tensor(output) and output.is_floating_point() and not output.requires_grad:
        return output.detach().requires_grad_(True)
    return output


def score_units(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    method: str = "grad",
    max_examples: int = 2048,
    task: str = "classification",
) -> tuple[torch.Tensor, int]:
    """Relevance score of every unit of the model's last hidden state, and the number of examples scored.

    ``s_j = mean over examples ( mean over scored positions t of g(i, t, j) )`` with g = |dL/dH| (``grad``),
    |dL/dH * H| (``grad_x_act``) or (dL/dH)^2 (``fisher``). L is the sum over examples of per-example losses,
    so dL/dH[i] is example i's own gradient. ``task="classification"``: L_i = CE(logits_i, label_i), scored
    positions = non-pad tokens (attention_mask). ``task="causal_lm"``: L_i = mean NLL over example i's response
    tokens (labels != -100, shifted), scored positions = the positions that predict a response token.
    An example without scored positions (no response token left after truncation) is skipped and not counted.
    Stops after ``max_examples`` examples (truncating the last batch). The model is run in eval mode (its
    previous mode is restored) and its parameters receive no gradient.
    """
    if method not in SCORE_METHODS:
        raise ConfigError(f"relevance.method: unknown scoring method {method!r}; valid: {', '.join(SCORE_METHODS)}")
    if task not in TASKS:
        raise ConfigError(f"relevance task: unknown task {task!r}; valid: {', '.join(TASKS)}")
    if max_examples < 1:
        raise ConfigError(f"relevance.max_examples must be >= 1, got {max_examples}")

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    handle = model.get_input_embeddings().register_forward_hook(_require_grad_hook)
    total: torch.Tensor | None = None
    n_taken = 0
    n_scored = 0
    n_skipped = 0
    try:
        for batch in batches:
            if n_taken >= max_examples:
                break
            if "labels" not in batch:
                raise ConfigError(f"relevance: every batch needs 'labels'; got keys {sorted(batch)}")
            batch_size = batch["labels"].shape[0]
            if n_taken + batch_size > max_examples:
                batch = _slice_batch(batch, max_examples - n_taken)
                batch_size = max_examples - n_taken
            n_taken += batch_size
            inputs = {k: batch[k].to(device) for k in _MODEL_INPUTS if k in batch and batch[k] is not None}
            grad, hidden, positions = _hidden_gradient(model, inputs, batch["labels"].to(device), task, device)

            with torch.no_grad():
                g = _unit_importance(grad.double(), hidden.double(), method)  # (B, T, d)
                weights = positions.double()
                counts = weights.sum(dim=1)  # (B,)
                keep = counts > 0
                n_skipped += int((~keep).sum())
                per_example = (g * weights.unsqueeze(-1)).sum(dim=1)[keep] / counts[keep].unsqueeze(-1)
                batch_total = per_example.sum(dim=0)
                total = batch_total if total is None else total + batch_total
                n_scored += int(keep.sum())
    finally:
        handle.remove()
        model.train(was_training)

    if n_skipped:
        warnings.warn(f"relevance: skipped {n_skipped} example(s) with no scored position", stacklevel=2)
    if n_scored == 0 or total is None:
        raise ConfigError("relevance: no example with a scored position in the scoring set")
    return (total / n_scored).float().cpu(), n_scored


def _hidden_gradient(model: torch.nn.Module, inputs: dict, labels: torch.Tensor, task: str,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dL/dH for one batch (L: the sum of the per-example losses, so row i is example i's own gradient), H
    (detached) and the positions scored (bool, (B, T))."""
    with torch.enable_grad():
        outputs = model(**inputs, output_hidden_states=True)
        hidden = outputs.hidden_states[-1]
        loss, positions = _loss_and_positions(outputs.logits.float(), labels, inputs, hidden.shape[:2], task, device)
        if not hidden.requires_grad:
            raise FlexKDError(f"relevance: {LAYER} of {type(model).__name__} does not require grad; cannot score units")
        try:
            (grad,) = torch.autograd.grad(loss, hidden)
        except RuntimeError as error:
            raise FlexKDError(
                f"relevance: {LAYER} of {type(model).__name__} is not in the autograd graph of its logits "
                f"({error}); this model needs a hook on the module that feeds its head"
            ) from error
    return grad, hidden.detach(), positions


def _loss_and_positions(logits: torch.Tensor, labels: torch.Tensor, inputs: dict, shape: torch.Size, task: str,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed per-example loss of a batch and its scored positions (see :func:`score_units`)."""
    if task == "classification":
        if logits.dim() != 2:
            raise ConfigError(f"relevance task 'classification' expects (B, C) logits, got {tuple(logits.shape)}")
        loss = F.cross_entropy(logits, labels.long(), reduction="sum")
        positions = inputs.get("attention_mask")
        if positions is None:
            positions = torch.ones(shape, device=device)
        return loss, positions.bool()
    if logits.dim() != 3:
        raise ConfigError(f"relevance task 'causal_lm' expects (B, T, V) logits, got {tuple(logits.shape)}")
    targets = labels[:, 1:].long()
    token_nll = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )  # (B, T-1)
    n_response = (targets != IGNORE_INDEX).sum(dim=1)
    loss = (token_nll.sum(dim=1) / n_response.clamp(min=1)).sum()
    positions = torch.zeros(shape, dtype=torch.bool, device=device)
    positions[:, :-1] = targets != IGNORE_INDEX
    return loss, positions


# --------------------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------------------


def select_units(scores: torch.Tensor, k: int, order: str = "index") -> torch.Tensor:
    """Indices of the k largest scores (ties: lower index first), ascending (``index``) or by score (``score``)."""
    scores = torch.as_tensor(scores)
    if scores.dim() != 1:
        raise ConfigError(f"select_units: scores must be 1-D (d_T,), got shape {tuple(scores.shape)}")
    d_t = scores.numel()
    if not 1 <= k <= d_t:
        raise ConfigError(f"select_units: k={k} must be in [1, d_T={d_t}] (k = d_S; d_S > d_T is an error)")
    if order not in ORDERS:
        raise ConfigError(f"relevance.order: unknown order {order!r}; valid: {', '.join(ORDERS)}")
    if bool(torch.isnan(scores).any()):
        raise ConfigError("select_units: scores contain NaN")
    ranked = torch.sort(scores.double(), descending=True, stable=True).indices[:k]
    if order == "index":
        ranked = torch.sort(ranked).values
    return ranked.long()


# --------------------------------------------------------------------------------------------------------------
# The artifact
# --------------------------------------------------------------------------------------------------------------


def _flexkd_version() -> str:
    import flexkd

    version = getattr(flexkd, "__version__", None)
    if version:
        return str(version)
    try:
        from importlib.metadata import version as package_version

        return package_version("flexkd")
    except Exception:  # noqa: BLE001 - not installed as a distribution (source checkout)
        return "unknown"


_HASH_EXCLUDED = ("created_at", "content_hash")


@dataclass
class RelevanceIndex:
    """Scores of every teacher unit, the selected units, and where they came from. Saved as JSON."""

    scores: list[float]
    indices: list[int]
    method: str
    order: str
    n_examples: int
    layer: str
    teacher: str
    teacher_weights_hash: str
    data_fingerprint: str
    k: int
    d_teacher: int
    # Empty unless a caller sets it: the same inputs must give a byte-identical file, because DVC compares bytes
    # and a changed index would rerun every distill stage. The MLflow run records when the index was made.
    created_at: str = ""
    flexkd_version: str = field(default_factory=_flexkd_version)

    @classmethod
    def from_scores(
        cls,
        scores: torch.Tensor,
        k: int,
        *,
        method: str,
        n_examples: int,
        teacher: str,
        teacher_weights_hash: str,
        data_fingerprint: str,
        order: str = "index",
        layer: str = LAYER,
    ) -> "RelevanceIndex":
        """Select the k units from ``scores`` and record the provenance."""
        scores = torch.as_tensor(scores).detach().float().cpu()
        indices = select_units(scores, k, order=order)
        return cls(
            scores=[float(s) for s in scores.tolist()],
            indices=[int(i) for i in indices.tolist()],
            method=method,
            order=order,
            n_examples=int(n_examples),
            layer=layer,
            teacher=str(teacher),
            teacher_weights_hash=teacher_weights_hash,
            data_fingerprint=data_fingerprint,
            k=int(k),
            d_teacher=int(scores.numel()),
        )

    @property
    def selected(self) -> torch.Tensor:
        """The selected teacher units as a LongTensor, in the stored order (student unit i <- teacher unit [i])."""
        return torch.tensor(self.indices, dtype=torch.long)

    def _hashed_fields(self) -> dict:
        return {key: value for key, value in dataclasses.asdict(self).items() if key not in _HASH_EXCLUDED}

    def content_hash(self) -> str:
        """sha256 over every field but ``created_at``: detects hand edits and corruption."""
        return sha256_bytes(json.dumps(self._hashed_fields(), sort_keys=True, separators=(",", ":")))

    def save(self, path: str | Path) -> Path:
        """Write the index as JSON atomically (temporary file in the same folder, then os.replace)."""
        record = dataclasses.asdict(self)
        record["content_hash"] = self.content_hash()
        atomic_write_text(path, json.dumps(record, indent=1) + "\n", fsync=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "RelevanceIndex":
        """Read an index; ProvenanceError (naming the file) on bad JSON, missing fields or a hash mismatch."""
        path = Path(path)
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            raise ProvenanceError(f"{path}: relevance index not found; run the relevance stage") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ProvenanceError(f"{path}: not a valid relevance index (bad JSON: {error})") from None
        if not isinstance(record, dict):
            raise ProvenanceError(f"{path}: not a valid relevance index (top level is not an object)")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [name for name in names + ["content_hash"] if name not in record]
        if missing:
            raise ProvenanceError(f"{path}: relevance index lacks field(s) {', '.join(missing)}")
        unknown = sorted(set(record) - set(names) - {"content_hash"})
        if unknown:
            raise ProvenanceError(f"{path}: relevance index has unknown field(s) {', '.join(unknown)}")
        stored_hash = record.pop("content_hash")
        index = cls(**record)
        found = index.content_hash()
        if found != stored_hash:
            raise ProvenanceError(
                f"{path}: content hash mismatch (stored {stored_hash}, computed {found}): the relevance index "
                "was edited or corrupted; never hand-edit it, rerun the relevance stage"
            )
        index._check_consistent(path)
        return index

    def _check_consistent(self, path) -> None:
        problems = []
        if len(self.scores) != self.d_teacher:
            problems.append(f"{len(self.scores)} scores for d_teacher={self.d_teacher}")
        if len(self.indices) != self.k:
            problems.append(f"{len(self.indices)} indices for k={self.k}")
        if any(not 0 <= i < self.d_teacher for i in self.indices):
            problems.append(f"indices outside [0, {self.d_teacher})")
        if len(set(self.indices)) != len(self.indices):
            problems.append("repeated indices")
        if problems:
            raise ProvenanceError(f"{path}: inconsistent relevance index: {'; '.join(problems)}")

    def verify(
        self,
        *,
        teacher_weights_hash: str | None = None,
        data_fingerprint: str | None = None,
        method: str | None = None,
        k: int | None = None,
    ) -> None:
        """ProvenanceError naming every given field that does not match (expected vs found in the index)."""
        expected = {
            "teacher_weights_hash": teacher_weights_hash,
            "data_fingerprint": data_fingerprint,
            "method": method,
            "k": k,
        }
        mismatches = [
            f"{name}: expected {value!r}, index has {getattr(self, name)!r}"
            for name, value in expected.items()
            if value is not None and value != getattr(self, name)
        ]
        if mismatches:
            raise ProvenanceError(
                f"relevance index (teacher {self.teacher!r}) does not match its inputs: "
                + "; ".join(mismatches)
                + ". Rerun the relevance stage."
            )


# --------------------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------------------


def plot_scores(index: RelevanceIndex, path: str | Path) -> Path:
    """PNG: scores sorted descending with the selected units highlighted, and a histogram of the scores."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scores = torch.tensor(index.scores, dtype=torch.float64)
    order = torch.sort(scores, descending=True, stable=True).indices
    selected = torch.zeros(scores.numel(), dtype=torch.bool)
    selected[index.selected] = True
    ranks = torch.arange(scores.numel())
    sorted_scores = scores[order]
    sorted_selected = selected[order]

    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2, width_ratios=(2, 1))
    left.plot(ranks.numpy(), sorted_scores.numpy(), color="0.6", linewidth=1, label="all units")
    left.scatter(
        ranks[sorted_selected].numpy(),
        sorted_scores[sorted_selected].numpy(),
        s=8,
        color="tab:red",
        label=f"selected (k={index.k})",
        zorder=3,
    )
    left.set_xlabel("rank")
    left.set_ylabel("relevance score")
    left.set_yscale("log" if bool((scores > 0).all()) else "linear")
    left.legend()
    low, high = float(scores.min()), float(scores.max())
    if high <= low:
        high = low + 1.0
    bins = torch.linspace(low, high, min(50, max(5, scores.numel() // 4)) + 1).numpy()
    right.hist(scores.numpy(), bins=bins, color="0.6", label="all")
    right.hist(scores[selected].numpy(), bins=bins, color="tab:red", alpha=0.7, label="selected")
    right.set_xlabel("relevance score")
    right.set_ylabel("units")
    right.legend()
    figure.suptitle(
        f"{index.teacher}: {index.method} relevance of {index.layer}, n_examples={index.n_examples}, "
        f"k={index.k} of d_T={index.d_teacher}"
    )
    figure.savefig(path, format="png", dpi=100)
    return path
