"""benchmarks/curve.py: pruned students of several widths and depths, one fixed budget, scored on validation."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.integration.project import save_tiny_llama, tiny_generation_params


def test_every_size_trains_the_same_budget_and_the_pick_fits_the_parameter_share(tmp_path, data_dir, capsys):
    from benchmarks import curve
    from flexkd.relevance import RelevanceIndex

    teacher = save_tiny_llama(tmp_path / "teacher_init")
    params = tiny_generation_params("alpaca", data_dir, teacher)
    (tmp_path / "alpaca.yaml").write_text(yaml.safe_dump(params))
    argv = ["--params", str(tmp_path / "alpaca.yaml"), "--widths", "8", "16", "--depths", "1", "2", "--steps", "3",
            "--max-ratio", "0.8", "--work-dir", str(tmp_path / "work"), "--output", str(tmp_path / "curve.json")]
    assert curve.main(argv) == 0
    result = json.loads((tmp_path / "curve.json").read_text())
    rows = {(r["width"], r["depth"]): r for r in result["rows"]}
    assert set(rows) == {(8, 1), (8, 2), (16, 1), (16, 2)} and result["score"] == "validation NLL"
    assert all(r["steps"] == 3 for r in rows.values())  # the same fixed budget for every size
    # wider and deeper students hold more parameters; every score is a finite NLL
    assert rows[(8, 1)]["parameters"] < rows[(16, 1)]["parameters"] < rows[(16, 2)]["parameters"]
    assert rows[(8, 1)]["parameters"] < rows[(8, 2)]["parameters"]
    assert all(0 < r["validation"] < 50 for r in rows.values())
    eligible = [r for r in rows.values() if r["parameter_ratio"] <= 0.8]
    assert result["pick"] == min(eligible, key=lambda r: r["validation"])
    # each width its own relevance index of k = width, on the base's teacher
    k8 = RelevanceIndex.load(tmp_path / "work-relevance-grad-index-k8" / "data" / "relevance" / "alpaca" / "index.json")
    assert k8.k == 8
    assert "| 16 | 2 | 4 |" in curve.render(result)
    # a rerun trains nothing again
    capsys.readouterr()
    assert curve.main(argv) == 0
    assert json.loads((tmp_path / "curve.json").read_text())["rows"] == result["rows"]
    assert "distill pruned/kd" not in capsys.readouterr().err


def test_the_curve_refuses_a_student_that_is_not_pruned(tmp_path, data_dir):
    from benchmarks import curve

    teacher = save_tiny_llama(tmp_path / "teacher_init")
    (tmp_path / "alpaca.yaml").write_text(yaml.safe_dump(tiny_generation_params("alpaca", data_dir, teacher)))
    with pytest.raises(SystemExit, match="--student random: the curve is of pruned students"):
        curve.main(["--params", str(tmp_path / "alpaca.yaml"), "--student", "random", "--work-dir", str(tmp_path / "w")])


def test_the_head_count_follows_the_width_in_whole_kv_groups():
    from benchmarks.curve import heads_for

    assert heads_for(288, 9, 3) == 9 and heads_for(384, 9, 3) == 6 and heads_for(480, 9, 3) == 6
    assert heads_for(192, 6, 1) == 6 and heads_for(100, 6, 1) == 5
    with pytest.raises(SystemExit, match="width 7: no head count up to 9"):
        heads_for(7, 9, 3)
    # BERT / GPT-2: the head size is the teacher's (MiniLM: 32), so the width sets the head count
    assert heads_for(256, 6, 1, head_size=32) == 8 and heads_for(192, 6, 1, head_size=32) == 6
    with pytest.raises(SystemExit, match="width 200: the teacher's heads are 32 wide"):
        heads_for(200, 6, 1, head_size=32)


def test_mlp_ratios_size_the_mlp_apart_from_the_width(tmp_path, data_dir):
    from benchmarks import curve

    teacher = save_tiny_llama(tmp_path / "teacher_init")  # hidden 32, MLP 64
    (tmp_path / "alpaca.yaml").write_text(yaml.safe_dump(tiny_generation_params("alpaca", data_dir, teacher)))
    argv = ["--params", str(tmp_path / "alpaca.yaml"), "--widths", "16", "--depths", "2", "--mlp-ratios", "1", "3",
            "--steps", "2", "--max-ratio", "1", "--work-dir", str(tmp_path / "work"), "--output", str(tmp_path / "c.json")]
    assert curve.main(argv) == 0
    result = json.loads((tmp_path / "c.json").read_text())
    rows = {r["mlp"]: r for r in result["rows"]}
    assert set(rows) == {16, 48} and all(r["width"] == 16 and r["depth"] == 2 for r in rows.values())
    assert rows[16]["parameters"] < rows[48]["parameters"]  # only the MLP differs
    assert sorted(p.name for p in (tmp_path / "work" / "curve" / "records").iterdir()) == [
        "w16-d2-mlp16.json", "w16-d2-mlp48.json"]
    assert "| 16 | 2 | 4 | 48 |" in curve.render(result)
    # more channels than the teacher's MLP has cannot be pruned from it: refused before any training, naming the flag
    with pytest.raises(SystemExit, match="--mlp-ratios 5: 80 MLP channels at width 16; pruning keeps between 1 and the teacher's 64"):
        curve.main(argv[:6] + ["--mlp-ratios", "5"] + argv[8:])
