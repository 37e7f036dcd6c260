"""One training loop for teacher fine-tuning and distillation.

Read it top to bottom: set up the optimizer and schedule, maybe resume, then for each step draw the next
batch of a seeded per-epoch permutation, compute the loss (the caller decides what the loss is: task CE for
the teacher, a DistillObjective for students), clip, step, log, evaluate, checkpoint.

Resume is exact: a checkpoint holds the weights, optimizer, schedule, RNG state and the position in the data
order, so an interrupted run that is started again ends with the same weights as one that never stopped.
Checkpoints are written to a temp directory and renamed into place, and carry a manifest of hashes: a
half-written or corrupted checkpoint is never picked up.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from flexkd.config import TrainConfig
from flexkd.errors import ProvenanceError
from flexkd.provenance import atomic_dir, sha256_file

LossFn = Callable[[dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]
EvalFn = Callable[[nn.Module], dict[str, float]]
LogFn = Callable[[dict[str, float], int], None]

CHECKPOINT = "checkpoint"
BEST = "best"


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_score: float | None = None
    best_step: int | None = None
    train_seconds: float = 0.0
    evals: list[dict] = field(default_factory=list)


@dataclass
class TrainResult:
    state: TrainState
    model_dir: Path  # the weights to keep: best on validation when selecting, else the last
    total_steps: int
    resumed_from: int | None


class Interrupted(Exception):
    """Raised when ``stop_after`` steps were reached (used to test resume)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def set_threads() -> None:
    """Use every core for intra-op parallelism unless the user pinned it (OMP_NUM_THREADS)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))


def _param_groups(modules: Sequence[nn.Module], weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for module in modules:
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_linear_decay(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    warmup = int(round(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of one epoch: a permutation that depends only on (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def _manifest(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): sha256_file(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != "manifest.json"
    }


def save_training_checkpoint(directory: Path, *, model, extra: nn.Module | None, optimizer, scheduler, state: TrainState, fingerprint: str) -> None:
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp / "model", safe_serialization=True)
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "extra": extra.state_dict() if extra is not None else None,
                "torch_rng": torch.get_rng_state(),
                "python_rng": list(random.getstate()[1]),
                "python_rng_gauss": random.getstate()[2],
            },
            tmp / "trainer_state.pt",
        )
        (tmp / "state.json").write_text(json.dumps({"fingerprint": fingerprint, **asdict(state)}, indent=1))
        (tmp / "manifest.json").write_text(json.dumps(_manifest(tmp), indent=1))

    atomic_dir(directory, write)


def load_training_checkpoint(directory: Path, *, fingerprint: str) -> tuple[dict, TrainState]:
    """Read a checkpoint after checking every file against its manifest and the run's fingerprint."""
    manifest_path = directory / "manifest.json"
    if not manifest_path.exists():
        raise ProvenanceError(f"{directory}: checkpoint has no manifest.json (incomplete); delete it to start over")
    try:
        expected = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise ProvenanceError(f"{manifest_path}: unreadable manifest ({err}); delete the checkpoint to start over") from None
    found = _manifest(directory)
    if found != expected:
        bad = sorted(set(expected) ^ set(found) | {k for k in expected if k in found and expected[k] != found[k]})
        raise ProvenanceError(f"{directory}: checkpoint files do not match their manifest ({', '.join(bad)}): corrupted")
    meta = json.loads((directory / "state.json").read_text())
    if meta.pop("fingerprint") != fingerprint:
        raise ProvenanceError(
            f"{directory}: checkpoint belongs to another configuration or input (fingerprint mismatch); "
            "it was not reused"
        )
    blob = torch.load(directory / "trainer_state.pt", map_location="cpu", weights_only=True)
    return blob, TrainState(**meta)


def _load_weights(model, directory: Path) -> None:
    from safetensors.torch import load_file

    state = {}
    for path in sorted(directory.glob("*.safetensors")):
        state.update(load_file(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights (e.g. LM heads) are saved once; anything else missing is an error.
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ProvenanceError(f"{directory}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")


def train_loop(
    *,
    model: nn.Module,
    loss_fn: LossFn,
    train_data: Sequence[dict],
    collate: Callable[[list[dict]], dict],
    settings: TrainConfig,
    seed: int,
    work_dir: str | Path,
    fingerprint: str,
    extra: nn.Module | None = None,
    evaluate: EvalFn | None = None,
    select_metric: str | None = None,
    log: LogFn | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` (and ``extra``, e.g. a projector) on ``train_data``; resume from ``work_dir`` if possible.

    ``fingerprint`` identifies the run's inputs (config, data, teacher); a checkpoint with another one is refused.
    """
    work_dir = Path(work_dir)
    modules = [model] + ([extra] if extra is not None else [])
    n = len(train_data)
    if n == 0:
        raise ValueError("train_data is empty")
    steps_per_epoch = math.ceil(n / settings.batch_size)
    total_steps = settings.max_steps or max(1, math.ceil(settings.epochs * steps_per_epoch))

    seed_everything(seed)
    optimizer = torch.optim.AdamW(_param_groups(modules, settings.weight_decay), lr=settings.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear_decay(total_steps, settings.warmup_ratio))
    state = TrainState()
    resumed_from = None

    checkpoint_dir = work_dir / CHECKPOINT
    if checkpoint_dir.exists():
        blob, state = load_training_checkpoint(checkpoint_dir, fingerprint=fingerprint)
        _load_weights(model, checkpoint_dir / "model")
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        if extra is not None and blob["extra"] is not None:
            extra.load_state_dict(blob["extra"])
        torch.set_rng_state(blob["torch_rng"])
        random.setstate((3, tuple(blob["python_rng"]), blob["python_rng_gauss"]))
        resumed_from = state.step

    def run_eval() -> None:
        if evaluate is None:
            return
        model.eval()
        metrics = evaluate(model)
        model.train()
        state.evals.append({"step": state.step, **metrics})
        if log:
            log({f"validation/{k}": v for k, v in metrics.items()}, state.step)
        if select_metric is not None:
            score = metrics[select_metric]
            if state.best_score is None or score > state.best_score:
                state.best_score, state.best_step = score, state.step
                atomic_dir(work_dir / BEST, lambda tmp: model.save_pretrained(tmp, safe_serialization=True))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=state.step, desc=desc, dynamic_ncols=True, mininterval=2.0)

    model.train()
    order = epoch_order(n, seed, state.epoch)
    while state.step < total_steps:
        if state.batch_in_epoch >= steps_per_epoch:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            order = epoch_order(n, seed, state.epoch)
        start = state.batch_in_epoch * settings.batch_size
        batch = collate([train_data[i] for i in order[start : start + settings.batch_size]])

        began = time.perf_counter()
        loss, terms = loss_fn(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for m in modules for p in m.parameters()], settings.grad_clip)
        optimizer.step()
        scheduler.step()
        state.train_seconds += time.perf_counter() - began
        state.step += 1
        state.batch_in_epoch += 1

        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss became {loss.item()} at step {state.step}; lower the learning rate")
        if log and (state.step % settings.log_every == 0 or state.step == total_steps):
            metrics = {f"train/{k}": float(v) for k, v in terms.items()}
            metrics.update({"train/lr": scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm), "train/epoch": state.epoch})
            log(metrics, state.step)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)

        end_of_epoch = state.batch_in_epoch >= steps_per_epoch
        due = (state.step % settings.eval_every == 0) if settings.eval_every else end_of_epoch
        if due or state.step == total_steps:
            if not (state.evals and state.evals[-1]["step"] == state.step):
                run_eval()
        if state.step % settings.checkpoint_every == 0 or state.step == total_steps:
            save_training_checkpoint(
                checkpoint_dir, model=model, extra=extra, optimizer=optimizer, scheduler=scheduler, state=state, fingerprint=fingerprint
            )
        if stop_after is not None and state.step >= stop_after and state.step < total_steps:
            if bar is not None:
                bar.close()
            raise Interrupted(f"stopped after step {state.step} as asked")

    if bar is not None:
        bar.close()
    keep = work_dir / BEST if (select_metric and settings.keep_best and (work_dir / BEST).exists()) else checkpoint_dir / "model"
    if keep != checkpoint_dir / "model":
        _load_weights(model, keep)
    return TrainResult(state=state, model_dir=keep, total_steps=total_steps, resumed_from=resumed_from)


# What one step computes. The loop above is the same for both; only the loss differs.

def _model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def task_loss(model: nn.Module) -> LossFn:
    """The task loss alone (teacher fine-tuning): cross-entropy for a classifier, response NLL for a causal LM."""
    from flexkd.losses import response_nll, task_ce

    def step(batch: dict):
        logits = model(**_model_inputs(batch)).logits
        loss = task_ce(logits, batch["labels"]) if logits.dim() == 2 else response_nll(logits, batch["labels"])
        return loss, {"task": loss.detach(), "total": loss.detach()}

    return step


def distillation_loss(
    student: nn.Module,
    teacher: nn.Module | None,
    objective: nn.Module,
    feature_mask: Callable[[dict], torch.Tensor] = lambda batch: batch["attention_mask"],
) -> LossFn:
    """The DistillObjective of one method: the teacher runs frozen, without gradients, inside the step.

    ``feature_mask`` picks the positions whose hidden states are compared (classification: every non-pad
    token; generation: the response positions).
    """
    needs_hidden = getattr(objective, "needs_teacher_hidden", False)
    if teacher is not None:
        teacher.eval()
        teacher.requires_grad_(False)

    def step(batch: dict):
        inputs = _model_inputs(batch)
        out = student(**inputs, output_hidden_states=needs_hidden)
        teacher_logits = teacher_hidden = None
        if objective.needs_teacher:
            with torch.no_grad():
                t_out = teacher(**inputs, output_hidden_states=needs_hidden)
            teacher_logits = t_out.logits
            teacher_hidden = t_out.hidden_states[-1] if needs_hidden else None
        return objective(
            student_logits=out.logits,
            student_hidden=out.hidden_states[-1] if needs_hidden else None,
            labels=batch["labels"],
            feature_mask=feature_mask(batch),
            teacher_logits=teacher_logits,
            teacher_hidden=teacher_hidden,
        )

    return step
