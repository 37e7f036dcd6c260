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
from flexkd.losses import METHODS
from flexkd.preflight import check, describe
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
    bpe = save_tiny_bert(root / "teacher-bpe-tokenizer", hidden=32, layers=2, heads=2)  # same sizes, a BPE tokenizer
    bpe_tokenizer().save_pretrained(bpe)
    return {"teacher": teacher, "same": same, "other": other, "bpe": bpe}


def bpe_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab={"[PAD]": 0, "[UNK]": 1, "a": 2, "b": 3, "ab": 4}, merges=[("a", "b")],
                                   unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


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
                node = node.setdefault(key, {})
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
    import flows.storage

    ran: list[str] = []

    def trip(what):
        def tripped(*args, **kwargs):
            ran.append(what)
            raise AssertionError(f"{what} ran before the bad param was reported")
        return tripped

    monkeypatch.setattr(flows.storage.subprocess, "run", trip("dvc repro"))
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(lambda cls, *a, **k: trip("weights")()))
    monkeypatch.setattr(safetensors.torch, "load_file", trip("weights"))
    monkeypatch.setattr(torch, "load", trip("weights"))
    monkeypatch.setattr(flexkd.tracking, "setup", trip("MLflow"))
    return ran


def _run_pipeline(root: Path, monkeypatch):
    from flows.pipeline import pipeline_flow

    monkeypatch.setenv("FLEXKD_PROJECT_ROOT", str(root))
    pipeline_flow.fn()


# (the one mistake, the error, the key the message names, what the message says to do about it or why: one or more)
SCHEMA_CASES = {  # flexkd.config: the message names params.yaml, then the key
    "unknown method": ({"distill.methods": ["ft", "distilbert"]}, ConfigError, "distill.methods",
                       f"unknown method(s) ['distilbert']; valid: {list(METHODS)}"),
    "unknown feature loss": ({"distill.flexkd_loss": "cosine"}, ConfigError, "distill.flexkd_loss",
                             "Input should be 'pearson', 'barlow' or 'mse' (got 'cosine')"),
    "unknown logit loss": ({"distill.logit_loss": "kl"}, ConfigError, "distill.logit_loss",
                           "Input should be 'forward_kl'"),
    "negative learning rate": ({"distill.train.lr": -1e-3}, ConfigError, "distill.train.lr",
                               "greater than 0 (got -0.001)"),
    "zero batch": ({"distill.train.batch_size": 0}, ConfigError, "distill.train.batch_size", "greater than 0 (got 0)"),
}
PREFLIGHT_CASES = {  # flexkd.preflight: the message starts with the key
    "a device the machine lacks": ({"runtime.device": "cuda:99"}, ConfigError, "runtime.device",
                                   ("'cuda:99' is not on this machine", "'auto'")),
    "fp16 on the CPU": ({"runtime.device": "cpu", "runtime.precision": "fp16"}, ConfigError, "runtime.precision",
                        "needs a CUDA device"),
    "k > d_T": ({"students.random.hidden_size": 64, "students.pruned.hidden_size": 64}, ConfigError,
                "students.random.hidden_size", ("64 is more than the teacher's hidden size d_T = 32", "so k <= d_T")),
    "missing data dir": ({"data.data_dir": "/nonexistent/flexkd-data"}, DataError, "data.data_dir",
                         "Set the param data.data_dir or the env var FLEXKD_DATA_DIR"),
    "missing train file": ({"data.train_file": "nope.tsv"}, DataError, "data.train_file",
                           "nope.tsv does not exist (data.data_dir resolves to"),
    "missing test file": ({"data.test_file": "nope.tsv"}, DataError, "data.test_file",
                          "nope.tsv does not exist (data.data_dir resolves to"),
    "missing teacher": ({"teacher.model": "/nonexistent/teacher"}, ConfigError, "teacher.model",
                        "/nonexistent/teacher does not exist"),
    "tokenizer mismatch": ({"students.random.init": "path", "students.random.path": "<other>"}, ConfigError,
                           "students.random.path", "does not share the teacher's tokenizer"),
    "path student of another hidden size": ({"students.random.init": "path", "students.random.path": "<teacher>"},
                                            ConfigError, "students.random.hidden_size",
                                            "16, but the model at students.random.path"),
    "pruned: more layers than the teacher": ({"students.pruned.num_layers": 3}, ConfigError,
                                             "students.pruned.num_layers", "3 is more than the teacher's 2 layers"),
    "pruned: layer out of range": ({"students.pruned.prune_layers": [0, 5]}, ConfigError,
                                   "students.pruned.prune_layers", "[5] out of range; the teacher has 2 layers (0..1)"),
    "pruned: heads that do not fit": ({"students.pruned.num_heads": 2}, ConfigError, "students.pruned.num_heads",
                                      "so num_heads must be 1, got 2"),
    "pruned: more MLP channels than the teacher": ({"students.pruned.intermediate_size": 128}, ConfigError,
                                                   "students.pruned.intermediate_size",
                                                   "128 must be an integer in [1, 64]"),
    "vocabulary: train with a tokenizer it cannot cut": ({"teacher.model": "<bpe>", "students.pruned.vocabulary": "train"},
                                                         ConfigError, "students.pruned.vocabulary",
                                                         ("train needs a WordPiece tokenizer", "BPE", "set it to full")),
}
CASES = {**SCHEMA_CASES, **PREFLIGHT_CASES}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_param_fails_before_any_compute_naming_the_key(case, project, models, tripwires, monkeypatch):
    overrides, error, key, remedy = CASES[case]
    overrides = {k: str(models[v[1:-1]]) if isinstance(v, str) and v.startswith("<") else v
                 for k, v in overrides.items()}
    root = project(**overrides)
    before = (root / "params.yaml").read_text()
    with pytest.raises(error) as err:
        _run_pipeline(root, monkeypatch)
    assert type(err.value) is error
    message = str(err.value)
    if case in SCHEMA_CASES:
        assert message.startswith(f"{root / 'params.yaml'}: invalid parameters") and f"{key}: " in message
    else:
        assert message.startswith(f"{key}: ")
    for needle in (remedy,) if isinstance(remedy, str) else remedy:
        assert needle in message
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


def test_a_stage_refuses_a_device_it_cannot_use_before_loading_anything(project, tripwires, monkeypatch):
    """Each stage (here the teacher's fine-tuning, run on its own) checks runtime.device first."""
    from flows.finetune_teacher import finetune_teacher_flow

    root = project(**{"runtime.device": "cuda:99"})
    monkeypatch.setenv("FLEXKD_PROJECT_ROOT", str(root))
    with pytest.raises(ConfigError, match=r"^runtime.device: 'cuda:99' is not on this machine"):
        finetune_teacher_flow.fn()
    assert tripwires == []


def _config(root: Path, **changes):
    params = yaml.safe_load((root / "params.yaml").read_text())
    params.update(changes)
    return parse_config(params)


def test_good_params_pass_with_no_notes(project, models):
    root = project(**{"students.random.init": "path", "students.random.path": str(models["same"])})
    notes = check(_config(root))
    assert notes == []
    assert describe(notes) == "pre-flight checks passed"


def test_what_is_not_checked_is_returned_as_a_note(project, tmp_path):
    root = project()
    hub = _config(root, data={"task": "sst2", "source": "hub", "hub_id": "glue", "hub_config": "sst2",
                              "columns": {"text": "sentence", "label": "label"}})
    notes = check(hub)
    assert len(notes) == 1 and notes[0].startswith("data.source is hub (glue): ")  # noted, not checked
    assert "validate stage" in notes[0]
    assert describe(notes) == f"pre-flight checks passed ({notes[0]})"
    assert check(hub, data=False) == []  # stages that do not read the raw data do not look at it
    # a GGUF teacher whose header transformers cannot read: its sizes are not checked, and the note says so
    gguf = tmp_path / "teacher.gguf"
    gguf.write_bytes(b"not a gguf header")
    notes = check(_config(root, teacher={**yaml.safe_load((root / "params.yaml").read_text())["teacher"],
                                         "model": str(gguf)}))
    assert notes == [f"teacher.model: the config of {gguf} could not be read; teacher sizes were not checked"]


def test_data_false_skips_the_data_and_teacher_checks_against_another_teacher(project, models):
    root = project(**{"data.data_dir": "/nonexistent/flexkd-data", "students.random.hidden_size": 32,
                      "students.pruned.hidden_size": 32, "students.pruned.num_heads": 2})
    cfg = _config(root)
    with pytest.raises(DataError, match="^data.data_dir: "):
        check(cfg)
    assert check(cfg, data=False) == []
    # later stages check against the tuned teacher: its sizes count, not teacher.model's
    with pytest.raises(ConfigError) as err:
        check(cfg, data=False, teacher=str(models["same"]))
    assert str(err.value).startswith(
        f"students.random.hidden_size: 32 is more than the teacher's hidden size d_T = 16 ({models['same']})")


def test_k_equal_to_d_t_is_fine_and_the_next_k_is_not(project, models):
    root = project(**{"students.random.hidden_size": 32, "students.pruned.hidden_size": 32,
                      "students.pruned.num_heads": 2})
    assert check(_config(root)) == []
    root = project(**{"students.random.hidden_size": 34, "students.pruned.hidden_size": 34})  # the next k 2 heads divide
    with pytest.raises(ConfigError, match="^students.random.hidden_size: 34 is more than the teacher's hidden size "
                                          "d_T = 32 .*so k <= d_T$"):
        check(_config(root))
