"""benchmarks/tune.py: every method gets the same trials, the pick is made on validation, the picks paste back."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.integration.project import save_tiny_bert, tiny_params


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, data_dir):
    from benchmarks import tune

    root = tmp_path_factory.mktemp("tune")
    teacher = save_tiny_bert(root / "teacher_init")
    params = tiny_params(data_dir, teacher)
    params["distill"]["methods"] = ["ft", "kd", "flexkd"]
    params["teacher_cache"]["features"] = "selected"
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    argv = ["--params", str(root / "params.yaml"), "--trials", "3", "--students", "random", "pruned",
            "--work-dir", str(root / "work"), "--output", str(root / "tuning.json")]
    assert tune.main(argv) == 0
    return root, argv, params, json.loads((root / "tuning.json").read_text())


def test_every_method_gets_the_same_trials_and_the_pick_is_the_best_on_validation(tuned):
    from benchmarks.tune import dims_of

    root, _, params, result = tuned
    assert result["trials"] == 3 and result["primary_metric"] == "accuracy"
    lr, alpha, tau = params["distill"]["train"]["lr"], params["distill"]["alpha"], params["distill"]["temperature"]
    for student in ("random", "pruned"):
        blocks = {m: result["results"][f"{student}/{m}"] for m in ("ft", "kd", "flexkd")}
        for method, block in blocks.items():
            trials = block["trials"]
            assert [t["trial"] for t in trials] == [0, 1, 2]
            # trial 0 is the profile's own settings
            assert trials[0]["settings"]["lr"] == pytest.approx(lr)
            assert trials[0]["settings"]["alpha"] == pytest.approx(alpha)
            assert trials[0]["settings"]["temperature"] == pytest.approx(tau)
            assert block["default_validation"] == trials[0]["validation"]
            best = max(trials, key=lambda t: (t["validation"], -t["trial"]))
            assert block["pick"]["trial"] == best["trial"] and block["pick"]["validation"] == best["validation"]
            assert set(block["pick"]["settings"]) == set(dims_of(method))
            assert 0.0 <= block["pick"]["test"] <= 1.0
            # only the pick's student is kept
            kept = {t["trial"] for t in trials if (root / "work" / "tune" / f"trial-{t['trial']}" / student / method).exists()}
            assert kept == {best["trial"]}
        for trial in (1, 2):  # the same point for every method: same lr; kd and flexkd the same alpha, temperature
            lrs = {blocks[m]["trials"][trial]["settings"]["lr"] for m in blocks}
            assert len(lrs) == 1 and lrs != {lr}
            for key in ("alpha", "temperature"):
                assert blocks["kd"]["trials"][trial]["settings"][key] == blocks["flexkd"]["trials"][trial]["settings"][key]
            assert blocks["ft"]["trials"][trial]["settings"]["alpha"] == pytest.approx(alpha)  # ft ignores alpha
            assert blocks["flexkd"]["trials"][trial]["settings"]["feature_weight"] != params["distill"]["feature_weight"]["flexkd"]


def test_a_second_run_reuses_every_trial_and_the_picks_paste_into_the_profile(tuned, capsys):
    from benchmarks import tune
    from flexkd.config import parse_config
    from flexkd.distill import method_settings

    root, argv, params, result = tuned
    capsys.readouterr()
    assert tune.main(argv) == 0
    again = json.loads((root / "tuning.json").read_text())
    for key, block in result["results"].items():  # nothing retrained: the same seconds and scores
        assert again["results"][key]["trials"] == block["trials"]
    out = capsys.readouterr().out
    assert "shared stages reused" in out
    snippet = out[out.index("# python -m benchmarks.tune"):]
    per_method = yaml.safe_load("students:\n" + snippet.split("\n", 1)[1])["students"]
    for student, spec in per_method.items():
        params["students"][student]["per_method"] = spec["per_method"]
    cfg = parse_config(params, source="pasted")
    for key, block in result["results"].items():
        student, method = key.split("/")
        resolved = method_settings(cfg, student, method)
        for name, value in block["pick"]["settings"].items():
            assert resolved["beta" if name == "feature_weight" else name] == pytest.approx(value)
    assert "| random | flexkd |" in tune.render(result)
