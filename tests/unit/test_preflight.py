"""Bad params fail before any compute, naming the key: the schema's errors and the pre-flight checks
(flexkd.preflight) that need the data directory and the models' configs.

Each case runs the pipeline flow (``pipeline_flow.fn``: what ``python -m flows.pipeline`` runs, without Prefect)
on a project whose params.yaml has one mistake, with tripwires on everything that would be compute: ``dvc repro``
(the stages), loading model weights, and MLflow. The error must come first and name the key.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flexkd.config import parse_config
from flexkd.errors import ConfigError, DataError
from flexkd.preflight import check
from tests.integration.project import save_tiny_bert, tiny_params


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny BERT teacher (d_T = 32, 2 layers, 2 heads), a student of the same tokenizer (hidden 16), and one
    whose tokenizer has another vocabulary."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    root = tmp_path_factory.mktemp("preflight-models")
    teacher = save_tiny_bert(root / "teacher", hidden=32, layers=2, heads=2)
    same = save_tiny_bert(root / "student-same-tokenizer", hidden=16, layers=1, heads=2)
    other = root / "student-other-tokenizer"
    other.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"word{i}" for i in range(27)]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(other)
    BertForSequenceClassification(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32)).save_pretrained(other)
    return {"teacher": teacher, "same": same, "other": other}


@pytest.fixture
def project(tmp_path, models):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("train.tsv", "test.tsv"):
        (raw / name).write_text("sentence\tlabel\na fine film\t1\na dull film\t0\n")
    params = tiny_params(raw, models["teacher"])
    params["data"].update(train_file="train.tsv", test_file="test.tsv")
    root = tmp_path / "project"
    root.mkdir()

    def write(**overrides) -> Path:
        for dotted, value in overrides.items():
            node = params
            *parents, last = dotted.split(".")
            for key in parents:
                node = node[key]
            node[last] = value
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        return root

    return write


@pytest.fixture
def tripwires(monkeypatch):
    """Fail loudly if anything past the checks runs: the stages (dvc repro), model weights, MLflow."""
    import safetensors.torch
    import torch
    from transformers import PreTrainedModel

    import flexkd.tracking
    import flows.pipeline

    ran: list[str] = []

    def trip(what):
        def tripped(*args, **kwargs):
            ran.append(what)
            raise AssertionError(f"{what} ran before the bad param was reported")
        return tripped

    monkeypatch.setattr(flows.pipeline.subprocess, "run", trip("dvc repro"))
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(lambda cls, *a, **k: trip("weights")()))
    monkeypatch.setattr(safetensors.torch, "load_file", trip("weights"))
    monkeypatch.setattr(torch, "load", trip("weights"))
    monkeypatch.setattr(flexkd.tracking, "setup", trip("MLflow"))
    return ran


def _run_pipeline(root: Path, monkeypatch):
    from flows.pipeline import pipeline_flow

    monkeypatch.setenv("FLEXKD_PROJECT_ROOT", str(root))
    pipeline_flow.fn()


CASES = {
    # the schema (flexkd.config)
    "unknown method": ({"distill.methods": ["ft", "distilbert"]}, ConfigError, "distill.methods"),
    "unknown feature loss": ({"distill.flexkd_loss": "cosine"}, ConfigError, "distill.flexkd_loss"),
    "unknown logit loss": ({"distill.logit_loss": "kl"}, ConfigError, "distill.logit_loss"),
    "negative learning rate": ({"distill.train.lr": -1e-3}, ConfigError, "distill.train.lr"),
    "zero batch": ({"distill.train.batch_size": 0}, ConfigError, "distill.train.batch_size"),
    # the pre-flight checks (flexkd.preflight)
    "k > d_T": ({"students.random.hidden_size": 64, "students.pruned.hidden_size": 64}, ConfigError,
                "students.random.hidden_size: 64 is more than the teacher's hidden size d_T = 32"),
    "missing data dir": ({"data.data_dir": "/nonexistent/flexkd-data"}, DataError, "data.data_dir"),
    "missing train file": ({"data.train_file": "nope.tsv"}, DataError, "data.train_file"),
    "missing test file": ({"data.test_file": "nope.tsv"}, DataError, "data.test_file"),
    "missing teacher": ({"teacher.model": "/nonexistent/teacher"}, ConfigError, "teacher.model"),
    "tokenizer mismatch": ({"students.random.init": "path", "students.random.path": "<other>"}, ConfigError,
                           "students.random.path"),
    "path student of another hidden size": ({"students.random.init": "path", "students.random.path": "<teacher>"},
                                            ConfigError, "students.random.hidden_size: 16, but the model at"),
    "pruned: more layers than the teacher": ({"students.pruned.num_layers": 3}, ConfigError,
                                             "students.pruned.num_layers: 3 is more than the teacher's 2 layers"),
    "pruned: layer out of range": ({"students.pruned.prune_layers": [0, 5]}, ConfigError,
                                   "students.pruned.prune_layers: [5] out of range"),
    "pruned: heads that do not fit": ({"students.pruned.num_heads": 2}, ConfigError, "students.pruned.num_heads"),
    "pruned: more MLP channels than the teacher": ({"students.pruned.intermediate_size": 128}, ConfigError,
                                                   "students.pruned.intermediate_size"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_param_fails_before_any_compute_naming_the_key(case, project, models, tripwires, monkeypatch):
    overrides, error, needle = CASES[case]
    overrides = {k: str(models[v[1:-1]]) if isinstance(v, str) and v.startswith("<") else v
                 for k, v in overrides.items()}
    root = project(**overrides)
    before = (root / "params.yaml").read_text()
    with pytest.raises(error) as err:
        _run_pipeline(root, monkeypatch)
    assert needle in str(err.value)
    assert tripwires == []  # nothing past the checks ran
    assert not (root / "mlflow.db").exists() and not (root / ".flexkd").exists() and not (root / "data").exists()
    assert (root / "params.yaml").read_text() == before


def test_distill_stage_checks_too_before_loading_anything(project, tripwires, monkeypatch):
    """Run on its own (python -m flows.distill, a deployment), the distill stage makes the same checks first."""
    import flexkd.launch
    from flows.distill import distill_flow

    monkeypatch.setattr(flexkd.launch, "run_training", lambda *a, **k: tripwires.append("training"))
    root = project(**{"students.random.hidden_size": 48, "students.pruned.hidden_size": 48})
    monkeypatch.setenv("FLEXKD_PROJECT_ROOT", str(root))
    with pytest.raises(ConfigError, match="students.random.hidden_size: 48 is more than the teacher's hidden size"):
        distill_flow.fn(student="random", method="flexkd")
    assert tripwires == []


def test_good_params_pass(project, models):
    root = project(**{"students.random.init": "path", "students.random.path": str(models["same"])})
    cfg = parse_config(yaml.safe_load((root / "params.yaml").read_text()))
    assert check(cfg) == []
    hub = parse_config({**yaml.safe_load((root / "params.yaml").read_text()),
                        "data": {"task": "sst2", "source": "hub", "hub_id": "glue", "hub_config": "sst2",
                                 "columns": {"text": "sentence", "label": "label"}}})
    assert "data.source is hub" in check(hub)[0]  # noted, not checked: the validate stage loads it


def test_k_equal_to_d_t_is_fine(project, models):
    root = project(**{"students.random.hidden_size": 32, "students.pruned.hidden_size": 32,
                      "students.pruned.num_heads": 2})
    check(parse_config(yaml.safe_load((root / "params.yaml").read_text())))
