"""Multi-process training: 2 CPU ranks (gloo) under ``accelerate launch``, started by ``flexkd.launch.run_training``
(the code path the flows use), against one process with the same global batch.

Tolerance: ``ATOL`` = 1e-5 on every weight (model and projector). With dropout off and every example of the
same length, a two-process step computes the same global-batch mean gradient as one process; only the order
of the floating-point sums differs (two share means weighted and averaged by an all-reduce instead of one
mean; the projector's gradients summed across ranks), i.e. float32 rounding, ~1e-7 relative, carried through
ten AdamW steps at lr 1e-3. Measured max abs differences: 1.6e-8 (DDP, 2 vs 1 process), 1.2e-8 (2 -> 1
resume), 3.7e-9 (1 -> 2 resume with FSDP). 1e-5 leaves a wide margin yet catches real errors, which move
weights by the order of the learning rate: measured 2.7e-3 with the shares unweighted, 4.2e-3 with the
projector's gradients not averaged across ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from flexkd.config import TrainConfig, parse_config
from flexkd.data.tokenize import PadCollator
from flexkd.errors import ConfigError
from flexkd.launch import dump_job, launch_command, launch_env, run_training
from flexkd.losses import build_objective
from flexkd.train import Interrupted, distillation_loss, train_loop

ATOL = 1e-5
N_ROWS = 21  # batch 5: shares of 3 and 2 rows, and a last batch of 1 row (rank 1 runs a stand-in with weight 0)


def bert(hidden: int, seed: int, layers: int = 1) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=40, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=hidden * 2,
        num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def rows(n: int = N_ROWS) -> list[dict]:
    """Every row 6 tokens long: token-averaged terms (the projector MSE) then weigh every example alike."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = [1] + torch.randint(5, 40, (5,), generator=g).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * 6, "token_type_ids": [0] * 6, "labels": ids[1] % 2})
    return out


def settings(num_processes: int = 1, **overrides) -> TrainConfig:
    values = dict(epochs=2, batch_size=5, lr=1e-3, warmup_ratio=0.2, checkpoint_every=3, eval_every=4, log_every=1,
                  num_processes=num_processes)
    return TrainConfig(**{**values, **overrides})


def score(model) -> dict[str, float]:
    """A deterministic 'validation score' that depends on the weights (picked by reference by the ranks)."""
    with torch.no_grad():
        return {"score": float(-model.classifier.weight.abs().sum())}


class FileLog:
    """Log callback that appends (rank, step, metrics) to a file: the ranks' calls come back to the test."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, metrics: dict, step: int) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"rank": int(os.environ.get("RANK", "0")), "world": int(os.environ.get("WORLD_SIZE", "1")),
                                     "step": step, "metrics": metrics}) + "\n")

    def read(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()]


def distill(work_dir: Path, num_processes: int, stop_after: int | None = None, log: FileLog | None = None, **overrides):
    """Projector distillation of a 1-layer student from a 2-layer teacher: trains the model and the projector."""
    teacher, student = bert(16, 0, layers=2), bert(8, 1)
    objective = build_objective("projector", student_hidden=8, teacher_hidden=16)
    result = run_training(
        model=student, loss_fn=distillation_loss(student, teacher, objective), extra=objective, train_data=rows(),
        collate=PadCollator(0), settings=settings(num_processes, **overrides), seed=5, work_dir=work_dir,
        fingerprint="fp", evaluate=score, select_metric="score", log=log, stop_after=stop_after, progress=False,
    )
    return student, objective, result


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process, keep_best off (the last weights), logged."""
    work = tmp_path_factory.mktemp("one")
    log = FileLog(work / "log.jsonl")
    student, objective, result = distill(work / "run", 1, log=log, keep_best=False)
    return student, objective, result, log.read()


def optimizer_state(work_dir: Path) -> dict:
    return torch.load(work_dir / "checkpoint" / "trainer_state.pt", map_location="cpu", weights_only=True)["optimizer"]


def test_two_processes_reach_the_weights_of_one(one_process, tmp_path):
    ref_student, ref_objective, ref_result, ref_log = one_process
    log = FileLog(tmp_path / "log.jsonl")
    student, objective, result = distill(tmp_path / "run", 2, log=log, keep_best=False)
    difference = max(max_difference(student, ref_student), max_difference(objective, ref_objective))
    print(f"\nddp 2 processes vs 1: max abs weight difference {difference:.3g} (tolerance {ATOL})")
    assert difference < ATOL
    assert result.total_steps == ref_result.total_steps == 10 and result.state.step == 10
    assert result.model_dir == tmp_path / "run" / "checkpoint" / "model"
    # evaluation and selection ran on rank 0 as in one process
    assert [e["step"] for e in result.state.evals] == [e["step"] for e in ref_result.state.evals] == [4, 8, 10]
    assert result.state.best_step == ref_result.state.best_step
    # only rank 0 logged, every step, and the logged terms are the global batch's
    logged = log.read()
    assert {(e["rank"], e["world"]) for e in logged} == {(0, 2)}
    train = [e for e in logged if "train/total" in e["metrics"]]
    ref_train = [e for e in ref_log if "train/total" in e["metrics"]]
    assert [e["step"] for e in train] == [e["step"] for e in ref_train] == list(range(1, 11))
    for mine, ref in zip(train, ref_train):
        for key in ("train/total", "train/task", "train/kd", "train/feature/projector", "train/grad_norm"):
            assert mine["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-4, abs=1e-6), (mine["step"], key)


def test_resume_across_process_counts(one_process, tmp_path):
    ref_student, ref_objective, ref_result, _ = one_process
    # 2 processes stop after step 4 (last checkpoint at 3); 1 process resumes from it
    with pytest.raises(Interrupted, match="step 4"):
        distill(tmp_path / "a", 2, stop_after=4, keep_best=False)
    student, objective, result = distill(tmp_path / "a", 1, keep_best=False)
    assert result.resumed_from == 3
    difference = max(max_difference(student, ref_student), max_difference(objective, ref_objective))
    print(f"\n2 -> 1 processes resumed: max abs weight difference {difference:.3g} (tolerance {ATOL})")
    assert difference < ATOL
    # and the other way: 1 process stops after 7 (checkpoint at 6), 2 processes sharded with FSDP resume from it
    with pytest.raises(Interrupted, match="step 7"):
        distill(tmp_path / "b", 1, stop_after=7, keep_best=False)
    student, objective, result = distill(tmp_path / "b", 2, keep_best=False, distributed="fsdp")
    assert result.resumed_from == 6
    difference = max(max_difference(student, ref_student), max_difference(objective, ref_objective))
    print(f"1 -> 2 processes (fsdp) resumed: max abs weight difference {difference:.3g} (tolerance {ATOL})")
    assert difference < ATOL
    # the sharded ranks wrote the optimizer state in the one-process layout, with the same values
    mine, ref = optimizer_state(tmp_path / "b"), optimizer_state(ref_result.model_dir.parents[1])
    def groups(state):  # which AdamW kernel ran (fused, or foreach for sharded parameters) is not the state
        return [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in state["param_groups"]]

    assert groups(mine) == groups(ref) and mine["state"].keys() == ref["state"].keys()
    for index, values in ref["state"].items():
        for key, value in values.items():
            assert torch.allclose(mine["state"][index][key], value, rtol=1e-3, atol=1e-9), (index, key)


def test_launch_command_and_environment(monkeypatch):
    command = launch_command(3, "/w/job.pkl", "/w/result.json")
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert command[command.index("--num_processes") + 1] == "3"
    assert "--multi_gpu" in command and command[command.index("--main_process_port") + 1] == "0"
    assert command[-4:] == ["-m", "flexkd.launch", "/w/job.pkl", "/w/result.json"]
    env = launch_env(2, base={"PYTHONPATH": "/elsewhere"})
    assert int(env["OMP_NUM_THREADS"]) == max(1, len(os.sched_getaffinity(0)) // 2)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(Path(__file__).resolve().parents[2])
    assert "/elsewhere" in env["PYTHONPATH"].split(os.pathsep)
    assert launch_env(2, base={"OMP_NUM_THREADS": "1"})["OMP_NUM_THREADS"] == "1"  # a pinned value is kept


def test_mlflow_logger_is_bound_to_the_active_run(tmp_path, monkeypatch):
    """The flows pass tracking.log_metrics (the active run of the flow's process): the ranks get it bound to
    that run's id, and the tracking URI in their environment."""
    import functools
    from types import SimpleNamespace

    import mlflow

    from flexkd import tracking
    from flexkd.launch import _portable_log

    monkeypatch.setattr(mlflow, "active_run", lambda: SimpleNamespace(info=SimpleNamespace(run_id="run-123")))
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "sqlite:////somewhere/mlflow.db")
    bound = _portable_log(tracking.log_metrics)
    assert isinstance(bound, functools.partial) and bound.func is tracking.log_metrics_to_run and bound.args == ("run-123",)
    assert launch_env(2, base={})["MLFLOW_TRACKING_URI"] == "sqlite:////somewhere/mlflow.db"
    assert launch_env(2, base={"MLFLOW_TRACKING_URI": "http://server"})["MLFLOW_TRACKING_URI"] == "http://server"
    other = FileLog(tmp_path / "x")
    assert _portable_log(other) is other


def test_process_count_is_checked(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="num_processes"):
        parse_config({"distill": {"train": {"batch_size": 2, "num_processes": 4}}})
    with pytest.raises(ConfigError, match="num_processes"):
        parse_config({"distill": {"train": {"num_processes": 0}}})
    with pytest.raises(ConfigError, match="distributed"):
        parse_config({"teacher": {"finetune": {"distributed": "zero3"}}})
    # train_loop itself refuses a process count that is not the one it runs under
    model = bert(8, 0)
    with pytest.raises(ConfigError, match="num_processes is 2 but this process is one of 1"):
        train_loop(model=model, loss_fn=distillation_loss(model, None, build_objective("ft", student_hidden=8, teacher_hidden=8)),
                   train_data=rows(), collate=PadCollator(0), settings=settings(2), seed=0, work_dir=tmp_path,
                   fingerprint="x", progress=False)


def test_fingerprint_leaves_out_the_process_count():
    from flows.common import fingerprint

    base = TrainConfig(batch_size=8)
    assert fingerprint("s", {"train": base.model_dump()}) == fingerprint(
        "s", {"train": base.model_copy(update={"num_processes": 4, "distributed": "fsdp"}).model_dump()})
    assert fingerprint("s", {"train": base.model_dump()}) != fingerprint(
        "s", {"train": base.model_copy(update={"batch_size": 16}).model_dump()})


def test_a_pickled_model_returns_its_hidden_states_in_a_fresh_process(tmp_path):
    """dump_job works around two private globals of transformers' output capturing (flexkd.launch says why); this
    fails when transformers changes them: a model that already ran with output_hidden_states=True (its capture
    hooks installed) is pickled here and must return the same hidden states in a new interpreter, as a rank."""
    model = bert(8, 0, layers=2).eval()
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        expected = model(input_ids=ids, output_hidden_states=True).hidden_states
    with open(tmp_path / "job.pkl", "wb") as handle:
        dump_job({"model": model, "ids": ids}, handle)
    rank = ("import sys, cloudpickle, torch\n"
            "job = cloudpickle.load(open(sys.argv[1], 'rb'))\n"
            "with torch.no_grad():\n"
            "    out = job['model'](input_ids=job['ids'], output_hidden_states=True)\n"
            "torch.save(list(out.hidden_states or ()), sys.argv[2])\n")
    done = subprocess.run([sys.executable, "-c", rank, str(tmp_path / "job.pkl"), str(tmp_path / "hidden.pt")],
                          env=launch_env(1), capture_output=True, text=True)
    changed = "transformers' output capturing changed: see the comment above flexkd.launch._output_collector"
    assert done.returncode == 0, f"{changed}\n{done.stderr[-3000:]}"
    hidden = torch.load(tmp_path / "hidden.pt", weights_only=True)
    assert len(hidden) == len(expected) == 3, changed
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(hidden, expected))
