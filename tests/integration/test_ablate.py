"""benchmarks/ablate.py: each variant changes one choice of Flex-KD and is scored on validation against base."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.integration.project import save_tiny_bert, tiny_params


@pytest.fixture(scope="module")
def ablated(tmp_path_factory, data_dir):
    from benchmarks import ablate

    root = tmp_path_factory.mktemp("ablate")
    teacher = save_tiny_bert(root / "teacher_init")
    params = tiny_params(data_dir, teacher)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    tuning = {"results": {"random/flexkd": {"pick": {"settings": {"lr": 2e-3, "alpha": 0.3, "temperature": 4.0,
                                                                 "feature_weight": 0.05}}}}}
    (root / "tuning.json").write_text(json.dumps(tuning))
    argv = ["--params", str(root / "params.yaml"), "--tuning", str(root / "tuning.json"), "--seeds", "42", "43",
            "--variants", "relevance:random", "order:score", "loss:mse", "layers:matched", "--work-dir", str(root / "work"),
            "--output", str(root / "ablation.json")]
    assert ablate.main(argv) == 0
    return root, argv, params, json.loads((root / "ablation.json").read_text())


def test_every_variant_is_scored_on_validation_against_base(ablated):
    from flexkd.relevance import RelevanceIndex

    root, _, params, result = ablated
    assert list(result["variants"]) == ["base", "relevance:random", "order:score", "loss:mse", "layers:matched"]
    assert result["seeds"] == [42, 43] and result["students"] == ["random", "pruned"]
    for student in result["students"]:
        base = result["table"][f"base/{student}"]
        assert base["minus_base"] == 0.0
        for name in result["variants"]:
            if (name, student) == ("order:score", "pruned"):  # always index order: not run
                assert f"{name}/{student}" not in result["table"]
                continue
            row = result["table"][f"{name}/{student}"]
            assert 0.0 <= row["mean"] <= 1.0 and row["minus_base"] == pytest.approx(row["mean"] - base["mean"])
    workspace = root / "work" / "sst2-seed42"
    # the tuned flexkd settings reached the random student's run, not the pruned one's
    records = {p.stem: json.loads(p.read_text()) for p in (workspace / "ablation" / "records").glob("*.json")}
    assert len(records) == 18
    assert records["base-random-seed43"]["params"]["students"]["random"]["per_method"]["flexkd"]["lr"] == 2e-3
    assert not records["base-pruned-seed42"]["params"]["students"]["pruned"].get("per_method")
    # matched layers need the teacher's intermediate layers: online; the others read the cache
    assert records["layers-matched-random-seed42"]["teacher_outputs"] == "online"
    assert records["base-random-seed42"]["teacher_outputs"] == "cache"
    # the control: a seeded random draw of k units, with no teacher pass; the teacher and data are the base's
    control = root / "work" / "sst2-seed42-relevance-random-index-seed42"
    index = RelevanceIndex.load(control / "data" / "relevance" / "sst2" / "index.json")
    base_index = RelevanceIndex.load(workspace / "data" / "relevance" / "sst2" / "index.json")
    assert index.method == "random" and index.n_examples == 0 and index.k == base_index.k
    assert sorted(index.indices) != sorted(base_index.indices)
    other_draw = RelevanceIndex.load(root / "work" / "sst2-seed42-relevance-random-index-seed43" / "data" / "relevance"
                                     / "sst2" / "index.json")
    assert sorted(other_draw.indices) != sorted(index.indices)  # each student seed its own draw
    assert (control / "runs" / "teacher" / "sst2").resolve() == (workspace / "runs" / "teacher" / "sst2").resolve()
    # order:score pairs the random-init student with units in score order
    ordered = RelevanceIndex.load(root / "work" / "sst2-seed42-relevance-grad-score" / "data" / "relevance" / "sst2" / "index.json")
    assert sorted(ordered.indices) == sorted(base_index.indices) and ordered.indices != base_index.indices
    text = __import__("benchmarks.ablate", fromlist=["render"]).render(result)
    assert "| relevance:random (`relevance.method: random`) |" in text


def test_a_rerun_reuses_the_records_and_a_foreign_base_dir_is_refused(ablated, capsys):
    from benchmarks import ablate

    root, argv, params, result = ablated
    assert ablate.main(argv) == 0
    assert json.loads((root / "ablation.json").read_text())["table"] == result["table"]
    other = dict(params)
    other["teacher"] = {**params["teacher"], "max_length": 24}
    (root / "other.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(SystemExit, match="not a workspace of these params \\(differs in: teacher\\)"):
        ablate.main(["--params", str(root / "other.yaml"), "--seeds", "42", "--variants", "loss:mse",
                     "--base-dir", str(root / "work" / "sst2-seed42"), "--output", str(root / "other.json")])


def test_another_feature_method_gets_the_variants_that_concern_it(ablated):
    """--method projector: base and positions:head (the Flex-KD-only variants are not run), in records of its own,
    on the same shared stages; positions:head compares the [CLS] rows only and so trains another student."""
    from benchmarks import ablate

    root, _, _, _ = ablated
    output = root / "ablation-projector.json"
    argv = ["--params", str(root / "params.yaml"), "--seeds", "42", "--students", "random", "--method", "projector",
            "--variants", "positions:head", "loss:mse", "--work-dir", str(root / "work"), "--output", str(output)]
    assert ablate.main(argv) == 0
    result = json.loads(output.read_text())
    assert result["method"] == "projector" and list(result["variants"]) == ["base", "positions:head"]
    assert set(result["table"]) == {"base/random", "positions:head/random"}
    records = root / "work" / "sst2-seed42" / "ablation" / "records"
    base = json.loads((records / "base-random-projector-seed42.json").read_text())
    head = json.loads((records / "positions-head-random-projector-seed42.json").read_text())
    assert base["method"] == head["method"] == "projector" and base["params"]["distill"]["methods"] == ["projector"]
    assert head["params"]["distill"]["feature_positions"] == "head"
    assert head["validation"] != base["validation"] or head["best_step"] != base["best_step"]
    assert "the projector student" in ablate.render(result)
