"""Raw data sources, validation suites and the prepared classification dataset."""

from flexkd.data.prepare import load_label_map, load_split, prepare_classification, split_fingerprint
from flexkd.data.sources import ColumnMap, build_label_map, load_hub, load_table, resolve_data_dir
from flexkd.data.validation import ValidationReport, ValidationSettings, raise_for_failures, validate_classification

__all__ = [
    "ColumnMap",
    "ValidationReport",
    "ValidationSettings",
    "build_label_map",
    "load_hub",
    "load_label_map",
    "load_split",
    "load_table",
    "prepare_classification",
    "raise_for_failures",
    "resolve_data_dir",
    "split_fingerprint",
    "validate_classification",
]
