import json

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from flexkd.config import TrainConfig
from flexkd.data.tokenize import PadCollator
from flexkd.errors import ProvenanceError
from flexkd.losses import build_objective
from flexkd.runtime import epoch_order
from flexkd.train import Interrupted, distillation_loss, seed_everything, task_loss, train_loop, warmup_linear_decay


def bert(hidden, seed, layers=1):
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(vocab_size=40, hidden_size=hidden, num_hidden_layers=layers,
                                                    num_attention_heads=2, intermediate_size=hidden * 2, num_labels=2,
                                                    hidden_dropout_prob=0.1))


def data(n=40):
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        length = 3 + int(torch.randint(0, 6, (1,), generator=g))
        ids = [1] + torch.randint(5, 40, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "token_type_ids": [0] * len(ids), "labels": ids[1] % 2})
    return rows


SETTINGS = TrainConfig(epochs=2, batch_size=8, lr=1e-3, warmup_ratio=0.2, checkpoint_every=3, eval_every=4, log_every=1)


def test_schedule_warms_up_then_decays_to_zero():
    f = warmup_linear_decay(10, 0.2)
    assert [round(f(s), 3) for s in range(10)] == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]


def test_schedule_is_transformers_linear_warmup_but_for_the_warmup():
    """Why warmup_linear_decay is not transformers' get_linear_schedule_with_warmup: theirs starts the warmup at
    factor 0 (step s gets s / warmup: the first step trains with lr 0), ours at 1 / warmup ((s + 1) / warmup).
    After the warmup the two are the same, float for float."""
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=10).lr_lambdas[0]
    ours = warmup_linear_decay(10, 0.2)
    assert [theirs(s) for s in range(2)] == [0.0, 0.5] and [ours(s) for s in range(2)] == [0.5, 1.0]
    assert [theirs(s) for s in range(2, 10)] == [ours(s) for s in range(2, 10)]
    no_warmup = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=10).lr_lambdas[0]
    assert [no_warmup(s) for s in range(10)] == [warmup_linear_decay(10, 0.0)(s) for s in range(10)]


def test_seeding_is_transformers_set_seed_and_takes_any_seed():
    """Why seed_everything is not transformers.set_seed: below 2**32 they set the same Python, numpy and torch
    states, but project.seed has no upper bound and set_seed fails from 2**32 on (numpy's limit)."""
    import random

    import numpy as np
    from transformers import set_seed

    def states():
        return random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state()

    for seed in (0, 42, 2**32 - 1):
        seed_everything(seed)
        ours = states()
        set_seed(seed)
        theirs = states()
        assert ours[:2] == theirs[:2] and torch.equal(ours[2], theirs[2]), seed
    seed_everything(2**40)
    with pytest.raises(ValueError, match="2\\*\\*32"):
        set_seed(2**40)


def test_epoch_order_depends_on_seed_and_epoch_only():
    assert epoch_order(10, 1, 0) == epoch_order(10, 1, 0)
    assert epoch_order(10, 1, 0) != epoch_order(10, 1, 1)
    assert sorted(epoch_order(10, 2, 3)) == list(range(10))


def _run_flexkd(work_dir, stop_after=None, fingerprint="fp"):
    teacher, student = bert(16, 0, layers=2), bert(8, 1)
    objective = build_objective("projector", student_hidden=8, teacher_hidden=16)
    logged = []
    result = train_loop(
        model=student, loss_fn=distillation_loss(student, teacher, objective), extra=objective, train_data=data(),
        collate=PadCollator(0), settings=SETTINGS, seed=5, work_dir=work_dir, fingerprint=fingerprint,
        log=lambda m, s: logged.append((s, m)), stop_after=stop_after, progress=False,
    )
    return student, objective, result, logged


def test_interrupted_run_resumes_to_identical_weights(tmp_path):
    full, full_obj, full_result, logged = _run_flexkd(tmp_path / "a")
    assert full_result.total_steps == 10
    # every loss term is logged separately
    keys = set(logged[0][1])
    assert {"train/task", "train/kd", "train/feature/projector", "train/total", "train/lr"} <= keys
    with pytest.raises(Interrupted):
        _run_flexkd(tmp_path / "b", stop_after=7)  # last checkpoint at step 6: step 7 is redone
    resumed, resumed_obj, result, _ = _run_flexkd(tmp_path / "b")
    assert result.resumed_from == 6
    for name, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    for name, value in full_obj.state_dict().items():  # the projector resumes too
        assert torch.equal(value, resumed_obj.state_dict()[name]), name


def test_checkpoint_of_other_inputs_or_corrupted_is_refused(tmp_path):
    with pytest.raises(Interrupted):
        _run_flexkd(tmp_path, stop_after=3)
    with pytest.raises(ProvenanceError, match="fingerprint"):
        _run_flexkd(tmp_path, fingerprint="other")
    state = tmp_path / "checkpoint" / "state.json"
    meta = json.loads(state.read_text())
    meta["step"] = 1
    state.write_text(json.dumps(meta))
    with pytest.raises(ProvenanceError, match="manifest"):
        _run_flexkd(tmp_path)


def test_half_written_checkpoint_is_ignored(tmp_path):
    # a crash while writing leaves only a temp directory, which is never read
    (tmp_path / ".checkpoint.tmp-dead").mkdir(parents=True)
    (tmp_path / ".checkpoint.tmp-dead" / "state.json").write_text("{")
    _, _, result, _ = _run_flexkd(tmp_path)
    assert result.resumed_from is None and result.state.step == 10


def test_best_checkpoint_selected_on_validation(tmp_path):
    model = bert(8, 2)
    scores = iter([0.5, 0.9, 0.7])
    result = train_loop(
        model=model, loss_fn=task_loss(model), train_data=data(), collate=PadCollator(0),
        settings=SETTINGS, seed=0, work_dir=tmp_path, fingerprint="x",
        evaluate=lambda m: {"accuracy": next(scores)}, select_metric="accuracy", progress=False,
    )
    assert result.state.best_step == 8 and result.state.best_score == 0.9
    assert result.model_dir == tmp_path / "best"
    from safetensors.torch import load_file
    best = load_file(tmp_path / "best" / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in best.items())


def test_checkpoint_lost_between_the_two_renames_is_restored(tmp_path):
    """atomic_dir moves the old checkpoint aside, then renames the new one in; a kill between the two leaves only
    `.checkpoint.old-*`: the rerun puts it back and resumes from it instead of starting over."""
    import os

    with pytest.raises(Interrupted):
        _run_flexkd(tmp_path, stop_after=6)
    checkpoint = tmp_path / "checkpoint"
    os.replace(checkpoint, tmp_path / ".checkpoint.old-deadbeef")  # the state a kill in the window leaves
    (tmp_path / ".checkpoint.tmp-cafe").mkdir()  # and a half-written new one, never read
    _, _, result, _ = _run_flexkd(tmp_path)
    assert result.resumed_from == 6 and checkpoint.exists()


def test_patience_stops_after_evaluations_without_a_new_best_and_keeps_the_best(tmp_path):
    model = bert(8, 2)
    settings = SETTINGS.model_copy(update={"epochs": 10, "eval_every": 2, "patience": 2})  # 50 steps budgeted
    scores = iter([0.5, 0.8, 0.7, 0.75, 0.99, 0.99])
    result = train_loop(
        model=model, loss_fn=task_loss(model), train_data=data(), collate=PadCollator(0),
        settings=settings, seed=0, work_dir=tmp_path, fingerprint="x",
        evaluate=lambda m: {"accuracy": next(scores)}, select_metric="accuracy", progress=False,
    )
    # evaluations at steps 2, 4, 6, 8: the best (0.8) at step 4, then two without a new best: stop at step 8
    assert result.total_steps == 50 and result.state.step == 8 and result.state.best_step == 4
    assert "no better validation accuracy in 2 evaluations since step 4 (patience 2)" == result.state.stopped_early
    assert result.model_dir == tmp_path / "best"
    # the stop is in the checkpoint: a rerun resumes there and trains no further
    again = train_loop(
        model=bert(8, 2), loss_fn=task_loss(model), train_data=data(), collate=PadCollator(0),
        settings=settings, seed=0, work_dir=tmp_path, fingerprint="x",
        evaluate=lambda m: pytest.fail("a stopped run does not evaluate again"), select_metric="accuracy", progress=False,
    )
    assert again.resumed_from == 8 and again.state.step == 8 and again.state.stopped_early


def test_a_time_budget_stops_with_a_last_evaluation(tmp_path, monkeypatch):
    import flexkd.train

    clock = iter(range(0, 10_000, 30))  # every step "takes" 30 s of training time
    monkeypatch.setattr(flexkd.train.time, "perf_counter", lambda: float(next(clock)))
    model = bert(8, 2)
    settings = SETTINGS.model_copy(update={"epochs": 10, "eval_every": 100, "max_minutes": 2.0})
    evaluated = []
    result = train_loop(
        model=model, loss_fn=task_loss(model), train_data=data(), collate=PadCollator(0),
        settings=settings, seed=0, work_dir=tmp_path, fingerprint="x",
        evaluate=lambda m: evaluated.append(1) or {"accuracy": 0.5}, select_metric="accuracy", progress=False,
    )
    assert result.state.step == 4 and evaluated == [1]  # 4 steps x 30 s = 2 minutes, evaluated once, then stopped
    assert result.state.stopped_early.startswith("the time budget is spent: 2.0 of max_minutes 2")
    with pytest.raises(ValueError, match="max_minutes needs num_processes 1"):
        TrainConfig(batch_size=8, max_minutes=1.0, num_processes=2)


def test_weight_average_moves_each_weight_towards_the_model_with_the_warmed_up_decay():
    from flexkd.averaging import WeightAverage

    layer = torch.nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.fill_(0.0), layer.bias.fill_(1.0)
    average = WeightAverage(layer, decay=0.9)
    expected_w, expected_b = 0.0, 1.0
    for n, value in enumerate([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0], start=1):
        with torch.no_grad():
            layer.weight.fill_(value), layer.bias.fill_(-value)
        decay = min(0.9, (1 + n) / (10 + n))  # 2/11, 3/12, ... then 0.9 from n = 80; here the warm-up rates
        assert average.rate() == pytest.approx(decay)
        average.update()
        expected_w = decay * expected_w + (1 - decay) * value
        expected_b = decay * expected_b + (1 - decay) * -value
    assert average.updates == 12
    assert average.shadow[0].flatten().tolist() == pytest.approx([expected_w, expected_w])
    assert average.shadow[1].tolist() == pytest.approx([expected_b])
    with average.applied():  # the averages inside the block, the raw weights after it
        assert layer.weight.flatten().tolist() == pytest.approx([expected_w, expected_w])
    assert layer.weight.tolist() == [[12.0, 12.0]] and layer.bias.tolist() == [-12.0]
    average.updates = 10_000
    assert average.rate() == 0.9  # the configured decay once warmed up


def _run_averaged(work_dir, stop_after=None, select=True, seen=None):
    model = bert(8, 2)
    settings = SETTINGS.model_copy(update={"ema_decay": 0.8})

    def evaluate(m):
        seen.append({k: v.clone() for k, v in m.state_dict().items()})
        return {"accuracy": [0.5, 0.9, 0.7][len(seen) - 1]}

    result = train_loop(
        model=model, loss_fn=task_loss(model), train_data=data(), collate=PadCollator(0), settings=settings, seed=0,
        work_dir=work_dir, fingerprint="x", evaluate=evaluate if select else None, select_metric="accuracy" if select else None,
        stop_after=stop_after, progress=False,
    )
    return model, result


def test_ema_decay_validates_and_keeps_the_averaged_weights_and_resumes_them(tmp_path):
    from safetensors.torch import load_file

    seen = []
    model, result = _run_averaged(tmp_path / "a", seen=seen)
    assert result.state.best_step == 8 and result.model_dir == tmp_path / "a" / "best"
    best = load_file(tmp_path / "a" / "best" / "model.safetensors")
    assert all(torch.equal(seen[1][k], v) for k, v in best.items())  # the weights validation scored are kept
    assert all(torch.equal(model.state_dict()[k], v) for k, v in best.items())
    raw = load_file(tmp_path / "a" / "checkpoint" / "model" / "model.safetensors")  # training goes on from these
    key = "bert.encoder.layer.0.output.dense.weight"
    assert not torch.equal(raw[key], seen[2][key])  # validation at step 10 scored the average, not the raw weights

    # without selection the last averaged weights are kept; a run stopped after step 7 (checkpoint at step 6)
    # resumes its average too and ends with the same weights as one that never stopped
    whole, whole_result = _run_averaged(tmp_path / "b", select=False)
    assert whole_result.model_dir == tmp_path / "b" / "averaged"
    last = load_file(tmp_path / "b" / "checkpoint" / "model" / "model.safetensors")
    assert not torch.equal(whole.state_dict()[key], last[key])
    with pytest.raises(Interrupted):
        _run_averaged(tmp_path / "c", stop_after=7, select=False)
    resumed, resumed_result = _run_averaged(tmp_path / "c", select=False)
    assert resumed_result.resumed_from == 6
    for name, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_ema_decay_is_refused_with_sharded_weights_and_a_checkpoint_without_an_average(tmp_path):
    with pytest.raises(ValueError, match="ema_decay needs the whole weights on every rank"):
        TrainConfig(batch_size=8, ema_decay=0.99, num_processes=2, distributed="fsdp")
    TrainConfig(batch_size=8, ema_decay=0.99, num_processes=2, distributed="ddp")
    model = bert(8, 2)
    with pytest.raises(Interrupted):
        train_loop(model=model, loss_fn=task_loss(model), train_data=data(), collate=PadCollator(0), settings=SETTINGS,
                   seed=0, work_dir=tmp_path, fingerprint="x", stop_after=4, progress=False)
    with pytest.raises(ProvenanceError, match="no weight average"):
        _run_averaged(tmp_path, select=False)
