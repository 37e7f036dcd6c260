"""flexkd.runtime: device and precision resolution, length-grouped batches, the training loop under them."""

import math

import pytest
import torch

from flexkd import runtime as rt
from flexkd.config import RuntimeConfig, TrainConfig, parse_config
from flexkd.data.tokenize import PadCollator
from flexkd.errors import ConfigError
from flexkd.losses import build_objective
from flexkd.train import Interrupted, distillation_loss, train_loop
from tests.unit.test_train import bert, data


def _fake_gpus(monkeypatch, count, bf16=True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake GPU")


def test_auto_is_the_cpu_here_and_cuda_without_cuda_is_refused_naming_the_setting(monkeypatch):
    _fake_gpus(monkeypatch, 0)
    assert rt.resolve_device("auto") == torch.device("cpu")
    for setting in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError) as err:
            rt.resolve_device(setting)
        assert str(err.value).startswith(f"runtime.device: '{setting}' is not on this machine: it has no CUDA device")
        assert "'cpu' or 'auto'" in str(err.value)
    with pytest.raises(ConfigError, match="not a device"):
        rt.resolve_device("tpu")


def test_cuda_devices_are_counted_and_ranks_get_their_own(monkeypatch):
    _fake_gpus(monkeypatch, 2)
    assert rt.resolve_device("auto") == torch.device("cuda", 0)
    assert rt.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert rt.resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"has 2 CUDA device\(s\) \(cuda:0 to cuda:1\)"):
        rt.resolve_device("cuda:2")


def test_precision_auto_is_fp32_on_the_cpu_and_bf16_or_fp16_on_cuda(monkeypatch):
    cpu = torch.device("cpu")
    assert rt.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(rt, "cpu_has_bf16", lambda: True)
    assert rt.resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ConfigError, match="runtime.precision: 'fp16' needs a CUDA device"):
        rt.resolve_precision("fp16", cpu)
    _fake_gpus(monkeypatch, 1, bf16=True)
    assert rt.resolve_precision("auto", torch.device("cuda", 0)) == "bf16"
    _fake_gpus(monkeypatch, 1, bf16=False)
    assert rt.resolve_precision("auto", torch.device("cuda", 0)) == "fp16"
    with pytest.raises(ConfigError, match="no bfloat16 support"):
        rt.resolve_precision("bf16", torch.device("cuda", 0))


def test_bf16_on_a_cpu_without_bfloat16_instructions_warns_that_it_is_slow(monkeypatch):
    monkeypatch.setattr(rt, "cpu_has_bf16", lambda: False)
    with pytest.warns(UserWarning, match="without bfloat16 instructions.*'auto' keeps fp32"):
        assert rt.resolve_precision("bf16", torch.device("cpu")) == "bf16"  # still honoured: the user asked for it
    assert rt.resolve_precision("auto", torch.device("cpu")) == "fp32"


def test_the_optimizer_is_fused_adamw_for_float32_parameters_on_the_device():
    model = torch.nn.Linear(4, 2)
    groups = [{"params": list(model.parameters()), "weight_decay": 0.0}]
    optimizer = rt.Runtime().optimizer(groups, lr=0.1)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True
    before = model.weight.detach().clone()
    model(torch.ones(3, 4)).sum().backward()
    optimizer.step()  # the fused CPU kernel runs and moves the weights
    assert not torch.equal(before, model.weight)
    half = torch.nn.Linear(4, 2).to(torch.bfloat16)  # not float32: the plain kernel
    assert not rt.Runtime().optimizer([{"params": list(half.parameters())}], lr=0.1).defaults["fused"]


def test_teacher_dtype_follows_precision_on_cuda_only(monkeypatch):
    _fake_gpus(monkeypatch, 0)
    assert rt.resolve(RuntimeConfig(precision="bf16")).teacher_dtype == torch.float32
    assert rt.resolve(RuntimeConfig(precision="bf16", teacher_dtype="bf16")).teacher_dtype == torch.bfloat16
    # the schema refuses what is not a device before anything resolves
    with pytest.raises(ConfigError, match="runtime.device"):
        parse_config({"data": {"task": "t", "train_file": "a.tsv", "test_size": 10,
                               "columns": {"text": "s", "label": "l"}}, "runtime": {"device": "gpu0"}})


def test_batches_without_lengths_cut_the_seeded_permutation():
    got = rt.batches(10, 4, seed=3, epoch=1)
    flat = [i for b in got for i in b]
    assert [len(b) for b in got] == [4, 4, 2] and sorted(flat) == list(range(10))
    generator = torch.Generator().manual_seed(3 * 1_000_003 + 1)
    assert flat == torch.randperm(10, generator=generator).tolist()


def test_grouped_batches_cover_every_row_once_pad_less_and_depend_on_seed_and_epoch_only():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 120, (1000,), generator=g).tolist()
    plain = rt.batches(1000, 32, seed=1, epoch=0)
    grouped = rt.batches(1000, 32, seed=1, epoch=0, lengths=lengths, mega=8)
    assert len(grouped) == len(plain) == math.ceil(1000 / 32)
    assert sorted(i for b in grouped for i in b) == list(range(1000))
    assert sum(len(b) < 32 for b in grouped) == 1  # only the last mega-batch ends short
    assert grouped == rt.batches(1000, 32, seed=1, epoch=0, lengths=lengths, mega=8)
    assert grouped != rt.batches(1000, 32, seed=1, epoch=1, lengths=lengths, mega=8)
    assert grouped != rt.batches(1000, 32, seed=2, epoch=0, lengths=lengths, mega=8)
    # the batch with the longest row comes first: a run that will not fit fails at its first step
    assert max(lengths[i] for i in grouped[0]) == max(lengths)
    p, q = rt.padding_stats(plain, lengths), rt.padding_stats(grouped, lengths)
    assert p["real_tokens"] == q["real_tokens"] == sum(lengths)
    assert q["padding_tokens"] < 0.25 * p["padding_tokens"]
    # batches are shuffled, not sorted by length over the epoch
    firsts = [max(lengths[i] for i in b) for b in grouped[1:]]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)


SETTINGS = TrainConfig(epochs=2, batch_size=8, lr=1e-3, warmup_ratio=0.2, checkpoint_every=3, eval_every=4, log_every=1)


def _distill(work_dir, runtime, stop_after=None):
    teacher, student = bert(16, 0, layers=2), bert(8, 1)
    objective = build_objective("flexkd", student_hidden=8, teacher_hidden=16, selected_units=torch.arange(0, 16, 2))
    seen = []

    def collate(rows):
        seen.append(max(len(r["input_ids"]) for r in rows))
        return PadCollator(0)(rows)

    result = train_loop(model=student, loss_fn=distillation_loss(student, teacher, objective), train_data=data(64),
                        collate=collate, settings=SETTINGS, seed=5, work_dir=work_dir, fingerprint="fp",
                        stop_after=stop_after, progress=False, runtime=runtime, log=None)
    return student, result, seen


def test_length_grouped_training_resumes_exactly(tmp_path):
    grouped = rt.Runtime(group_by_length=True)
    full, result, _ = _distill(tmp_path / "a", grouped)
    with pytest.raises(Interrupted):
        _distill(tmp_path / "b", grouped, stop_after=5)
    resumed, again, _ = _distill(tmp_path / "b", grouped)
    assert again.resumed_from == 3 and result.total_steps == again.total_steps == 16
    for name, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_bf16_autocast_on_the_cpu_keeps_float32_weights_and_learns(tmp_path):
    bf16 = rt.Runtime(precision="bf16", group_by_length=True)
    student, result, _ = _distill(tmp_path, bf16)
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert result.state.step == 16
    with bf16.autocast():
        out = student(input_ids=torch.tensor([[1, 5, 6]]))
    assert out.logits.dtype == torch.bfloat16  # the forward pass did run in bf16
    objective = build_objective("kd", student_hidden=8, teacher_hidden=16)
    with bf16.autocast():  # the loss is formed in float32 whatever the forward ran in
        loss, terms = objective(student_logits=out.logits, labels=torch.tensor([1]),
                                teacher_logits=torch.randn(1, 2).to(torch.bfloat16))
    assert loss.dtype == torch.float32 and terms["kd"].dtype == torch.float32


def test_grouping_shortens_the_padded_batches_the_loop_builds(tmp_path):
    _, _, plain = _distill(tmp_path / "p", rt.Runtime())
    _, _, grouped = _distill(tmp_path / "g", rt.Runtime(group_by_length=True))
    assert len(plain) == len(grouped) == 16
    assert sum(grouped) < sum(plain)
