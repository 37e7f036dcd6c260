"""One adapter per task format, so that each flow reads the same for classification and generation.

A ``Task`` knows how to load and validate raw data, prepare splits, load a model of the right head,
tokenise, batch, compute the task loss, pick the feature positions, score a model during training (for
checkpoint selection) and at the end (the reported metrics), and log a student as an MLflow model.
"""

from __future__ import annotations

import math

from pathlib import Path
from typing import Callable

import torch

from flexkd.config import FlexKDConfig, StudentConfig
from flexkd.errors import ConfigError


def evenly_spaced_layers(total: int, keep: int) -> list[int]:
    """``keep`` of ``total`` layer indices, evenly spaced, first and last kept (keep=1: the last)."""
    if not 1 <= keep <= total:
        raise ConfigError(f"students.*.num_layers={keep}: must be between 1 and the teacher's {total} layers")
    if keep == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def teacher_layers_for(teacher, scfg: StudentConfig) -> list[int]:
    """The teacher layer (0-based) each student layer stands for: ``prune_layers``, else ``num_layers`` evenly
    spaced over the teacher's (first and last kept). A pruned student keeps these layers; Flex-KD's matched
    layers pair student layer i with teacher layer [i]."""
    return list(scfg.prune_layers) if scfg.prune_layers else evenly_spaced_layers(_num_layers(teacher), scfg.num_layers)


def _num_layers(model) -> int:
    config = model.config
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(config, name):
            return int(getattr(config, name))
    raise ConfigError(f"cannot tell the number of layers of {type(model).__name__}")


# Encoder families whose sequence-classification head reads the first token ([CLS] / <s>).
FIRST_TOKEN_HEADS = ("albert", "bert", "camembert", "deberta", "deberta-v2", "distilbert", "electra", "ernie",
                     "megatron-bert", "mpnet", "nezha", "rembert", "roberta", "roberta-prelayernorm", "xlm-roberta")


def head_position(model) -> str:
    """``first`` or ``last``: which non-pad position the classification head of ``model`` reads.

    Encoders of ``FIRST_TOKEN_HEADS`` pool the first token; decoder-only models (a causal-LM family in transformers,
    e.g. GPT-2, Llama) the last non-pad token. Anything else (mean pooling, e.g. ModernBERT) has no single head
    position: ConfigError.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(model.config, "model_type", None)
    if model_type in FIRST_TOKEN_HEADS:
        return "first"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "last"
    raise ConfigError(
        f"distill.feature_positions: head: cannot tell which position the classification head of a {model_type!r} "
        f"model reads (known: first token for {', '.join(FIRST_TOKEN_HEADS)}; last non-pad token for decoder-only "
        "models); set distill.feature_positions: tokens"
    )


def head_mask(attention_mask: torch.Tensor, side: str) -> torch.Tensor:
    """(B, T) bool: true at each row's first (``side='first'``) or last (``'last'``) non-pad position."""
    mask = attention_mask.bool()
    if mask.dim() != 2 or not bool(mask.any(dim=1).all()):
        raise ConfigError(f"head_mask: attention_mask must be (B, T) with a non-pad token in every row; got {tuple(mask.shape)}")
    width = mask.shape[1]
    index = mask.int().argmax(dim=1) if side == "first" else width - 1 - mask.flip(1).int().argmax(dim=1)
    out = torch.zeros_like(mask)
    out[torch.arange(mask.shape[0], device=mask.device), index] = True
    return out


class Task:
    """Shared behaviour; subclasses fill in the format-specific parts."""

    relevance_task: str
    is_generation: bool

    def __init__(self, cfg: FlexKDConfig, runtime=None):
        self.cfg = cfg
        self._runtime = runtime

    @property
    def runtime(self):
        """Where this task's models run (``params.yaml: runtime``, resolved on first use; see flexkd.runtime)."""
        if self._runtime is None:
            from flexkd import runtime

            self._runtime = runtime.resolve(self.cfg.runtime)
        return self._runtime

    # -- selection during training (higher is better) -------------------------------------------------
    @property
    def selection_metric(self) -> str:
        raise NotImplementedError

    def _drop_invalid(self, splits: dict, columns: list[str]) -> tuple[dict, dict[str, list[int]]]:
        from flexkd.data.raw_splits import drop_invalid_rows

        v = self.cfg.validation
        kept, dropped = {}, {}
        for name, frame in splits.items():
            kept[name], dropped[name] = drop_invalid_rows(frame, columns, v.min_chars, v.max_chars)
        if v.check_overlap and "test" in kept:  # test rows that repeat a training text (tolerated by max_invalid_rate)
            keys = [c for c in dict.fromkeys(columns + ["text_pair", "input"]) if c in kept["test"].columns and c != "response"]
            seen = set(map(tuple, kept["train"][keys].astype(str).itertuples(index=False)))
            test = kept["test"]
            overlap = [tuple(row) in seen for row in test[keys].astype(str).itertuples(index=False)]
            dropped["test"] += [int(r) for r in test.loc[overlap, "source_row"]]
            kept["test"] = test[[not o for o in overlap]].reset_index(drop=True)
        return kept, dropped

    # -- compared positions ------------------------------------------------------------------------------
    def compare_mask(self, model) -> Callable[[dict], torch.Tensor]:
        """The positions whose hidden states the feature terms compare, for ``model`` (the student): by default
        the positions the teacher cache holds (``feature_mask``)."""
        return self.feature_mask

    # -- students ----------------------------------------------------------------------------------------
    def build_student(self, teacher, scfg: StudentConfig, *, seed: int, selected_units: list[int], calibration=None):
        """A student of the teacher's family: random init, loaded from a path, or pruned from the teacher.

        Returns ``(model, pruning)`` where ``pruning`` describes what a pruned student kept (else None).
        """
        from flexkd.models import student_config

        if scfg.init == "path":
            return self.load_model(scfg.path), None
        if scfg.init == "prune":
            from flexkd.prune import PrunePlan, activation_importance, describe, prune_model

            layers = teacher_layers_for(teacher, scfg)
            plan = PrunePlan(hidden_units=sorted(selected_units), layers=layers, num_heads=scfg.num_heads,
                             intermediate_size=scfg.intermediate_size)
            heads = channels = None
            if scfg.prune_importance == "activations" and calibration is not None:
                heads, channels = activation_importance(teacher, calibration, max_batches=8)
            student = prune_model(teacher, plan, head_importance=heads, channel_importance=channels)
            return student, describe(plan, teacher, student)
        config = student_config(
            teacher.config, num_layers=scfg.num_layers, hidden_size=scfg.hidden_size, num_heads=scfg.num_heads,
            intermediate_size=scfg.intermediate_size,
        )
        if scfg.num_kv_heads is not None and hasattr(config, "num_key_value_heads"):
            config.num_key_value_heads = scfg.num_kv_heads
        if scfg.head_dim is not None:
            if not hasattr(config, "head_dim"):
                raise ConfigError(f"students.*.head_dim: a {config.model_type} model has no separate head width")
            config.head_dim = scfg.head_dim
        torch.manual_seed(seed)
        return self.model_class().from_config(config), None


def _record_dropped(out_dir: Path, manifest: dict, dropped: dict[str, list[int]]) -> dict:
    """Add the rows dropped as invalid (source lines per split) to the prepared manifest."""
    from flexkd.data.prepare import MANIFEST_FILE, write_json

    manifest["dropped_invalid_rows"] = {split: sorted(rows) for split, rows in dropped.items()}
    write_json(Path(out_dir) / MANIFEST_FILE, manifest)  # atomically: the manifest is rewritten in place
    return manifest


class ClassificationTask(Task):
    relevance_task = "classification"
    is_generation = False

    @property
    def selection_metric(self) -> str:
        return self.cfg.evaluate.primary_metric

    def model_class(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    # -- data -----------------------------------------------------------------------------------------
    def load_raw(self):
        from flexkd.data.raw_splits import hold_out_test, load_raw_splits

        keys = ["text"] + (["text_pair"] if self.cfg.data.columns.text_pair is not None else [])
        return hold_out_test(load_raw_splits(self.cfg.data), self.cfg.data, self.cfg.project.seed, keys)

    def validate(self, splits):
        from flexkd.data.raw_splits import validation_settings
        from flexkd.data.validation import validate_classification

        return validate_classification(splits, validation_settings(self.cfg.data, self.cfg.validation))

    def prepare(self, splits, out_dir: Path) -> dict:
        from flexkd.data.prepare import prepare_classification
        from flexkd.data.sources import build_label_map

        data = self.cfg.data
        columns = ["text"] + (["text_pair"] if data.columns.text_pair is not None else [])
        splits, dropped = self._drop_invalid(splits, columns)
        label_map = build_label_map(splits["train"]["label"], data.labels)
        manifest = prepare_classification(
            splits["train"], splits["test"], out_dir, label_map=label_map, validation_size=data.validation_size,
            max_train=data.max_train, max_test=data.max_test, seed=self.cfg.project.seed,
            validation_from=data.validation_from,
        )
        return _record_dropped(out_dir, manifest, dropped)

    # -- models ---------------------------------------------------------------------------------------
    def load_model(self, spec: str, prepared_dir: Path | None = None):
        from flexkd.data.prepare import load_label_map
        from flexkd.models import load_classifier

        label_map = load_label_map(prepared_dir) if prepared_dir is not None else None
        return load_classifier(spec, label_map=label_map, trust_remote_code=self.cfg.teacher.trust_remote_code,
                               seed=self.cfg.project.seed)

    # -- batches --------------------------------------------------------------------------------------
    def features(self, prepared_dir: Path, split: str, tokenizer, limit: int | None = None) -> list[dict]:
        from flexkd.data.tokenize import tokenized_split

        return tokenized_split(prepared_dir, split, tokenizer, self.cfg.teacher.max_length, limit=limit)

    def collate(self, tokenizer) -> Callable:
        from flexkd.data.tokenize import PadCollator

        return PadCollator(tokenizer.pad_token_id)

    def feature_mask(self, batch: dict) -> torch.Tensor:
        return batch["attention_mask"]

    def compare_mask(self, model) -> Callable[[dict], torch.Tensor]:
        """Every non-pad token (``distill.feature_positions: tokens``), or only the position the classification
        head of ``model`` reads (``head``)."""
        if self.cfg.distill.feature_positions == "tokens":
            return self.feature_mask
        side = head_position(model)
        return lambda batch: head_mask(batch["attention_mask"], side)

    # -- scores ---------------------------------------------------------------------------------------
    def validation_scores(self, model, features, collate) -> dict[str, float]:
        from flexkd.evaluate import evaluate_classifier

        return evaluate_classifier(model, features, collate, self.cfg.evaluate.batch_size, runtime=self.runtime)

    def test_scores(self, model, tokenizer, prepared_dir: Path) -> tuple[dict[str, float], list[str] | None]:
        features = self.features(prepared_dir, "test", tokenizer)
        return self.validation_scores(model, features, self.collate(tokenizer)), None

    def score_teacher(self, model, features, collate, prepared_dir: Path, *, check: bool,
                      base_scores: dict | None = None) -> tuple[dict[str, float], dict | None]:
        """The tuned teacher's validation scores and, with ``check``, its quality (against the majority class,
        and each class's recall), from one prediction pass."""
        from flexkd.data.prepare import load_label_map
        from flexkd.evaluate import classification_metrics, classifier_quality, predict_logits

        logits = predict_logits(model, features, collate, self.cfg.evaluate.batch_size, runtime=self.runtime)
        labels, predictions = [f["labels"] for f in features], logits.argmax(-1).tolist()
        scores = classification_metrics(labels, predictions)  # what validation_scores gives
        if not check:
            return scores, None
        q = self.cfg.teacher.quality
        names = {i: name for name, i in load_label_map(prepared_dir).items()}
        return scores, classifier_quality(labels, predictions, names, min_gain_over_majority=q.min_gain_over_majority,
                                          min_class_recall=q.min_class_recall)

    def log_model(self, tracking, checkpoint_dir: Path, prepared_dir: Path, name: str = "model") -> str:
        """Log the checkpoint as a pyfunc model called ``name`` (the student and method: ``pruned-flexkd``)."""
        from flexkd.data.prepare import load_label_map, load_split

        examples = [r["text"] for r in load_split(prepared_dir / "validation.jsonl")[:3]]
        return tracking.log_classifier_model(
            checkpoint_dir, label_map=load_label_map(prepared_dir), max_length=self.cfg.teacher.max_length,
            input_example_texts=examples, text_pair=self.cfg.data.columns.text_pair is not None, artifact_path=name,
        )


class GenerationTask(Task):
    relevance_task = "causal_lm"
    is_generation = True

    @property
    def selection_metric(self) -> str:
        return "neg_loss"  # validation NLL on response tokens: cheap; ROUGE-L needs generation

    def model_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def formatter(self, tokenizer):
        from flexkd.data.generation import PromptFormatter

        g = self.cfg.generation
        return PromptFormatter(tokenizer, self.cfg.data.format, use_chat_template=g.use_chat_template,
                               summary_instruction=g.summary_instruction)

    # -- data -----------------------------------------------------------------------------------------
    def _columns(self, data=None):
        from flexkd.data.generation import GenerationColumns

        c = (data or self.cfg.data).columns
        return GenerationColumns(prompt=c.prompt, response=c.response, input=c.input)

    def load_raw(self):
        from flexkd.data.generation import load_generation_hub, load_generation_table
        from flexkd.data.raw_splits import hold_out_test, local_problem, neither_source_error, resolve_source, source_files
        from flexkd.errors import DataError

        data = resolve_source(self.cfg.data)
        columns = self._columns(data)
        if data.source == "hub":
            names = {"train": data.hub_train_split, **({} if data.test_size else {"test": data.hub_test_split})}
            try:
                splits = {
                    split: load_generation_hub(data.hub_id, columns=columns, task=data.format, split=name,
                                               config=data.hub_config, revision=data.hub_revision)
                    for split, name in names.items()
                }
            except DataError as err:
                if self.cfg.data.source == "auto":
                    raise neither_source_error(data, local_problem(data) if data.train_file else None, str(err)) from err
                raise
            return hold_out_test(splits, data, self.cfg.project.seed, ["prompt", "input"])
        splits = {
            split: load_generation_table(path, columns=columns, task=data.format, fmt=data.file_format,
                                         header=data.header)
            for split, path in source_files(data).items()
        }
        return hold_out_test(splits, data, self.cfg.project.seed, ["prompt", "input"])

    def validate(self, splits):
        from flexkd.data.generation import GenerationValidationSettings, validate_generation
        from flexkd.models import load_tokenizer

        v = self.cfg.validation
        settings = GenerationValidationSettings(
            min_chars=v.min_chars, max_chars=v.max_chars, max_prompt_tokens=v.max_prompt_tokens,
            max_response_tokens=None, max_duplicate_rate=v.max_duplicate_rate, check_overlap=v.check_overlap,
            sample_rows=v.sample_rows, max_invalid_rate=v.max_invalid_rate,
        )
        tokenizer = load_tokenizer(self.cfg.teacher.model, trust_remote_code=self.cfg.teacher.trust_remote_code)
        return validate_generation(splits, settings, tokenizer=tokenizer, formatter=self.formatter(tokenizer))

    def prepare(self, splits, out_dir: Path) -> dict:
        from flexkd.data.generation import prepare_generation

        data = self.cfg.data
        splits, dropped = self._drop_invalid(splits, ["prompt", "response"])
        for name, frame in splits.items():  # an empty reference makes a row invalid too
            empty_ref = frame["references"].map(lambda refs: not refs or any(not str(r).strip() for r in refs))
            dropped[name] += [int(r) for r in frame.loc[empty_ref, "source_row"]]
            splits[name] = frame[~empty_ref].reset_index(drop=True)
        manifest = prepare_generation(
            splits["train"], splits["test"], out_dir, task=data.format, validation_size=data.validation_size,
            max_train=data.max_train, max_test=data.max_test, seed=self.cfg.project.seed,
        )
        return _record_dropped(out_dir, manifest, dropped)

    # -- models ---------------------------------------------------------------------------------------
    def load_model(self, spec: str, prepared_dir: Path | None = None):
        from flexkd.models import load_causal_lm

        return load_causal_lm(spec, trust_remote_code=self.cfg.teacher.trust_remote_code)

    # -- batches --------------------------------------------------------------------------------------
    def _records(self, prepared_dir: Path, split: str, limit: int | None):
        from flexkd.data.prepare import load_split

        records = load_split(Path(prepared_dir) / f"{split}.jsonl")
        return records[:limit] if limit is not None else records

    def features(self, prepared_dir: Path, split: str, tokenizer, limit: int | None = None) -> list[dict]:
        from flexkd.data.generation import tokenize_generation

        g = self.cfg.generation
        features = tokenize_generation(self._records(prepared_dir, split, limit), tokenizer, self.formatter(tokenizer),
                                       max_prompt_tokens=g.max_prompt_tokens, max_response_tokens=g.max_response_tokens)
        for f in features:
            f.pop("prompt_len", None)
        return features

    def collate(self, tokenizer) -> Callable:
        from flexkd.data.generation import CausalCollator

        return CausalCollator(tokenizer=tokenizer)

    def feature_mask(self, batch: dict) -> torch.Tensor:
        from flexkd.losses import response_mask

        return response_mask(batch["labels"])

    # -- scores ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def validation_scores(self, model, features, collate) -> dict[str, float]:
        """Mean response NLL per token over the split (and its negation, the selection score)."""
        from flexkd.losses import response_nll

        was_training = model.training
        model.eval()
        total, tokens = 0.0, 0
        batch_size = max(1, self.cfg.generation.batch_size)
        runtime = self.runtime
        for ids in length_sorted_batches(features, batch_size):
            batch = runtime.to_device(collate([features[i] for i in ids]))
            labels = batch.pop("labels")
            n = int((labels[:, 1:] != -100).sum())
            if n:
                with runtime.autocast():
                    logits = model(**batch).logits
                total += float(response_nll(logits.float(), labels)) * n
                tokens += n
        model.train(was_training)
        loss = total / max(tokens, 1)
        return {"loss": loss, "neg_loss": -loss}

    def score_teacher(self, model, features, collate, prepared_dir: Path, *, check: bool,
                      base_scores: dict | None = None) -> tuple[dict[str, float], dict | None]:
        """The tuned teacher's validation scores and, with ``check``, its quality: its validation NLL against
        the model it started from (``base_scores``)."""
        from flexkd.evaluate import generator_quality

        scores = self.validation_scores(model, features, collate)
        if not check:
            return scores, None
        return scores, generator_quality(base_scores["loss"] if base_scores else None, scores["loss"])

    def test_scores(self, model, tokenizer, prepared_dir: Path) -> tuple[dict[str, float], list[str]]:
        from flexkd.generate import evaluate_generation

        g = self.cfg.generation
        records = self._records(prepared_dir, "test", g.eval_max_examples)
        formatter = self.formatter(tokenizer)
        result = evaluate_generation(
            model, tokenizer, records, formatter.prompt, max_new_tokens=g.max_new_tokens, batch_size=g.batch_size,
            seeds=g.seeds, do_sample=g.seeds is not None, max_prompt_tokens=g.max_prompt_tokens,
            temperature=g.temperature, top_p=g.top_p, runtime=self.runtime,
        )
        scores = {k: float(v) for k, v in result.items() if k in ("rougeL", "rougeL_std")}
        if g.seeds is not None:  # also report greedy, the number papers quote
            greedy = evaluate_generation(model, tokenizer, records, formatter.prompt, max_new_tokens=g.max_new_tokens,
                                         batch_size=g.batch_size, max_prompt_tokens=g.max_prompt_tokens,
                                         runtime=self.runtime)
            scores["rougeL_greedy"] = float(greedy["rougeL"])
        # teacher-forced on the same rows: the reference response's NLL per token, and its perplexity
        features = self.features(prepared_dir, "test", tokenizer, g.eval_max_examples)
        nll = self.validation_scores(model, features, self.collate(tokenizer))["loss"]
        scores.update(nll=nll, perplexity=math.exp(min(nll, 50.0)))
        return scores, result["predictions"]

    def log_model(self, tracking, checkpoint_dir: Path, prepared_dir: Path, name: str = "model") -> str:
        """Log the checkpoint as a pyfunc text generator called ``name`` (the student and method)."""
        from flexkd.models import load_tokenizer

        g = self.cfg.generation
        formatter = self.formatter(load_tokenizer(str(checkpoint_dir)))  # resolves use_chat_template: None
        examples = [r["prompt"] for r in self._records(prepared_dir, "validation", 2)]
        return tracking.log_generator_model(
            checkpoint_dir, max_new_tokens=g.max_new_tokens, max_prompt_tokens=g.max_prompt_tokens,
            use_chat_template=formatter.use_chat_template, summary_instruction=g.summary_instruction,
            task=self.cfg.data.format, input_example_prompts=examples, artifact_path=name,
        )


def length_sorted_batches(features, batch_size: int) -> list[list[int]]:
    """Evaluation batches of rows of similar length (less padding); the scores do not depend on the order."""
    from flexkd.runtime import row_lengths

    lengths = row_lengths(features)
    order = sorted(range(len(features)), key=lambda i: -lengths[i]) if lengths else list(range(len(features)))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def task_for(cfg: FlexKDConfig) -> Task:
    return GenerationTask(cfg) if cfg.data.is_generation else ClassificationTask(cfg)
