"""Same-trials tuning: ``python -m benchmarks.tune``: every method tuned the same way, on validation only.

For one profile (default ``params.yaml``) and one seed, the shared stages run once (prepare, fine-tune the teacher,
select the units, fill the teacher cache: :mod:`flexkd.stages`, the code the pipeline's flows run); then each
student set-up x method trains ``--trials`` times. The trials are the same list for every method:

- trial 0 is the profile's own settings (so tuning can only match or beat them on validation);
- trials 1.. are points of a scrambled Sobol sequence (seeded with ``project.seed``) over four dimensions:
  the learning rate (the student's own lr x 10^[-0.75, 0.75]), alpha in [0.1, 0.9], the temperature in
  2^[0, 3] = [1, 8], and the feature weight beta in 10^[-3, 0].

A method reads the dimensions its terms have (ft: lr; kd: lr, alpha, temperature; projector, cka, flexkd: all four), so
trial i gives every method the same learning rate, alpha and temperature. The pick of each (student, method) is its
best trial on the validation split (``evaluate.primary_metric``; ties: the earlier trial); the test split is scored
for the pick only, after every trial ran, and reported. Each trial's record is written as it finishes, so an
interrupted run continues. Writes ``--output`` (default benchmarks/tuning-<task>.json; ``python -m benchmarks.run`` puts every such file
in BENCHMARKS.md) and prints the picks as a ``students.<name>.per_method`` block to paste into the profile.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from benchmarks.cli import add_profile_args, add_teacher_from, overrides, read_profile, work_dir

REPO = Path(__file__).resolve().parents[1]
DIMENSIONS = ("lr", "alpha", "temperature", "feature_weight")
LR_DECADES = 0.75  # the learning rate spans the student's lr x 10^[-0.75, 0.75]
# Keys the trials never change: the shared stages (prepare, teacher, relevance, cache) are reused while they hold.
TUNED_STUDENT_KEYS = ("per_method", "lr", "alpha", "feature_weight")
DISTILL_ONLY_STUDENT_KEYS = TUNED_STUDENT_KEYS + ("vocabulary",)  # student keys no shared stage reads


def dims_of(method: str, composed: dict | None = None) -> tuple[str, ...]:
    """The dimensions ``method`` reads, asked of its terms (``flexkd.losses.Method.settings``): ft lr; kd lr, alpha,
    temperature; projector, cka, flexkd all four; a method of ``composed`` (distill.composed_methods) lr, and the
    temperature when it has a logit term (its weights are its own)."""
    from flexkd.losses.methods import get_method

    settings = get_method(method, composed).settings
    return tuple(d for d in DIMENSIONS if d in settings)


def trial_points(n: int, seed: int) -> list[dict[str, float] | None]:
    """``n`` trials: None (the profile's settings), then n - 1 scrambled Sobol points in [0, 1)^4, by dimension."""
    import torch

    if n < 1:
        raise ValueError(f"--trials must be at least 1, got {n}")
    engine = torch.quasirandom.SobolEngine(len(DIMENSIONS), scramble=True, seed=seed)
    points = engine.draw(n - 1).tolist() if n > 1 else []
    return [None] + [dict(zip(DIMENSIONS, point)) for point in points]


def settings_for(point: dict[str, float] | None, method: str, base_lr: float,
                 composed: dict | None = None) -> dict[str, float]:
    """One trial's settings for one method (empty for trial 0: the profile's own)."""
    if point is None:
        return {}
    values = {"lr": base_lr * 10 ** (LR_DECADES * (2 * point["lr"] - 1)),
              "alpha": 0.1 + 0.8 * point["alpha"],
              "temperature": 2 ** (3 * point["temperature"]),
              "feature_weight": 10 ** (3 * point["feature_weight"] - 3)}
    return {key: float(f"{values[key]:.3g}") for key in dims_of(method, composed)}


def shared_key(raw: dict) -> dict:
    """The params the shared stages depend on (everything but the tuned keys and the distill stage's own)."""
    key = {name: value for name, value in raw.items() if name != "distill"}
    key["students"] = {name: {k: v for k, v in spec.items() if k not in DISTILL_ONLY_STUDENT_KEYS}
                       for name, spec in raw.get("students", {}).items()}
    distill = raw.get("distill", {})
    key["distill"] = {k: distill.get(k) for k in ("students", "methods", "temperature", "teacher_top_k")}
    return key


def with_settings(raw: dict, student: str, method: str, settings: dict[str, float]) -> dict:
    """``raw`` with ``settings`` as students.<student>.per_method.<method>."""
    out = json.loads(json.dumps(raw))
    per_method = out["students"][student].setdefault("per_method", {}) or {}
    per_method[method] = {**(per_method.get(method) or {}), **settings}
    out["students"][student]["per_method"] = per_method
    return out


def run_shared(root: Path, raw: dict, must_match: bool = False):
    """prepare, teacher, relevance and cache in ``root`` (skipped when they finished with the same shared params;
    otherwise ``root`` is emptied and they run, unless ``must_match``: then the mismatch is an error)."""
    from flexkd import stages
    from flexkd.config import parse_config
    from flexkd.project import Paths, read_json, write_json
    from flexkd.tasks import task_for

    cfg = parse_config(raw, source=str(root))
    paths = Paths(root, cfg.data.task, cfg.project.runs_dir, cfg.project.work_dir)
    task = task_for(cfg)
    done, key = root / "shared.json", shared_key(raw)
    found = read_json(done) if done.exists() else None
    if found is not None and found.get("key") == key:
        print(f"{root}: shared stages reused")
        return found
    if must_match:
        differs = sorted(k for k in key if found is None or found["key"].get(k) != key[k])
        raise SystemExit(f"{root}: not a workspace of these params (differs in: {', '.join(differs) or 'all'}); "
                         "give the same profile and --set overrides it was made with, or leave --base-dir out")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    began = time.perf_counter()
    task.prepare(task.load_raw(), paths.prepared)
    teacher = stages.finetune_teacher(cfg, paths, task)
    stages.select_units(cfg, paths, task, plot=False)
    stages.teacher_cache(cfg, paths, task)
    record = {"key": key, "teacher_validation": teacher["validation"],
              "seconds": round(time.perf_counter() - began, 1)}
    write_json(done, record)
    return record


def adopt_shared(root: Path, raw: dict, workspace: Path) -> dict:
    """Make ``root`` reuse the shared stages' outputs of a finished run instead of running them again: ``workspace``
    is a project or ``benchmarks.run`` workspace whose ``dvc repro`` finished (its params.yaml, prepared data, tuned
    teacher, relevance index and teacher cache). Its params must equal ``raw`` on every key those stages read
    (``shared_key``: the seed too), else nothing is linked and the keys that differ are named. The outputs are
    linked, not copied; ``shared.json`` records where they came from, so ``run_shared`` finds them done."""
    import yaml

    from flexkd.config import parse_config
    from flexkd.project import Paths, read_json, write_json

    workspace = Path(workspace).resolve()
    params_file = workspace / "params.yaml"
    if not params_file.is_file():
        raise SystemExit(f"--teacher-from {workspace}: no params.yaml there (give a project or benchmark workspace "
                         "whose dvc repro finished)")
    key, theirs = shared_key(raw), shared_key(yaml.safe_load(params_file.read_text(encoding="utf-8")) or {})
    differs = sorted(k for k in set(key) | set(theirs) if key.get(k) != theirs.get(k))
    if differs:
        raise SystemExit(f"--teacher-from {workspace}: its params.yaml differs from this profile in "
                         f"{', '.join(differs)}: its teacher is not this profile's (give the profile, seed and --set "
                         "overrides it ran with)")
    cfg = parse_config(raw, source=str(params_file))
    mine, source = (Paths(r, cfg.data.task, cfg.project.runs_dir, cfg.project.work_dir) for r in (Path(root), workspace))
    names = ["prepared", "teacher", "relevance"] + (["teacher_cache"] if cfg.teacher_cache.enabled else [])
    missing = [str(getattr(source, n)) for n in names if not getattr(source, n).is_dir()]
    if missing or not (source.teacher / "flexkd_teacher.json").exists():
        raise SystemExit(f"--teacher-from {workspace}: its run has not finished these stages: "
                         f"{', '.join(missing) or str(source.teacher / 'flexkd_teacher.json')} (run dvc repro there first)")
    done = Path(root) / "shared.json"
    found = read_json(done) if done.exists() else {}
    if found.get("adopted_from") == str(workspace) and found.get("key") == key:
        return found
    if Path(root).exists():
        shutil.rmtree(root)
    for name in names:
        link = getattr(mine, name)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(getattr(source, name), target_is_directory=True)
    record = {"key": key, "teacher_validation": read_json(source.teacher / "flexkd_teacher.json").get("validation"),
              "seconds": 0.0, "adopted_from": str(workspace)}
    write_json(done, record)
    print(f"{root}: prepared data, teacher, relevance index and cache of {workspace}")
    return record


def trial_dir(root: Path, trial: int, student: str, method: str) -> Path:
    return root / "tune" / f"trial-{trial}" / student / method


@dataclasses.dataclass(frozen=True)
class OutputPaths:
    """The project's paths, with the students written under ``directory/<student>/<method>`` (and their metrics
    beside them) instead of the pipeline's runs/ and metrics/."""

    base: object
    directory: Path

    def __getattr__(self, name):
        return getattr(self.base, name)

    def student(self, student: str, method: str) -> Path:
        return self.directory / student / method

    def distill_metrics(self, student: str, method: str) -> Path:
        return self.directory / student / f"{method}.metrics.json"


def drop_scratch(root: Path, cfg, student: str, method: str) -> None:
    """Remove a finished distill run's resumable checkpoints (nothing resumes it: its record is written)."""
    for scratch in (root / cfg.project.work_dir).glob(f"distill-{student}-{method}-*"):
        shutil.rmtree(scratch, ignore_errors=True)


def run_trial(root: Path, raw: dict, student: str, method: str, trial: int, settings: dict,
              force: bool = False) -> dict:
    """Train one (student, method) with one trial's settings; its record (reused when it finished before, unless
    ``force``)."""
    from flexkd import stages
    from flexkd.config import parse_config
    from flexkd.project import Paths, read_json, write_json
    from flexkd.tasks import task_for

    record_path = root / "tune" / "records" / f"{student}-{method}-{trial}.json"
    params = with_settings(raw, student, method, settings)
    if record_path.exists() and not force:
        record = read_json(record_path)
        if record.get("params") == params:
            return record
    cfg = parse_config(params, source=f"{root} trial {trial}")
    paths = Paths(root, cfg.data.task, cfg.project.runs_dir, cfg.project.work_dir)
    began = time.perf_counter()
    out = stages.distill(cfg, OutputPaths(paths, root / "tune" / f"trial-{trial}"), task_for(cfg), student, method)
    summary = out["summary"]
    drop_scratch(root, cfg, student, method)
    record = {"trial": trial, "student": student, "method": method, "settings": settings, "params": params,
              "resolved": {"lr": summary["lr"], "alpha": summary["alpha"], "temperature": summary["temperature"],
                           "feature_weight": summary["beta"]},
              "validation": out["scores"], "best_step": summary["best_step"], "steps": summary["steps"],
              "seconds": round(time.perf_counter() - began, 1)}
    write_json(record_path, record)
    return record


def pick(records: list[dict], metric: str) -> dict:
    """The trial best on validation (ties: the earlier trial)."""
    return max(records, key=lambda r: (r["validation"][metric], -r["trial"]))


def test_score(root: Path, raw: dict, student: str, method: str, trial: int) -> dict:
    from flexkd.config import parse_config
    from flexkd.models import load_tokenizer
    from flexkd.project import Paths
    from flexkd.tasks import task_for

    cfg = parse_config(raw, source=str(root))
    paths = Paths(root, cfg.data.task, cfg.project.runs_dir, cfg.project.work_dir)
    task = task_for(cfg)
    directory = trial_dir(root, trial, student, method)
    model = task.load_model(str(directory)).to(task.runtime.device)
    return task.test_scores(model, load_tokenizer(str(directory)), paths.prepared)[0]  # the student's own tokenizer


def tune(raw: dict, root: Path, students: list[str], methods: list[str], trials: int, keep_all: bool = False) -> dict:
    from flexkd.config import parse_config
    from flexkd.distill import method_settings
    from flexkd.train import set_threads

    set_threads()
    raw = json.loads(json.dumps(raw))
    raw["distill"]["students"], raw["distill"]["methods"] = list(students), list(methods)
    cfg = parse_config(raw, source="tuning")
    metric = cfg.evaluate.primary_metric
    shared = run_shared(root, raw)
    points = trial_points(trials, cfg.project.seed)
    results: dict[str, dict] = {}
    for student in students:
        base_lr = method_settings(cfg, student, "ft")["lr"]
        for method in methods:
            records = []
            for index, point in enumerate(points):
                record = run_trial(root, raw, student, method, index, settings_for(point, method, base_lr, cfg.distill.composed_methods))
                records.append(record)
                print(f"{student}/{method} trial {index}: {record['resolved']} -> validation {metric} "
                      f"{record['validation'][metric]:.4f} ({record['seconds']:.0f}s)")
            best = pick(records, metric)
            if not trial_dir(root, best["trial"], student, method).exists():  # removed by an earlier, shorter run
                best = run_trial(root, raw, student, method, best["trial"], best["settings"], force=True)
            test = test_score(root, raw, student, method, best["trial"])
            if not keep_all:  # the picks' checkpoints stay; the others are only records
                for record in records:
                    if record["trial"] != best["trial"]:
                        shutil.rmtree(trial_dir(root, record["trial"], student, method), ignore_errors=True)
            results[f"{student}/{method}"] = {
                "trials": [{"trial": r["trial"], "settings": r["resolved"], "validation": r["validation"][metric],
                            "best_step": r["best_step"], "seconds": r["seconds"]} for r in records],
                "default_validation": records[0]["validation"][metric],
                "pick": {"trial": best["trial"],
                         "settings": {k: best["resolved"][k] for k in dims_of(method, cfg.distill.composed_methods)},
                         "validation": best["validation"][metric], "test": test[metric]},
            }
    return {"seed": cfg.project.seed, "task": cfg.data.task, "primary_metric": metric, "trials": trials,
            "students": students, "methods": methods, "teacher_validation": shared["teacher_validation"][metric],
            "space": {"lr": f"student lr x 10^[-{LR_DECADES}, {LR_DECADES}]", "alpha": "[0.1, 0.9]",
                      "temperature": "2^[0, 3]", "feature_weight": "10^[-3, 0]"},
            "budget": tune_budget(raw), "results": results}


def tune_budget(raw: dict) -> dict:
    """The data and training budget the trials ran at (said beside the table), with how validation was held out where
    it is not random rows."""
    held_out = raw["data"].get("validation_from", "rows")
    return {"data.max_train": raw["data"].get("max_train"),
            **({"data.validation_from": held_out} if held_out != "rows" else {}),
            "distill.train.epochs": raw["distill"]["train"]["epochs"]}


def per_method_yaml(result: dict) -> str:
    """The picks as a students.<name>.per_method block (paste into the profile)."""
    lines = [f"# python -m benchmarks.tune: best of {result['trials']} trials per method on validation "
             f"({result['task']}, seed {result['seed']})"]
    for student in result["students"]:
        lines += [f"  {student}:", "    per_method:"]
        for method in result["methods"]:
            settings = result["results"][f"{student}/{method}"]["pick"]["settings"]
            lines.append(f"      {method}: {{{', '.join(f'{k}: {v:g}' for k, v in settings.items())}}}")
    return "\n".join(lines)


def profile_name(params: str) -> str:
    """The profile as a path inside the repository (older files recorded the absolute path of the machine they ran on)."""
    path = Path(params)
    if not path.is_absolute():
        return params
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return path.name


def render(result: dict) -> str:
    metric = result["primary_metric"]
    profile = f"`{profile_name(result['params'])}`: " if result.get("params") else ""  # older files did not record it
    lines = [f"`python -m benchmarks.tune` ({profile}{result['task']}, seed {result['seed']}, {result['trials']} trials per "
             f"method, the same for every method: trial 0 the profile's settings, then Sobol points over lr "
             f"({result['space']['lr']}), alpha {result['space']['alpha']}, temperature {result['space']['temperature']}, "
             f"feature weight {result['space']['feature_weight']}; budget: "
             + ", ".join(f"{k} {'all' if v is None else v}" for k, v in result["budget"].items())
             + f"). Picked on validation {metric} × 100; the test split scored for the pick only. Teacher: validation "
             f"{result['teacher_validation'] * 100:.2f}.", "",
             "| student | method | profile's settings (val) | tuned (val) | test of the pick | lr | alpha | temperature | beta |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, block in result["results"].items():
        student, method = key.split("/")
        pick_ = block["pick"]
        chosen = block["trials"][pick_["trial"]]["settings"]
        cells = [f"{chosen[k]:g}" if k in pick_["settings"] else "" for k in DIMENSIONS]  # the method's dimensions
        lines.append(f"| {student} | {method} | {block['default_validation'] * 100:.2f} | {pick_['validation'] * 100:.2f} "
                     f"(trial {pick_['trial']}) | {pick_['test'] * 100:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Tune every method with the same trials, on validation only.")
    add_profile_args(parser)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--students", nargs="+", default=None, help="default: the profile's distill.students")
    parser.add_argument("--methods", nargs="+", default=None, help="default: the profile's distill.methods")
    parser.add_argument("--work-dir", default=None, help="default: benchmarks/work/tune-<task>-seed<seed>")
    parser.add_argument("--output", default=None, help="default: benchmarks/tuning-<task>.json (in BENCHMARKS.md)")
    parser.add_argument("--keep-all", action="store_true", help="keep every trial's student, not only the picks")
    add_teacher_from(parser)
    args = parser.parse_args(argv)
    raw = read_profile(parser, args)
    students = args.students or raw["distill"]["students"]
    methods = args.methods or raw["distill"]["methods"]
    if args.teacher_from:
        adopt_shared(work_dir(args, raw, "tune"), raw, Path(args.teacher_from))
    result = tune(raw, work_dir(args, raw, "tune"), students, methods, args.trials, keep_all=args.keep_all)
    result["params"] = profile_name(str(Path(args.params).resolve()))
    result["overrides"] = overrides(parser, args)
    from benchmarks.run import write_result

    write_result("tuning", result, args.output)
    print(render(result))
    print(per_method_yaml(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
