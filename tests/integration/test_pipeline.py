"""The whole pipeline through ``dvc repro`` on tiny random models and a few hundred real SST-2 rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.project import git_commit, make_project, run, save_tiny_bert, tiny_params

pytestmark = pytest.mark.slow

METHODS = ["ft", "kd", "projector", "cka", "flexkd"]
STUDENTS = ["random", "pruned"]


@pytest.fixture(scope="module")
def project(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("flexkd-project")
    teacher = save_tiny_bert(root.parent / f"{root.name}-teacher", hidden=32, layers=2)
    # the pruned student keeps only the training split's tokens (students.<name>.vocabulary: train)
    make_project(root, tiny_params(data_dir, teacher, **{"students.pruned.vocabulary": "train"}))
    # the pipeline flow: a fresh MLflow parent run, then `dvc repro` (as `make run` does)
    completed = run([sys.executable, "-m", "flows.pipeline"], root)
    return root, completed


def mlflow_client(root: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return mlflow.MlflowClient()


def test_every_stage_writes_its_outputs(project):
    root, _ = project
    assert json.loads((root / "data/validated/sst2/validation_report.json").read_text())["success"] is True
    manifest = json.loads((root / "data/prepared/sst2/manifest.json").read_text())
    assert manifest["rows"] == {"train": 240, "validation": 60, "test": 80}
    assert (root / "runs/teacher/sst2/model.safetensors").exists()
    index = json.loads((root / "data/relevance/sst2/index.json").read_text())
    assert len(index["indices"]) == 16 and len(set(index["indices"])) == 16 and index["d_teacher"] == 32
    assert (root / "data/relevance/sst2/scores.png").stat().st_size > 1000
    for name in STUDENTS:
        for method in METHODS:
            student = root / "runs/students/sst2" / name / method
            assert (student / "model.safetensors").exists() and (student / "tokenizer.json").exists()
            info = json.loads((student / "flexkd_student.json").read_text())
            assert info["steps"] == 15 and info["model_uri"] and info["init"] == ("prune" if name == "pruned" else "random")
            metrics = json.loads((root / f"metrics/distill/{name}/{method}.json").read_text())
            assert 0 <= metrics["validation"]["accuracy"] <= 1
            # the default params cache the teacher (all units: projector and cka are trained too)
            assert info["teacher_outputs"] == ("none" if method == "ft" else "cache")
    cache = json.loads((root / "data/teacher_cache/sst2/meta.json").read_text())
    assert cache["n_examples"] == 240 and cache["columns"] == list(range(32)) and cache["bytes"] == cache["full_width_bytes"]
    pruned = json.loads((root / "runs/students/sst2/pruned/flexkd/flexkd_student.json").read_text())
    assert pruned["pruning"]["hidden_units"] == sorted(index["indices"]) and pruned["pruning"]["layers"] == [1]
    evaluation = json.loads((root / "metrics/evaluation.json").read_text())
    assert set(evaluation["students"]) == {f"{s}/{m}" for s in STUDENTS for m in METHODS}
    assert evaluation["test_rows"] == 80
    table = (root / "reports/comparison.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith(("| student |", "| **student** (chosen) |"))]
    assert len(rows) == 10 and sum("(chosen)" in row for row in rows) == 1
    for method in METHODS:
        assert f"| {method} |" in table or f"| **{method}** |" in table
    assert "| teacher |" in table and "MCC" in table and "parameters" in table
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert {"validate", "prepare", "finetune_teacher", "relevance", "augment", "teacher_cache", "evaluate",
            "register"} <= set(lock["stages"])
    assert json.loads((root / "data/augmented/sst2/meta.json").read_text()) == {"enabled": False}  # the default
    assert {f"distill@{s}-{m}" for s in STUDENTS for m in METHODS} <= set(lock["stages"])


def test_checkpoints_load_with_plain_transformers(project):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root, _ = project
    path = root / "runs/students/sst2/pruned/flexkd"
    model = AutoModelForSequenceClassification.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    logits = model(**tokenizer(["a fine film"], return_tensors="pt")).logits
    assert logits.shape == (1, 2) and model.config.hidden_size == 16 and model.config.num_hidden_layers == 1
    # vocabulary: train: the saved tokenizer and embedding hold the training split's tokens only, and the test
    # scores are those of this smaller student read with its own tokenizer
    info = json.loads((path / "flexkd_student.json").read_text())
    assert len(tokenizer) == model.config.vocab_size == info["vocabulary"]["tokens_kept"] < 30522 // 4
    assert info["parameters"] == info["vocabulary"]["parameters_after"] < info["vocabulary"]["parameters_before"]
    assert info["pruning"]["parameter_ratio"] == info["parameters"] / info["pruning"]["teacher"]["parameters"]
    evaluation = json.loads((root / "metrics/evaluation.json").read_text())
    assert evaluation["students"]["pruned/flexkd"]["parameters"] == info["parameters"]
    random = AutoModelForSequenceClassification.from_pretrained(root / "runs/students/sst2/random/flexkd")
    assert random.config.vocab_size == 30522 and "vocabulary" not in json.loads(
        (root / "runs/students/sst2/random/flexkd/flexkd_student.json").read_text())


def test_mlflow_runs_nest_under_the_pipeline_and_log_each_term(project):
    root, _ = project
    client = mlflow_client(root)
    experiment = client.get_experiment_by_name("flexkd-test")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    stages = {r.data.tags.get("flexkd.stage"): r for r in runs if r.data.tags.get("flexkd.stage")}
    parents = {r.data.tags.get("mlflow.parentRunId") for r in runs if r.data.tags.get("flexkd.stage")}
    assert len(parents) == 1 and None not in parents, "all stage runs share one pipeline parent"
    assert {"validate", "prepare", "finetune_teacher", "relevance", "evaluate", "register"} <= set(stages)
    distill = {(r.data.tags.get("flexkd.student"), r.data.tags.get("flexkd.method")): r
               for r in runs if (r.data.tags.get("flexkd.stage") or "").startswith("distill")}
    assert set(distill) == {(s, m) for s in STUDENTS for m in METHODS}
    flexkd_run = distill[("random", "flexkd")]
    for key in ("train/task", "train/kd", "train/feature/flexkd", "train/total"):
        history = client.get_metric_history(flexkd_run.info.run_id, key)
        assert len(history) >= 5, key
    assert "train/feature/projector" in distill[("pruned", "projector")].data.metrics
    assert "train/kd" not in distill[("random", "ft")].data.metrics
    assert "test/accuracy" in flexkd_run.data.metrics
    assert flexkd_run.data.tags.get("flexkd.git_commit")
    pipeline = [r for r in runs if r.data.tags.get("flexkd.kind") == "pipeline"]
    assert len(pipeline) == 1 and pipeline[0].info.run_id in parents and pipeline[0].info.status == "FINISHED"
    # what a newcomer sees in the UI: the model-training view, runs told apart by name, described, models named
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    _, completed = project
    link = f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
    assert f"MLflow runs of {experiment.name}: {link} (start the UI with `make ui`)" in completed.stdout + completed.stderr
    commit = pipeline[0].data.tags["flexkd.git_commit"]
    assert pipeline[0].info.run_name.startswith(f"pipeline-sst2-seed42-{commit[:7]}")
    note = pipeline[0].data.tags["mlflow.note.content"]
    assert "task **sst2**" in note and "seed 42" in note and commit[:12] in note and "validation split" in note
    names = {m.name for m in client.search_logged_models(experiment_ids=[experiment.experiment_id])}
    assert {f"{s}-{m}" for s in STUDENTS for m in METHODS} <= names and "model" not in names
    prepare = stages["prepare"]
    assert {d.dataset.name for d in prepare.inputs.dataset_inputs} >= {"sst2-train", "sst2-test"}
    relevance_artifacts = {a.path for a in client.list_artifacts(stages["relevance"].info.run_id, "relevance")}
    assert {"relevance/index.json", "relevance/scores.png"} <= relevance_artifacts


def test_best_student_registered_as_champion_with_model_card(project):
    root, _ = project
    client = mlflow_client(root)
    registry = json.loads((root / "reports/registry.json").read_text())
    evaluation = json.loads((root / "metrics/evaluation.json").read_text())
    # chosen on validation: the best validation accuracy the distill runs recorded (ties: the first in params order)
    order = [f"{s}/{m}" for s in STUDENTS for m in METHODS]
    validation = {k: json.loads((root / f"metrics/distill/{k}.json").read_text())["validation"]["accuracy"] for k in order}
    expected = max(order, key=lambda k: validation[k])
    assert evaluation["selection"]["best"] == expected == registry["best"]
    version = client.get_model_version_by_alias("flexkd-sst2", "champion")
    assert str(version.version) == str(registry["version"]) and registry["alias"] == "champion"
    assert version.tags["selection_split"] == "validation" and version.tags["selection_metric"] == "accuracy"
    assert float(version.tags["selection_value"]) == validation[expected] and version.tags["selected_student"] == expected
    assert float(version.tags["test_accuracy"]) == evaluation["students"][expected]["accuracy"]
    assert "# " in version.description and registry["best_method"] in version.description
    assert "- **validation split**: accuracy" in version.description and "- **test split**: accuracy" in version.description
    import mlflow.pyfunc
    import pandas as pd

    model = mlflow.pyfunc.load_model("models:/flexkd-sst2@champion")
    out = model.predict(pd.DataFrame({"text": ["a gorgeous , witty film", "dull and lifeless"]}))
    assert set(out["label"].astype(str)) <= {"0", "1"} and len(out) == 2


def test_test_scores_never_choose_the_registered_student(project):
    """Validation and test disagree (the test scores are rewritten so that another student is best on test): the
    register stage still registers the validation pick, and as challenger (it does not beat itself)."""
    root, _ = project
    path = root / "metrics/evaluation.json"
    original = path.read_text()
    evaluation = json.loads(original)
    pick = evaluation["selection"]["best"]
    other = next(k for k in evaluation["students"] if k != pick)
    evaluation["students"][other]["accuracy"] = 1.0
    evaluation["students"][pick]["accuracy"] = 0.0
    path.write_text(json.dumps(evaluation))
    try:
        run([sys.executable, "-m", "flows.register"], root)
        registry = json.loads((root / "reports/registry.json").read_text())
    finally:
        path.write_text(original)
        run([sys.executable, "-m", "dvc", "commit", "-f", "register"], root)
    assert registry["best"] == pick and registry["alias"] == "challenger"
    assert "does not beat the champion" in registry["reason"] and "same validation data" in registry["reason"]


def test_second_repro_reruns_nothing_and_the_gate_read_the_raw_rows_once(project):
    """The validate stage stored the rows it read (data/validated/<task>/raw, DVC-tracked); prepare read those, and
    with nothing changed `dvc repro` has nothing to do."""
    root, _ = project
    completed = run([sys.executable, "-m", "dvc", "repro"], root)
    text = completed.stdout + completed.stderr
    assert "Running stage" not in text and "Data and pipelines are up to date" in text, text[-2000:]
    sources = json.loads((root / "data/validated/sst2/sources.json").read_text())
    assert sources["source"] == "local" and set(sources["snapshot"]) == {"train", "test"}
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    validated = [o for o in lock["stages"]["validate"]["outs"] if o["path"] == "data/validated/sst2"][0]
    assert validated["md5"].endswith(".dir")  # in DVC's cache: pushed and pulled with the run
    assert "data/validated/sst2/raw" in {d["path"] for d in lock["stages"]["prepare"]["deps"]}


def _dry_run(root: Path, group: str, key: str, value) -> str:
    """What `dvc repro --dry` would run with params.yaml's ``group.key`` set to ``value`` (params.yaml restored)."""
    original = (root / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params[group][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        return run([sys.executable, "-m", "dvc", "repro", "--dry"], root).stdout
    finally:
        (root / "params.yaml").write_text(original)


def test_a_changed_param_reruns_only_what_depends_on_it(project):
    root, _ = project
    dry = _dry_run(root, "distill", "flexkd_loss", "barlow")
    assert "Running stage 'distill@random-flexkd'" in dry and "Running stage 'distill@pruned-flexkd'" in dry
    assert "Running stage 'finetune_teacher'" not in dry and "Running stage 'relevance'" not in dry
    # augmentation (stage augment) feeds the students only: the teacher and the relevance index are kept
    dry = _dry_run(root, "augment", "enabled", True)
    assert "Running stage 'augment'" in dry and "Running stage 'teacher_cache'" in dry
    assert "Running stage 'distill@random-kd'" in dry
    assert "Running stage 'finetune_teacher'" not in dry and "Running stage 'relevance'" not in dry


def test_readme_variant_with_dvc_exp_run(project):
    """README: commit the baseline run, then `dvc exp run -S ...` reruns only the stages that depend on the change."""
    root, _ = project
    git_commit(root, "baseline run")
    completed = run([sys.executable, "-m", "dvc", "exp", "run", "-S", "evaluate.batch_size=64"], root)
    text = completed.stdout + completed.stderr
    assert "Running stage 'evaluate'" in text  # register reruns only if the metrics changed (here they cannot)
    assert "Running stage 'register'" in text or "Stage 'register' didn't change" in text
    for stage in ("finetune_teacher", "relevance", "distill@random-flexkd", "distill@pruned-ft"):
        assert f"Running stage '{stage}'" not in text, stage
    shown = json.loads(run([sys.executable, "-m", "dvc", "exp", "show", "--json"], root).stdout)
    experiments = [e for rev in shown for e in (rev.get("experiments") or [])]
    batch_sizes = [r["data"]["params"]["params.yaml"]["data"]["evaluate"]["batch_size"]
                   for e in experiments for r in e["revs"]]
    assert 64 in batch_sizes, shown


def test_benchmark_measurements_run_on_the_project(project):
    """The speed ratios, cache sizes and the relevance sanity ablation of `make benchmark`, on the tiny project."""
    from benchmarks.sanity import ablation
    from benchmarks.speed import cache_sizes, distill_step_times, relevance_time_ratio

    import flexkd.distill

    root, _ = project
    built, real = [], flexkd.distill.build_distill

    def recording(cfg, paths, student, method, **kwargs):  # the benchmark times the stage's own set-up
        setup = real(cfg, paths, student, method, **kwargs)
        built.append((method, kwargs.get("teacher_source"), setup.teacher_outputs))
        return setup

    flexkd.distill.build_distill = recording
    try:
        steps = distill_step_times(root, rounds=2, warmup=1)
    finally:
        flexkd.distill.build_distill = real
    assert ("flexkd", "cache", "cache") in built and ("kd", "online", "online") in built and ("ft", "online", "none") in built
    padding = steps["padding"]
    assert padding["grouped"]["real_tokens"] == padding["ungrouped"]["real_tokens"] > 0
    assert padding["grouped"]["padded_tokens"] < padding["ungrouped"]["padded_tokens"]
    assert set(steps["median_step_seconds"]) == {"ft/online"} | {f"{m}/{s}" for m in METHODS[1:] for s in ("online", "cache")}
    assert steps["ratio_to_plain_step"]["ft/online"] == 1.0 and 0 < steps["flexkd_term_share"] < 1
    assert set(steps["cached_over_online"]) == set(METHODS[1:])
    relevance = relevance_time_ratio(root, n_batches=2)
    assert relevance["ratio"] > 0 and relevance["batches"] == 2
    sizes = cache_sizes(root)
    assert sizes["selected"]["columns"] == 16 and sizes["full"]["columns"] == 32
    assert 0.4 < sizes["selected_over_full"] < 0.6  # hidden states dominate: 16 of 32 units
    sanity = ablation(root, ks=[8], random_draws=1)
    assert set(sanity["by_k"]["8"]) == {"top", "bottom", "random_mean"} and 0 <= sanity["none"] <= 1


def test_the_benchmark_commands_reuse_a_finished_runs_teacher(project, tmp_path, capsys):
    """--teacher-from: the curve sizes students on the project's own data, teacher and relevance index (linked, not
    trained again); a profile that differs from the run's params is refused, naming the keys that differ."""
    from benchmarks import curve

    root, _ = project
    work = tmp_path / "curve"
    argv = ["--params", str(root / "params.yaml"), "--teacher-from", str(root), "--widths", "16", "--depths", "1",
            "--steps", "2", "--max-ratio", "1", "--work-dir", str(work), "--output", str(tmp_path / "curve.json")]
    capsys.readouterr()
    assert curve.main(argv) == 0
    out, err = capsys.readouterr()
    assert "shared stages reused" in out and "teacher:" not in err  # no teacher trained
    assert json.loads((work / "shared.json").read_text())["adopted_from"] == str(root.resolve())
    assert (work / "runs/teacher/sst2").resolve() == (root / "runs/teacher/sst2").resolve()
    result = json.loads((tmp_path / "curve.json").read_text())
    row = result["rows"][0]
    # the project's pruned student has vocabulary: train: the curve counts the parameters it is saved with
    assert row["steps"] == 2 and row["parameters"] < 30522 * 16
    assert "cut to the training split's tokens" in curve.render(result)
    with pytest.raises(SystemExit, match="params.yaml differs from this profile in project"):
        curve.main(argv[:2] + ["--set", "project.seed=43"] + argv[2:])


def test_a_run_travels_to_a_fresh_clone_through_the_dvc_remote(project, tmp_path):
    """A finished run pushed to a DVC remote, the project cloned elsewhere, pulled (raw rows included): `dvc repro`
    there has nothing to do, the pulled student predicts exactly what the original does, and it is the student
    the shared MLflow registry holds. A remote that cannot be reached stops the pipeline before any stage runs."""
    import mlflow
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from flexkd.provenance import weights_hash
    from flows.storage import dvc_remote

    root, _ = project
    dvc = [sys.executable, "-m", "dvc"]
    (tmp_path / "a-file").write_text("not a directory")
    run([*dvc, "remote", "add", "-d", "-f", "broken", str(tmp_path / "a-file" / "remote")], root)
    stopped = run([sys.executable, "-m", "flows.pipeline"], root, check=False, timeout=600)
    assert stopped.returncode == 1
    assert "DVC remote 'broken'" in stopped.stderr and "cannot be reached" in stopped.stderr
    assert "Running stage" not in stopped.stdout + stopped.stderr  # stopped before dvc repro

    remote_dir = tmp_path / "storage" / "flexkd"
    run([*dvc, "remote", "add", "-d", "-f", "shared", str(remote_dir)], root)
    assert dvc_remote(root) == {"name": "shared", "url": str(remote_dir)} and remote_dir.is_dir()  # made on first use
    pushed = run([sys.executable, "-m", "flows.storage", "push"], root)  # `make push`, and the end of `make run`
    assert "pushing the run's outputs to DVC remote 'shared'" in pushed.stdout
    git_commit(root, "a finished run, shared")

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(root), str(clone)], tmp_path)
    assert not (clone / "runs").exists() and not (clone / "data/validated/sst2/raw").exists()
    run([sys.executable, "-m", "flows.storage", "pull"], clone)  # `make pull`
    assert (clone / "data/validated/sst2/raw/train.jsonl").is_file()  # the rows the run read, whatever the source
    repro = run([*dvc, "repro"], clone)
    text = repro.stdout + repro.stderr
    assert "Running stage" not in text and "Data and pipelines are up to date" in text, text[-2000:]

    texts = ["a fine film", "dull and far too long", "the cast is wonderful"]
    logits = []
    for base in (root, clone):
        path = base / "runs/students/sst2/pruned/flexkd"
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        logits.append(model(**tokenizer(texts, return_tensors="pt", padding=True)).logits)
    assert logits[0].shape == (3, 2) and (logits[0] == logits[1]).all()

    # the MLflow store (a shared tracking server in production; the project's sqlite file here) holds the same
    # students: the registered version named in the pulled reports/registry.json has the pulled student's weights
    registry = json.loads((clone / "reports/registry.json").read_text())
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    downloaded = Path(mlflow.artifacts.download_artifacts(f"models:/{registry['name']}/{registry['version']}",
                                                          dst_path=str(tmp_path / "registered")))
    weights = {p.parent for p in downloaded.rglob("*.safetensors")}
    assert len(weights) == 1
    best = clone / "runs/students/sst2" / registry["best"]
    assert weights_hash(weights.pop()) == weights_hash(best) == json.loads((best / "flexkd_student.json").read_text())["weights_hash"]
