"""Stage 6: score the teacher and every student on the held-out test split; write the comparison report.

Classification: accuracy, macro-F1, MCC. Generation: ROUGE-L (greedy; mean ± std over sampling seeds when
generation.seeds is set) of generated responses against every reference, plus a sample table of prompt /
reference / teacher / student outputs logged to MLflow. Writes metrics/evaluation.json (DVC metrics) and
reports/comparison.md (one row per model: student set-up, method, metrics, parameters, train time). Warns
loudly when the teacher does not beat an ft student (teacher.require_better_than_ft turns it into a stop).
"""

from __future__ import annotations

import warnings

from prefect import flow

from flows.common import load_params, paths_for, read_json, run_cli, write_json

CLASSIFICATION_COLUMNS = (("accuracy", "accuracy"), ("macro-F1", "macro_f1"), ("MCC", "mcc"))
GENERATION_COLUMNS = (("ROUGE-L", "rougeL"),)


def _columns(evaluation: dict) -> tuple:
    columns = GENERATION_COLUMNS if evaluation["primary_metric"] == "rougeL" else CLASSIFICATION_COLUMNS
    extra = [("ROUGE-L std", "rougeL_std"), ("ROUGE-L greedy", "rougeL_greedy")]
    present = {k for m in evaluation["students"].values() for k in m}
    return columns + tuple(c for c in extra if c[1] in present and columns is GENERATION_COLUMNS)


def best_student(evaluation: dict, order: list[str]) -> str | None:
    """The key of the best student by the primary metric; ties go to the first in ``order``."""
    students, primary = evaluation["students"], evaluation["primary_metric"]
    keys = [k for k in order if k in students]
    return max(keys, key=lambda k: students[k][primary]) if keys else None


def comparison_table(evaluation: dict, order: list[str] | None = None) -> str:
    """Markdown: one row for the teacher, one per student (set-up and method), the best in bold."""
    columns = _columns(evaluation)
    students = evaluation["students"]
    order = order or list(students)
    best = best_student(evaluation, order)
    lines = [
        f"# {evaluation['task']}: teacher and students on the test split ({evaluation['test_rows']} rows)",
        "",
        "| model | student | method | " + " | ".join(name for name, _ in columns) + " | parameters | train time (s) |",
        "|---|---|---|" + "---:|" * (len(columns) + 2),
    ]

    def cells(m):
        values = [f"{m[key]:.4f}" if key in m else "" for _, key in columns]
        return " | ".join(values) + f" | {m['parameters']:,} | {m.get('train_seconds', 0):.0f} |"

    teacher = evaluation["teacher"]
    lines.append(f"| teacher | {'fine-tuned' if teacher.get('finetuned') else 'as given'} | - | " + cells(teacher))
    for key in order:
        m = students[key]
        bold = (lambda x: f"**{x}**") if key == best else (lambda x: x)
        lines.append(f"| {bold('student')} | {bold(m['student'])} ({m.get('init', '')}) | {bold(m['method'])} | " + cells(m))
    lines += ["", f"Primary metric: {evaluation['primary_metric']}. Best student: {best}."]
    if evaluation.get("warnings"):
        lines += [""] + [f"> WARNING: {w}" for w in evaluation["warnings"]]
    return "\n".join(lines) + "\n"


@flow(name="flexkd-evaluate", log_prints=True)
def evaluate_flow(params: str | None = None) -> dict:
    from flexkd import resources, tracking
    from flexkd.data.prepare import load_split
    from flexkd.errors import FlexKDError
    from flexkd.models import count_parameters, load_tokenizer
    from flexkd.tasks import task_for
    from flexkd.train import set_threads

    cfg = load_params(params)
    paths = paths_for(cfg)
    task = task_for(cfg)
    set_threads()
    tracking.setup(paths.root, cfg.project.experiment)
    primary = cfg.evaluate.primary_metric
    order = [f"{s}/{m}" for s in cfg.distill.students for m in cfg.distill.methods]
    with tracking.stage_run("evaluate", project_root=paths.root, experiment=cfg.project.experiment,
                            params={"evaluate": cfg.evaluate.model_dump(), "students": order}):
        tokenizer = load_tokenizer(str(paths.teacher))
        outputs: dict[str, list[str] | None] = {}

        def score(directory, name):
            model = task.load_model(str(directory))
            with resources.compute():
                scores, predictions = task.test_scores(model, tokenizer, paths.prepared)
            outputs[name] = predictions
            return {**scores, "parameters": count_parameters(model)}

        teacher_info = read_json(paths.teacher / "flexkd_teacher.json")
        teacher_timing = read_json(paths.teacher_metrics) if paths.teacher_metrics.exists() else {}
        test_rows = len(load_split(paths.prepared / "test.jsonl"))
        if task.is_generation and cfg.generation.eval_max_examples:
            test_rows = min(test_rows, cfg.generation.eval_max_examples)
        evaluation = {
            "task": cfg.data.task, "format": cfg.data.format, "primary_metric": primary, "test_rows": test_rows,
            "teacher": {**score(paths.teacher, "teacher"), "train_seconds": teacher_timing.get("train_seconds", 0.0),
                        "finetuned": teacher_info["finetuned"], "spec": teacher_info["spec"]},
            "students": {}, "warnings": [],
        }
        metric_keys = [k for k in ("accuracy", "macro_f1", "mcc", "rougeL", "rougeL_std", "rougeL_greedy") if k in evaluation["teacher"]]
        tracking.log_metrics({f"test/teacher/{k}": evaluation["teacher"][k] for k in metric_keys})
        for student in cfg.distill.students:
            for method in cfg.distill.methods:
                key = f"{student}/{method}"
                info = read_json(paths.student(student, method) / "flexkd_student.json")
                metrics = {**score(paths.student(student, method), key), "student": student, "method": method,
                           "init": info["init"], "train_seconds": info["train_seconds"], "run_id": info["run_id"],
                           "model_uri": info["model_uri"]}
                evaluation["students"][key] = metrics
                tracking.log_metrics({f"test/{student}/{method}/{k}": metrics[k] for k in metric_keys})
                tracking.log_metrics_to_run(info["run_id"], {f"test/{k}": metrics[k] for k in metric_keys})

        for student in cfg.distill.students:
            ft = evaluation["students"].get(f"{student}/ft")
            if ft is None:
                continue
            t = evaluation["teacher"][primary]
            if t <= ft[primary]:
                message = (f"the teacher ({primary} {t:.4f}) does not beat the ft student of '{student}' "
                           f"({ft[primary]:.4f}): distilling from it wastes the run; tune the teacher longer "
                           "(teacher.finetune.*) or pick a stronger one")
                evaluation["warnings"].append(message)
                banner = "!" * 100
                print(f"\n{banner}\nWARNING: {message}\n{banner}\n")
                warnings.warn(message, stacklevel=1)
                if cfg.teacher.require_better_than_ft:
                    raise FlexKDError(message + " (teacher.require_better_than_ft is true)")

        if task.is_generation:
            from flexkd.generate import sample_table

            records = load_split(paths.prepared / "test.jsonl")[: test_rows]
            formatter = task.formatter(tokenizer)
            table = sample_table(records, {k: v for k, v in outputs.items() if v is not None},
                                 n=cfg.generation.sample_rows, formatter_prompt=formatter.prompt)
            tracking.log_text_table(table, "samples/test_samples.json")

        write_json(paths.evaluation, evaluation)
        paths.comparison.parent.mkdir(parents=True, exist_ok=True)
        paths.comparison.write_text(comparison_table(evaluation, order), encoding="utf-8")
        tracking.log_artifact(paths.comparison, "reports")
        tracking.log_artifact(paths.evaluation, "reports")
        print(paths.comparison.read_text())
    return evaluation


if __name__ == "__main__":
    run_cli(evaluate_flow, "Evaluate the teacher and every student on the test split.")
