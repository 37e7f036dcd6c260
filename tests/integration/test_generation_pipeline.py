"""The generative pipeline (instruction following, summarization) end to end on tiny random Llama models and a
few dozen real Alpaca and SciTLDR rows, through the same stages as classification."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from tests.integration.project import make_project, run, save_tiny_llama, tiny_generation_params

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("profile", ["alpaca", "scitldr"])
def test_generation_profile_end_to_end(profile, tmp_path, data_dir):
    teacher = save_tiny_llama(tmp_path / "teacher")
    params = tiny_generation_params(profile, data_dir, teacher)
    # alpaca: the teacher cache of top-k logits and the selected units only (projector then runs the teacher
    # online); scitldr: no cache
    params["teacher_cache"] = {"enabled": profile == "alpaca", "features": "selected"}
    params["distill"]["teacher_top_k"] = 8
    # one student each (both kinds are covered): alpaca every method with the pruned student, scitldr the
    # summarization format with the random-init one
    if profile == "scitldr":
        params["distill"].update(students=["random"], methods=["ft", "flexkd"])
    else:
        params["distill"].update(students=["pruned"], methods=["ft", "kd", "projector", "flexkd"])
    root = make_project(tmp_path / "project", params)
    run([sys.executable, "-m", "flows.pipeline"], root)

    cfg = yaml.safe_load((root / "params.yaml").read_text())
    task = cfg["data"]["task"]
    students, methods = cfg["distill"]["students"], cfg["distill"]["methods"]
    if profile == "alpaca":
        assert {"ft", "kd", "projector", "flexkd"} <= set(methods) and students == ["pruned"]
    manifest = json.loads((root / f"data/prepared/{task}/manifest.json").read_text())
    assert manifest["rows"]["train"] == 32 and manifest["rows"]["test"] == 8
    records = [json.loads(line) for line in (root / f"data/prepared/{task}/test.jsonl").read_text().splitlines()]
    assert all(r["references"] and r["response"] == r["references"][0] for r in records)
    if profile == "scitldr":
        assert any(len(r["references"]) > 1 for r in records) or manifest["references_per_row"]["max"] >= 1

    evaluation = json.loads((root / "metrics/evaluation.json").read_text())
    assert evaluation["primary_metric"] == "rougeL"
    assert set(evaluation["students"]) == {f"{s}/{m}" for s in students for m in methods}
    import math

    for scores in [evaluation["teacher"], *evaluation["students"].values()]:
        assert 0.0 <= scores["rougeL"] <= 100.0
        # teacher-forced on the test rows: finite, and the perplexity is its exponential
        assert 0.0 < scores["nll"] < 50.0 and scores["perplexity"] == pytest.approx(math.exp(scores["nll"]))
    if profile == "alpaca":  # the best tiny student learned something: its test NLL is below uniform's ln(V)
        vocab = json.loads((root / f"runs/students/{task}/{students[0]}/ft/config.json").read_text())["vocab_size"]
        assert min(s["nll"] for s in evaluation["students"].values()) < math.log(vocab)
    table = (root / "reports/comparison.md").read_text()
    assert "test ROUGE-L" in table and "validation NLL" in table and "test NLL" in table and "test perplexity" in table
    assert all(f"{n}: {'pruned from the teacher' if n == 'pruned' else 'random init'}" in table for n in students)
    # the choice is the lowest validation NLL the distill runs recorded, whatever the test ROUGE-L says
    chosen = evaluation["selection"]
    losses = {k: v["validation"]["loss"] for k, v in evaluation["students"].items()}
    assert chosen["split"] == "validation" and chosen["metric"] == "neg_loss" and chosen["best"] == min(losses, key=losses.get)

    for student in students:
        for method in methods:
            info = json.loads((root / f"runs/students/{task}/{student}/{method}/flexkd_student.json").read_text())
            expected = {"ft": "none", "projector": "online"}.get(method, "cache" if profile == "alpaca" else "online")
            assert info["teacher_outputs"] == expected, (student, method)
    from transformers import AutoModelForCausalLM

    for name in students:
        info = json.loads((root / f"runs/students/{task}/{name}/flexkd/flexkd_student.json").read_text())
        if name == "pruned":
            index = json.loads((root / f"data/relevance/{task}/index.json").read_text())
            assert info["pruning"]["hidden_units"] == sorted(index["indices"])
        student = AutoModelForCausalLM.from_pretrained(root / f"runs/students/{task}/{name}/flexkd")
        assert student.config.hidden_size == 16

    registry = json.loads((root / "reports/registry.json").read_text())
    assert registry["alias"] == "champion" and registry["name"] == f"flexkd-{task}" and registry["best"] == chosen["best"]
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(f"flexkd-{task}", "champion")
    assert "ROUGE-L" in version.description and "AutoModelForCausalLM" in version.description
    assert version.tags["selection_split"] == "validation" and version.tags["selection_metric"] == "neg_loss"
    runs = client.search_runs([client.get_experiment_by_name(params["project"]["experiment"]).experiment_id])
    evaluate = [r for r in runs if r.data.tags.get("flexkd.stage") == "evaluate"][0]
    artifacts = {a.path for a in client.list_artifacts(evaluate.info.run_id, "samples")}
    assert "samples/test_samples.json" in artifacts
    flexkd_run = [r for r in runs if r.data.tags.get("flexkd.method") == "flexkd" and r.data.tags.get("flexkd.student") == students[0]][0]
    assert client.get_metric_history(flexkd_run.info.run_id, "train/feature/flexkd")
