"""Great Expectations suites for raw classification data, and a report a user can act on.

Each split (``train``, ``test``, ...) as returned by ``load_table`` is checked by one GX expectation suite.
Every failure names the split, the raw file, the column and the ``source_row`` of sample bad rows, i.e. the
line to open in an editor. great_expectations is imported inside functions: importing it takes seconds.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from flexkd.errors import ValidationFailed

REPORT_JSON = "validation_report.json"
REPORT_MD = "validation_report.md"
_PAIR_KEY = "_text_and_pair"  # synthetic column: duplicates / overlap of sentence pairs are judged on both texts
_PAIR_SEP = "\x1f"
_BIG = 20  # kwargs lists longer than this are summarised in the report


@dataclass
class ValidationSettings:
    """Thresholds of the classification suite (params ``data.validation.*``)."""

    allowed_labels: list | None = None  # None: train may hold any label; other splits only labels seen in train
    min_chars: int = 1
    max_chars: int = 2000
    max_duplicate_rate: float = 0.05
    check_overlap: bool = True
    sample_rows: int = 5
    require_text_pair: bool = False  # sentence-pair task: every split must have ``text_pair``
    max_invalid_rate: float = 0.0  # share of rows a row-level expectation may fail (GX ``mostly``); prepare drops them


@dataclass
class ValidationReport:
    """Outcome of ``validate_classification``: overall success, failures with sample rows, per-split counts."""

    success: bool
    failures: list[dict] = field(default_factory=list)
    statistics: dict = field(default_factory=dict)
    results: list[dict] = field(default_factory=list)  # every expectation run: split, expectation, column, success

    def to_dict(self) -> dict:
        return _jsonable(
            {"success": self.success, "statistics": self.statistics, "failures": self.failures, "results": self.results}
        )

    def to_markdown(self) -> str:
        lines = [f"# Data validation: {'PASS' if self.success else 'FAIL'}", ""]
        for split, stats in self.statistics.items():
            lines.append(
                f"## {split}: {stats['successful']}/{stats['evaluated']} expectations met"
                f" ({stats['rows']} rows, {stats['file']})"
            )
            lines += ["", "| expectation | column | result | unexpected |", "|---|---|---|---|"]
            for result in self.results:
                if result["split"] != split:
                    continue
                unexpected = "" if result["unexpected_count"] is None else str(result["unexpected_count"])
                lines.append(
                    f"| {result['expectation']} | {result['column'] or ''} | "
                    f"{'pass' if result['success'] else '**FAIL**'} | {unexpected} |"
                )
            lines.append("")
        if self.failures:
            lines += ["## Failures", ""]
            for number, failure in enumerate(self.failures, start=1):
                target = f"`{failure['column']}`" if failure["column"] else "the table"
                lines.append(f"### {number}. {failure['split']}: {failure['expectation']} on {target}")
                lines.append("")
                lines.append(f"- file: `{failure['file']}`")
                if failure["kwargs"]:
                    lines.append(f"- arguments: `{json.dumps(_jsonable(failure['kwargs']), ensure_ascii=False)}`")
                if failure["unexpected_count"] is not None:
                    lines.append(f"- unexpected rows: {failure['unexpected_count']}{_percent(failure)}")
                if failure.get("observed_value") is not None:
                    lines.append(f"- observed value: {failure['observed_value']}")
                if failure.get("details"):
                    lines.append(f"- details: {failure['details']}")
                if failure["samples"]:
                    lines += ["", "| row (line in file) | value |", "|---|---|"]
                    for sample in failure["samples"]:
                        value = _short(sample["value"]).replace("|", "\\|")
                        lines.append(f"| {sample['row']} | `{value}` |")
                lines.append("")
        return "\n".join(lines).rstrip() + "\n"

    def save(self, directory: str | os.PathLike) -> tuple[Path, Path]:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        json_path, md_path = directory / REPORT_JSON, directory / REPORT_MD
        json_path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        md_path.write_text(self.to_markdown(), encoding="utf-8")
        return json_path, md_path


# --------------------------------------------------------------------------------------------- helpers
def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _short(value, width: int = 80) -> str:
    text = repr(value) if not isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 3] + "..."


def _target(column: str | None) -> str:
    return f"column {column!r}" if column else "the table"


def _percent(failure: dict) -> str:
    percent = failure.get("unexpected_percent")
    return "" if percent is None else f" ({percent:.2f}%)"


def _is_missing(value) -> bool:
    try:
        return value is None or bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _as_str_or_none(value):
    if _is_missing(value):
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    return str(value)


def _file_of(frame: pd.DataFrame) -> str:
    if "source_file" not in frame.columns or frame.empty:
        return "<in-memory>"
    return ", ".join(sorted({str(f) for f in frame["source_file"].dropna().unique()})) or "<in-memory>"


def _validation_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """What the suite sees: labels as strings (nulls kept), a 1-based ``source_row``, a pair key."""
    out = pd.DataFrame(index=range(len(frame)))
    for column in ("text", "text_pair"):
        if column in frame.columns:
            out[column] = pd.Series(list(frame[column]), dtype=object)
    if "label" in frame.columns:
        out["label"] = pd.Series([_as_str_or_none(v) for v in frame["label"]], dtype=object)
    if "source_row" in frame.columns:
        out["source_row"] = pd.Series(list(frame["source_row"]), dtype="int64")
    else:
        out["source_row"] = pd.Series(range(1, len(frame) + 1), dtype="int64")
    if "text" in out.columns and "text_pair" in out.columns:
        out[_PAIR_KEY] = [
            None if _is_missing(a) or _is_missing(b) else f"{a}{_PAIR_SEP}{b}" for a, b in zip(out["text"], out["text_pair"])
        ]
    return out


def _display_column(column: str | None) -> str | None:
    return "text+text_pair" if column == _PAIR_KEY else column


def _display_value(column: str | None, value):
    if column == _PAIR_KEY and isinstance(value, str):
        text, _, pair = value.partition(_PAIR_SEP)
        return {"text": text, "text_pair": pair}
    return None if _is_missing(value) else value


def _small_kwargs(kwargs: dict) -> dict:
    out = {}
    for key, value in kwargs.items():
        if key in ("batch_id", "column"):
            continue
        if isinstance(value, (list, tuple, set)) and len(value) > _BIG:
            value = f"<{len(value)} values>"
        out[key] = _jsonable(value)
    return out


def _quiet_context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    try:
        context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    except Exception:  # noqa: BLE001 - progress bars are cosmetic
        pass
    return context


def _build_suite(gx, name: str, frame: pd.DataFrame, settings: ValidationSettings, allowed, train_keys):
    suite = gx.ExpectationSuite(name=name)
    E = gx.expectations
    required = ["text", "label"] + (["text_pair"] if settings.require_text_pair or "text_pair" in frame else [])
    suite.add_expectation(E.ExpectTableRowCountToBeBetween(min_value=1))
    for column in required:
        suite.add_expectation(E.ExpectColumnToExist(column=column))
    text_columns = [c for c in ("text", "text_pair") if c in frame.columns]
    mostly = 1.0 - settings.max_invalid_rate
    for column in text_columns:
        suite.add_expectation(E.ExpectColumnValuesToNotBeNull(column=column, mostly=mostly))
        suite.add_expectation(E.ExpectColumnValuesToNotMatchRegex(column=column, regex=r"^\s*$", mostly=mostly))
        suite.add_expectation(
            E.ExpectColumnValueLengthsToBeBetween(column=column, min_value=settings.min_chars, max_value=settings.max_chars,
                                                  mostly=mostly)
        )
    key = _PAIR_KEY if _PAIR_KEY in frame.columns else ("text" if "text" in frame.columns else None)
    if key is not None:
        suite.add_expectation(
            E.ExpectColumnProportionOfUniqueValuesToBeBetween(column=key, min_value=1.0 - settings.max_duplicate_rate)
        )
        if train_keys is not None:
            suite.add_expectation(E.ExpectColumnValuesToNotBeInSet(column=key, value_set=train_keys, mostly=mostly))
    if "label" in frame.columns:
        suite.add_expectation(E.ExpectColumnValuesToNotBeNull(column="label"))
        if allowed is not None:
            suite.add_expectation(E.ExpectColumnValuesToBeInSet(column="label", value_set=allowed))
    return suite


def _failure(split: str, file: str, frame: pd.DataFrame, raw: pd.DataFrame, result, settings: ValidationSettings) -> dict:
    config = result.expectation_config
    column = config.kwargs.get("column")
    res = result.result or {}
    samples = []
    for entry in (res.get("unexpected_index_list") or [])[: settings.sample_rows]:
        if isinstance(entry, dict):
            samples.append({"row": int(entry["source_row"]), "value": _display_value(column, entry.get(column))})
    details = None
    if config.type == "expect_column_proportion_of_unique_values_to_be_between" and column in frame.columns:
        repeated = frame[frame[column].duplicated(keep="first") & frame[column].notna()]
        samples = [
            {"row": int(row), "value": _display_value(column, value)}
            for row, value in zip(repeated["source_row"][: settings.sample_rows], repeated[column][: settings.sample_rows])
        ]
        if len(repeated):
            details = f"{len(repeated)} row(s) repeat an earlier row's value (samples are the repeats)"
    elif config.type == "expect_column_to_exist":
        details = f"columns found: {[str(c) for c in raw.columns]}"
    exception = result.exception_info or {}
    if exception.get("raised_exception"):
        details = f"expectation raised: {exception.get('exception_message')}"
    return {
        "split": split,
        "file": file,
        "expectation": config.type,
        "column": _display_column(column),
        "kwargs": _small_kwargs(dict(config.kwargs)),
        "unexpected_count": res.get("unexpected_count"),
        "unexpected_percent": res.get("unexpected_percent"),
        "observed_value": _jsonable(res.get("observed_value")),
        "details": details,
        "samples": _jsonable(samples),
    }


def run_suite(gx, context, batch, suite, split: str, frame: pd.DataFrame, sample_rows: int):
    """Run one split's suite on its frame, with unexpected rows identified by their source line."""
    suite = context.suites.add(suite)
    definition = context.validation_definitions.add(gx.ValidationDefinition(data=batch, suite=suite, name=f"validate_{split}"))
    return definition.run(
        batch_parameters={"dataframe": frame},
        result_format={
            "result_format": "COMPLETE",
            "unexpected_index_column_names": ["source_row"],
            "partial_unexpected_count": sample_rows,
        },
    )


def record_outcome(report: "ValidationReport", split: str, file: str, frame: pd.DataFrame, outcome) -> None:
    """Add one split's counts to the report and fold its success into the overall verdict."""
    stats = outcome.statistics
    report.statistics[split] = {
        "evaluated": int(stats["evaluated_expectations"]),
        "successful": int(stats["successful_expectations"]),
        "rows": len(frame),
        "file": file,
    }
    report.success = report.success and bool(outcome.success)


# --------------------------------------------------------------------------------------------- public
def validate_classification(
    splits: dict[str, pd.DataFrame], settings: ValidationSettings | None = None
) -> ValidationReport:
    """Run one GX suite per split (as returned by ``load_table``) and collect the failures with sample rows."""
    import great_expectations as gx

    settings = settings or ValidationSettings()
    context = _quiet_context()
    batch = (
        context.data_sources.add_pandas("flexkd_raw")
        .add_dataframe_asset("classification")
        .add_batch_definition_whole_dataframe("whole")
    )
    frames = {split: _validation_frame(frame) for split, frame in splits.items()}
    train = frames.get("train")
    train_key = None
    if train is not None:
        train_key = _PAIR_KEY if _PAIR_KEY in train.columns else ("text" if "text" in train.columns else None)
    train_labels = None
    if train is not None and "label" in train.columns:
        train_labels = sorted({v for v in train["label"] if v is not None})
    allowed_declared = None if settings.allowed_labels is None else sorted({str(v) for v in settings.allowed_labels})

    report = ValidationReport(success=True)
    for split, frame in frames.items():
        allowed = allowed_declared if allowed_declared is not None else (None if split == "train" else train_labels)
        train_keys = None
        own_key = _PAIR_KEY if _PAIR_KEY in frame.columns else ("text" if "text" in frame.columns else None)
        if settings.check_overlap and split != "train" and train_key is not None and train_key == own_key:
            train_keys = sorted({v for v in train[train_key] if isinstance(v, str)})
        suite = _build_suite(gx, f"classification_{split}", frame, settings, allowed, train_keys)
        outcome = run_suite(gx, context, batch, suite, split, frame, settings.sample_rows)
        file = _file_of(splits[split])
        for result in outcome.results:
            config = result.expectation_config
            res = result.result or {}
            report.results.append(
                {
                    "split": split,
                    "expectation": config.type,
                    "column": _display_column(config.kwargs.get("column")),
                    "success": bool(result.success),
                    "unexpected_count": res.get("unexpected_count"),
                }
            )
            if not result.success:
                report.failures.append(_failure(split, file, frame, splits[split], result, settings))
        record_outcome(report, split, file, frame, outcome)
    return report


def raise_for_failures(report: ValidationReport, *, max_samples: int = 3) -> None:
    """Raise ``ValidationFailed`` listing each failed expectation (split, file, column, first sample rows)."""
    if report.success:
        return
    lines = [f"data validation failed: {len(report.failures)} expectation(s) not met"]
    for failure in report.failures:
        amount = ""
        if failure["unexpected_count"] is not None:
            amount = f": {failure['unexpected_count']} row(s){_percent(failure)}"
        elif failure.get("observed_value") is not None:
            amount = f": observed {failure['observed_value']}"
        lines.append(
            f"- [{failure['split']}] {failure['file']}: {failure['expectation']} on "
            f"{_target(failure['column'])}{amount}"
        )
        if failure.get("details"):
            lines.append(f"    {failure['details']}")
        for sample in failure["samples"][:max_samples]:
            lines.append(f"    line {sample['row']}: {_short(sample['value'])}")
    raise ValidationFailed("\n".join(lines), report=report)
