"""One training loop for teacher fine-tuning and distillation.

Read it top to bottom: set up the optimizer and schedule, maybe resume, then for each step draw the next
batch of a seeded per-epoch permutation, compute the loss (the caller decides what the loss is: task CE for
the teacher, a DistillObjective for students), clip, step, log, evaluate, checkpoint.

Resume is exact: a checkpoint holds the weights, optimizer, schedule, RNG state and the position in the data
order, so an interrupted run that is started again ends with the same weights as one that never stopped.
Checkpoints are written to a temp directory and renamed into place, and carry a manifest of hashes: a
half-written or corrupted checkpoint is never picked up.

With ``ema_decay`` the loop also keeps a moving average of the weights (:class:`WeightAverage`, in the
checkpoint too): validation scores it, and the best (or last) averaged weights are the ones kept.

Several processes (``TrainConfig.num_processes`` > 1, started by ``flexkd.launch`` under ``accelerate launch``):
every rank runs this same loop over the same data order. The loop talks to its processes through a small
interface: :class:`OneProcess` with one process (each method the plain step, or nothing), and
:class:`flexkd.distributed.Ranks` under ``accelerate launch``: each rank takes its contiguous share of the
global batch, the model is wrapped in DDP (or sharded with FSDP2), gradients are averaged, and only rank 0 logs,
evaluates (every rank with FSDP, which needs them all) and writes checkpoints while the others wait. The
checkpoint is the same as with one process (the unwrapped model, the full optimizer state), so a run resumes
under any process count.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import nn

from flexkd.averaging import WeightAverage
from flexkd.config import TrainConfig
from flexkd.errors import ConfigError, ProvenanceError
from flexkd.provenance import atomic_dir, file_manifest, recover_dir
from flexkd.runtime import Runtime, batches, row_lengths

if TYPE_CHECKING:
    from flexkd.distributed import Ranks

# loss_fn(model, batch) -> (loss, {term: value}); ``model`` is the module to call: the plain model with one
# process, its DDP / FSDP-wrapped form with several.
LossFn = Callable[[nn.Module, dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]
EvalFn = Callable[[nn.Module], dict[str, float]]
LogFn = Callable[[dict[str, float], int], None]

CHECKPOINT = "checkpoint"
BEST = "best"
AVERAGED = "averaged"  # ema_decay without a best checkpoint: the last averaged weights


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_score: float | None = None
    best_step: int | None = None
    train_seconds: float = 0.0
    evals: list[dict] = field(default_factory=list)
    stopped_early: str | None = None  # why training ended before its budget (patience, max_minutes); None: it did not


@dataclass
class TrainResult:
    state: TrainState
    model_dir: Path  # the weights to keep: best on validation when selecting, else the last
    total_steps: int
    resumed_from: int | None


class Interrupted(Exception):
    """Raised when ``stop_after`` steps were reached (used to test resume)."""


def seed_everything(seed: int) -> None:
    """Seed Python's, torch's (every device) and numpy's global generators.

    Not ``transformers.set_seed``: for seeds below 2**32 it sets the very same states (test_train.py checks it),
    but ``project.seed`` has no upper bound and numpy refuses seeds of 2**32 and more, which ``set_seed``
    passes on as they are; here numpy gets the seed modulo 2**32.
    """
    import numpy as np

    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def set_threads() -> None:
    """Use every core for intra-op parallelism unless the user pinned it (OMP_NUM_THREADS)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))


def param_groups(modules: Sequence[nn.Module], weight_decay: float) -> list[dict]:
    """The optimizer's parameter groups: weight decay on matrices, none on biases and norms (and frozen left out)."""
    decay, no_decay = [], []
    for module in modules:
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_linear_decay(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """The learning-rate factor of each step: a linear warmup to 1 over the first ``warmup_ratio`` of the steps,
    then a linear decay to 0 at ``total_steps``.

    Not transformers' ``get_linear_schedule_with_warmup``: its warmup starts at factor 0 (step s gets s / warmup,
    so the first step does not move the weights), this one at 1 / warmup ((s + 1) / warmup), so that every step
    trains. After the warmup the two are the same. test_train.py shows the difference.
    """
    warmup = int(round(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def _manifest(directory: Path) -> dict[str, str]:
    return file_manifest(directory, exclude=("manifest.json",))


def save_training_checkpoint(directory: Path, *, model, extra: nn.Module | None, optimizer, scheduler, state: TrainState,
                             fingerprint: str, model_state: dict | None = None, optimizer_state: dict | None = None,
                             scaler=None, average: WeightAverage | None = None) -> None:
    """Write a resumable checkpoint atomically. ``model_state`` / ``optimizer_state``: full state dicts gathered
    from sharded ranks (FSDP); None: the model's and optimizer's own. ``average``: the moving average of the
    weights (``ema_decay``), resumed with them."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp / "model", safe_serialization=True, state_dict=model_state)
        torch.save(
            {
                "optimizer": optimizer_state if optimizer_state is not None else optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
                "extra": extra.state_dict() if extra is not None else None,
                "average": average.state_dict() if average is not None else None,
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


def load_weights(model, directory: Path) -> None:
    """Load the safetensors weights of a ``save_pretrained`` directory into ``model`` (all of them, strictly)."""
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


class OneProcess:
    """The loop's processes when there is one: each method is the plain one-process step, or nothing.

    :class:`flexkd.distributed.Ranks` has the same methods for one rank of several; the loop calls them and never
    asks which of the two it has.
    """

    is_main = True  # this process logs, shows progress and writes the files

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def recover(self, checkpoint_dir: Path) -> None:
        """Killed between atomic_dir's two renames: put the previous (complete) checkpoint back."""
        recover_dir(checkpoint_dir)

    def prepare(self, model: nn.Module, extra: nn.Module | None) -> nn.Module:
        """Put the model (compiled when asked) and ``extra`` on the device; return the module the loss calls."""
        module = self.runtime.student(model)
        if extra is not None:
            extra.to(self.runtime.device)
        return module

    def share(self, indices: list[int]) -> tuple[list[int], float]:
        """This process's rows of the batch and the weight of its loss: all of them, 1."""
        return indices, 1.0

    def average_gradients(self, extra: nn.Module | None) -> None:
        """Nothing to average."""

    def clip_grad_norm(self, modules: Sequence[nn.Module], max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_([p for m in modules for p in m.parameters()], max_norm)

    def reduce(self, loss: torch.Tensor, terms: dict, weight: float) -> tuple[torch.Tensor, dict]:
        """The batch's loss and terms: this process's own."""
        return loss, terms

    def evaluate(self, evaluate: EvalFn, model: nn.Module) -> dict[str, float]:
        model.eval()
        metrics = evaluate(model)
        model.train()
        return metrics

    def gather_model_state(self, model: nn.Module) -> None:
        """None: the model's own state is whole."""

    def gather_optimizer_state(self, optimizer) -> None:
        """None: the optimizer's own state is whole."""

    def load_optimizer(self, optimizer, saved: dict) -> None:
        optimizer.load_state_dict(saved)

    def barrier(self) -> None:
        """No one to wait for."""

    def keep_weights(self, model: nn.Module, directory: Path) -> None:
        """Leave ``model`` with the weights in ``directory`` (the best on validation)."""
        load_weights(model, directory)


def _processes(settings: TrainConfig, runtime: Runtime) -> OneProcess | Ranks:
    """One process, or this rank of ``num_processes`` under ``accelerate launch``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and settings.num_processes == 1:
        return OneProcess(runtime)
    if world != settings.num_processes:
        raise ConfigError(
            f"num_processes is {settings.num_processes} but this process is one of {world}: start multi-process "
            "training with flexkd.launch.run_training (it runs accelerate launch with num_processes ranks)"
        )
    from flexkd.distributed import Ranks

    return Ranks(settings, runtime)


@dataclass
class _Run:
    """What one training run moves: set up by :func:`_start`, driven step by step by :func:`train_loop`."""

    processes: OneProcess | Ranks
    model: nn.Module
    extra: nn.Module | None
    module: nn.Module  # what the loss calls: the model, or its DDP / FSDP form
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    state: TrainState
    resumed_from: int | None
    checkpoint_dir: Path
    average: WeightAverage | None = None  # ema_decay: the moving average of the weights

    def averaged(self):
        """The block runs with the averaged weights in the model when there is an average (else as they are)."""
        return self.average.applied() if self.average is not None else nullcontext()

    def step(self, loss_fn: LossFn, batch: dict, weight: float, runtime: Runtime, grad_clip: float):
        """One optimizer step on ``batch`` (this process's share of the global batch, whose loss counts ``weight``):
        the loss and its terms (the global batch's) and the gradient norm before clipping. Its time is counted
        in ``state.train_seconds``."""
        began = time.perf_counter()
        with runtime.autocast():
            loss, terms = loss_fn(self.module, batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss * weight).backward()
        self.scaler.unscale_(self.optimizer)  # clip the true gradients (a no-op without fp16)
        self.processes.average_gradients(self.extra)
        modules = [self.model] + ([self.extra] if self.extra is not None else [])
        grad_norm = self.processes.clip_grad_norm(modules, grad_clip)
        self.scaler.step(self.optimizer)  # fp16: skipped when the gradients overflowed, and the scale lowered
        self.scaler.update()
        self.scheduler.step()
        if self.average is not None:
            self.average.update()
        loss, terms = self.processes.reduce(loss, terms, weight)
        self.state.train_seconds += time.perf_counter() - began
        return loss, terms, grad_norm

    def save_model(self, directory: Path) -> None:
        """Write the weights (every process gathers them, the main one writes, the others wait)."""
        full = self.processes.gather_model_state(self.model)
        if self.processes.is_main:
            atomic_dir(directory, lambda tmp: self.model.save_pretrained(tmp, safe_serialization=True, state_dict=full))
        self.processes.barrier()

    def save_checkpoint(self, fingerprint: str) -> None:
        """Write a resumable checkpoint (every process gathers, the main one writes, the others wait)."""
        model_state = self.processes.gather_model_state(self.model)
        optimizer_state = self.processes.gather_optimizer_state(self.optimizer)
        if self.processes.is_main:
            save_training_checkpoint(
                self.checkpoint_dir, model=self.model, extra=self.extra, optimizer=self.optimizer, scheduler=self.scheduler,
                state=self.state, fingerprint=fingerprint, model_state=model_state, optimizer_state=optimizer_state,
                scaler=self.scaler, average=self.average,
            )
        self.processes.barrier()

    def evaluate(self, evaluate: EvalFn, log: LogFn | None, select_metric: str | None, best_dir: Path) -> None:
        """Evaluate now, log it, and keep the weights in ``best_dir`` when ``select_metric`` is a new best (the
        averaged weights, both, when there is an average)."""
        with self.averaged():
            metrics = self.processes.evaluate(evaluate, self.model)
            state = self.state
            state.evals.append({"step": state.step, **metrics})
            if log and self.processes.is_main:
                log({f"validation/{k}": v for k, v in metrics.items()}, state.step)
            if select_metric is not None and (state.best_score is None or metrics[select_metric] > state.best_score):
                state.best_score, state.best_step = metrics[select_metric], state.step
                self.save_model(best_dir)

    def keep(self, work_dir: Path, *, select: bool) -> Path:
        """Leave the model with the weights to keep and return their directory: the best on validation when
        selecting (and there is one), else the last (the last averaged ones when there is an average)."""
        last = self.checkpoint_dir / "model"
        if select and (work_dir / BEST).exists():
            self.processes.keep_weights(self.model, work_dir / BEST)
            return work_dir / BEST
        if self.average is None:
            return last
        self.average.copy_to()  # not the raw weights of the checkpoint
        self.save_model(work_dir / AVERAGED)
        return work_dir / AVERAGED


def _start(processes: OneProcess | Ranks, model: nn.Module, extra: nn.Module | None, *, settings: TrainConfig,
           runtime: Runtime, seed: int, total_steps: int, checkpoint_dir: Path, fingerprint: str) -> _Run:
    """Seed, resume the weights from the checkpoint if there is one (before the model is placed and wrapped),
    then build the optimizer and schedule and resume their state and the RNG state too."""
    seed_everything(seed)
    processes.recover(checkpoint_dir)
    blob, state = None, TrainState()
    if checkpoint_dir.exists():
        blob, state = load_training_checkpoint(checkpoint_dir, fingerprint=fingerprint)
        load_weights(model, checkpoint_dir / "model")
        if extra is not None and blob["extra"] is not None:
            extra.load_state_dict(blob["extra"])
    module = processes.prepare(model, extra)
    average = WeightAverage(model, settings.ema_decay) if settings.ema_decay is not None else None
    if average is not None and blob is not None:
        if blob.get("average") is None:
            raise ProvenanceError(f"{checkpoint_dir}: the checkpoint has no weight average (written without "
                                  "ema_decay); delete it to start over")
        average.load_state_dict(blob["average"])
    modules = [model] + ([extra] if extra is not None else [])
    optimizer = runtime.optimizer(param_groups(modules, settings.weight_decay), lr=settings.lr)
    scaler = runtime.grad_scaler()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear_decay(total_steps, settings.warmup_ratio))
    if blob is not None:
        kernel = {key: optimizer.defaults.get(key) for key in ("fused", "foreach")}
        processes.load_optimizer(optimizer, blob["optimizer"])
        for group in optimizer.param_groups:  # the saved groups carry the writer's kernel; keep this run's
            group.update(kernel)
        scheduler.load_state_dict(blob["scheduler"])
        if blob.get("scaler") is not None and scaler.is_enabled():
            scaler.load_state_dict(blob["scaler"])
        torch.set_rng_state(blob["torch_rng"])
        random.setstate((3, tuple(blob["python_rng"]), blob["python_rng_gauss"]))
    return _Run(processes, model, extra, module, optimizer, scheduler, scaler, state,
                resumed_from=state.step if blob is not None else None, checkpoint_dir=checkpoint_dir, average=average)


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
    runtime: Runtime | None = None,
) -> TrainResult:
    """Train ``model`` (and ``extra``, e.g. a projector) on ``train_data``; resume from ``work_dir`` if possible.

    ``fingerprint`` identifies the run's inputs (config, data, teacher); a checkpoint with another one is refused.
    ``loss_fn(module, batch)`` runs ``module`` (the wrapped model under several processes). Under ``accelerate
    launch`` every rank calls this with the same arguments; ``model`` is then left as trained on each rank and
    the caller loads ``model_dir`` (``flexkd.launch`` does). ``runtime`` (default: CPU, float32) places the model,
    ``extra`` and each batch, runs ``loss_fn`` under its autocast (float32 master weights; fp16 scales the loss),
    picks the optimizer and groups rows by length when asked. The model is left on its device.
    """
    work_dir, runtime = Path(work_dir), runtime or Runtime()
    processes = _processes(settings, runtime)
    n = len(train_data)
    if n == 0:
        raise ValueError("train_data is empty")
    steps_per_epoch = math.ceil(n / settings.batch_size)
    lengths = row_lengths(train_data) if runtime.group_by_length else None
    total_steps = settings.max_steps or max(1, math.ceil(settings.epochs * steps_per_epoch))
    run = _start(processes, model, extra, settings=settings, runtime=runtime, seed=seed, total_steps=total_steps,
                 checkpoint_dir=work_dir / CHECKPOINT, fingerprint=fingerprint)
    state = run.state

    run.module.train()
    order = batches(n, settings.batch_size, seed, state.epoch, lengths)
    with _progress_bar(total_steps, state.step, desc, enabled=progress and processes.is_main) as bar:
        while state.step < total_steps and not state.stopped_early:
            if state.batch_in_epoch >= steps_per_epoch:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                order = batches(n, settings.batch_size, seed, state.epoch, lengths)
            indices, weight = processes.share(order[state.batch_in_epoch])
            batch = runtime.to_device(collate([train_data[i] for i in indices]))

            loss, terms, grad_norm = run.step(loss_fn, batch, weight, runtime, settings.grad_clip)
            state.step += 1
            state.batch_in_epoch += 1

            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss became {loss.item()} at step {state.step}; lower the learning rate")
            if log and processes.is_main and (state.step % settings.log_every == 0 or state.step == total_steps):
                log({**{f"train/{k}": float(v) for k, v in terms.items()}, "train/lr": run.scheduler.get_last_lr()[0],
                     "train/grad_norm": float(grad_norm), "train/epoch": state.epoch}, state.step)
            bar.update(1)
            if not bar.disable:  # reading the loss waits for the device: only to show it
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)

            if evaluate is not None and _evaluation_due(settings, state, steps_per_epoch, total_steps):
                run.evaluate(evaluate, log, select_metric, work_dir / BEST)
            if _evaluated_now(state):
                state.stopped_early = early_stop_reason(settings, state, select_metric)
            if state.stopped_early or state.step % settings.checkpoint_every == 0 or state.step == total_steps:
                run.save_checkpoint(fingerprint)
            if state.stopped_early:
                print(f"{desc}: stopped at step {state.step} of {total_steps}: {state.stopped_early}")
                break
            if stop_after is not None and state.step >= stop_after and state.step < total_steps:
                raise Interrupted(f"stopped after step {state.step} as asked")

    keep = run.keep(work_dir, select=bool(select_metric and settings.keep_best))
    return TrainResult(state=state, model_dir=keep, total_steps=total_steps, resumed_from=run.resumed_from)


def _progress_bar(total_steps: int, initial: int, desc: str, *, enabled: bool):
    """A progress bar of the steps (a silent one when not ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total_steps, initial=initial, desc=desc, dynamic_ncols=True, mininterval=2.0, disable=not enabled)


def _evaluated_now(state: TrainState) -> bool:
    return bool(state.evals) and state.evals[-1]["step"] == state.step


def _evaluation_due(settings: TrainConfig, state: TrainState, steps_per_epoch: int, total_steps: int) -> bool:
    """Every ``eval_every`` steps (0: at the end of each epoch), at the last step, and when the time budget is spent
    (the last weights get their evaluation before the stop); never twice at one step."""
    end_of_epoch = state.batch_in_epoch >= steps_per_epoch
    due = (state.step % settings.eval_every == 0) if settings.eval_every else end_of_epoch
    return (due or state.step == total_steps or _budget_spent(settings, state)) and not _evaluated_now(state)


def _budget_spent(settings: TrainConfig, state: TrainState) -> bool:
    return settings.max_minutes is not None and state.train_seconds >= settings.max_minutes * 60


def early_stop_reason(settings: TrainConfig, state: TrainState, select_metric: str | None) -> str | None:
    """Why training should stop now, right after an evaluation (None: go on). ``patience``: that many evaluations
    in a row without a new best; ``max_minutes``: the training steps have used the time budget."""
    if settings.patience and select_metric and state.best_step is not None:
        since = sum(1 for e in state.evals if e["step"] > state.best_step)
        if since >= settings.patience:
            return (f"no better validation {select_metric} in {since} evaluations since step {state.best_step} "
                    f"(patience {settings.patience})")
    if _budget_spent(settings, state):
        return f"the time budget is spent: {state.train_seconds / 60:.1f} of max_minutes {settings.max_minutes:g}"
    return None


# What one step computes. The loop above is the same for both; only the loss differs.

def _model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def _follow(device: torch.device, *modules: nn.Module | None) -> None:
    """Move modules the step uses besides the trained one (frozen teacher, objective buffers) to its device."""
    for module in modules:
        if module is None:
            continue
        tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
        if tensor is not None and tensor.device != device:
            module.to(device)


def task_loss(model: nn.Module | None = None) -> LossFn:
    """The task loss alone (teacher fine-tuning): cross-entropy for a classifier, response NLL for a causal LM.

    The step is called as ``step(module, batch)`` and runs ``module`` (the wrapped model under several
    processes); ``model`` is not used (the argument remains for the call form ``task_loss(model)``).
    """
    from flexkd.losses import response_nll, task_ce

    def step(module: nn.Module, batch: dict):
        logits = module(**_model_inputs(batch)).logits.float()  # the loss in float32 under autocast
        loss = task_ce(logits, batch["labels"]) if logits.dim() == 2 else response_nll(logits, batch["labels"])
        return loss, {"task": loss.detach(), "total": loss.detach()}

    return step


def distillation_loss(
    student: nn.Module | None,
    teacher: nn.Module | None,
    objective: nn.Module,
    feature_mask: Callable[[dict], torch.Tensor] = lambda batch: batch["attention_mask"],
) -> LossFn:
    """The DistillObjective of one method: the teacher runs frozen, without gradients, inside the step.

    The step is called as ``step(module, batch)``: ``module`` is the student to run (the wrapped one under
    several processes; ``student`` is not used, the argument remains for the call form). The teacher stays
    captured here, and follows the student's device. ``feature_mask`` picks the positions whose hidden states
    are compared (classification: every non-pad token; generation: the response positions).
    """
    needs_hidden = getattr(objective, "needs_teacher_hidden", False)
    pairs = getattr(objective, "layer_pairs", None)

    def pick(states, side: int):  # the last hidden states, or one side's (0 student, 1 teacher) of every pair
        return [states[pair[side]] for pair in pairs] if pairs else states[-1]

    if teacher is not None:
        teacher.eval()
        teacher.requires_grad_(False)

    def step(module: nn.Module, batch: dict):
        inputs = _model_inputs(batch)
        out = module(**inputs, output_hidden_states=needs_hidden)
        _follow(out.logits.device, teacher if objective.needs_teacher else None, objective)
        teacher_logits = teacher_hidden = None
        if objective.needs_teacher:
            with torch.no_grad():
                t_out = teacher(**inputs, output_hidden_states=needs_hidden)
            teacher_logits = t_out.logits
            teacher_hidden = pick(t_out.hidden_states, 1) if needs_hidden else None
        return objective(
            student_logits=out.logits,
            student_hidden=pick(out.hidden_states, 0) if needs_hidden else None,
            labels=batch["labels"],
            feature_mask=feature_mask(batch),
            teacher_logits=teacher_logits,
            teacher_hidden=teacher_hidden,
        )

    return step
