"""Teacher ceiling: ``python -m benchmarks.teacher``: how far the teacher recipe goes on a task, on validation.

For one profile (default ``params.yaml``) and one seed, the teacher is fine-tuned once per learning rate in ``--lrs``
(every other key the profile's, plus ``--set`` overrides such as a larger epoch budget), each run stopping on
validation with the profile's patience (``teacher.finetune.patience``). The pick is the run best on validation
(``evaluate.primary_metric``; ties: the earlier lr); the test split is scored for every run and reported beside it,
never used to choose. Each run's record is written as it finishes, so an interrupted sweep continues. Writes
``--output`` (default benchmarks/teacher-<task>.json; ``python -m benchmarks.run`` puts every such file in
BENCHMARKS.md).

This answers "is the teacher as good as this recipe gets?": when the pick's validation score is where the profile's
own lr landed and the runs stopped on patience (not at the end of their budget), the profile's teacher is at the
recipe's measured ceiling for that model and data.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from benchmarks.cli import add_profile_args, read_profile, work_dir

REPO = Path(__file__).resolve().parents[1]


def run_one(raw: dict, root: Path) -> dict:
    """Prepare the data and fine-tune the teacher of ``raw`` in ``root``; its validation and test scores."""
    from flexkd import stages
    from flexkd.config import parse_config
    from flexkd.models import load_tokenizer
    from flexkd.project import Paths
    from flexkd.tasks import task_for
    from flexkd.train import set_threads

    set_threads()
    cfg = parse_config(raw, source=str(root))
    if not cfg.teacher.finetune.enabled:
        raise SystemExit(f"{root}: teacher.finetune.enabled is false: there is no teacher recipe to sweep")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    paths = Paths(root, cfg.data.task, cfg.project.runs_dir, cfg.project.work_dir)
    task = task_for(cfg)
    began = time.perf_counter()
    task.prepare(task.load_raw(), paths.prepared)
    summary = stages.finetune_teacher(cfg, paths, task)
    teacher = task.load_model(str(paths.teacher)).eval()
    test, _ = task.test_scores(teacher, load_tokenizer(str(paths.teacher)), paths.prepared)
    return {"validation": summary["validation"], "test": test, "best_step": summary.get("best_step"),
            "steps_run": summary.get("steps_run"), "steps": summary.get("steps"),
            "stopped_early": summary.get("stopped_early"), "seconds": round(time.perf_counter() - began, 1)}


def sweep(raw: dict, root: Path, lrs: list[float]) -> dict:
    from flexkd.config import parse_config
    from flexkd.project import read_json, write_json

    cfg = parse_config(raw, source="teacher sweep")
    metric = cfg.evaluate.primary_metric
    generation = cfg.data.is_generation
    rows = []
    for lr in lrs:
        params = json.loads(json.dumps(raw))
        params["teacher"]["finetune"]["lr"] = float(lr)
        record_path = root / "records" / f"lr{lr:g}.json"
        record = read_json(record_path) if record_path.exists() else None
        if record is None or record.get("params") != params:
            record = {"params": params, **run_one(params, root / f"lr{lr:g}")}
            write_json(record_path, record)
            shutil.rmtree(root / f"lr{lr:g}", ignore_errors=True)  # the weights are not kept: the scores are
        score = record["validation"]["loss" if generation else metric]
        rows.append({"lr": float(lr), "validation": score, "test": record["test"][metric],
                     "best_step": record["best_step"], "steps_run": record["steps_run"], "steps": record["steps"],
                     "stopped_early": record["stopped_early"], "seconds": record["seconds"]})
        print(f"lr {lr:g}: validation {score:.4f}, test {metric} {record['test'][metric]:.4f}, "
              f"{record['steps_run']} of {record['steps']} steps ({record['stopped_early'] or 'whole budget'})")
    pick = (min if generation else max)(rows, key=lambda r: r["validation"])  # the first of equals: the earlier lr
    finetune = cfg.teacher.finetune
    return {"task": cfg.data.task, "seed": cfg.project.seed, "model": cfg.teacher.model, "metric": metric,
            "score": "validation NLL" if generation else f"validation {metric}", "lower_is_better": generation,
            "profile_lr": finetune.lr, "epochs": finetune.epochs, "patience": finetune.patience,
            "eval_every": finetune.eval_every, "rows": rows, "pick": pick}


def render(result: dict) -> str:
    metric = result["metric"]
    lines = [f"`python -m benchmarks.teacher` ({result['task']}, seed {result['seed']}): the teacher "
             f"({result['model']}) fine-tuned at each learning rate for up to {result['epochs']:g} epochs, stopping after "
             f"{result['patience']} evaluations (every {result['eval_every']} steps) without a better {result['score']}; "
             f"the profile's lr is {result['profile_lr']:g}. Picked on validation; test reported.", "",
             f"| lr | {result['score']} | test {metric} | best step | steps run / budget | stopped |",
             "|---:|---:|---:|---:|---:|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['lr']:g} | {row['validation']:.4f} | {row['test']:.4f} | {row['best_step']} | "
                     f"{row['steps_run']} / {row['steps']} | {row['stopped_early'] or 'no: whole budget'} |")
    pick = result["pick"]
    lines += ["", f"Pick: lr {pick['lr']:g} ({result['score']} {pick['validation']:.4f}, test {metric} "
                  f"{pick['test']:.4f})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fine-tune the teacher at several learning rates; pick on validation.")
    add_profile_args(parser)
    parser.add_argument("--lrs", nargs="+", type=float, required=True, help="teacher learning rates to try")
    parser.add_argument("--work-dir", default=None, help="default: benchmarks/work/teacher-<task>-seed<seed>")
    parser.add_argument("--output", default=None, help="default: benchmarks/teacher-<task>.json (in BENCHMARKS.md)")
    args = parser.parse_args(argv)
    from benchmarks.run import write_result
    raw = read_profile(parser, args)
    result = sweep(raw, work_dir(args, raw, "teacher"), args.lrs)
    path = write_result("teacher", result, args.output)
    print(render(result))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
