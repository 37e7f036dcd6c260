"""Stage 6: score the teacher and every student on the held-out test split; write the comparison report.

The best student is chosen here on the validation split only (the score its distill run recorded:
``flexkd.selection``); the test metrics are reported beside it and never used to choose.

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


@flow(name="flexkd-evaluate", log_prints=True)
def evaluate_flow(params: str | None = None, sync: bool = False) -> dict:
    if sync:  # a worker with only the code and the DVC remote: pull the inputs, run under dvc repro, push
        from flows.storage import run_synced

        return run_synced("evaluate", params)
    from flexkd import resources, tracking
    from flexkd.data.prepare import load_split
    from flexkd.errors import FlexKDError
    from flexkd.evaluate import TEST_METRICS
    from flexkd.models import count_parameters, load_tokenizer
    from flexkd.selection import (best_by_validation, comparison_table, selection_label, selection_value_text,
                                  validation_fingerprint)
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
                            params={"evaluate": cfg.evaluate.model_dump(), "students": order,
                                    "runtime": task.runtime.describe()}):
        tokenizer = load_tokenizer(str(paths.teacher))
        outputs: dict[str, list[str] | None] = {}

        def score(directory, name):
            model = task.load_model(str(directory)).to(task.runtime.device)  # evaluated under the runtime's autocast
            with resources.compute():
                scores, predictions = task.test_scores(model, tokenizer, paths.prepared)
            outputs[name] = predictions
            return {**scores, "parameters": count_parameters(model)}

        teacher_info = read_json(paths.teacher / "flexkd_teacher.json")
        teacher_timing = read_json(paths.teacher_metrics) if paths.teacher_metrics.exists() else {}
        test_rows = len(load_split(paths.prepared / "test.jsonl"))
        validation_rows = len(load_split(paths.prepared / "validation.jsonl"))
        if task.is_generation and cfg.generation.eval_max_examples:
            test_rows = min(test_rows, cfg.generation.eval_max_examples)
        evaluation = {
            "task": cfg.data.task, "format": cfg.data.format, "primary_metric": primary, "test_rows": test_rows,
            "validation_rows": validation_rows,
            "teacher": {**score(paths.teacher, "teacher"), "train_seconds": teacher_timing.get("train_seconds", 0.0),
                        "validation": teacher_info.get("validation", {}),
                        "finetuned": teacher_info["finetuned"], "spec": teacher_info["spec"]},
            "students": {}, "warnings": [],
        }
        metric_keys = [k for k in TEST_METRICS if k in evaluation["teacher"]]
        tracking.log_metrics({f"test/teacher/{k}": evaluation["teacher"][k] for k in metric_keys})
        for student in cfg.distill.students:
            for method in cfg.distill.methods:
                key = f"{student}/{method}"
                info = read_json(paths.student(student, method) / "flexkd_student.json")
                metrics = {**score(paths.student(student, method), key), "student": student, "method": method,
                           "init": info["init"], "train_seconds": info["train_seconds"], "run_id": info["run_id"],
                           "validation": info["validation"],
                           "model_uri": info["model_uri"]}
                evaluation["students"][key] = metrics
                tracking.log_metrics({f"test/{student}/{method}/{k}": metrics[k] for k in metric_keys})
                tracking.log_metrics_to_run(info["run_id"], {f"test/{k}": metrics[k] for k in metric_keys})

        for problem in (teacher_info.get("quality") or {}).get("problems", []):  # found by the teacher stage
            evaluation["warnings"].append(f"teacher: {problem}")
        for student in cfg.distill.students:
            ft = evaluation["students"].get(f"{student}/ft")
            if ft is None:
                continue
            metric = task.selection_metric  # compared on validation, like every other decision
            t, f = evaluation["teacher"]["validation"].get(metric), ft["validation"][metric]
            if t is not None and t <= f:
                message = (f"the teacher ({selection_label(metric)} {selection_value_text(metric, t)}) does not beat "
                           f"the ft student of '{student}' ({selection_value_text(metric, f)}): distilling from it wastes "
                           "the run; tune the teacher longer (teacher.finetune.*) or pick a stronger one")
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

        # the choice: validation only (what the distill runs recorded); test is reported, never used to choose
        metric = task.selection_metric
        best = best_by_validation(evaluation["students"], order, metric)
        evaluation["selection"] = {"split": "validation", "metric": metric, "best": best,
                                   "value": evaluation["students"][best]["validation"][metric],
                                   "validation_fingerprint": validation_fingerprint(paths.prepared)}
        write_json(paths.evaluation, evaluation)
        paths.comparison.parent.mkdir(parents=True, exist_ok=True)
        paths.comparison.write_text(comparison_table(evaluation, order), encoding="utf-8")
        tracking.log_artifact(paths.comparison, "reports")
        tracking.log_artifact(paths.evaluation, "reports")
        print(paths.comparison.read_text())
    return evaluation


if __name__ == "__main__":
    run_cli(evaluate_flow, "Evaluate the teacher and every student on the test split.")
