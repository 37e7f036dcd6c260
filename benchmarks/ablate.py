"""What Flex-KD leaves open, against validation: ``python -m benchmarks.ablate``.

Each variant changes one choice of the method and trains the flexkd student of every student set-up with it, seed
by seed; reported: the validation score (``evaluate.primary_metric``) and its difference to ``base`` paired by seed.
The seeds are the students' (``project.seed`` of the distill runs: init, data order, the random draw of the
control); the teacher, its relevance scores and cache are one base workspace's, made with the profile's seed.
Nothing here looks at the test split: a variant that helps on validation becomes a param.

Variants (``--variants``, default all):
- ``base``: the profile as it is (with ``--tuning``: each student's tuned flexkd settings, see benchmarks/tune.py);
- ``relevance:grad_x_act``, ``relevance:fisher``: the other unit scores;
- ``relevance:random``: k units drawn at random (the control: what the relevance selection is worth);
- ``order:score``: the random-init student's unit i paired with the i-th best unit instead of the i-th by index
  (not run for a pruned student: it is always paired in index order, its units being the teacher's);
- ``loss:barlow``, ``loss:mse``: the other Flex-KD losses;
- ``layers:matched``: the term also on every student layer against its teacher layer (the teacher runs online);
- ``positions:head``: classification: the feature term compares only the position the classification head reads
  (BERT: [CLS]) instead of every token: the only last-layer position the task loss, and so the relevance scores,
  depend on.

``--method`` (default flexkd) trains another feature method instead (projector, cka), with the variants that concern
it (``base``, ``positions:head``), so that a variant that helps Flex-KD can be checked against the baselines under
the same change.

The shared stages (prepare, teacher, relevance, cache) run once (``benchmarks.tune.run_shared``; the tuning
workspace of the same profile is reused with ``--base-dir``); a variant that changes the relevance
index gets a workspace of its own that links the base's prepared data and teacher and reruns only the relevance
and cache stages. Each variant's record is written as it finishes, so an interrupted run continues. Writes
``--output`` (default benchmarks/ablation-<task>.json; ``python -m benchmarks.run`` puts it in BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from benchmarks.cli import add_profile_args, add_teacher_from, read_profile

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "base": {},
    "relevance:grad_x_act": {"relevance.method": "grad_x_act"},
    "relevance:fisher": {"relevance.method": "fisher"},
    "relevance:random": {"relevance.method": "random"},
    "order:score": {"relevance.order": "score"},
    "loss:barlow": {"distill.flexkd_loss": "barlow"},
    "loss:mse": {"distill.flexkd_loss": "mse"},
    "layers:matched": {"distill.flexkd_layers": "matched"},
    "positions:head": {"distill.feature_positions": "head"},
}
ANY_METHOD = ("base", "positions:head")  # the variants that concern every feature method, not Flex-KD alone


def with_tuning(raw: dict, tuning: dict | None, method: str = "flexkd") -> dict:
    """``raw`` with the tuned ``method`` settings of every student in ``tuning`` (a benchmarks/tune.py result)."""
    from benchmarks.tune import with_settings

    for key, block in ((tuning or {}).get("results") or {}).items():
        student, tuned = key.split("/")
        if tuned == method and student in raw["students"]:
            raw = with_settings(raw, student, tuned, block["pick"]["settings"])
    return raw


def applies(name: str, student: dict, method: str = "flexkd") -> bool:
    """order:score means nothing to a pruned student (its unit i is teacher unit sorted(S)[i] whatever the order);
    a method other than flexkd gets only the variants that concern it (``ANY_METHOD``)."""
    if method != "flexkd" and name not in ANY_METHOD:
        return False
    return not (name == "order:score" and student.get("init") == "prune")


def variant_params(raw: dict, name: str, students: list[str], method: str = "flexkd") -> dict:
    from flexkd.overrides import set_dotted

    out = json.loads(json.dumps(raw))
    out["distill"]["students"], out["distill"]["methods"] = list(students), [method]
    for key, value in VARIANTS[name].items():
        set_dotted(out, key, value)
    return out


def relevance_root(base: Path, params: dict) -> Path:
    """The workspace holding the relevance index and cache ``params`` need (their relevance settings, k = the
    students' hidden size, the seed of a random draw): the base's own, or one that links the base's prepared data
    and teacher and reruns the relevance and cache stages."""
    from flexkd import stages
    from flexkd.config import parse_config
    from flexkd.project import Paths, read_json, write_json
    from flexkd.relevance import RelevanceIndex
    from flexkd.tasks import task_for

    rel = params["relevance"]
    cfg = parse_config(params, source=str(base))
    base_k = RelevanceIndex.load(Paths(base, cfg.data.task, cfg.project.runs_dir, cfg.project.work_dir).relevance
                                 / "index.json").k
    if rel == read_json(base / "shared.json")["key"]["relevance"] and cfg.k == base_k:
        return base
    name = f"{base.name}-relevance-{rel.get('method', 'grad')}-{rel.get('order', 'index')}"
    seed = params["project"]["seed"] if rel.get("method") == "random" else None  # each seed its own draw
    root = base.parent / (name + (f"-k{cfg.k}" if cfg.k != base_k else "") + (f"-seed{seed}" if seed is not None else ""))
    done = root / "relevance.json"
    record = {"relevance": rel, "k": cfg.k, "seed": seed}
    if done.exists() and read_json(done) == record:
        return root
    if root.exists():
        shutil.rmtree(root)
    paths, base_paths = (Paths(r, cfg.data.task, cfg.project.runs_dir, cfg.project.work_dir) for r in (root, base))
    for link, target in ((paths.prepared, base_paths.prepared), (paths.teacher, base_paths.teacher)):
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target.resolve(), target_is_directory=True)
    task = task_for(cfg)
    stages.select_units(cfg, paths, task, plot=False)
    stages.teacher_cache(cfg, paths, task)
    write_json(done, record)
    return root


def run_variant(base: Path, raw: dict, name: str, student: str, method: str = "flexkd") -> dict:
    """Train the ``method`` student ``student`` under variant ``name``; its record (reused when it finished before)."""
    from benchmarks.tune import OutputPaths, drop_scratch
    from flexkd import stages
    from flexkd.config import parse_config
    from flexkd.project import Paths, read_json, write_json
    from flexkd.tasks import task_for

    params = variant_params(raw, name, [student], method)
    seed = params["project"]["seed"]
    label = student if method == "flexkd" else f"{student}-{method}"  # flexkd's records keep their earlier names
    record_path = base / "ablation" / "records" / f"{name.replace(':', '-')}-{label}-seed{seed}.json"
    if record_path.exists():
        record = read_json(record_path)
        if record.get("params") == params:
            return record
    root = relevance_root(base, params)
    cfg = parse_config(params, source=f"{base} {name}")
    paths = Paths(root, cfg.data.task, cfg.project.runs_dir, cfg.project.work_dir)
    began = time.perf_counter()
    directory = base / "ablation" / name.replace(":", "-")
    out = stages.distill(cfg, OutputPaths(paths, directory), task_for(cfg), student, method)
    drop_scratch(root, cfg, student, method)
    shutil.rmtree(directory / student, ignore_errors=True)  # the score is what an ablation keeps
    record = {"variant": name, "student": student, "method": method, "params": params, "validation": out["scores"],
              "best_step": out["summary"]["best_step"],
              "teacher_outputs": out["summary"]["teacher_outputs"], "seconds": round(time.perf_counter() - began, 1)}
    write_json(record_path, record)
    return record


def ablate(raw: dict, seeds: list[int], students: list[str], variants: list[str], work: Path,
           base_dir: Path | None = None, method: str = "flexkd") -> dict:
    from benchmarks.tune import run_shared
    from flexkd.config import parse_config
    from flexkd.train import set_threads

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; valid: {list(VARIANTS)}")
    if "base" not in variants:
        variants = ["base", *variants]
    set_threads()
    metric = parse_config(raw, source="ablation").evaluate.primary_metric
    scores: dict[str, dict[str, dict[int, float]]] = {v: {s: {} for s in students} for v in variants}
    base = base_dir or work / f"{raw['data']['task']}-seed{raw['project']['seed']}"
    run_shared(base, raw, must_match=base_dir is not None)
    for seed in seeds:
        seeded = json.loads(json.dumps(raw))
        seeded["project"]["seed"] = seed
        for name in variants:
            for student in students:
                if not applies(name, seeded["students"][student], method):
                    continue
                record = run_variant(base, seeded, name, student, method)
                scores[name][student][seed] = record["validation"][metric]
                print(f"seed {seed} {name} {student}/{method}: validation {metric} {record['validation'][metric]:.4f} "
                      f"({record['seconds']:.0f}s)")
    table = {}
    for name in variants:
        for student in students:
            if not scores[name][student]:
                continue
            values = [scores[name][student][s] for s in seeds]
            diffs = [scores[name][student][s] - scores["base"][student][s] for s in seeds]
            table[f"{name}/{student}"] = {
                "variant": name, "student": student, "values": values, "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "minus_base": statistics.fmean(diffs), "minus_base_std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0}
    return {"task": raw["data"]["task"], "primary_metric": metric, "seeds": list(seeds), "students": list(students),
            "teacher_seed": raw["project"]["seed"], "method": method,
            "variants": {v: VARIANTS[v] for v in variants if applies(v, {}, method)}, "table": table,
            "budget": {"data.max_train": raw["data"].get("max_train"), "distill.train.epochs": raw["distill"]["train"]["epochs"]}}


def render(result: dict) -> str:
    metric = result["primary_metric"]
    students = result["students"]
    method = result.get("method", "flexkd")
    tuned = f"; tuned {method} settings from {result['tuning']}" if result.get("tuning") else ""
    budget = ", ".join(f"{k} {v}" for k, v in result["budget"].items())
    lines = [f"`python -m benchmarks.ablate` ({result['task']}, the {method} student, student seeds "
             f"{', '.join(map(str, result['seeds']))} with the teacher of seed {result.get('teacher_seed', '?')}; "
             f"budget: {budget}{tuned}): validation {metric} × 100, mean ± std over seeds, and Δ against `base` paired "
             "by seed.", "",
             "| variant | " + " | ".join(f"{s} | Δ {s}" for s in students) + " |",
             "|---|" + "---:|---:|" * len(students)]
    for name, overrides in result["variants"].items():
        cells = []
        for student in students:
            row = result["table"].get(f"{name}/{student}")
            if row is None:
                cells += ["n/a", ""]
                continue
            cells += [f"{row['mean'] * 100:.2f} ± {row['std'] * 100:.2f}",
                      "" if name == "base" else f"{row['minus_base'] * 100:+.2f} ± {row['minus_base_std'] * 100:.2f}"]
        label = name + (f" (`{', '.join(f'{k}: {v}' for k, v in overrides.items())}`)" if overrides else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Flex-KD's open choices, each against validation.")
    add_profile_args(parser)
    parser.add_argument("--tuning", default=None, help="a benchmarks/tune.py result: use its picks for the method")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44], help="the students' seeds")
    parser.add_argument("--students", nargs="+", default=None, help="default: the profile's distill.students")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"any of {list(VARIANTS)}")
    parser.add_argument("--method", default="flexkd", choices=["flexkd", "projector", "cka"],
                        help="the feature method the variants train (default flexkd; the others get base and "
                             "positions:head)")
    parser.add_argument("--work-dir", default=str(REPO / "benchmarks" / "work" / "ablation"))
    parser.add_argument("--base-dir", default=None, metavar="DIR",
                        help="the shared stages are in DIR (e.g. the tuning workspace of the same profile)")
    parser.add_argument("--output", default=None, help="default: benchmarks/ablation-<task>.json, "
                        "ablation-<task>-<method>.json for another method (in BENCHMARKS.md)")
    add_teacher_from(parser)
    args = parser.parse_args(argv)
    raw = read_profile(parser, args)
    tuning = json.loads(Path(args.tuning).read_text()) if args.tuning else None
    raw = with_tuning(raw, tuning, args.method)
    students = args.students or raw["distill"]["students"]
    base_dir = Path(args.base_dir) if args.base_dir else None
    if args.teacher_from:
        from benchmarks.tune import adopt_shared

        base_dir = base_dir or Path(args.work_dir) / f"{raw['data']['task']}-seed{raw['project']['seed']}"
        adopt_shared(base_dir, raw, Path(args.teacher_from))
    result = ablate(raw, args.seeds, students, args.variants, Path(args.work_dir), base_dir, method=args.method)
    result["tuning"] = args.tuning and Path(args.tuning).name
    from benchmarks.run import write_result

    output = args.output or (None if args.method == "flexkd" else  # flexkd's keeps its earlier name
                             str(REPO / "benchmarks" / f"ablation-{result['task']}-{args.method}.json"))
    write_result("ablation", result, output)
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
