"""The student-size curve: ``python -m benchmarks.curve``: which pruned student to train, measured.

For a profile (default ``profiles/alpaca.yaml``) and one seed, each (width, depth) of ``--widths`` x ``--depths``
is a pruned student (``students.<--student>``: hidden size = width = k, the relevance-selected teacher units;
``num_layers`` = depth; MLP channels scaled with the width, or, with ``--mlp-ratios``, each ratio x the width: a
deeper student with a narrower MLP at the same parameter share) trained with ``--method`` (default kd) for the same
fixed budget (``--steps`` optimizer steps) from the teacher cache, then scored on the validation split (generation:
the teacher-forced response NLL; classification: the primary metric). Reported per size: parameters, their share of
the teacher's, the validation score and seconds; the pick is the best validation score among the sizes with at
most ``--max-ratio`` of the teacher's parameters. Nothing here reads the test split.

The shared stages (prepare, teacher, relevance, cache) run once (``benchmarks.tune.run_shared``); each width gets
the relevance index and cache of its own k (``benchmarks.ablate.relevance_root``), linked to the base's data and
teacher. Each size's record is written as it finishes, so an interrupted run continues. Writes ``--output``
(default benchmarks/curve-<task>.json; ``python -m benchmarks.run`` puts it in BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from benchmarks.cli import add_profile_args, add_teacher_from, read_profile, work_dir

REPO = Path(__file__).resolve().parents[1]


def heads_for(width: int, wanted: int, kv_groups: int, head_size: int | None = None) -> int:
    """The query heads of a student ``width`` wide. With ``head_size`` (BERT, GPT-2: the head size is the teacher's,
    hidden = heads x head size): ``width / head_size``. Otherwise (Llama: heads keep their own size) the most heads,
    at most ``wanted``, that divide ``width`` and keep the same number in every KV group (what pruning can do)."""
    if head_size:
        if width % head_size:
            raise SystemExit(f"width {width}: the teacher's heads are {head_size} wide; give a multiple of {head_size}")
        return width // head_size
    for heads in range(wanted, 0, -1):
        if width % heads == 0 and heads % kv_groups == 0:
            return heads
    raise SystemExit(f"width {width}: no head count up to {wanted} divides it in whole KV groups of {kv_groups}")


def mlp_channels(width: int, d_teacher: int, teacher_intermediate: int | None, ratio: float | None) -> int | None:
    """The MLP channels of a student ``width`` wide: ``ratio`` x width, or (None) the teacher's MLP scaled with the
    width; None where the teacher has no MLP width to scale."""
    if ratio is not None:
        channels = round(ratio * width)
        if teacher_intermediate and not 0 < channels <= teacher_intermediate:
            raise SystemExit(f"--mlp-ratios {ratio:g}: {channels} MLP channels at width {width}; pruning keeps between 1 "
                             f"and the teacher's {teacher_intermediate}")
        return channels
    return max(1, round(teacher_intermediate * width / d_teacher)) if teacher_intermediate else None


def sized(raw: dict, student: str, method: str, width: int, depth: int, steps: int, d_teacher: int,
          teacher_intermediate: int | None, kv_groups: int = 1, head_size: int | None = None,
          mlp_ratio: float | None = None) -> dict:
    """``raw`` training only ``student`` at this width and depth (MLP: :func:`mlp_channels`) with ``method`` for
    ``steps`` steps (query heads: the student's, or fewer where the width needs it)."""
    out = json.loads(json.dumps(raw))
    spec = out["students"][student]
    spec.update(hidden_size=width, num_layers=depth, prune_layers=None)
    if spec.get("num_heads"):
        spec["num_heads"] = heads_for(width, spec["num_heads"], kv_groups, head_size)
    channels = mlp_channels(width, d_teacher, teacher_intermediate, mlp_ratio)
    if channels:
        spec["intermediate_size"] = channels
    out["distill"]["students"], out["distill"]["methods"] = [student], [method]
    out["distill"]["train"]["max_steps"] = steps
    out["distill"]["train"]["patience"] = None
    return out


def score_of(scores: dict, generation: bool, metric: str) -> float:
    return scores["loss"] if generation else scores[metric]


def curve(raw: dict, root: Path, student: str, method: str, widths: list[int], depths: list[int], steps: int,
          max_ratio: float, mlp_ratios: list[float] | None = None) -> dict:
    from benchmarks.ablate import relevance_root
    from benchmarks.tune import OutputPaths, drop_scratch, run_shared
    from flexkd import stages
    from flexkd.config import parse_config
    from flexkd.models import count_parameters
    from flexkd.project import Paths, read_json, write_json
    from flexkd.prune import geometry
    from flexkd.tasks import task_for
    from flexkd.train import set_threads

    set_threads()
    cfg = parse_config(raw, source="curve")
    if cfg.student(student).init != "prune":
        raise SystemExit(f"--student {student}: the curve is of pruned students (init: prune), not {cfg.student(student).init}")
    generation = cfg.data.is_generation
    metric = cfg.evaluate.primary_metric
    run_shared(root, raw)
    paths = Paths(root, cfg.data.task, cfg.project.runs_dir, cfg.project.work_dir)
    teacher = task_for(cfg).load_model(str(paths.teacher))
    shape, teacher_params = geometry(teacher), count_parameters(teacher)
    d_teacher, n_layers = shape.hidden, shape.layers
    teacher_intermediate = getattr(teacher.config, "intermediate_size", None)
    kv_groups = getattr(teacher.config, "num_key_value_heads", None) or 1  # GQA: heads kept evenly per group
    head_size = shape.head_dim if shape.family in ("bert", "gpt2") else None  # heads x head size = width there
    del teacher
    rows = []
    sizes = []  # every size checked before any trains
    for width in widths:
        for depth in depths:
            if width > d_teacher or depth > n_layers:
                raise SystemExit(f"width {width} / depth {depth}: the teacher has {d_teacher} units and {n_layers} layers")
            sizes += [(width, depth, ratio, sized(raw, student, method, width, depth, steps, d_teacher,
                                                  teacher_intermediate, kv_groups, head_size, ratio))
                      for ratio in (mlp_ratios or [None])]
    for width, depth, ratio, params in sizes:
        mlp = params["students"][student].get("intermediate_size")
        name = f"w{width}-d{depth}" + ("" if ratio is None else f"-mlp{mlp}")
        record_path = root / "curve" / "records" / f"{name}.json"
        record = read_json(record_path) if record_path.exists() else None
        if record is None or record.get("params") != params:
            sized_cfg = parse_config(params, source=f"curve w{width} d{depth}")
            where = relevance_root(root, params)
            size_paths = Paths(where, sized_cfg.data.task, sized_cfg.project.runs_dir, sized_cfg.project.work_dir)
            directory = root / "curve" / name
            began = time.perf_counter()
            out = stages.distill(sized_cfg, OutputPaths(size_paths, directory), task_for(sized_cfg), student, method)
            drop_scratch(where, sized_cfg, student, method)
            shutil.rmtree(directory, ignore_errors=True)
            record = {"params": params, "width": width, "depth": depth,
                      "parameters": out["summary"]["parameters"], "validation": out["scores"],
                      "steps": out["summary"]["steps_run"], "seconds": round(time.perf_counter() - began, 1)}
            write_json(record_path, record)
        value = score_of(record["validation"], generation, metric)
        rows.append({"width": width, "depth": depth, "heads": params["students"][student].get("num_heads"),
                     "mlp": mlp, "parameters": record["parameters"],
                     "parameter_ratio": record["parameters"] / teacher_params, "validation": value,
                     "steps": record["steps"], "seconds": record["seconds"]})
        print(f"width {width} depth {depth} MLP {mlp}: {record['parameters'] / 1e6:.1f}M parameters "
              f"({rows[-1]['parameter_ratio']:.1%}), validation {'NLL' if generation else metric} {value:.4f}")
    eligible = [r for r in rows if r["parameter_ratio"] <= max_ratio]
    best = (min if generation else max)(eligible, key=lambda r: r["validation"]) if eligible else None
    return {"task": cfg.data.task, "seed": cfg.project.seed, "student": student, "method": method, "steps": steps,
            "batch_size": cfg.distill.train.batch_size, "score": "validation NLL" if generation else f"validation {metric}",
            "lower_is_better": generation, "teacher_parameters": teacher_params, "max_ratio": max_ratio,
            "vocabulary": cfg.student(student).vocabulary,
            "rows": rows, "pick": best}


def vocabulary_note(result: dict) -> str:
    if result.get("vocabulary", "full") == "full":
        return ""
    return (", then cut to the training split's tokens (`vocabulary: train`: the parameters are those of the student "
            "as saved)")


def render(result: dict) -> str:
    lines = [f"`python -m benchmarks.curve` ({result['task']}, seed {result['seed']}): pruned `{result['student']}` "
             f"students trained with {result['method']} for {result['steps']} steps of {result['batch_size']} from the "
             f"teacher cache{vocabulary_note(result)}; {result['score']} "
             f"({'lower' if result['lower_is_better'] else 'higher'} is better). The "
             f"teacher has {result['teacher_parameters'] / 1e6:.1f}M parameters.", "",
             "| width | depth | heads | MLP | parameters | share of the teacher's | " + result["score"] + " | seconds |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['width']} | {row['depth']} | {row.get('heads') or ''} | {row.get('mlp') or ''} "
                     f"| {row['parameters'] / 1e6:.1f}M "
                     f"| {row['parameter_ratio']:.1%} "
                     f"| {row['validation']:.4f} | {row['seconds']:.0f} |")
    pick = result["pick"]
    lines += ["", f"Pick (best with at most {result['max_ratio']:.0%} of the teacher's parameters): "
                  + (f"width {pick['width']}, depth {pick['depth']}"
                     + (f", MLP {pick['mlp']}" if pick.get("mlp") else "") + "." if pick else "none fits.")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Pruned student width x depth against validation, at a fixed budget.")
    add_profile_args(parser, REPO / "profiles" / "alpaca.yaml", "the profile (default: profiles/alpaca.yaml)")
    parser.add_argument("--student", default="pruned", help="the student set-up to size (init: prune)")
    parser.add_argument("--method", default="kd")
    parser.add_argument("--widths", nargs="+", type=int, default=[288, 384, 480, 576])
    parser.add_argument("--depths", nargs="+", type=int, default=[8, 12, 16])
    parser.add_argument("--mlp-ratios", nargs="+", type=float, default=None,
                        help="MLP channels of each size as these multiples of its width (default: the teacher's MLP "
                             "scaled with the width), e.g. 2 4: a deeper student with a narrower MLP at the same share")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of every size (the fixed budget)")
    parser.add_argument("--max-ratio", type=float, default=0.5, help="largest share of the teacher's parameters")
    parser.add_argument("--work-dir", default=None, help="default: benchmarks/work/curve-<task>-seed<seed>")
    parser.add_argument("--output", default=None, help="default: benchmarks/curve-<task>.json (in BENCHMARKS.md)")
    add_teacher_from(parser)
    args = parser.parse_args(argv)
    raw = read_profile(parser, args)
    if args.teacher_from:
        from benchmarks.tune import adopt_shared

        adopt_shared(work_dir(args, raw, "curve"), raw, Path(args.teacher_from))
    result = curve(raw, work_dir(args, raw, "curve"), args.student, args.method, args.widths, args.depths, args.steps, args.max_ratio,
                   args.mlp_ratios)
    from benchmarks.run import write_result

    write_result("curve", result, args.output)
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
