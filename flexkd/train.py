"""One training loop for teacher fine-tuning and distillation.

Read it top to bottom: set up the optimizer and schedule, maybe resume, then for each step draw the next
batch of a seeded per-epoch permutation, compute the loss (the caller decides what the loss is: task CE for
the teacher, a DistillObjective for students), clip, step, log, evaluate, checkpoint.

Resume is exact: a checkpoint holds the weights, optimizer, schedule, RNG state and the position in the data
order, so an interrupted run that is started again ends with the same weights as one that never stopped.
Checkpoints are written to a temp directory and renamed into place, and carry a manifest of hashes: a
half-written or corrupted checkpoint is never picked up.

Several processes (``TrainConfig.num_processes`` > 1, started by ``flexkd.launch`` under ``accelerate launch``):
every rank runs this same loop over the same data order; each takes its contiguous share of the global batch,
the model is wrapped in DDP (or sharded with FSDP2), gradients are averaged, and only rank 0 logs, evaluates
(every rank with FSDP, which needs them all) and writes checkpoints while the others wait. The checkpoint is the
same as with one process (the unwrapped model, the full optimizer state), so a run resumes under any process
count. What differs from one process is described in :class:`_Ranks`.
"""

from __future__ import annotations

import itertools
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
from flexkd.errors import ConfigError, ProvenanceError
from flexkd.provenance import atomic_dir, file_manifest, recover_dir
from flexkd.runtime import Runtime, batches, row_lengths

# loss_fn(model, batch) -> (loss, {term: value}); ``model`` is the module to call: the plain model with one
# process, its DDP / FSDP-wrapped form with several.
LossFn = Callable[[nn.Module, dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]
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


def _manifest(directory: Path) -> dict[str, str]:
    return file_manifest(directory, exclude=("manifest.json",))


def save_training_checkpoint(directory: Path, *, model, extra: nn.Module | None, optimizer, scheduler, state: TrainState,
                             fingerprint: str, model_state: dict | None = None, optimizer_state: dict | None = None,
                             scaler=None) -> None:
    """Write a resumable checkpoint atomically. ``model_state`` / ``optimizer_state``: full state dicts gathered
    from sharded ranks (FSDP); None: the model's and optimizer's own."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp / "model", safe_serialization=True, state_dict=model_state)
        torch.save(
            {
                "optimizer": optimizer_state if optimizer_state is not None else optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
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


class _Ranks:
    """This process as one rank of several (``accelerate launch``): what the loop does differently.

    - The process group comes from accelerate's ``PartialState`` (gloo on CPU, NCCL when ``runtime.device`` is
      CUDA: one GPU per process, rank r on cuda:<local rank>).
    - ``batch_size`` is the global batch: rank r takes the r-th contiguous share of it (sizes differ by at most
      one) and scales its loss by ``share * world / batch`` so that the averaged gradient is the global batch's
      mean gradient. A rank whose share is empty (a last batch smaller than the world) runs one stand-in row
      with weight 0, so that every rank takes part in every gradient all-reduce. Exact for losses that are
      means over examples; terms averaged over tokens or computed over the whole batch (response NLL with
      unequal response lengths, feature terms with unequal lengths, CKA) are per-share values, as in any
      data-parallel run.
    - The model is wrapped in DDP, or sharded with FSDP2 (``fully_shard`` on each transformer block named in
      ``_no_split_modules``, then the root). ``extra`` (the objective's projector) stays whole on every rank
      and its gradients are averaged with one all-reduce. The global gradient norm is clipped.
    - Logged terms are the global batch's (weighted mean over ranks). Dropout draws are per rank, so with
      dropout a run matches the one-process run in distribution, not in value.
    - Checkpoints hold the unwrapped model (FSDP: gathered to rank 0) and the optimizer state in the
      one-process layout; the RNG state saved is rank 0's and every rank restores it.

    Why accelerate's ``PartialState`` (process group, device, barrier) and ``accelerate launch``, and not the
    whole ``Accelerator`` (prepare / backward / clip / save_state), measured against what this loop guarantees:

    - Exact resume across process counts. ``Accelerator.save_state`` writes one RNG file per rank and the
      optimizer and sampler state of *this* world size; a run checkpointed with 2 processes cannot resume with 1
      or 4 to the same weights. Here the batch plan is a pure function of (seed, epoch, lengths)
      (:func:`flexkd.runtime.batches`), the checkpoint is in the one-process layout, and
      tests/unit/test_distributed.py resumes a 2-rank run in 1 process (and the reverse) to identical weights.
    - The global batch is the unit: ``batch_size`` means the same optimisation at any process count, split
      into per-rank shares with loss weights (unequal last batches included). ``prepare(dataloader)`` splits
      per-process batches and pads or drops the uneven end (``even_batches``), which changes the examples seen.
    - Length-grouped batches are planned globally, before sharding; accelerate's samplers shard first.
    - Precision: :class:`flexkd.runtime.Runtime` gives autocast, the fp16 grad scaler and the frozen teacher's
      dtype in one place for the one-process loop, the multi-process loop, relevance scoring, the teacher cache
      and evaluation; ``Accelerator(mixed_precision=...)`` covers only what is ``prepare``-d (not the frozen
      teacher in the loss closure, nor the stages that do not train), so the launcher passes
      ``--mixed_precision no`` and the runtime decides.
    - What Accelerator would add (DeepSpeed, TPU, gradient accumulation) no profile uses; FSDP2 is
      ``fully_shard`` here directly.
    """

    def __init__(self, settings: TrainConfig, model: nn.Module, runtime: Runtime):
        from accelerate import PartialState

        on_cuda = runtime.device.type == "cuda"
        self.state = PartialState(cpu=not on_cuda)
        self.world, self.rank = self.state.num_processes, self.state.process_index
        self.is_main = self.state.is_main_process
        self.device = torch.device("cuda", self.state.local_process_index) if on_cuda else torch.device("cpu")
        self.fsdp = settings.distributed == "fsdp"

    @staticmethod
    def start(settings: TrainConfig, model: nn.Module, runtime: Runtime) -> "_Ranks | None":
        """None with one process; the rank's state under ``accelerate launch`` with num_processes ranks."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1 and settings.num_processes == 1:
            return None
        if world != settings.num_processes:
            raise ConfigError(
                f"num_processes is {settings.num_processes} but this process is one of {world}: start multi-process "
                "training with flexkd.launch.run_training (it runs accelerate launch with num_processes ranks)"
            )
        return _Ranks(settings, model, runtime)

    def wrap(self, model: nn.Module, extra: nn.Module | None) -> nn.Module:
        """Move to this rank's device; return the module that the loss calls (DDP, or the FSDP-sharded model)."""
        model.to(self.device)
        if extra is not None:
            extra.to(self.device)
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            blocks = set(getattr(model, "_no_split_modules", None) or ())
            for module in [m for m in model.modules() if m is not model and type(m).__name__ in blocks]:
                fully_shard(module)
            fully_shard(model)
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def shard(self, indices: list[int]) -> tuple[list[int], float]:
        """This rank's share of the global batch and its loss weight (share * world / batch)."""
        base, rest = divmod(len(indices), self.world)
        size = base + (1 if self.rank < rest else 0)
        start = self.rank * base + min(self.rank, rest)
        if size == 0:
            return indices[:1], 0.0
        return indices[start : start + size], size * self.world / len(indices)

    def average_extra_grads(self, extra: nn.Module | None) -> None:
        """DDP / FSDP average the model's gradients; ``extra`` is outside them: one all-reduce of its gradients.
        Parameters without a gradient (unused by the objective, alike on every rank) are left out."""
        import torch.distributed as dist

        params = [p for p in extra.parameters() if p.grad is not None] if extra is not None else []
        if not params:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    def clip_grad_norm(self, modules: Sequence[nn.Module], max_norm: float) -> torch.Tensor:
        """Clip on the global gradient norm (DDP: every rank holds the averaged gradients; FSDP: the sharded
        ones are DTensors, reduced across ranks; the same coefficient as ``clip_grad_norm_``)."""
        params = [p for m in modules for p in m.parameters()]
        if not self.fsdp:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in params if p.grad is not None]
        norms = []
        for group in ([g for g in grads if isinstance(g, DTensor)], [g for g in grads if not isinstance(g, DTensor)]):
            if group:
                norm = torch.nn.utils.get_total_norm(group)
                norms.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).to(self.device))
        total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), device=self.device)
        coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        for g in grads:
            g.mul_(coef)
        return total

    def mean_terms(self, loss: torch.Tensor, terms: dict, weight: float) -> tuple[torch.Tensor, dict]:
        """The global batch's loss and terms: the weighted mean over ranks (the same on every rank)."""
        import torch.distributed as dist

        keys = list(terms)
        values = torch.stack([loss.detach().float()] + [torch.as_tensor(terms[k]).detach().float().to(loss.device) for k in keys])
        values = values * weight
        dist.all_reduce(values)
        values /= self.world
        return values[0], dict(zip(keys, values[1:]))

    def evaluate(self, evaluate: EvalFn, model: nn.Module) -> dict[str, float]:
        """Rank 0 evaluates the unwrapped model (FSDP: every rank, since its forward gathers the shards);
        every rank gets rank 0's metrics."""
        import torch.distributed as dist

        metrics = None
        if self.fsdp or self.is_main:
            model.eval()
            metrics = evaluate(model)
            model.train()
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def model_state(self, model: nn.Module) -> dict | None:
        """FSDP: the full state dict, gathered to rank 0 (on CPU; empty elsewhere). DDP: None (the model's own)."""
        if not self.fsdp:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state(self, optimizer) -> dict | None:
        """FSDP: the optimizer state in the one-process layout (sharded tensors gathered), on rank 0. DDP: None."""
        if not self.fsdp:
            return None
        from torch.distributed.tensor import DTensor

        saved = optimizer.state_dict()
        state = {}
        for index, values in saved["state"].items():
            state[index] = {}
            for key, value in values.items():
                if isinstance(value, DTensor):
                    full = value.full_tensor()  # a collective: every rank, same order
                    value = full.cpu() if self.is_main else None
                state[index][key] = value
        return {"state": state, "param_groups": saved["param_groups"]} if self.is_main else None

    def load_optimizer(self, optimizer, saved: dict) -> None:
        """Load a one-process-layout optimizer state (whatever process count wrote it)."""
        if self.fsdp:
            from torch.distributed.tensor import DTensor, distribute_tensor

            params = [p for group in optimizer.param_groups for p in group["params"]]
            state = {}
            for index, values in saved["state"].items():
                param = params[int(index)]
                state[index] = {
                    key: distribute_tensor(value.to(self.device), param.device_mesh, param.placements, src_data_rank=None)
                    if isinstance(param, DTensor) and torch.is_tensor(value) and value.shape == param.shape else value
                    for key, value in values.items()
                }
            saved = {"state": state, "param_groups": saved["param_groups"]}
        optimizer.load_state_dict(saved)

    def barrier(self) -> None:
        self.state.wait_for_everyone()


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
    ``loss_fn`` is called as ``loss_fn(module, batch)`` with the module to run (the wrapped one under several
    processes). Under ``accelerate launch`` every rank calls this with the same arguments (see :class:`_Ranks`);
    then ``model`` is left as trained on each rank and the caller loads ``model_dir`` (``flexkd.launch`` does).

    ``runtime`` (default: CPU, float32, batches in permutation order) puts the model, ``extra`` and each batch on
    its device, runs ``loss_fn`` under its autocast (float32 master weights; fp16 scales the loss), picks its
    optimizer (fused AdamW) and groups rows by length when asked. The model is left on that device.
    """
    work_dir = Path(work_dir)
    runtime = runtime or Runtime()
    ranks = _Ranks.start(settings, model, runtime)
    is_main = ranks is None or ranks.is_main
    modules = [model] + ([extra] if extra is not None else [])
    n = len(train_data)
    if n == 0:
        raise ValueError("train_data is empty")
    steps_per_epoch = math.ceil(n / settings.batch_size)
    lengths = row_lengths(train_data) if runtime.group_by_length else None
    total_steps = settings.max_steps or max(1, math.ceil(settings.epochs * steps_per_epoch))

    seed_everything(seed)
    state = TrainState()
    resumed_from = None
    blob = None
    checkpoint_dir = work_dir / CHECKPOINT
    if ranks is None:  # under several processes flexkd.launch.run_training did it before starting the ranks
        recover_dir(checkpoint_dir)  # killed between atomic_dir's two renames: the previous checkpoint is complete
    if checkpoint_dir.exists():  # weights first: under several processes they are loaded before wrapping
        blob, state = load_training_checkpoint(checkpoint_dir, fingerprint=fingerprint)
        _load_weights(model, checkpoint_dir / "model")
        if extra is not None and blob["extra"] is not None:
            extra.load_state_dict(blob["extra"])
        resumed_from = state.step
    if ranks is None:
        train_module = runtime.student(model)  # on the device; compiled when asked
        if extra is not None:
            extra.to(runtime.device)
    else:
        if runtime.gradient_checkpointing or runtime.compile:
            runtime.student(model)  # what it turns on; the rank moves and wraps the model itself
        train_module = ranks.wrap(model, extra)
    optimizer = runtime.optimizer(_param_groups(modules, settings.weight_decay), lr=settings.lr)
    scaler = runtime.grad_scaler()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear_decay(total_steps, settings.warmup_ratio))
    if blob is not None:
        kernel = {key: optimizer.defaults.get(key) for key in ("fused", "foreach")}
        if ranks is None:
            optimizer.load_state_dict(blob["optimizer"])
        else:
            ranks.load_optimizer(optimizer, blob["optimizer"])
        for group in optimizer.param_groups:  # the saved groups carry the writer's kernel; keep this run's
            group.update(kernel)
        scheduler.load_state_dict(blob["scheduler"])
        if blob.get("scaler") is not None and scaler.is_enabled():
            scaler.load_state_dict(blob["scaler"])
        torch.set_rng_state(blob["torch_rng"])
        random.setstate((3, tuple(blob["python_rng"]), blob["python_rng_gauss"]))

    def save_model(directory: Path) -> None:
        if ranks is None:
            atomic_dir(directory, lambda tmp: model.save_pretrained(tmp, safe_serialization=True))
            return
        full = ranks.model_state(model)
        if ranks.is_main:
            atomic_dir(directory, lambda tmp: model.save_pretrained(tmp, safe_serialization=True, state_dict=full))
        ranks.barrier()

    def save_checkpoint() -> None:
        if ranks is None:
            save_training_checkpoint(
                checkpoint_dir, model=model, extra=extra, optimizer=optimizer, scheduler=scheduler, state=state,
                fingerprint=fingerprint, scaler=scaler,
            )
            return
        model_state, optimizer_state = ranks.model_state(model), ranks.optimizer_state(optimizer)
        if ranks.is_main:
            save_training_checkpoint(
                checkpoint_dir, model=model, extra=extra, optimizer=optimizer, scheduler=scheduler, state=state,
                fingerprint=fingerprint, model_state=model_state, optimizer_state=optimizer_state, scaler=scaler,
            )
        ranks.barrier()

    def run_eval() -> None:
        if evaluate is None:
            return
        if ranks is None:
            model.eval()
            metrics = evaluate(model)
            model.train()
        else:
            metrics = ranks.evaluate(evaluate, model)
        state.evals.append({"step": state.step, **metrics})
        if log and is_main:
            log({f"validation/{k}": v for k, v in metrics.items()}, state.step)
        if select_metric is not None:
            score = metrics[select_metric]
            if state.best_score is None or score > state.best_score:
                state.best_score, state.best_step = score, state.step
                save_model(work_dir / BEST)

    bar = None
    if progress and is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=state.step, desc=desc, dynamic_ncols=True, mininterval=2.0)

    train_module.train()
    order = batches(n, settings.batch_size, seed, state.epoch, lengths)
    while state.step < total_steps and not state.stopped_early:
        if state.batch_in_epoch >= steps_per_epoch:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            order = batches(n, settings.batch_size, seed, state.epoch, lengths)
        indices, weight = order[state.batch_in_epoch], 1.0
        if ranks is not None:
            indices, weight = ranks.shard(indices)
        batch = runtime.to_device(collate([train_data[i] for i in indices]))

        began = time.perf_counter()
        with runtime.autocast():
            loss, terms = loss_fn(train_module, batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss if ranks is None else loss * weight).backward()
        scaler.unscale_(optimizer)  # clip the true gradients (a no-op without fp16)
        if ranks is None:
            grad_norm = torch.nn.utils.clip_grad_norm_([p for m in modules for p in m.parameters()], settings.grad_clip)
        else:
            ranks.average_extra_grads(extra)
            grad_norm = ranks.clip_grad_norm(modules, settings.grad_clip)
        scaler.step(optimizer)  # fp16: skipped when the gradients overflowed, and the scale lowered
        scaler.update()
        scheduler.step()
        if ranks is not None:
            loss, terms = ranks.mean_terms(loss, terms, weight)
        state.train_seconds += time.perf_counter() - began
        state.step += 1
        state.batch_in_epoch += 1

        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss became {loss.item()} at step {state.step}; lower the learning rate")
        if log and is_main and (state.step % settings.log_every == 0 or state.step == total_steps):
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
        if _budget_spent(settings, state):
            if not (state.evals and state.evals[-1]["step"] == state.step):
                run_eval()  # the budget is spent: the last weights get their evaluation before the stop
        if state.evals and state.evals[-1]["step"] == state.step:
            state.stopped_early = early_stop_reason(settings, state, select_metric)
        if state.stopped_early or state.step % settings.checkpoint_every == 0 or state.step == total_steps:
            save_checkpoint()
        if state.stopped_early:
            print(f"{desc}: stopped at step {state.step} of {total_steps}: {state.stopped_early}")
            break
        if stop_after is not None and state.step >= stop_after and state.step < total_steps:
            if bar is not None:
                bar.close()
            raise Interrupted(f"stopped after step {state.step} as asked")

    if bar is not None:
        bar.close()
    keep = work_dir / BEST if (select_metric and settings.keep_best and (work_dir / BEST).exists()) else checkpoint_dir / "model"
    if keep != checkpoint_dir / "model" and ranks is None:
        _load_weights(model, keep)
    return TrainResult(state=state, model_dir=keep, total_steps=total_steps, resumed_from=resumed_from)


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
