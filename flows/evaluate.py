"""Stage 6: score the teacher and every student on the held-out test split; write the comparison report.

Writes metrics/evaluation.json (DVC metrics) and reports/comparison.md: method, accuracy, macro-F1, MCC,
parameters, train time. Warns loudly when the teacher does not beat the ft student (a run that distils from
such a teacher is wasted); teacher.require_better_than_ft turns the warning into a stop.
"""

from __future__ import annotations

import warnings

from prefect import flow

from flows.common import load_params, paths_for, read_json, run_cli, write_json

COLUMNS = (("accuracy", "accuracy"), ("macro-F1", "macro_f1"), ("MCC", "mcc"))


def comparison_table(evaluation: dict) -> str:
    """Markdown: one row for the teacher, one per student, best student in bold."""
    primary = evaluation["primary_metric"]
    students = evaluation["students"]
    best = max(students, key=lambda m: students[m][primary]) if students else None
    lines = [
        f"# {evaluation['task']}: teacher and students on the test split ({evaluation['test_rows']} rows)",
        "",
        "| model | method | " + " | ".join(name for name, _ in COLUMNS) + " | parameters | train time (s) |",
        "|---|---|" + "---:|" * (len(COLUMNS) + 2),
    ]

    def row(name, method, m):
        cells = [f"{m[key]:.4f}" for _, key in COLUMNS]
        return f"| {name} | {method} | " + " | ".join(cells) + f" | {m['parameters']:,} | {m.get('train_seconds', 0):.0f} |"

    lines.append(row("teacher", "fine-tuned" if evaluation["teacher"].get("finetuned") else "as given", evaluation["teacher"]))
    for method, m in students.items():
        lines.append(row("**student**" if method == best else "student", f"**{method}**" if method == best else method, m))
    lines += ["", f"Primary metric: {primary}. Best student: {best}."]
    if evaluation.get("warnings"):
        lines += [""] + [f"> WARNING: {w}" for w in evaluation["warnings"]]
    return "\n".join(lines) + "\n"


@flow(name="flexkd-evaluate", log_prints=True)
def evaluate_flow(params: str | None = None) -> dict:
    from flexkd import tracking
    from flexkd.data.task import tokenized_split
    from flexkd.data.tokenize import PadCollator
    from flexkd.errors import FlexKDError
    from flexkd.evaluate import evaluate_classifier
    from flexkd.models import count_parameters, load_classifier, load_tokenizer
    from flexkd.train import set_threads

    cfg = load_params(params)
    paths = paths_for(cfg)
    set_threads()
    tracking.setup(paths.root, cfg.project.experiment)
    primary = cfg.evaluate.primary_metric
    with tracking.stage_run("evaluate", project_root=paths.root, experiment=cfg.project.experiment,
                            params={"evaluate": cfg.evaluate.model_dump(), "methods": cfg.distill.methods}):
        tokenizer = load_tokenizer(str(paths.teacher))
        collate = PadCollator(tokenizer.pad_token_id)
        test = tokenized_split(paths.prepared, "test", tokenizer, cfg.teacher.max_length)

        def score(directory):
            model = load_classifier(str(directory))
            return {**evaluate_classifier(model, test, collate, cfg.evaluate.batch_size), "parameters": count_parameters(model)}

        teacher_info = read_json(paths.teacher / "flexkd_teacher.json")
        evaluation = {
            "task": cfg.data.task, "primary_metric": primary, "test_rows": len(test),
            "teacher": {**score(paths.teacher), "train_seconds": teacher_info.get("train_seconds", 0.0),
                        "finetuned": teacher_info["finetuned"], "spec": teacher_info["spec"]},
            "students": {}, "warnings": [],
        }
        tracking.log_metrics({f"test/teacher/{k}": evaluation["teacher"][k] for k in ("accuracy", "macro_f1", "mcc")})
        for method in cfg.distill.methods:
            info = read_json(paths.student(method) / "flexkd_student.json")
            metrics = {**score(paths.student(method)), "train_seconds": info["train_seconds"],
                       "run_id": info["run_id"], "model_uri": info["model_uri"]}
            evaluation["students"][method] = metrics
            test_metrics = {f"test/{k}": metrics[k] for k in ("accuracy", "macro_f1", "mcc")}
            tracking.log_metrics({f"test/{method}/{k}": metrics[k] for k in ("accuracy", "macro_f1", "mcc")})
            tracking.log_metrics_to_run(info["run_id"], test_metrics)

        if "ft" in evaluation["students"]:
            t, ft = evaluation["teacher"][primary], evaluation["students"]["ft"][primary]
            if t <= ft:
                message = (f"the teacher ({primary} {t:.4f}) does not beat the ft student ({ft:.4f}): distilling from it "
                           "wastes the run; tune the teacher longer (teacher.finetune.*) or pick a stronger one")
                evaluation["warnings"].append(message)
                banner = "!" * 100
                print(f"\n{banner}\nWARNING: {message}\n{banner}\n")
                warnings.warn(message, stacklevel=1)
                if cfg.teacher.require_better_than_ft:
                    raise FlexKDError(message + " (teacher.require_better_than_ft is true)")

        write_json(paths.evaluation, evaluation)
        paths.comparison.parent.mkdir(parents=True, exist_ok=True)
        paths.comparison.write_text(comparison_table(evaluation), encoding="utf-8")
        tracking.log_artifact(paths.comparison, "reports")
        tracking.log_artifact(paths.evaluation, "reports")
        print(paths.comparison.read_text())
    return evaluation


if __name__ == "__main__":
    run_cli(evaluate_flow, "Evaluate the teacher and every student on the test split.")
