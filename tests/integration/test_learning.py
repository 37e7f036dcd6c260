"""Methods learn: on real SST-2 rows, a student distilled with Flex-KD from a fine-tuned teacher ends well above
chance and above its untrained self, and every distillation term falls over training.

The library's own pieces, in the pipeline's order (prepare, teacher fine-tuning, relevance scoring, a student
pruned to the selected units, distillation), on the packaged all-MiniLM-L6-v2 teacher and the shipped fixture
rows: small enough for the suite, real enough that learning shows.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _cfg(data_dir: Path):
    from flexkd.config import parse_config

    raw = yaml.safe_load((REPO / "profiles" / "sst2.yaml").read_text())
    raw["data"].update(data_dir=str(data_dir), max_train=800, validation_size=100, max_test=None)
    raw["teacher"]["max_length"] = 32
    raw["teacher"]["finetune"].update(epochs=1, batch_size=16, lr=2e-4, eval_every=1000, checkpoint_every=1000)
    raw["students"]["pruned"].update(num_layers=3, hidden_size=192, num_heads=6, intermediate_size=512)
    raw["distill"].update(students=["pruned"], methods=["flexkd"])
    raw["distill"]["train"].update(epochs=2, batch_size=32, lr=2e-4, eval_every=1000, checkpoint_every=1000, log_every=1)
    return parse_config(raw)


def _mean(values):
    return sum(values) / len(values)


def test_a_flexkd_student_learns_from_a_tuned_teacher(tmp_path, data_dir):
    import torch

    from flexkd.losses import build_objective
    from flexkd.models import load_tokenizer, resolve_source
    from flexkd.relevance import score_units, select_units
    from flexkd.tasks import task_for
    from flexkd.train import distillation_loss, task_loss, train_loop

    torch.set_num_threads(2)
    cfg = _cfg(data_dir)
    task = task_for(cfg)
    prepared = tmp_path / "prepared"
    task.prepare(task.load_raw(), prepared)
    spec = resolve_source(cfg.teacher.model).location
    tokenizer = load_tokenizer(str(spec))
    collate = task.collate(tokenizer)
    train = task.features(prepared, "train", tokenizer)
    test = task.features(prepared, "test", tokenizer)  # 300 real SST-2 dev rows: the majority class is ~51%

    teacher = task.load_model(str(spec), prepared)
    train_loop(model=teacher, loss_fn=task_loss(), train_data=train, collate=collate, settings=cfg.teacher.finetune,
               seed=0, work_dir=tmp_path / "teacher", fingerprint="teacher", progress=False)
    teacher_accuracy = task.validation_scores(teacher, test, collate)["accuracy"]

    batches = (collate(train[i : i + 64]) for i in range(0, 512, 64))
    scores, _ = score_units(teacher, batches, method="grad", max_examples=512, task="classification")
    units = select_units(scores, 192).tolist()
    student, _ = task.build_student(teacher, cfg.student("pruned"), seed=0, selected_units=units,
                                    calibration=[collate(train[i : i + 16]) for i in range(0, 64, 16)])
    untrained = task.validation_scores(student, test, collate)["accuracy"]

    objective = build_objective("flexkd", alpha=0.5, temperature=2.0, feature_weight=0.1, student_hidden=192,
                                teacher_hidden=384, selected_units=torch.tensor(units))
    logged: list[dict] = []
    train_loop(model=student, loss_fn=distillation_loss(student, teacher, objective, task.feature_mask),
               train_data=train, collate=collate, settings=cfg.distill.train, seed=0, work_dir=tmp_path / "student",
               fingerprint="student", log=lambda metrics, step: logged.append(dict(metrics)), progress=False)
    trained = task.validation_scores(student, test, collate)["accuracy"]

    print(f"teacher {teacher_accuracy:.3f}; student untrained {untrained:.3f} -> distilled {trained:.3f}")
    assert teacher_accuracy >= 0.70, "the teacher itself did not learn"
    assert trained >= 0.66, f"distilled student at {trained:.3f}: not well above chance (0.5)"
    assert trained >= untrained + 0.08, f"distilled {trained:.3f} vs untrained {untrained:.3f}"
    steps = [m for m in logged if "train/total" in m]
    assert len(steps) >= 40
    quarter = len(steps) // 4
    for term in ("train/task", "train/kd", "train/feature/flexkd", "train/total"):
        first = _mean([m[term] for m in steps[:quarter]])
        last = _mean([m[term] for m in steps[-quarter:]])
        assert last < 0.85 * first, f"{term} did not fall over training: first quarter {first:.4f}, last {last:.4f}"
