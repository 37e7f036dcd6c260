"""flexkd.tracking against a real MLflow SQLite store in tmp_path (one store per test)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from flexkd import tracking
from flexkd.selection import Selection
from flexkd.errors import FlexKDError

EXPERIMENT = "flexkd-test"
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh SQLite tracking store; the project root is tmp_path."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv(tracking.PIPELINE_RUN_ENV, raising=False)
    yield tmp_path
    while mlflow.active_run() is not None:
        mlflow.end_run()


def _client():
    import mlflow

    return mlflow.MlflowClient()


def test_tracking_uri_defaults_to_project_sqlite(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert tracking.tracking_uri(tmp_path) == "http://example:5000"


def test_ui_links_open_the_model_training_view_of_the_server_or_of_make_ui():
    # a server: its own address; a local store: where `make ui` serves it
    assert tracking.experiment_url("7", "http://mlflow.internal:8080/") == \
        "http://mlflow.internal:8080/#/experiments/7/runs?workflowType=machine_learning"
    assert tracking.experiment_url("3", "sqlite:////tmp/x/mlflow.db") == \
        "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
    assert tracking.model_version_url("flexkd-sst2", 2, "https://m.example") == \
        "https://m.example/#/models/flexkd-sst2/versions/2?workflowType=machine_learning"


def test_stage_runs_nest_under_one_pipeline_parent_across_processes(store):
    with tracking.stage_run("prepare", project_root=store, experiment=EXPERIMENT) as first:
        pass
    with tracking.stage_run("distill", project_root=store, experiment=EXPERIMENT, tags={"method": "kd"}) as second:
        pass
    parent = (store / ".flexkd" / "pipeline_run_id").read_text().strip()
    client = _client()
    runs = [client.get_run(r.info.run_id) for r in (first, second)]
    assert [r.data.tags["mlflow.parentRunId"] for r in runs] == [parent, parent]
    assert runs[0].data.tags["flexkd.stage"] == "prepare"
    assert runs[1].data.tags["flexkd.method"] == "kd"
    assert all(r.info.status == "FINISHED" for r in runs)
    assert client.get_run(parent).data.tags["flexkd.kind"] == "pipeline"

    code = (
        "import sys; from flexkd import tracking; "
        f"print(tracking.pipeline_run_id(sys.argv[1], {EXPERIMENT!r}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(store)], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == parent

    fresh = tracking.start_pipeline_run(store, EXPERIMENT)
    assert fresh != parent
    assert tracking.pipeline_run_id(store, EXPERIMENT) == fresh
    tracking.end_pipeline_run(fresh)
    assert client.get_run(fresh).info.status == "FINISHED"


def test_pipeline_run_id_env_wins_and_stale_file_is_replaced(store, monkeypatch):
    (store / ".flexkd").mkdir()
    (store / ".flexkd" / "pipeline_run_id").write_text("0" * 32 + "\n")  # not in this store
    assert tracking.pipeline_run_id(store, EXPERIMENT, create=False) is None
    created = tracking.pipeline_run_id(store, EXPERIMENT)
    assert created != "0" * 32
    assert (store / ".flexkd" / "pipeline_run_id").read_text().strip() == created
    monkeypatch.setenv(tracking.PIPELINE_RUN_ENV, "abc123")
    assert tracking.pipeline_run_id(store, EXPERIMENT) == "abc123"


def test_params_flattened_metrics_per_key_with_steps_and_provenance(store):
    (store / "dvc.lock").write_text("schema: '2.0'\n")
    params = {"distill": {"method": "flexkd", "loss": {"alpha": 0.5}}, "seed": 1, "long": "x" * 7000}
    with tracking.stage_run("distill", project_root=store, experiment=EXPERIMENT, params=params) as run:
        for step in range(3):
            tracking.log_metrics(
                {"train/task": 1.0 + step, "train/feature/flexkd": 0.5, "train/lr": 1e-3, "eval acc(%)": 90},
                step=step,
            )
    client = _client()
    data = client.get_run(run.info.run_id).data
    assert data.params["distill.method"] == "flexkd"
    assert data.params["distill.loss.alpha"] == "0.5"
    assert data.params["seed"] == "1"
    assert len(data.params["long"]) <= 6000
    history = client.get_metric_history(run.info.run_id, "train/task")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 1.0), (1, 2.0), (2, 3.0)]
    assert len(client.get_metric_history(run.info.run_id, "train/feature/flexkd")) == 3
    assert "eval acc___" in data.metrics
    artifacts = [f.path for f in client.list_artifacts(run.info.run_id, "provenance")]
    assert artifacts == ["provenance/dvc.lock"]


def test_git_commit_is_logged_in_a_git_repo(store):
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], cwd=store, check=True)
    (store / "a.txt").write_text("a")
    subprocess.run(["git", "add", "a.txt"], cwd=store, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], cwd=store, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=store, capture_output=True, text=True).stdout.strip()
    with tracking.stage_run("prepare", project_root=store, experiment=EXPERIMENT) as run:
        pass
    tags = _client().get_run(run.info.run_id).data.tags
    assert tags["flexkd.git_commit"] == head
    assert tags["mlflow.source.git.commit"] == head
    assert tags["flexkd.git_dirty"] == "false"


def test_failing_stage_marks_run_failed_and_propagates(store):
    with pytest.raises(RuntimeError, match="boom"):
        with tracking.stage_run("finetune_teacher", project_root=store, experiment=EXPERIMENT) as run:
            raise RuntimeError("boom")
    import mlflow

    assert mlflow.active_run() is None
    assert _client().get_run(run.info.run_id).info.status == "FAILED"


def test_dataset_inputs_recorded_from_jsonl_and_dataframe(store):
    path = store / "train.jsonl"
    pd.DataFrame({"text": ["a b", "c"], "label": [0, 1]}).to_json(path, orient="records", lines=True)
    with tracking.stage_run("distill", project_root=store, experiment=EXPERIMENT) as run:
        tracking.log_dataset(path, name="sst2-train", context="training")
        tracking.log_dataset(pd.DataFrame({"text": ["x"], "label": [1]}), name="sst2-val", context="validation")
    inputs = _client().get_run(run.info.run_id).inputs.dataset_inputs
    by_name = {d.dataset.name: d for d in inputs}
    assert set(by_name) == {"sst2-train", "sst2-val"}
    assert str(path) in by_name["sst2-train"].dataset.source
    contexts = {d.dataset.name: {t.value for t in d.tags if t.key == "mlflow.data.context"} for d in inputs}
    assert contexts == {"sst2-train": {"training"}, "sst2-val": {"validation"}}


def test_log_metrics_outside_a_run_is_an_error(store):
    with pytest.raises(FlexKDError, match="no active MLflow run"):
        tracking.log_metrics({"a": 1.0})


def test_sanitize_key():
    assert tracking.sanitize_key("train/feature/flexkd") == "train/feature/flexkd"
    assert tracking.sanitize_key("/a//b/../c?") == "a/b/c_"
    assert tracking.flatten_params({"a": {"b": {"c": 1}}, "d": [1, 2]}) == {"a.b.c": "1", "d": "[1, 2]"}


def test_served_models_are_plain_modules_that_import_no_flexkd():
    """The pyfunc models are real modules that MLflow copies into the model and runs where flexkd may be missing:
    they import no flexkd and end by naming their model; the package still exposes the classes."""
    import ast

    serving = REPO_ROOT / "flexkd" / "tracking" / "serving"
    for stem, cls in (("text_classifier", "TextClassifierModel"), ("text_generator", "TextGeneratorModel")):
        tree = ast.parse((serving / f"{stem}.py").read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert imported <= {"mlflow", "pandas", "re", "torch", "transformers"}, (stem, imported)
        assert ast.unparse(tree.body[-1]) == f"mlflow.models.set_model({cls}())", stem
        assert getattr(tracking, cls).__module__ == f"flexkd.tracking.serving.{stem}"


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A random 1-layer BERT classifier and a word-level tokenizer from a 12-word vocab, saved offline."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "the", "is", "great", "awful"]
    ckpt = tmp_path / "student"
    ckpt.mkdir()
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64, num_labels=2,
        id2label={0: "LABEL_0", 1: "LABEL_1"}, label2id={"LABEL_0": 0, "LABEL_1": 1},
    )
    BertForSequenceClassification(config).save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    return ckpt


def test_pyfunc_model_loads_in_a_fresh_process_and_registry_aliases(store, tiny_checkpoint):
    label_map = {"negative": 0, "positive": 1}
    with tracking.stage_run("distill", project_root=store, experiment=EXPERIMENT, tags={"method": "flexkd"}) as run:
        uri = tracking.log_classifier_model(
            tiny_checkpoint, label_map=label_map, max_length=16, input_example_texts=["good movie", "bad"]
        )
    run_id = run.info.run_id

    # load without flexkd importable: the model's code is self-contained
    code = (
        "import sys; sys.modules['flexkd'] = None\n"
        "import mlflow.pyfunc, pandas as pd\n"
        "m = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "out = m.predict(pd.DataFrame({'text': ['good movie', 'the awful movie is bad', 'great']}))\n"
        "print(out.to_json(orient='records'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, uri], cwd=store, capture_output=True, text=True, timeout=180,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    predictions = pd.read_json(__import__("io").StringIO(out.stdout.strip().splitlines()[-1]))
    assert list(predictions.columns) == ["label", "score"]
    assert len(predictions) == 3
    assert set(predictions["label"]) <= set(label_map)
    assert ((predictions["score"] >= 0.5) & (predictions["score"] <= 1.0)).all()

    card = tracking.model_card(
        task="sst2",
        teacher={"spec": "bert-base", "weights_hash": "abc123", "test": {"accuracy": 0.91}},
        student={"architecture": "BertForSequenceClassification", "num_parameters": 12345},
        data={"files": ["train.jsonl"], "rows": 2, "fingerprint": "f00d"},
        method="flexkd",
        metrics={"validation": {"accuracy": 0.82, "macro_f1": 0.81}, "test": {"accuracy": 0.8, "mcc": 0.6}},
        selection_note="Chosen on the validation split by validation accuracy.",
        selected_units=[0, 1, 2, 5, 7, 8],
        relevance={"path": "data/relevance/x.json"},
        loss_weights={"task": 1.0, "feature": 0.5},
    )
    assert "models:/flexkd-sst2@champion" in card and "0-2, 5, 7-8" in card and "12,345" in card
    assert "- **Model**: bert-base" in card and "accuracy=0.9100" in card and "task=1.0000, feature=0.5000" in card
    # every metric line names its split, and nothing is a table the registry's renderer would flatten
    assert "- **validation split**: accuracy 0.8200, macro-F1 0.8100" in card
    assert "- **test split**: accuracy 0.8000, MCC 0.6000" in card
    assert "Chosen on the validation split by validation accuracy." in card and "| metric |" not in card

    fingerprint = "a" * 64

    def register(value, metric="accuracy", fp=fingerprint):
        return tracking.register_student(
            "sst2", model_uri=uri, run_id=run_id, model_card_md=card, tags={"method": "flexkd"},
            selection=Selection(key="random/flexkd", metric=metric, value=value, validation_fingerprint=fp),
            test_metrics={"accuracy": 0.5},
        )

    client = _client()
    first = register(0.8)
    assert first["name"] == "flexkd-sst2"
    assert (first["alias"], first["previous_champion"]) == ("champion", None)
    worse = register(0.7)
    assert (worse["alias"], worse["previous_champion"], worse["previous_value"]) == ("challenger", "1", 0.8)
    assert "does not beat the champion (version 1) on the same validation data" in worse["reason"]
    assert str(client.get_model_version_by_alias("flexkd-sst2", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("flexkd-sst2", "challenger").version) == worse["version"]
    better = register(0.9)
    assert better["alias"] == "champion" and "beats the champion (version 1)" in better["reason"]
    champion = client.get_model_version_by_alias("flexkd-sst2", "champion")
    assert str(champion.version) == better["version"] == "3"
    assert champion.description == card
    assert champion.tags["selection_split"] == "validation" and champion.tags["selection_metric"] == "accuracy"
    assert float(champion.tags["selection_value"]) == 0.9 and champion.tags["validation_fingerprint"] == fingerprint
    assert float(champion.tags["test_accuracy"]) == 0.5 and champion.tags["method"] == "flexkd"
    assert champion.tags["selected_student"] == "random/flexkd" and "beats" in champion.tags["alias_reason"]
    # a higher score on other validation data, or by another metric, says nothing: challenger, with the reason
    other_data = register(0.99, fp="b" * 64)
    assert other_data["alias"] == "challenger" and "other validation data" in other_data["reason"]
    other_metric = register(0.99, metric="mcc")
    assert other_metric["alias"] == "challenger" and "chosen by accuracy, this one by mcc" in other_metric["reason"]
    assert str(client.get_model_version_by_alias("flexkd-sst2", "champion").version) == "3"
    assert "model_card.md" in [f.path for f in client.list_artifacts(run_id)]
    tracking.log_metrics_to_run(run_id, {"test/accuracy": 0.5})  # into the finished distill run
    assert client.get_run(run_id).data.metrics["test/accuracy"] == 0.5

    # the champion alias resolves and predicts in this process too
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model("models:/flexkd-sst2@champion")
    assert set(model.predict(pd.DataFrame({"text": ["great"]}))["label"]) <= set(label_map)

    # a metric where lower is better (a loss), registered under another task
    def loss(value):
        return tracking.register_student(
            "t", model_uri=uri, run_id=run_id, model_card_md="# card", higher_is_better=False,
            selection=Selection(key="s/m", metric="loss", value=value, validation_fingerprint=fingerprint))

    assert [loss(v)["alias"] for v in (0.5, 0.6, 0.4, 0.4)] == ["champion", "challenger", "champion", "challenger"]


def test_a_champion_chosen_before_validation_selection_is_not_replaced_silently(store, tiny_checkpoint):
    """A champion registered by test metric (no selection tags) cannot be compared: the new one is challenger."""
    import mlflow

    with tracking.stage_run("distill", project_root=store, experiment=EXPERIMENT) as run:
        uri = tracking.log_classifier_model(tiny_checkpoint, label_map={"a": 0, "b": 1}, max_length=8,
                                            input_example_texts=["x"])
    client = _client()
    client.create_registered_model("flexkd-old")
    old = mlflow.register_model(uri, "flexkd-old", tags={"metric_name": "test_accuracy", "metric_value": "0.7"})
    client.set_registered_model_alias("flexkd-old", "champion", old.version)
    result = tracking.register_student(
        "old", model_uri=uri, run_id=run.info.run_id, model_card_md="# card",
        selection=Selection(key="s/m", metric="accuracy", value=0.95, validation_fingerprint="c" * 64))
    assert result["alias"] == "challenger" and "records no validation score" in result["reason"]
    assert str(client.get_model_version_by_alias("flexkd-old", "champion").version) == str(old.version)
