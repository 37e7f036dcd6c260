"""Generation data (instruction following, summarization): read, template, tokenise, prepare, validate.

Every loader returns a DataFrame with columns ``prompt`` (instruction, or the document for summarization),
``input`` (extra input, ``""`` when none), ``response`` (the training target: the first reference),
``references`` (list of all reference outputs, for scoring), ``source_file`` and ``source_row`` (the line to open
in an editor, or the 1-based record number of a JSON list, as in ``flexkd.data.sources``).

Token conventions (see ``tokenize_generation``):
- the prompt is the *templated* text (chat template when the tokenizer has one, else an Alpaca-style template);
  it is tokenised with ``add_special_tokens=False`` (chat templates carry their own BOS). With the plain template
  the tokenizer's BOS is prepended only when the tokenizer itself puts BOS first when adding special tokens
  (LLaMA-style); GPT-2-style and BERT-style tokenizers get nothing in front.
- the response ends with the end token: ``eos_token_id``, else ``sep_token_id`` (BERT-style), else an error.
- prompts are truncated from the left (the end holds the question and the generation prompt); a leading BOS is
  kept. Responses are truncated from the right; ``max_response_tokens`` counts the end token, and a response that
  had to be cut gets no end token (the model is not taught to stop mid-sentence).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pandas as pd
import torch

from flexkd.data import prepare as _prepare
from flexkd.data import sources as _sources
from flexkd.data import validation as _validation
from flexkd.data.explanations import describe_failure
from flexkd.data.sources import ColumnMap
from flexkd.data.validation import ValidationReport
from flexkd.errors import ConfigError, DataError
from flexkd.provenance import sha256_file

TASKS = ("instruction", "summarization")
COLUMNS = ("prompt", "input", "response", "references", "source_file", "source_row")
DEFAULT_SUMMARY_INSTRUCTION = "Summarize the following text in one or two sentences.\n\n{document}"
ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)
ALPACA_HEADER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
_KEY = "_prompt_and_input"  # synthetic validation column: duplicates / overlap are judged on prompt and input
_KEY_SEP = "\x1f"
_SHORTEST_REF = "_shortest_reference"  # synthetic validation column: the shortest reference of a row


@dataclass(frozen=True)
class GenerationColumns:
    """Which raw field holds what (params ``data.columns``). Names for json/jsonl/hub; names or 0-based positions
    for csv/tsv."""

    prompt: str | int  # instruction (instruction task) or document (summarization; a list of sentences is joined)
    response: str | int  # output / summary: a string, or a list of reference strings
    input: str | int | None = None  # optional extra input (Alpaca "input")


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise ConfigError(f"task must be one of {TASKS}, got {task!r}")
    return task


# --------------------------------------------------------------------------------------------- loading
def _text_field(where: str, key, value, role: str, task: str) -> str | None:
    """Prompt/input value: a string (or None, left for validation); a summarization document may be a list of
    sentences, joined with a space."""
    if value is None or isinstance(value, str):
        return value
    if role == "prompt" and task == "summarization" and isinstance(value, (list, tuple)):
        bad = [i for i, part in enumerate(value) if not isinstance(part, str)]
        if bad:
            raise DataError(
                f"{where}: field {key!r} (for prompt) is a list whose item {bad[0]} is a "
                f"{type(value[bad[0]]).__name__}, expected a list of sentence strings"
            )
        return " ".join(value)
    expected = "a string or a list of sentence strings" if role == "prompt" and task == "summarization" else "a string"
    raise DataError(f"{where}: field {key!r} (for {role}) is a {type(value).__name__}, expected {expected}")


def _references(where: str, key, value) -> list[str]:
    """Response value → list of references: a string becomes ``[string]``; None becomes ``[]`` (left for
    validation to report)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) or (hasattr(value, "tolist") and not isinstance(value, (str, bytes))):
        value = list(value.tolist() if hasattr(value, "tolist") else value)
        bad = [i for i, part in enumerate(value) if not isinstance(part, str)]
        if bad:
            raise DataError(
                f"{where}: field {key!r} (for response) is a list whose item {bad[0]} is a "
                f"{type(value[bad[0]]).__name__}, expected a list of reference strings"
            )
        return value
    raise DataError(
        f"{where}: field {key!r} (for response) is a {type(value).__name__}, expected a string or a list of strings"
    )


def _generation_frame(rows: list[dict], source_file: str | list[str], source_rows: list[int]) -> pd.DataFrame:
    references = [row["references"] for row in rows]
    frame = pd.DataFrame(
        {
            "prompt": pd.Series([row["prompt"] for row in rows], dtype=object),
            "input": pd.Series([row["input"] for row in rows], dtype=object),
            "response": pd.Series([refs[0] if refs else None for refs in references], dtype=object),
            "references": pd.Series(references, dtype=object),
        }
    )
    frame["source_file"] = source_file
    frame["source_row"] = pd.Series(source_rows, dtype="int64")
    return frame


def _normalise_row(where: str, columns: GenerationColumns, task: str, prompt, input_value, response) -> dict:
    input_text = _text_field(where, columns.input, input_value, "input", task) if columns.input is not None else ""
    return {
        "prompt": _text_field(where, columns.prompt, prompt, "prompt", task),
        "input": "" if input_text is None else input_text,
        "references": _references(where, columns.response, response),
    }


def _renamed(err: DataError, roles: dict[str, str]) -> DataError:
    """A DataError from the classification readers, with their role names replaced by ours."""
    message = str(err)
    for old, new in roles.items():
        message = message.replace(f"(for {old})", f"(for {new})")
    return DataError(message)


def _load_json_generation(path: Path, text: str, columns: GenerationColumns, task: str, fmt: str) -> pd.DataFrame:
    entries = _sources.json_records(path, text, fmt)
    if not entries:
        raise DataError(f"{path}: no records")
    where_word = "line" if fmt == "jsonl" else "record"
    first_keys = list(entries[0][1]) if isinstance(entries[0][1], dict) else []
    roles = [("prompt", columns.prompt), ("response", columns.response)]
    if columns.input is not None:
        roles.append(("input", columns.input))
    for role, key in roles:
        if not isinstance(key, str):
            raise DataError(f"{path}: column {key!r} (for {role}) must be a field name in {fmt} files")
        if not any(isinstance(rec, dict) and key in rec for _, rec in entries):
            raise DataError(f"{path}: column {key!r} (for {role}) not found; fields found: {first_keys!r}")
    rows, numbers = [], []
    for number, record in entries:
        where = f"{path}: {where_word} {number}"
        if not isinstance(record, dict):
            raise DataError(f"{where} is a {type(record).__name__}, expected a JSON object")
        for role, key in roles:
            if key not in record:
                raise DataError(f"{where} has no field {key!r} (for {role}; fields: {list(record)!r})")
        input_value = record[columns.input] if columns.input is not None else None
        rows.append(_normalise_row(where, columns, task, record[columns.prompt], input_value, record[columns.response]))
        numbers.append(number)
    return _generation_frame(rows, str(path), numbers)


def _load_delimited_generation(
    path: Path, text: str, columns: GenerationColumns, task: str, fmt: str, header: bool
) -> pd.DataFrame:
    # The classification reader does the parsing and line bookkeeping. Its ``label`` role turns all-integer
    # columns into ints, so it gets the prompt (never all integers in practice) and ``text`` gets the response.
    column_map = ColumnMap(text=columns.response, label=columns.prompt, text_pair=columns.input)
    try:
        raw = _sources.load_delimited(path, text, column_map, fmt, header)
    except DataError as err:
        raise _renamed(err, {"text": "response", "label": "prompt", "text_pair": "input"}) from None
    rows = []
    for prompt, response, pair, line in zip(
        raw["label"], raw["text"], raw["text_pair"] if "text_pair" in raw else [None] * len(raw), raw["source_row"]
    ):
        prompt = prompt.item() if hasattr(prompt, "item") else prompt
        rows.append(
            _normalise_row(
                f"{path}: line {line}", columns, task, None if prompt is None else str(prompt), pair, response
            )
        )
    return _generation_frame(rows, str(path), [int(v) for v in raw["source_row"]])


def load_generation_table(
    path: str | os.PathLike,
    *,
    columns: GenerationColumns,
    task: Literal["instruction", "summarization"],
    fmt: str | None = None,
    header: bool = True,
) -> pd.DataFrame:
    """Read a local json/jsonl/csv/tsv file into ``prompt, input, response, references, source_file, source_row``.

    The response field may be a string (one reference) or a list of references (SciTLDR); ``response`` is the
    first. For summarization the prompt field is the document; a list of sentences is joined with a space.
    Null prompts/responses and empty reference lists are kept (``validate_generation`` reports them with their
    row); wrong types raise DataError naming the file, line/record and field.
    """
    task = _check_task(task)
    path = Path(path)
    fmt = _sources.infer_format(path, fmt)
    text = _sources.read_text(path)
    if fmt in ("tsv", "csv"):
        return _load_delimited_generation(path, text, columns, task, fmt, header)
    return _load_json_generation(path, text, columns, task, fmt)


def load_generation_hub(
    dataset_id: str,
    *,
    columns: GenerationColumns,
    task: Literal["instruction", "summarization"],
    split: str,
    config: str | None = None,
    revision: str | None = None,
) -> pd.DataFrame:
    """One split of a Hugging Face Hub dataset (network or local HF cache) in the ``load_generation_table`` shape;
    ``source_file`` is ``hf://<dataset_id>/<split>`` and ``source_row`` the 1-based row. DataError when offline."""
    task = _check_task(task)
    column_map = ColumnMap(text=columns.prompt, label=columns.response, text_pair=columns.input)
    try:
        raw = _sources.load_hub(dataset_id, columns=column_map, split=split, config=config, revision=revision)
    except DataError as err:
        raise _renamed(err, {"text": "prompt", "label": "response", "text_pair": "input"}) from err.__cause__
    source = f"hf://{dataset_id}/{split}"
    pairs = raw["text_pair"] if "text_pair" in raw else [None] * len(raw)
    rows = [
        _normalise_row(f"{source}: row {row}", columns, task, prompt, pair, response)
        for prompt, response, pair, row in zip(raw["text"], raw["label"], pairs, raw["source_row"])
    ]
    return _generation_frame(rows, source, [int(v) for v in raw["source_row"]])


# --------------------------------------------------------------------------------------------- prompts
class PromptFormatter:
    """Turns a record (``{"prompt", "input", ...}``) into the prompt text the model sees.

    Instruction: with a chat template, one user message ``instruction`` (+ ``"\\n\\n" + input``) rendered with
    ``add_generation_prompt=True``; otherwise the Alpaca template (``### Instruction:`` / ``### Input:`` /
    ``### Response:``). Summarization: the same, with the instruction ``summary_instruction`` in which
    ``{document}`` is replaced by the document (appended after a blank line when the placeholder is absent).
    ``use_chat_template``: None = use it when the tokenizer has one; True = require it; False = plain template.
    """

    def __init__(
        self,
        tokenizer,
        task: Literal["instruction", "summarization"],
        *,
        use_chat_template: bool | None = None,
        summary_instruction: str = DEFAULT_SUMMARY_INSTRUCTION,
    ):
        self.tokenizer = tokenizer
        self.task = _check_task(task)
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if use_chat_template and not has_template:
            raise ConfigError(
                f"use_chat_template=True but the tokenizer ({type(tokenizer).__name__}, "
                f"{getattr(tokenizer, 'name_or_path', '?')}) has no chat template; set it to false or null"
            )
        self.use_chat_template = has_template if use_chat_template is None else bool(use_chat_template)
        self.summary_instruction = summary_instruction

    def _instruction_and_input(self, record) -> tuple[str, str]:
        prompt = record["prompt"]
        extra = record.get("input") or ""
        if prompt is None:
            raise DataError(f"record (source_row {record.get('source_row', '?')}) has no prompt")
        if self.task == "summarization":
            if "{document}" in self.summary_instruction:
                prompt = self.summary_instruction.replace("{document}", prompt)
            else:
                prompt = f"{self.summary_instruction}\n\n{prompt}"
        return prompt, extra

    def prompt(self, record: dict) -> str:
        instruction, extra = self._instruction_and_input(record)
        if self.use_chat_template:
            content = instruction + (f"\n\n{extra}" if extra else "")
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
        if extra:
            return (
                f"{ALPACA_HEADER_WITH_INPUT}### Instruction:\n{instruction}\n\n### Input:\n{extra}\n\n"
                "### Response:\n"
            )
        return f"{ALPACA_HEADER}### Instruction:\n{instruction}\n\n### Response:\n"


# --------------------------------------------------------------------------------------------- tokens
def end_token_id(tokenizer) -> int:
    """The id that ends a response: ``eos_token_id``, else ``sep_token_id`` (BERT-style tokenizers)."""
    for name in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ConfigError(
        f"tokenizer {type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '?')}) has neither an eos nor "
        "a sep token, so responses cannot be terminated; set tokenizer.eos_token"
    )


def pad_token_id(tokenizer) -> int:
    """``pad_token_id``, else the end token (causal LMs often have no pad token)."""
    value = getattr(tokenizer, "pad_token_id", None)
    return int(value) if value is not None else end_token_id(tokenizer)


def _plain_bos(tokenizer) -> list[int]:
    """``[bos]`` when the tokenizer itself starts sequences with BOS (LLaMA-style), else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [int(bos)] if ids and ids[0] == bos else []


def _prompt_ids(records: Sequence[dict], tokenizer, formatter: PromptFormatter) -> list[list[int]]:
    texts = [formatter.prompt(record) for record in records]
    if not texts:
        return []
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    prefix = [] if formatter.use_chat_template else _plain_bos(tokenizer)
    return [prefix + list(ids) for ids in encoded]


def _response_ids(records: Sequence[dict], tokenizer) -> list[list[int]]:
    texts = []
    for record in records:
        if record.get("response") is None:
            raise DataError(f"record (source_row {record.get('source_row', '?')}) has no response")
        texts.append(record["response"])
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _check_budget(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _truncate_left(ids: list[int], limit: int, bos: int | None) -> list[int]:
    if len(ids) <= limit:
        return ids
    if bos is not None and ids and ids[0] == bos and limit > 1:
        return [ids[0]] + ids[len(ids) - (limit - 1):]
    return ids[len(ids) - limit:]


def tokenize_generation(
    records: Sequence[dict], tokenizer, formatter: PromptFormatter, *, max_prompt_tokens: int, max_response_tokens: int
) -> list[dict]:
    """Training features: ``input_ids = prompt_ids + response_ids + [end]``, ``attention_mask``, ``labels`` (-100 on
    the prompt, the response ids and end token elsewhere) and ``prompt_len``.

    The prompt keeps its last ``max_prompt_tokens`` tokens (a leading BOS is kept). ``max_response_tokens`` counts
    the end token; a longer response keeps its first ``max_response_tokens`` tokens and gets no end token.
    """
    _check_budget("max_prompt_tokens", max_prompt_tokens)
    _check_budget("max_response_tokens", max_response_tokens)
    end = end_token_id(tokenizer)
    bos = getattr(tokenizer, "bos_token_id", None)
    features = []
    for prompt, response in zip(_prompt_ids(records, tokenizer, formatter), _response_ids(records, tokenizer)):
        prompt = _truncate_left(prompt, max_prompt_tokens, bos)
        response = response + [end] if len(response) + 1 <= max_response_tokens else response[:max_response_tokens]
        features.append(
            {
                "input_ids": prompt + response,
                "attention_mask": [1] * (len(prompt) + len(response)),
                "labels": [-100] * len(prompt) + response,
                "prompt_len": len(prompt),
            }
        )
    return features


def tokenize_prompts(
    records: Sequence[dict], tokenizer, formatter: PromptFormatter, *, max_prompt_tokens: int
) -> list[dict]:
    """Generation features (prompt only, left-truncated like ``tokenize_generation``): input_ids, attention_mask,
    prompt_len."""
    _check_budget("max_prompt_tokens", max_prompt_tokens)
    bos = getattr(tokenizer, "bos_token_id", None)
    features = []
    for ids in _prompt_ids(records, tokenizer, formatter):
        ids = _truncate_left(ids, max_prompt_tokens, bos)
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "prompt_len": len(ids)})
    return features


def _resolve_pad(pad_token_id_: int | None, tokenizer) -> int:
    if pad_token_id_ is not None:
        return int(pad_token_id_)
    if tokenizer is not None:
        return pad_token_id(tokenizer)
    raise ConfigError("a collator needs pad_token_id or a tokenizer")


class _Collator:
    left = False

    def __init__(self, pad_token_id: int | None = None, *, tokenizer=None):
        self.pad_token_id = _resolve_pad(pad_token_id, tokenizer)

    def __call__(self, features: list[dict]) -> dict:
        if not features:
            raise ValueError("cannot collate an empty batch")
        longest = max(len(f["input_ids"]) for f in features)
        batch: dict = {}
        for key in features[0]:
            values = [f[key] for f in features]
            if isinstance(values[0], (list, tuple)):
                pad = self.pad_token_id if key == "input_ids" else (-100 if key == "labels" else 0)
                rows = []
                for value in values:
                    filler = [pad] * (longest - len(value))
                    rows.append(filler + list(value) if self.left else list(value) + filler)
                batch[key] = torch.tensor(rows, dtype=torch.long)
            elif all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
                batch[key] = torch.tensor([int(v) for v in values], dtype=torch.long)
            else:
                batch[key] = values  # strings, references: passed through as a list
        return batch


class CausalCollator(_Collator):
    """Training batches: right padding (input_ids with the pad id, attention_mask 0, labels -100); ints (e.g.
    ``prompt_len``) become a tensor. The pad id falls back to the end token when the tokenizer has no pad token."""

    left = False


class LeftPadCollator(_Collator):
    """Generation batches: left padding, so every prompt ends at the last position (``generate`` appends there)."""

    left = True


# --------------------------------------------------------------------------------------------- prepare
def _records(frame: pd.DataFrame) -> list[dict]:
    return [
        {
            "prompt": prompt,
            "input": "" if extra is None else extra,
            "response": response,
            "references": list(references),
            "source_row": int(row),
        }
        for prompt, extra, response, references, row in zip(
            frame["prompt"], frame["input"], frame["response"], frame["references"], frame["source_row"]
        )
    ]


def _write_records(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def _pick(n_rows: int, count: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.permutation(n_rows)[:count])


def _subsample(frame: pd.DataFrame, limit: int | None, rng: np.random.Generator, name: str) -> pd.DataFrame:
    if limit is None or limit >= len(frame):
        return frame
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"{name} must be an int >= 1 or null, got {limit!r}")
    return frame.iloc[_pick(len(frame), limit, rng)].reset_index(drop=True)


def _require_columns(frame: pd.DataFrame, name: str) -> None:
    missing = [c for c in ("prompt", "input", "response", "references", "source_row") if c not in frame.columns]
    if missing:
        raise DataError(f"{name} table lacks column(s) {missing} (load it with load_generation_table)")


def prepare_generation(
    train: pd.DataFrame,
    test: pd.DataFrame,
    out_dir: str | os.PathLike,
    *,
    task: Literal["instruction", "summarization"],
    validation_size: int | float,
    max_train: int | None,
    max_test: int | None,
    seed: int,
) -> dict:
    """Drop duplicate (prompt, input) train rows, hold out a seeded validation split, subsample, and write
    ``train/validation/test.jsonl`` (records ``prompt, input, response, references, source_row``) and
    ``manifest.json`` into ``out_dir``. Rows keep their raw-file order. Same inputs and seed → byte-identical files.
    Returns the manifest. Read splits back with ``flexkd.data.load_split``."""
    task = _check_task(task)
    _require_columns(train, "train")
    _require_columns(test, "test")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    deduped = train.drop_duplicates(subset=["prompt", "input"], keep="first").reset_index(drop=True)
    dropped = len(train) - len(deduped)
    n_val = _prepare.validation_count(validation_size, len(deduped))
    is_val = np.zeros(len(deduped), dtype=bool)
    is_val[_pick(len(deduped), n_val, rng)] = True
    splits = {
        "train": deduped[~is_val].reset_index(drop=True),
        "validation": deduped[is_val].reset_index(drop=True),
        "test": test.reset_index(drop=True),
    }
    splits["train"] = _subsample(splits["train"], max_train, rng, "max_train")
    splits["test"] = _subsample(splits["test"], max_test, rng, "max_test")

    manifest = {
        "format": "generation",
        "task": task,
        "rows": {},
        "sha256": {},
        "references_per_row": {},
        "seed": seed,
        "validation_size": validation_size,
        "max_train": max_train,
        "max_test": max_test,
        "dropped_duplicate_train_rows": dropped,
        "sources": {"train": _prepare.manifest_sources([train]), "test": _prepare.manifest_sources([test])},
    }
    for split in _prepare.SPLITS:
        records = _records(splits[split])
        path = _prepare.split_path(out_dir, split)
        _write_records(path, records)
        counts = [len(r["references"]) for r in records]
        manifest["rows"][split] = len(records)
        manifest["sha256"][split] = sha256_file(path)
        manifest["references_per_row"][split] = {"min": min(counts), "max": max(counts)} if counts else None
    manifest["fingerprint"] = _prepare.split_fingerprint(out_dir)
    _prepare.write_json(out_dir / _prepare.MANIFEST_FILE, manifest)
    return manifest


# --------------------------------------------------------------------------------------------- validation
@dataclass
class GenerationValidationSettings:
    """Thresholds of the generation suite (params ``data.validation.*``). Token bounds apply after templating
    (prompt) and count the end token (response), exactly as ``tokenize_generation`` budgets them."""

    min_chars: int = 1
    max_chars: int = 20000
    max_prompt_tokens: int | None = None
    max_response_tokens: int | None = None
    max_duplicate_rate: float = 0.05
    max_invalid_rate: float = 0.0  # share of rows a row-level expectation may fail (GX ``mostly``); prepare drops them
    check_overlap: bool = True
    sample_rows: int = 5


def _shortest_reference(references) -> str | None:
    if not isinstance(references, (list, tuple)) or not references:
        return None
    return min(references, key=lambda r: len(r.strip()) if isinstance(r, str) else -1)


def _token_counts(frame: pd.DataFrame, tokenizer, formatter: PromptFormatter) -> tuple[list, list]:
    """Templated prompt length (as ``tokenize_generation`` builds it, before truncation) and response length
    including the end token; None where the prompt / response is missing."""
    prompts = [
        (i, {"prompt": p, "input": x if isinstance(x, str) else ""})
        for i, (p, x) in enumerate(zip(frame["prompt"], frame["input"]))
        if isinstance(p, str)
    ]
    responses = [(i, r) for i, r in enumerate(frame["response"]) if isinstance(r, str)]
    prompt_tokens: list = [None] * len(frame)
    response_tokens: list = [None] * len(frame)
    for (i, _), ids in zip(prompts, _prompt_ids([r for _, r in prompts], tokenizer, formatter)):
        prompt_tokens[i] = len(ids)
    if responses:
        encoded = tokenizer([r for _, r in responses], add_special_tokens=False)["input_ids"]
        for (i, _), ids in zip(responses, encoded):
            response_tokens[i] = len(ids) + 1
    return prompt_tokens, response_tokens


def _generation_validation_frame(frame: pd.DataFrame, tokenizer, formatter) -> pd.DataFrame:
    out = pd.DataFrame(index=range(len(frame)))
    for column in ("prompt", "input", "response"):
        if column in frame.columns:
            out[column] = pd.Series([None if _validation.is_missing(v) else v for v in frame[column]], dtype=object)
    if "references" in frame.columns:
        out["reference_count"] = pd.Series(
            [len(r) if isinstance(r, (list, tuple)) else 0 for r in frame["references"]], dtype="int64"
        )
        out[_SHORTEST_REF] = pd.Series([_shortest_reference(r) for r in frame["references"]], dtype=object)
    if "source_row" in frame.columns:
        out["source_row"] = pd.Series(list(frame["source_row"]), dtype="int64")
    else:
        out["source_row"] = pd.Series(range(1, len(frame) + 1), dtype="int64")
    if "prompt" in out.columns:
        inputs = out["input"] if "input" in out.columns else [""] * len(out)
        out[_KEY] = [
            None if p is None else f"{p}{_KEY_SEP}{'' if i is None else i}" for p, i in zip(out["prompt"], inputs)
        ]
    if tokenizer is not None and formatter is not None and "prompt" in out.columns and "response" in out.columns:
        prompt_tokens, response_tokens = _token_counts(out.assign(input=out.get("input", "")), tokenizer, formatter)
        out["prompt_tokens"] = pd.Series(prompt_tokens, dtype="Int64")
        out["response_tokens"] = pd.Series(response_tokens, dtype="Int64")
    return out


def _build_generation_suite(gx, name: str, frame: pd.DataFrame, settings: GenerationValidationSettings, train_keys):
    suite = gx.ExpectationSuite(name=name)
    E = gx.expectations
    suite.add_expectation(E.ExpectTableRowCountToBeBetween(min_value=1))
    for column in ("prompt", "input", "response", "references"):
        suite.add_expectation(E.ExpectColumnToExist(column=column if column != "references" else "reference_count"))
    mostly = 1.0 - settings.max_invalid_rate
    for column in ("prompt", "response"):
        if column in frame.columns:
            suite.add_expectation(E.ExpectColumnValuesToNotBeNull(column=column, mostly=mostly))
            suite.add_expectation(E.ExpectColumnValuesToNotMatchRegex(column=column, regex=r"^\s*$", mostly=mostly))
            suite.add_expectation(
                E.ExpectColumnValueLengthsToBeBetween(
                    column=column, min_value=settings.min_chars, max_value=settings.max_chars, mostly=mostly
                )
            )
    if "input" in frame.columns:
        suite.add_expectation(
            E.ExpectColumnValueLengthsToBeBetween(column="input", min_value=0, max_value=settings.max_chars)
        )
    if "reference_count" in frame.columns:
        suite.add_expectation(E.ExpectColumnValuesToBeBetween(column="reference_count", min_value=1, mostly=mostly))
        suite.add_expectation(E.ExpectColumnValuesToNotMatchRegex(column=_SHORTEST_REF, regex=r"^\s*$", mostly=mostly))
    bounds = {"prompt_tokens": settings.max_prompt_tokens, "response_tokens": settings.max_response_tokens}
    for column, bound in bounds.items():
        if column in frame.columns:
            suite.add_expectation(
                E.ExpectColumnValuesToBeBetween(column=column, min_value=1, max_value=bound, mostly=mostly)
            )
    if _KEY in frame.columns:
        suite.add_expectation(
            E.ExpectColumnProportionOfUniqueValuesToBeBetween(column=_KEY, min_value=1.0 - settings.max_duplicate_rate)
        )
        if train_keys is not None:
            suite.add_expectation(E.ExpectColumnValuesToNotBeInSet(column=_KEY, value_set=train_keys, mostly=mostly))
    return suite


def _display(column: str | None) -> str | None:
    if column == _KEY:
        return "prompt+input"
    if column == _SHORTEST_REF:
        return "references"
    if column == "reference_count":
        return "references"
    return column


def _display_sample_value(column: str | None, value):
    if column == _KEY and isinstance(value, str):
        prompt, _, extra = value.partition(_KEY_SEP)
        return {"prompt": prompt, "input": extra}
    return value


def _finish_failure(failure: dict, column: str | None) -> dict:
    """A failure from the classification builder, with the generation suite's column names and sample values, and
    worded by ``describe_failure`` under those names (its words for ``references`` and the token counts)."""
    failure["column"] = _display(column)
    for sample in failure["samples"]:
        sample["value"] = _display_sample_value(column, sample["value"])
    failure["unexpected_values"] = [_display_sample_value(column, v) for v in failure["unexpected_values"]]
    if column == _SHORTEST_REF and not failure.get("details"):
        failure["details"] = "a reference is empty or whitespace-only (value: the row's shortest reference)"
    elif column == "reference_count" and not failure.get("details"):
        failure["details"] = "rows without any reference"
    elif column in ("prompt_tokens", "response_tokens") and not failure.get("details"):
        what = "templated prompt" if column == "prompt_tokens" else "response + end token"
        failure["details"] = f"token length of the {what} outside the bounds (it would be truncated)"
    return describe_failure(failure)


def validate_generation(
    splits: dict[str, pd.DataFrame],
    settings: GenerationValidationSettings | None = None,
    *,
    tokenizer=None,
    formatter: PromptFormatter | None = None,
) -> ValidationReport:
    """Run one GX suite per split (tables from ``load_generation_table``): required columns; prompt and response
    non-null, non-blank, within the char bounds; at least one reference and none blank; with ``tokenizer`` and
    ``formatter``: templated prompt / response token counts within the bounds; duplicate rate of (prompt, input);
    no (prompt, input) of a non-train split in train. Returns the classification ``ValidationReport``."""
    import great_expectations as gx

    settings = settings or GenerationValidationSettings()
    if (tokenizer is None) != (formatter is None):
        raise ConfigError(
            "validate_generation needs both tokenizer and formatter for the token-length checks, or neither"
        )
    context = _validation.quiet_context()
    batch = (
        context.data_sources.add_pandas("flexkd_raw")
        .add_dataframe_asset("generation")
        .add_batch_definition_whole_dataframe("whole")
    )
    frames = {split: _generation_validation_frame(frame, tokenizer, formatter) for split, frame in splits.items()}
    train = frames.get("train")
    report = ValidationReport(success=True)
    for split, frame in frames.items():
        train_keys = None
        if settings.check_overlap and split != "train" and train is not None and _KEY in train.columns:
            train_keys = sorted({v for v in train[_KEY] if isinstance(v, str)})
        suite = _build_generation_suite(gx, f"generation_{split}", frame, settings, train_keys)
        outcome = _validation.run_suite(gx, context, batch, suite, split, frame, settings.sample_rows)
        file = _validation.file_of(splits[split])
        for result in outcome.results:
            config = result.expectation_config
            column = config.kwargs.get("column")
            res = result.result or {}
            report.results.append(
                {
                    "split": split,
                    "expectation": config.type,
                    "column": _display(column),
                    "success": bool(result.success),
                    "unexpected_count": res.get("unexpected_count"),
                }
            )
            if not result.success:
                failure = _validation.failure_record(split, file, frame, splits[split], result, settings)
                report.failures.append(_finish_failure(failure, column))
        _validation.record_outcome(report, split, file, frame, outcome)
    return report
