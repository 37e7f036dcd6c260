"""Safe loading only: weights as safetensors, torch.load(weights_only=True), no pickles from artifacts, and a
model's custom code runs only when the param teacher.trust_remote_code turns it on.

Two kinds of checks: the code paths themselves (every ``torch.load`` / ``np.load`` / pickle call and every model
``save_pretrained`` in flexkd/ and flows/, read from the AST), and what happens when a hostile file is loaded (a
pickle payload in place of weights or of a checkpoint's trainer state; a model directory that asks to run its own
code): refused, and the payload never runs.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from transformers import BertConfig, BertForSequenceClassification

from flexkd.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted((REPO / "flexkd").rglob("*.py")) + sorted((REPO / "flows").glob("*.py"))
# The one pickle flexkd reads: the job file of multi-process training (flexkd/launch.py), which the stage process
# writes a moment before into its own scratch directory for the ranks it starts. Never an artifact from elsewhere.
ALLOWED_PICKLE_LOADS = {("flexkd/launch.py", "cloudpickle.load")}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _calls():
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                yield f"{path.relative_to(REPO)}", node, _dotted(node.func)


def _keyword(call: ast.Call, name: str):
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value
    return None


# ----------------------------------------------------------------------------------------------- the code paths
def test_every_torch_load_is_weights_only():
    loads = [(where, call) for where, call, name in _calls() if name == "torch.load"]
    assert loads, "expected the resume paths (flexkd/train.py, flexkd/launch.py) to call torch.load"
    for where, call in loads:
        flag = _keyword(call, "weights_only")
        assert isinstance(flag, ast.Constant) and flag.value is True, \
            f"{where}:{call.lineno}: torch.load without weights_only=True"


def test_no_pickle_is_read_from_an_artifact():
    for where, call, name in _calls():
        module, _, function = name.rpartition(".")
        if function in ("load", "loads") and module in ("pickle", "cloudpickle", "dill", "joblib"):
            assert (where, name) in ALLOWED_PICKLE_LOADS, f"{where}:{call.lineno}: {name}"
        if name in ("np.load", "numpy.load"):
            flag = _keyword(call, "allow_pickle")
            assert flag is None or (isinstance(flag, ast.Constant) and flag.value is False), f"{where}:{call.lineno}"


def test_models_are_saved_as_safetensors():
    saves = [(where, call) for where, call, name in _calls()
             if name.endswith(".save_pretrained") and "tokenizer" not in name.lower()]
    assert saves
    for where, call in saves:
        flag = _keyword(call, "safe_serialization")
        assert isinstance(flag, ast.Constant) and flag.value is True, \
            f"{where}:{call.lineno}: save_pretrained without safe_serialization=True"


def test_checkpoints_on_disk_are_safetensors_and_weights_only(tmp_path):
    from flexkd.models import save_checkpoint
    from flexkd.train import TrainState, load_training_checkpoint, save_training_checkpoint

    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32))
    save_checkpoint(model, None, tmp_path / "student")
    files = {p.name for p in (tmp_path / "student").iterdir()}
    assert "model.safetensors" in files and not {f for f in files if f.endswith((".bin", ".pt", ".pkl"))}

    optimizer = torch.optim.AdamW(model.parameters())
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_training_checkpoint(tmp_path / "checkpoint", model=model, extra=None, optimizer=optimizer, scheduler=scheduler,
                             state=TrainState(step=3), fingerprint="fp")
    assert [p.name for p in (tmp_path / "checkpoint" / "model").glob("*.safetensors")] == ["model.safetensors"]
    blob, state = load_training_checkpoint(tmp_path / "checkpoint", fingerprint="fp")  # weights_only=True inside
    assert state.step == 3 and set(blob) >= {"optimizer", "scheduler", "torch_rng"}


# ----------------------------------------------------------------------------------------------- hostile files
class _Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    from flexkd.models import load_classifier
    from flexkd.provenance import sha256_file
    from flexkd.train import load_training_checkpoint

    marker = tmp_path / "PAYLOAD_RAN"
    # weights as a pickle (pytorch_model.bin) instead of safetensors
    model_dir = tmp_path / "model"
    BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32).save_pretrained(model_dir)
    torch.save({"bert.embeddings.word_embeddings.weight": _Payload(marker)}, model_dir / "pytorch_model.bin")
    with pytest.raises(Exception):  # noqa: B017 - refused, whichever error transformers / torch raise
        load_classifier(str(model_dir))
    assert not marker.exists()

    # a training checkpoint whose trainer state is a payload, with a manifest that matches it: only
    # weights_only=True stands between the file and the code it carries
    checkpoint = tmp_path / "checkpoint"
    (checkpoint / "model").mkdir(parents=True)
    torch.save({"optimizer": _Payload(marker)}, checkpoint / "trainer_state.pt")
    (checkpoint / "state.json").write_text(json.dumps({"fingerprint": "fp", "step": 1}))
    manifest = {str(p.relative_to(checkpoint)): sha256_file(p) for p in sorted(checkpoint.rglob("*")) if p.is_file()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        load_training_checkpoint(checkpoint, fingerprint="fp")
    assert not marker.exists()


CUSTOM_CODE = '''
import os

from transformers import BertConfig, BertForSequenceClassification

open(os.environ["FLEXKD_TEST_CUSTOM_CODE_MARKER"], "a").write("ran\\n")


class CustomConfig(BertConfig):
    model_type = "flexkd-custom"


class CustomModel(BertForSequenceClassification):
    config_class = CustomConfig
'''


@pytest.fixture
def custom_code_model(tmp_path, monkeypatch):
    """A model directory whose config.json asks for its own modeling code (auto_map), which leaves a marker."""
    import transformers.dynamic_module_utils

    directory = tmp_path / "custom-model"
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(directory)
    raw = json.loads((directory / "config.json").read_text())
    raw.update(model_type="flexkd-custom", auto_map={"AutoConfig": "custom_model.CustomConfig",
                                                     "AutoModelForSequenceClassification": "custom_model.CustomModel"})
    (directory / "config.json").write_text(json.dumps(raw))
    (directory / "custom_model.py").write_text(CUSTOM_CODE)
    marker = tmp_path / "CUSTOM_CODE_RAN"
    monkeypatch.setenv("FLEXKD_TEST_CUSTOM_CODE_MARKER", str(marker))
    # transformers copies allowed custom code into its modules cache: keep that in the test's directory
    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    return directory, marker


def _config(teacher: Path, trust: bool):
    from flexkd.config import parse_config

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["teacher"].update(model=str(teacher), trust_remote_code=trust)
    return parse_config(raw)


def test_trust_remote_code_is_off_by_default():
    from flexkd import models, preflight
    from flexkd.config import TeacherConfig, load_config

    assert TeacherConfig().trust_remote_code is False
    assert load_config(REPO / "params.yaml").teacher.trust_remote_code is False
    for profile in sorted((REPO / "profiles").glob("*.yaml")):
        assert load_config(profile).teacher.trust_remote_code is False, profile.name
    for function in (models.load_tokenizer, models.load_classifier, models.load_causal_lm, preflight.model_config):
        assert inspect.signature(function).parameters["trust_remote_code"].default is False, function.__name__
    hard_coded = "trust_remote_code=" + "True"  # spelt in two parts so that this file is no hit of the same scan
    for path in SOURCES:
        assert hard_coded not in path.read_text(encoding="utf-8").replace(" ", ""), path


def test_custom_code_runs_only_when_the_param_turns_it_on(custom_code_model):
    from flexkd.preflight import check
    from flexkd.tasks import task_for

    directory, marker = custom_code_model
    off = _config(directory, trust=False)
    with pytest.raises(ConfigError, match="teacher.model: .* needs custom modeling code .* teacher.trust_remote_code"):
        check(off, data=False)  # the pipeline's pre-flight check says so before anything runs
    with pytest.raises(ValueError, match="trust_remote_code"):
        task_for(off).load_model(str(directory))  # and the stage's own loader refuses it too
    assert not marker.exists()

    model = task_for(_config(directory, trust=True)).load_model(str(directory))
    assert type(model).__name__ == "CustomModel" and marker.read_text() == "ran\n"
    assert os.environ["FLEXKD_TEST_CUSTOM_CODE_MARKER"] == str(marker)
