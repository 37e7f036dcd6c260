"""One rank of a multi-process training (``accelerate launch``, started by :mod:`flexkd.launch`).

:func:`flexkd.train.train_loop` runs every rank through the same loop as one process; it calls its processes
through a small interface (:class:`flexkd.train.OneProcess`, whose methods are the plain one-process steps or
nothing). :class:`Ranks` is the same interface for one rank of several: it shares out the global batch, wraps
the model (DDP or FSDP2), averages, clips and reduces across ranks, gathers full states for the checkpoint and
evaluates on rank 0.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from flexkd.config import TrainConfig
from flexkd.runtime import Runtime


class Ranks:
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

    def __init__(self, settings: TrainConfig, runtime: Runtime):
        from accelerate import PartialState

        on_cuda = runtime.device.type == "cuda"
        self.state = PartialState(cpu=not on_cuda)
        self.world, self.rank = self.state.num_processes, self.state.process_index
        self.is_main = self.state.is_main_process
        self.device = torch.device("cuda", self.state.local_process_index) if on_cuda else torch.device("cpu")
        self.fsdp = settings.distributed == "fsdp"
        self.runtime = runtime

    def recover(self, checkpoint_dir) -> None:
        """Nothing: :func:`flexkd.launch.run_training` recovered the checkpoint before it started the ranks."""

    def prepare(self, model: nn.Module, extra: nn.Module | None) -> nn.Module:
        """What the runtime turns on (gradient checkpointing, compilation), then :meth:`wrap`."""
        if self.runtime.gradient_checkpointing or self.runtime.compile:
            self.runtime.student(model)  # what it turns on; the rank moves and wraps the model itself
        return self.wrap(model, extra)

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

    def share(self, indices: list[int]) -> tuple[list[int], float]:
        """This rank's share of the global batch and its loss weight (share * world / batch)."""
        base, rest = divmod(len(indices), self.world)
        size = base + (1 if self.rank < rest else 0)
        start = self.rank * base + min(self.rank, rest)
        if size == 0:
            return indices[:1], 0.0
        return indices[start : start + size], size * self.world / len(indices)

    def average_gradients(self, extra: nn.Module | None) -> None:
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

    def reduce(self, loss: torch.Tensor, terms: dict, weight: float) -> tuple[torch.Tensor, dict]:
        """The global batch's loss and terms: the weighted mean over ranks (the same on every rank)."""
        import torch.distributed as dist

        keys = list(terms)
        values = torch.stack([loss.detach().float()] + [torch.as_tensor(terms[k]).detach().float().to(loss.device) for k in keys])
        values = values * weight
        dist.all_reduce(values)
        values /= self.world
        return values[0], dict(zip(keys, values[1:]))

    def evaluate(self, evaluate: Callable[[nn.Module], dict[str, float]], model: nn.Module) -> dict[str, float]:
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

    def gather_model_state(self, model: nn.Module) -> dict | None:
        """FSDP: the full state dict, gathered to rank 0 (on CPU; empty elsewhere). DDP: None (the model's own)."""
        if not self.fsdp:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def gather_optimizer_state(self, optimizer) -> dict | None:
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

    def keep_weights(self, model: nn.Module, directory) -> None:
        """Nothing: this rank's model goes with it; :func:`flexkd.launch.run_training` loads ``directory`` into the
        caller's model."""
