"""Great Expectations suite for raw generation data; the report and its plain words are the classification ones.

Each split as returned by ``load_generation_table`` is checked by one suite: required columns; prompt and response
non-null, non-blank and within the char bounds; at least one reference and none blank; templated prompt and
response token counts within the bounds (with a tokenizer); the duplicate rate of (prompt, input); no (prompt, input)
of another split in train. The suite runs and reports through ``flexkd.data.validation``, under this format's
column names.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from flexkd.data.explanations import describe_failure
from flexkd.data.generation.prompts import PromptFormatter
from flexkd.data.generation.tokenize import prompt_ids
from flexkd.data.validation import (
    ValidationReport,
    failure_record,
    file_of,
    is_missing,
    quiet_context,
    record_outcome,
    run_suite,
)
from flexkd.errors import ConfigError

_KEY = "_prompt_and_input"  # synthetic validation column: duplicates / overlap are judged on prompt and input
_KEY_SEP = "\x1f"
_SHORTEST_REF = "_shortest_reference"  # synthetic validation column: the shortest reference of a row


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
    for (i, _), ids in zip(prompts, prompt_ids([r for _, r in prompts], tokenizer, formatter)):
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
            out[column] = pd.Series([None if is_missing(v) else v for v in frame[column]], dtype=object)
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
    context = quiet_context()
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
        outcome = run_suite(gx, context, batch, suite, split, frame, settings.sample_rows)
        file = file_of(splits[split])
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
                failure = failure_record(split, file, frame, splits[split], result, settings)
                report.failures.append(_finish_failure(failure, column))
        record_outcome(report, split, file, frame, outcome)
    return report
