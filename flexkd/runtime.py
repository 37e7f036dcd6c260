"""Where and how the models run: device, precision, batch order. One place for every stage.

``params.yaml: runtime`` (:class:`flexkd.config.RuntimeConfig`) is resolved once per stage into a
:class:`Runtime`; the stages ask it to place models (``student`` / ``frozen``), to move batches
(``to_device``), for the autocast context of a forward pass, for the optimizer and the gradient scaler.

- device: ``auto`` is the first CUDA device when torch sees one, else the CPU. A device the machine cannot
  use (``cuda`` without CUDA, ``cuda:3`` on a two-GPU host) stops the stage before any model is loaded,
  with the setting to change.
- precision (what trained models compute in): students and a fine-tuned teacher keep float32 master weights
  and run their forward passes under ``torch.autocast`` in bf16 or fp16; fp16 scales the loss
  (``torch.amp.GradScaler``). ``auto`` is bf16 on a CUDA device that supports it (fp16 on older ones) and
  fp32 on the CPU: bf16 autocast is faster on a CPU with AVX512-BF16, but flexkd turns it on there only once
  it has been measured to keep accuracy (BENCHMARKS.md); ``precision: bf16`` asks for it.
- teacher_dtype: the frozen teacher (relevance scoring, teacher cache, online teacher in distillation) is cast
  to this dtype for inference; ``auto`` follows precision on CUDA and stays float32 on the CPU.
- Fused AdamW on the CPU and on CUDA (``fused_optimizer``). On CUDA also: TF32 matmuls, SDPA attention
  (transformers' default), pinned host memory and non-blocking copies.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from flexkd.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(setting: str, *, local_rank: int | None = None) -> torch.device:
    """``runtime.device`` as a torch device; a device this machine lacks is a ConfigError naming the remedy.

    Under several processes (``local_rank`` given) a CUDA setting means this rank's own GPU.
    """
    setting = (setting or "auto").strip().lower()
    count = _cuda_count()
    if setting == "auto":
        setting = "cuda" if count else "cpu"
    if setting == "cpu":
        return torch.device("cpu")
    if setting == "cuda" or setting.startswith("cuda:"):
        if not count:
            build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a build without CUDA")
            raise ConfigError(
                f"runtime.device: {setting!r} is not on this machine: it has no CUDA device ({build}; "
                "torch.cuda.is_available() is False). Set runtime.device to 'cpu' or 'auto', or run the stage on a GPU "
                "worker (docker/Dockerfile.cuda, the gpu work pool)."
            )
        index = int(setting.split(":", 1)[1]) if ":" in setting else 0
        if local_rank is not None:
            index = local_rank if ":" not in setting else index + local_rank
        if index >= count:
            raise ConfigError(
                f"runtime.device: {setting!r} is not on this machine: it has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})"
                + (f" and this is process {local_rank}" if local_rank else "")
                + "; pick one of them, or 'cuda' / 'auto'."
            )
        return torch.device("cuda", index)
    raise ConfigError(f"runtime.device: {setting!r} is not a device; use auto, cpu, cuda or cuda:N")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN's AVX512-BF16 / AMX kernels)."""
    try:  # torch (2.13) has no public query for this; the oneDNN op is what torch's own bf16 CPU tests call
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def resolve_precision(setting: str, device: torch.device) -> str:
    """``runtime.precision`` for this device: fp32, bf16 or fp16."""
    if setting == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if setting == "fp16" and device.type != "cuda":
        raise ConfigError("runtime.precision: 'fp16' needs a CUDA device (it relies on loss scaling there); "
                          "on the CPU use 'bf16' or 'fp32'.")
    if setting == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        import warnings

        warnings.warn("runtime.precision: 'bf16' on a CPU without bfloat16 instructions (AVX512-BF16 or AMX): "
                      "oneDNN emulates it and a training step is many times slower than in fp32 (about 20x on the "
                      "AVX2 CPU of BENCHMARKS.md); 'auto' keeps fp32 here", stacklevel=2)
    if setting == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"runtime.precision: 'bf16' is not supported here: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                          "use 'fp16' or 'auto'.")
    if setting not in DTYPES:
        raise ConfigError(f"runtime.precision: {setting!r} is not a precision; use auto, fp32, bf16 or fp16")
    return setting


@dataclass(frozen=True)
class Runtime:
    """A resolved ``runtime`` section. ``Runtime()`` is today's CPU float32 behaviour (what tests use)."""

    device: torch.device = torch.device("cpu")
    precision: str = "fp32"  # fp32 | bf16 | fp16
    teacher_dtype: torch.dtype = torch.float32
    group_by_length: bool = False
    gradient_checkpointing: bool = False
    compile: bool = False
    fused_optimizer: bool = True

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return None if self.precision == "fp32" else DTYPES[self.precision]

    def autocast(self):
        """The context of every forward pass of a trained model (no-op in fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=DTYPES[self.precision])

    def inference(self):
        """The context of a frozen model's forward pass: no gradients, autocast when the weights are float32
        but the run is not (a frozen teacher already cast to teacher_dtype runs as it is)."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())  # not inference_mode: its tensors may not enter a loss
        stack.enter_context(self.autocast())
        return stack

    def synchronize(self) -> None:
        """Wait for the device's queued work (timing a step on a GPU); a no-op on the CPU."""
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def grad_scaler(self) -> "torch.amp.GradScaler":
        """Loss scaling for fp16; a disabled scaler (a pass-through) otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def to_device(self, batch: dict) -> dict:
        """Move a collated batch's tensors to the device (pinned and non-blocking on CUDA)."""
        if self.device.type == "cpu":
            return batch
        moved = {}
        for key, value in batch.items():
            if torch.is_tensor(value):
                if self.is_cuda and value.device.type == "cpu":
                    value = value.pin_memory().to(self.device, non_blocking=True)
                else:
                    value = value.to(self.device)
            moved[key] = value
        return moved

    def student(self, model: nn.Module) -> nn.Module:
        """A model to train: float32 master weights on the device; gradient checkpointing and torch.compile
        when asked. Returns the module to call (the compiled one with compile: true)."""
        model.to(self.device, dtype=torch.float32)
        if self.gradient_checkpointing:
            if not hasattr(model, "gradient_checkpointing_enable"):
                raise ConfigError(f"runtime.gradient_checkpointing: {type(model).__name__} does not support it")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(model, "config"):
                model.config.use_cache = False
        if self.compile:
            return torch.compile(model)
        return model

    def frozen(self, model: nn.Module) -> nn.Module:
        """A model that is only run (the teacher when distilling or scoring): on the device, in teacher_dtype,
        in eval mode, without gradients."""
        model.to(self.device, dtype=self.teacher_dtype)
        model.eval()
        model.requires_grad_(False)
        return model

    def optimizer(self, param_groups: list[dict], lr: float) -> torch.optim.Optimizer:
        """AdamW with the fused kernel (one pass over every parameter: on a CPU a 4x192 student's step spends
        45-55 ms in the foreach AdamW and 8 ms in the fused one, BENCHMARKS.md), when every parameter is a float32
        tensor on this run's device."""
        from torch.distributed.tensor import DTensor

        params = [p for g in param_groups for p in g["params"]]
        # FSDP-sharded parameters (DTensors) take the foreach kernel: the fused one refuses the mix of sharded
        # parameters and its plain step tensors
        fused = self.fused_optimizer and self.device.type in ("cpu", "cuda") and all(
            p.device.type == self.device.type and p.dtype == torch.float32 and not isinstance(p, DTensor) for p in params)
        return torch.optim.AdamW(param_groups, lr=lr, fused=fused or None)

    def describe(self) -> dict[str, str]:
        """What the run used, for MLflow params and the stage summaries."""
        name = torch.cuda.get_device_name(self.device) if self.is_cuda else "cpu"
        return {"device": str(self.device), "device_name": name, "precision": self.precision,
                "teacher_dtype": str(self.teacher_dtype).replace("torch.", ""),
                "group_by_length": str(self.group_by_length).lower(),
                "gradient_checkpointing": str(self.gradient_checkpointing).lower(), "compile": str(self.compile).lower(),
                "fused_optimizer": str(self.fused_optimizer).lower()}


def resolve(settings=None, *, local_rank: int | None = None) -> Runtime:
    """``params.yaml: runtime`` (a RuntimeConfig, or None for the defaults) as a Runtime for this machine."""
    from flexkd.config import RuntimeConfig

    settings = settings if settings is not None else RuntimeConfig()
    if local_rank is None and "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        local_rank = int(os.environ["LOCAL_RANK"])
    device = resolve_device(settings.device, local_rank=local_rank)
    precision = resolve_precision(settings.precision, device)
    if settings.teacher_dtype == "auto":
        teacher_dtype = DTYPES[precision] if device.type == "cuda" else torch.float32
    else:
        teacher_dtype = DTYPES[resolve_precision(settings.teacher_dtype, device)]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.set_device(device)
    return Runtime(device=device, precision=precision, teacher_dtype=teacher_dtype,
                   group_by_length=settings.group_by_length, gradient_checkpointing=settings.gradient_checkpointing,
                   compile=settings.compile, fused_optimizer=settings.fused_optimizer)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of one epoch: a permutation that depends only on (seed, epoch); :func:`batches` cuts it."""
    return torch.randperm(n, generator=_epoch_generator(seed, epoch)).tolist()


def batches(n: int, batch_size: int, seed: int, epoch: int, lengths: Sequence[int] | None = None,
            *, mega: int = 50) -> list[list[int]]:
    """The batches of one epoch, a pure function of (n, batch_size, seed, epoch, lengths): resume is exact.

    Without lengths: a seeded permutation cut into batches. With lengths (group_by_length): the permutation
    is cut into mega-batches of ``mega * batch_size`` rows, each sorted by length (longest first) and cut into
    batches, so that a batch holds rows of similar length and pads little; then the batches are shuffled (the
    one with the longest row first, so that a run that will not fit in memory fails at once). The number of
    batches is ceil(n / batch_size) either way: only the last mega-batch can end in a short batch.
    """
    generator = _epoch_generator(seed, epoch)
    order = torch.randperm(n, generator=generator).tolist()
    if lengths is None:
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if len(lengths) != n:
        raise ValueError(f"lengths has {len(lengths)} entries for {n} rows")
    size = mega * batch_size
    out: list[list[int]] = []
    for start in range(0, n, size):
        chunk = sorted(order[start : start + size], key=lambda i: -lengths[i])
        out.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    shuffled = [out[i] for i in torch.randperm(len(out), generator=generator).tolist()]
    longest = max(range(len(shuffled)), key=lambda b: max(lengths[i] for i in shuffled[b]))
    shuffled.insert(0, shuffled.pop(longest))
    return shuffled


def row_lengths(rows: Iterable[dict]) -> list[int] | None:
    """Token counts of tokenised rows (``input_ids``); None when the rows are not token lists."""
    lengths = []
    for row in rows:
        ids = row.get("input_ids") if isinstance(row, dict) else None
        if ids is None:
            return None
        lengths.append(len(ids))
    return lengths


def padding_stats(batch_list: Sequence[Sequence[int]], lengths: Sequence[int]) -> dict[str, int]:
    """Real and padded tokens of an epoch with dynamic padding (each batch padded to its longest row)."""
    real = sum(lengths[i] for batch in batch_list for i in batch)
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batch_list if batch)
    return {"real_tokens": real, "padded_tokens": padded, "padding_tokens": padded - real}
