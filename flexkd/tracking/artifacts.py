"""Files and data logged to an MLflow run: artifacts, dataset inputs and sample tables.

Each function logs to the active run (see :func:`flexkd.tracking.runs.stage_run`); those with ``run_id`` also
to another run. mlflow is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from flexkd import resources
from flexkd.errors import FlexKDError
from flexkd.tracking.runs import active_run_id


@resources.phase("mlflow")
def log_artifact(path: str | Path, artifact_path: str | None = None, *, run_id: str | None = None) -> None:
    """Log a file (or a directory's files) to the active run."""
    import mlflow

    run_id = active_run_id(run_id)
    path = Path(path)
    client = mlflow.MlflowClient()
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path=artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path=artifact_path)


@resources.phase("mlflow")
def log_dataset(path_or_df, *, name: str, context: str, targets: str | None = "label"):
    """Record a dataset as an input of the active run (``context``: training / validation / test).

    Accepts a JSONL path (read with pandas; the path becomes the dataset source) or a DataFrame.
    Columns holding lists or dicts are stringified for the schema and digest.
    """
    import mlflow
    import mlflow.data
    import pandas as pd

    active_run_id()
    source = None
    if isinstance(path_or_df, pd.DataFrame):
        df = path_or_df
    else:
        path = Path(path_or_df)
        if not path.is_file():
            raise FlexKDError(f"{path}: dataset file not found")
        df = pd.read_json(path, lines=path.suffix.lower() in (".jsonl", ".ndjson"))
        source = str(path.resolve())
    nested = [c for c in df.columns if df[c].map(lambda v: isinstance(v, (list, dict, tuple))).any()]
    if nested:
        df = df.assign(**{c: df[c].map(str) for c in nested})
    with warnings.catch_warnings():
        # a local path resolves to two equivalent LocalArtifactDatasetSource entries; MLflow warns about it
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
        dataset = mlflow.data.from_pandas(
            df, source=source, targets=targets if targets in df.columns else None, name=name
        )
        mlflow.log_input(dataset, context=context)
    return dataset


@resources.phase("mlflow")
def log_text_table(df, artifact_file: str, *, run_id: str | None = None) -> None:
    """Log a DataFrame (e.g. prompt / reference / teacher / student samples) as an MLflow table artifact
    (``mlflow.load_table`` / the UI's artifact view) to ``run_id`` or the active run.

    ``artifact_file`` is run-relative and ends in ``.json`` (or ``.parquet``). Lists and tuples in a cell
    are joined with `` || ``, dicts become JSON, None / NaN become ``""``. As in MLflow, logging to an
    existing table file appends the rows.
    """
    import json

    import mlflow
    import pandas as pd

    run_id = active_run_id(run_id)
    if not str(artifact_file).endswith((".json", ".parquet")):
        raise FlexKDError(f"table artifact {artifact_file!r} must end in .json or .parquet")
    if not isinstance(df, pd.DataFrame):
        df = pd.DataFrame(df)

    def cell(value):
        if isinstance(value, (list, tuple)):
            return " || ".join(str(v) for v in value)
        if isinstance(value, dict):
            return json.dumps(value, ensure_ascii=False, default=str)
        if value is None or (isinstance(value, float) and value != value):
            return ""
        return value

    table = df.reset_index(drop=True).copy()
    for column in table.columns:
        if pd.api.types.is_object_dtype(table[column]) or pd.api.types.is_string_dtype(table[column]):
            table[column] = table[column].astype(object).map(cell)
    mlflow.MlflowClient().log_table(run_id, table, str(artifact_file))
