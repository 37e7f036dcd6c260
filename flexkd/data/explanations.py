"""Plain words for failed validation checks: what is wrong, for how many rows and where, and what to do.

One table (``EXPLANATIONS``) holds the words for every expectation type the suites use (the classification suite
in ``flexkd.data.validation``, the generation suite in ``flexkd.data.generation.validation``); ``describe_failure``
fills them from the facts of one failure. The GX expectation name comes last, for whoever reads the suite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

_COLUMNS_LISTED = 20  # column names listed when a required column is missing


def check_target(column: str | None) -> str:
    """What a check looked at, in words: ``column 'text'``, or ``the table``."""
    return f"column {column!r}" if column else "the table"


@dataclass(frozen=True)
class Explanation:
    """What a failed expectation means for the data, and what the user can do about it.

    Both are ``str.format`` templates over the facts of one failure (``_facts``): ``{rows}`` ("11 test rows
    (0.55%)"), ``{where}`` (file and lines), ``{column}``, the expectation's bounds, and the suggested setting
    that would tolerate it (``{tolerate}``, ``{duplicate_rate}``). The validator's own name for the check comes after
    these words, never instead of them: "expect_column_values_to_not_be_in_set" tells a user nothing."""

    what: str
    remedy: str


_DROPPED = "prepare then drops them and lists their lines in its manifest under dropped_invalid_rows"
_TOLERATE = "or {tolerate} to tolerate up to that share (" + _DROPPED + ")"

# Every expectation type the suites use (the classification suite in flexkd.data.validation, the generation suite in
# flexkd.data.generation.validation) -> its words. The inner key is the failure's column as the report shows it, None for
# any other column: a check whose meaning depends on the column (a null label is not a null text) gets its own
# words. tests/unit/test_validation.py builds both suites and fails when a type they use has no entry here.
EXPLANATIONS: dict[str, dict[str | None, Explanation]] = {
    "expect_table_row_count_to_be_between": {
        None: Explanation(
            what="The {split} split has no rows: {file} holds no data rows.",
            remedy="Point {file_param} at a file with data rows (a header line alone is not enough).",
        ),
    },
    "expect_column_to_exist": {
        None: Explanation(
            what="The {split} data has no '{column}' column, so none of its {total} rows can be checked "
            "({columns_found}): {file}.",
            remedy="Map the file's column to it with data.columns.{column} (its name, or its 0-based position in a "
            "file without header), or rename the column in the file.",
        ),
        "references": Explanation(
            what="The {split} data has no references (responses), so none of its {total} rows can be checked "
            "({columns_found}): {file}.",
            remedy="Map the file's response column with data.columns.response (a string, or a list of references).",
        ),
    },
    "expect_column_values_to_not_be_null": {
        None: Explanation(
            what="{rows} {have} no {column} (a missing field or null): {where}.",
            remedy="Fill in or remove those rows, " + _TOLERATE + ".",
        ),
        "label": Explanation(
            what="{rows} {have} no label (a missing field or null): {where}.",
            remedy="Give those rows their label or remove them (validation.max_invalid_rate does not cover labels: "
            "a row without a label can be neither trained on nor scored).",
        ),
    },
    "expect_column_values_to_not_match_regex": {
        None: Explanation(
            what="{rows} {have} an empty or whitespace-only {column}: {where}.",
            remedy="Fill in or remove those rows, " + _TOLERATE + ".",
        ),
        "references": Explanation(
            what="{rows} {have} an empty or whitespace-only reference (response): {where}.",
            remedy="Fill in or remove the empty references, " + _TOLERATE + ".",
        ),
    },
    "expect_column_value_lengths_to_be_between": {
        None: Explanation(
            what="{rows} {have} a {column} shorter than {min_value} or longer than {max_value} characters "
            "(found: {span}): {where}.",
            remedy="Shorten, fill in or remove those rows, or widen the bounds with validation.max_chars / "
            "validation.min_chars, " + _TOLERATE + ".",
        ),
        "input": Explanation(
            what="{rows} {have} an input longer than {max_value} characters (found: {span}): {where}.",
            remedy="Shorten or remove those inputs, or raise validation.max_chars (validation.max_invalid_rate does "
            "not cover the input column).",
        ),
    },
    "expect_column_values_to_be_in_set": {
        None: Explanation(
            what="{rows} {have} a {column} outside the allowed set ({values}; allowed: {allowed}): {where}.",
            remedy="Correct those labels or remove the rows, or list every label in data.labels (without "
            "data.labels the training file defines the labels and other splits may only use labels seen in it; "
            "validation.max_invalid_rate does not cover labels).",
        ),
    },
    "expect_column_values_to_not_be_in_set": {
        None: Explanation(
            what="{rows} also appear{s} in the training file (same {column}): {where}.",
            remedy="Remove those rows from one of the two files, " + _TOLERATE + ", or set "
            "validation.check_overlap: false to keep them (the {split} scores then include rows the model was "
            "trained on).",
        ),
    },
    "expect_column_proportion_of_unique_values_to_be_between": {
        None: Explanation(
            what="{rows} repeat{s} an earlier row's {column}, more than validation.max_duplicate_rate "
            "({max_duplicate}) allows: {where}.",
            remedy="Remove the repeated rows, or set validation.max_duplicate_rate: {duplicate_rate} to tolerate "
            "that share (prepare keeps the first of each repeated training row and drops the rest; other splits "
            "keep theirs).",
        ),
    },
    "expect_column_values_to_be_between": {
        None: Explanation(
            what="{rows} {have} a {column} outside {min_value} to {max_value} (found: {span}): {where}.",
            remedy="Correct or remove those rows, " + _TOLERATE + ".",
        ),
        "references": Explanation(
            what="{rows} {have} no reference (an empty list of responses): {where}.",
            remedy="Give those rows a response or remove them, " + _TOLERATE + ".",
        ),
        "prompt_tokens": Explanation(
            what="{rows} {have} a prompt longer than {max_value} tokens once templated (found: {span}): {where}.",
            remedy="Shorten or remove those prompts, or raise validation.max_prompt_tokens to {largest} or more "
            "(training keeps the last generation.max_prompt_tokens tokens of a prompt), or {tolerate} to let up "
            "to that share through (prepare keeps them; training truncates them).",
        ),
        "response_tokens": Explanation(
            what="{rows} {have} a response longer than {max_value} tokens with its end token (found: {span}): "
            "{where}.",
            remedy="Shorten or remove those responses, or raise max_response_tokens of GenerationValidationSettings "
            "to {largest} or more (training keeps the first generation.max_response_tokens tokens), or {tolerate} "
            "to let up to that share through (prepare keeps them; training truncates them).",
        ),
    },
}

_UNKNOWN = Explanation(  # never shown for the suites' own checks (a test holds every type to an entry)
    what="The {split} data failed a check without a plain-words description ({rows}): {where}.",
    remedy="See the check's arguments in validation_report.md; then add its words to EXPLANATIONS in "
    "flexkd/data/explanations.py.",
)
_RAISED = Explanation(
    what="The {split} data could not be checked for this: the validator stopped with \"{error}\" ({file}).",
    remedy="Usually a column is missing or holds values of an unexpected type; check the column mapping "
    "(data.columns) and the failures listed before this one.",
)
_LINES_SHOWN = 10  # line numbers spelled out in a message; the rest are counted


def _suggest(share: float) -> float:
    """A setting just above ``share`` (next 0.001 up): the GX ``mostly`` comparison is not fooled by rounding."""
    return min(1.0, math.floor(share * 1000 + 1) / 1000)


def _number(value):
    """GX stores bounds as floats: 100.0 tokens reads as 100."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _listed(values, limit: int = 10) -> str:
    shown = [repr(v) if isinstance(v, str) else str(v) for v in list(values)[:limit]]
    return ", ".join(shown) + (", ..." if len(values) > limit else "")


def _facts(failure: dict) -> dict:
    """The template fields of ``EXPLANATIONS`` for one failure (see ``Explanation``)."""
    kwargs = failure.get("kwargs") or {}
    split, file, count, share = failure["split"], failure["file"], failure.get("rows"), failure.get("share")
    lines = failure.get("lines") or []
    unit = "rows" if str(file).startswith("hf://") else "lines"
    shown = lines[:_LINES_SHOWN]
    where = file
    if shown:
        more = (count or len(lines)) - len(shown)
        unit = unit if len(shown) > 1 or more > 0 else unit[:-1]
        where = f"{file} {unit} {', '.join(str(r) for r in shown)}" + (f" and {more} more" if more > 0 else "")
    if count is None:
        rows = f"all {failure.get('rows_total')} {split} rows"
    else:
        rows = f"{count} {split} row{'' if count == 1 else 's'}" + ("" if share is None else f" ({share * 100:.2f}%)")
    invalid = _suggest(share or 0.0)
    tolerate = f"set validation.max_invalid_rate: {invalid:g}"
    if invalid >= 0.5:
        tolerate += " (not accepted: it must stay below 0.5, so this many rows must be fixed in the data)"
    low, high = (_number(v) for v in failure.get("unexpected_range") or [None, None])
    min_value, max_value = _number(kwargs.get("min_value")), _number(kwargs.get("max_value"))
    value_set = kwargs.get("value_set")
    return {
        "split": split,
        "file": file,
        "file_param": "data.train_file" if split == "train" else f"data.{split}_file (or data.test_size)",
        "column": (failure.get("column") or "table").replace("+", " and "),
        "rows": rows,
        "have": "has" if count == 1 else "have",  # verbs after {rows} agree with it
        "s": "s" if count == 1 else "",
        "total": failure.get("rows_total"),
        "where": where,
        "min_value": "no minimum" if min_value is None else min_value,
        "max_value": "no maximum" if max_value is None else max_value,
        "span": "?" if low is None else (str(low) if low == high else f"{low} to {high}"),
        "largest": high,
        "values": _listed(failure.get("unexpected_values") or []),
        "allowed": _listed(value_set) if isinstance(value_set, list) else value_set,
        "columns_found": f"columns found: {_listed(failure.get('columns_found') or [], limit=_COLUMNS_LISTED)}",
        "tolerate": tolerate,
        "max_duplicate": None if min_value is None else round(1.0 - min_value, 6),
        "duplicate_rate": f"{_suggest(share or 0.0):g}",
        "error": failure.get("error"),
    }


def explanation_for(expectation: str, column: str | None) -> Explanation | None:
    """The words of ``EXPLANATIONS`` for a check on a (report) column; None when the type has no entry."""
    entry = EXPLANATIONS.get(expectation)
    if entry is None:
        return None
    return entry.get(column, entry[None])


def describe_failure(failure: dict) -> dict:
    """Add ``message`` (what is wrong, how many rows, where), ``remedy`` (what to do, naming the setting) and
    ``check`` (the validator's expectation and column) to a failure from ``flexkd.data.validation.failure_record``; returns it.

    Called again after a suite renames the failure's column (generation), so the words follow the report."""
    words = _RAISED if failure.get("error") else explanation_for(failure["expectation"], failure["column"]) or _UNKNOWN
    facts = _facts(failure)
    failure["message"] = words.what.format(**facts)
    failure["remedy"] = words.remedy.format(**facts)
    failure["check"] = f"{failure['expectation']} on {check_target(failure['column'])}"
    return failure
