"""The benchmark command: ``python -m benchmarks.run`` (``make benchmark``) writes BENCHMARKS.md and benchmarks/results.json.

1. Quality (benchmarks/quality.py): every method × student set-up × seed on each profile (default: SST-2 and CoLA,
   seeds 42, 43, 44), each a real pipeline run in its own workspace; mean ± std and the flexkd - projector delta.
   The same runs give the orchestration overhead (pipeline wall time minus the stages' compute seconds) and the
   peak RSS of each stage.
2. Speed (benchmarks/speed.py), on the first profile's first-seed workspace: relevance scoring vs. a plain teacher
   forward + backward, distill step time per method with the teacher online and cached vs. a plain student step,
   the Flex-KD term's own share of a step, and the cache's size with the selected units vs. every unit.
All speeds are ratios measured inside one run (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow

REPO = Path(__file__).resolve().parents[1]


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        memory = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20  # GiB
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory, 1) if memory else None,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


@flow(name="flexkd-benchmark", log_prints=True)
def benchmark_flow(profiles: list[str] = ("sst2-bench", "cola-bench", "alpaca-bench"), seeds: list[int] = (42, 43, 44), work_dir: str | None = None,
                   overrides: dict | None = None, rounds: int = 12, output: str | None = None,
                   speed_from: str | None = None, fresh: bool = False, start_from: str | None = None) -> dict:
    from benchmarks.quality import quality_flow
    from benchmarks.speed import cache_sizes, distill_step_times, relevance_time_ratio

    work = Path(work_dir) if work_dir else REPO / "benchmarks" / "work"
    earlier_speed = json.loads(Path(speed_from).read_text()).get("speed") if speed_from else None
    if speed_from and not earlier_speed:  # checked before hours of runs, not after
        raise ValueError(f"--speed-from {speed_from}: no speed section in it")
    quality = quality_flow(profiles=list(profiles), seeds=list(seeds), work_dir=str(work), overrides=overrides,
                           start=start_from)
    first = work / f"{Path(profiles[0]).stem}-seed{seeds[0]}"
    if earlier_speed:  # the speed section of an earlier run (it names its own workspace), e.g. when a seed was added
        speed = earlier_speed
        print(f"speed section reused from {speed_from} (measured on {speed['workspace']}, "
              f"{speed.get('measured', 'earlier')})")
    else:
        speed = {
            "workspace": first.name,
            "measured": machine()["date"],
            "relevance": relevance_time_ratio(first),
            "distill_steps": distill_step_times(first, rounds=rounds),
            "cache_sizes": cache_sizes(first),
        }
    out = Path(output) if output else REPO
    earlier = out / "benchmarks" / "results.json"
    if earlier.exists() and not fresh:  # profiles and seeds of earlier runs stay; this run's replace their own
        from benchmarks.quality import merge

        quality = merge(json.loads(earlier.read_text()).get("quality"), quality)
    all_seeds = sorted({run["seed"] for block in quality.values() for run in block["runs"]})
    results = {"machine": machine(), "profiles": list(quality), "seeds": all_seeds, "overrides": overrides or {},
               "quality": quality, "speed": speed, **runtime_sections()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks").mkdir(exist_ok=True)
    (out / "benchmarks" / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "BENCHMARKS.md").write_text(render(results))
    print(f"wrote {out / 'BENCHMARKS.md'} and {out / 'benchmarks' / 'results.json'}")
    return results


def runtime_sections(directory: Path = REPO / "benchmarks") -> dict:
    """The runtime benchmark (``python -m benchmarks.runtime``: benchmarks/runtime.json) and the device check
    (``python -m benchmarks.device_check``: benchmarks/device_check.json) when they have been run."""
    out = {}
    for key, name in (("runtime", "runtime.json"), ("device_check", "device_check.json")):
        path = directory / name
        if path.exists():
            out[key] = json.loads(path.read_text())
    for key, prefix in (("tuning", "tuning"), ("ablation", "ablation"), ("curve", "curve"), ("teacher_sweep", "teacher")):
        # python -m benchmarks.tune / .ablate / .curve / .teacher: one file a task
        found = {path.stem.removeprefix(f"{prefix}-"): json.loads(path.read_text())
                 for path in sorted(directory.glob(f"{prefix}-*.json"))}
        if found:
            out[key] = found
    return out


def write_result(kind: str, result: dict, output: str | None = None) -> Path:
    """Save a tune / ablation / curve / teacher result (with the machine it ran on) where ``runtime_sections`` reads it:
    benchmarks/<kind>-<task>.json, unless ``output`` names another file."""
    result["machine"] = machine()
    path = Path(output) if output else REPO / "benchmarks" / f"{kind}-{result['task']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def render_tuning(results: dict) -> list[str]:
    from benchmarks.ablate import render as render_ablation
    from benchmarks.curve import render as render_curve
    from benchmarks.teacher import render as render_teacher
    from benchmarks.tune import render as render_table

    lines = []
    for key, title, render_block in (
            ("tuning", "Tuning: the same trials for every method, on validation", render_table),
            ("ablation", "Ablations: what Flex-KD leaves open, on validation", render_ablation),
            ("curve", "Student size: pruned width x depth at a fixed budget, on validation", render_curve),
            ("teacher_sweep", "Teacher ceiling: the teacher recipe's learning rate, on validation", render_teacher)):
        blocks = results.get(key) or {}
        if blocks:
            lines += [f"## {title}", ""]
            for block in blocks.values():
                lines += render_block(block).splitlines() + [""]
    return lines


# ------------------------------------------------------------------------------------------------ report
def render_runtime(results: dict) -> list[str]:
    lines = ["## Runtime: device, precision, batches", ""]
    runtime = results.get("runtime")
    if runtime:
        from benchmarks.runtime import render as render_table

        m = runtime["machine"]
        budget = runtime.get("budget")
        budget_text = (" with " + ", ".join(f"{key} {value}" for key, value in budget.items()) if budget else "")
        lines += [f"`python -m benchmarks.runtime` ({m['date']}, {m['cpu']}, {m['cores']} cores): the default run's "
                  f"(params.yaml of that date{budget_text}) teacher and distill stages ({', '.join(f'{s}/{x}' for s in runtime['students'] for x in runtime['methods'])}) "
                  "through `flexkd.stages`, seed by seed under each runtime: "
                  + "; ".join(f"`{name}` = " + ", ".join(f"{key.split('.')[-1]}: {value}" for key, value in keys.items())
                              for name, keys in runtime["configs"].items()) + ".", ""]
        lines += render_table(runtime["summary"], runtime.get("bf16_probe")).splitlines()
        lines.append("")
    check = results.get("device_check")
    if check and not check.get("tiny"):
        from benchmarks.device_check import render as render_check

        lines += ["`python -m benchmarks.device_check`:", ""] + render_check(check).splitlines() + [""]
    else:
        lines += ["Device check on a GPU (`python -m benchmarks.device_check`): **not run yet**: no GPU has been lent to "
                  "this project's sessions so far. Its CPU form (`--device cpu --tiny`) runs in the test suite "
                  "(tests/integration/test_device_check.py).", ""]
    return lines


def _pm(stats: dict, scale: float = 1.0, digits: int = 2) -> str:
    return f"{stats['mean'] * scale:.{digits}f} ± {stats['std'] * scale:.{digits}f}"


def _goal(value: float, goal: float, below: bool = True, percent: bool = False) -> str:
    met = value <= goal if below else value >= goal
    return f"{'met' if met else 'NOT met'} (goal {'≤' if below else '≥'} {f'{goal:.0%}' if percent else f'{goal:g}'})"


def quality_table(title: str, scores: dict, deltas: dict, scale: float, digits: int = 2) -> list[str]:
    """One metric's table: a row per student set-up, a column per method, flexkd - projector, then the teacher."""
    from flexkd.losses.methods import METHODS  # the built-in methods, in their order; composed ones after

    found = {k.split("/")[1] for k in scores if "/" in k}
    methods = [m for m in METHODS if m in found] + sorted(found - set(METHODS))
    students = list(dict.fromkeys(k.split("/")[0] for k in scores if "/" in k))
    lines = [title, "", "| student | " + " | ".join(methods) + " | flexkd − projector |",
             "|---|" + "---:|" * (len(methods) + 1)]
    for student in students:
        cells = [_pm(scores[f"{student}/{method}"], scale, digits) if f"{student}/{method}" in scores else ""
                 for method in methods]
        delta = deltas.get(student)
        lines.append(f"| {student} | " + " | ".join(cells) + f" | {_pm(delta, scale, digits) if delta else ''} |")
    return lines + ["", f"Teacher: {_pm(scores['teacher'], scale, digits)}."]


def _run_label(run: dict) -> str:
    """How a run reused an earlier run's stages (DVC skipped them), for its row; empty for a whole pipeline run."""
    if run.get("started_from"):
        return f" (from {run['started_from']})"
    return " (continued)" if run.get("continued") else ""


def render(results: dict) -> str:
    from benchmarks.quality import budget, method_settings

    m = results["machine"]
    speed = results["speed"]
    lines = [
        "# BENCHMARKS",
        "",
        "Written by `python -m benchmarks.run` (`make benchmark`); raw numbers in `benchmarks/results.json`. Speeds are",
        "ratios measured inside one run, configurations interleaved batch by batch, so that a noisy machine slows them alike.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM, GPU: {m['gpu'] or 'none'}; "
        f"Python {m['python']}, torch {m['torch']}; {m['platform']}; {m['date']}.",
        f"Profiles: {', '.join(results['profiles'])}; seeds: {', '.join(map(str, results['seeds']))}"
        + (f"; overrides: `{json.dumps(results['overrides'])}`" if results["overrides"] else "") + ".",
        "",
        "## Where the time goes",
        "",
    ]
    rel = speed["relevance"]
    lines += [f"Measured on the `{speed['workspace']}` workspace" + (f" ({speed['measured']})." if speed.get("measured") else "."), ""]
    lines += [
        f"Relevance scoring vs. a plain teacher forward + backward over the same {rel['batches']} batches of "
        f"{rel['batch_size']}: **{rel['ratio']:.2f}x**, {_goal(rel['ratio'], 1.3)}.",
        "",
    ]
    steps = speed["distill_steps"]
    lines += [
        f"Distill step time (student `{steps['student']}`, batch {steps['batch_size']}, median of {steps['rounds']} "
        "interleaved rounds) relative to a plain student step (`ft`: task loss only):",
        "",
        "| method | teacher online | teacher cached | cached / online |",
        "|---|---:|---:|---:|",
    ]
    ratios = steps["ratio_to_plain_step"]
    for method in dict.fromkeys(name.split("/")[0] for name in ratios):
        online, cached = ratios.get(f"{method}/online"), ratios.get(f"{method}/cache")
        both = steps.get("cached_over_online", {}).get(method)
        lines.append(f"| {method} | {online:.2f} | {'' if cached is None else f'{cached:.2f}'} | "
                     f"{'' if both is None else f'{both:.2f}'} |")
    if "padding" in steps:
        grouped, plain = steps["padding"]["grouped"], steps["padding"]["ungrouped"]
        lines += ["", f"Padding per epoch of the training split (batch {steps['batch_size']}, each batch padded to its "
                      f"longest row): {grouped['real_tokens']:,} real tokens; padded to {plain['padded_tokens']:,} in "
                      f"permutation order, {grouped['padded_tokens']:,} with length-grouped batches "
                      f"(runtime.group_by_length): **{plain['padded_tokens'] / grouped['padded_tokens']:.2f}x** fewer "
                      "tokens through the models."]
    if "flexkd_term_share" in steps:
        lines += ["", f"The Flex-KD term's own forward + backward: **{steps['flexkd_term_share']:.1%}** of a flexkd step "
                      f"(teacher online), {_goal(steps['flexkd_term_share'], 0.05, percent=True)}."]
    sizes = speed["cache_sizes"]
    lines += [
        "",
        f"Teacher cache of the training split ({sizes['selected']['positions']:,} token positions): selected units "
        f"({sizes['selected']['columns']}) {sizes['selected']['bytes'] / 2**20:.1f} MiB vs. every teacher unit "
        f"({sizes['full']['columns']}) {sizes['full']['bytes'] / 2**20:.1f} MiB: **{sizes['selected_over_full']:.2f}x**.",
        "",
        "Orchestration overhead: pipeline wall time (`python -m flows.pipeline`, i.e. `make run` once installed) minus "
        "the seconds the stages spend computing (training, relevance scoring, caching, evaluation, data validation; "
        "MLflow calls inside a training loop are not compute); the rest is Prefect, MLflow, DVC, process start-up, "
        "imports and model loading.",
        "",
        "| run | wall (s) | compute (s) | other (s) | overhead |",
        "|---|---:|---:|---:|---:|",
    ]
    runs = [(name, run) for name, block in results["quality"].items() for run in block["runs"]]
    whole = [run for _, run in runs if not _run_label(run)]  # the mean is over runs of the whole pipeline
    overheads, others = [run["overhead_ratio"] for run in whole], [run["other_seconds"] for run in whole]
    for name, run in runs:
        lines.append(f"| {name} seed {run['seed']}{_run_label(run)} | {run['wall_seconds']:.0f} | "
                     f"{run['compute_seconds']:.0f} | {run['other_seconds']:.0f} | {run['overhead_ratio']:.1%} |")
    if overheads:
        mean = sum(overheads) / len(overheads)
        lines += ["", f"Mean overhead **{mean:.1%}**, {_goal(mean, 0.10, percent=True)}. The other seconds hardly depend on the run "
                      f"(mean {sum(others) / len(others):.0f} s: one process per stage, each importing torch, transformers, "
                      "Prefect and MLflow and starting a flow run, plus model loading and MLflow model logging), while "
                      "compute grows with the data and epochs, and shrinks when nothing else runs on the machine: the ratio "
                      f"falls under 10% once compute passes {9 * sum(others) / len(others) / 60:.0f} minutes."
                      + (" The mean leaves out the runs that reused an earlier run's stages (from another profile's "
                         "workspace, or continued in their own after a change of params): DVC skipped those stages."
                         if len(whole) < len(runs) else "")]
    split_rows = [(name, run) for name, run in runs if run.get("split")]
    if split_rows:
        lines += ["", "Where the other seconds go, summed over the stage processes (runs that logged the split):", "",
                  "| run | stage processes | start-up: interpreter, imports, Prefect flow run | pre-flight | MLflow "
                  "| rest inside stages: model and data loading, saving | DVC between stages, process exits "
                  "| pipeline process: imports, temporary Prefect server, set-up |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, run in split_rows:
            split = run["split"]
            cells = [f"{split[key]:.0f} s ({split[key] / run['other_seconds']:.0%})"
                     for key in ("startup", "preflight", "mlflow", "in_stage", "dvc", "pipeline")]
            lines.append(f"| {name} seed {run['seed']}{_run_label(run)} | {split['stage_processes']} | "
                         + " | ".join(cells) + " |")
        per_process = [run["other_seconds"] / run["split"]["stage_processes"] for _, run in split_rows]
        lines += ["", f"About {sum(per_process) / len(per_process):.0f} s per stage process, spread over every part: no "
                      "single part is most of it. What would cut it is fewer processes (the ten distill stages are "
                      "separate DVC stages so that each student is cached and rerun on its own)."]
    first_profile = next(iter(results["quality"]))
    first_run = results["quality"][first_profile]["runs"][0]
    stages = first_run["stages"]
    lines += ["", f"Peak resident memory per stage ({first_profile}, seed {first_run['seed']}):", "",
              "| stage run | peak RSS (MiB) | compute (s) | stage (s) |", "|---|---:|---:|---:|"]
    for name, stage in stages.items():
        lines.append(f"| {name} | {stage['peak_rss_mb']:.0f} | {stage['compute_seconds']:.1f} | {stage['stage_seconds']:.1f} |")
    lines += [""] + render_runtime(results)
    lines += render_tuning(results)
    lines += ["## Quality", ""]
    for name, block in results["quality"].items():
        quality = block["quality"]
        metric = quality["primary_metric"]
        scale = 1.0 if metric.startswith("rouge") else 100.0  # ROUGE is reported in points already
        scores = quality["scores"]
        shown = f"{metric} × 100" if scale == 100.0 else metric
        lines += quality_table(f"### {name} ({block['task']}): test {shown}, mean ± std over seeds {quality['seeds']}",
                               scores, quality["flexkd_minus_projector"], scale)
        for extra, table in quality.get("secondary", {}).items():  # generation: test NLL (lower is better)
            lines += [""] + quality_table(f"Test {extra} (lower is better), mean ± std over seeds {quality['seeds']}:",
                                   table["scores"], table["flexkd_minus_projector"], 1.0, digits=3)
        best = quality.get("best_student")
        if best:
            picks = ", ".join(f"{name} ×{count}" for name, count in
                              sorted(((n, best["picks"].count(n)) for n in set(best["picks"])), key=lambda x: (-x[1], x[0])))
            lines += ["", f"The student each run picked on validation ({picks}): test {metric} "
                          f"**{_pm(best['over_teacher'], 100.0)}%** of the teacher's, with "
                          f"{best['parameter_ratio']['mean']:.1%} of its parameters."]
        started_runs = [run for run in block["runs"] if run.get("started_from")]
        if started_runs:
            lines += ["", "Started from another profile's finished workspace (`--start-from`; `dvc repro` reran only the "
                          "stages whose params, code or inputs differ, so their teacher is that run's): "
                          + ", ".join(f"seed {run['seed']} from {run['started_from']}" for run in started_runs) + "."]
        spent = budget(block["records"][0]["params"]) if block.get("records") else block.get("budget")
        if spent:
            lines += ["", "Budget: " + ", ".join(f"{k} {v if v is not None else 'all' if k == 'data.max_train' else 'none'}"
                                                 for k, v in spent.items()) + "."]
        tuned = method_settings(block["records"][0]["params"]) if block.get("records") else []
        if tuned:
            lines += ["", "Per-method settings (`students.<s>.per_method`, tuned on validation; the methods not named train at "
                          "distill's): " + "; ".join(tuned) + "."]
        lines.append("")
        sanity = block.get("sanity")
        if sanity:
            lines += [f"Relevance sanity check ({name}, seed {sanity.get('seed', quality['seeds'][0])}): the teacher's test {metric} × 100 "
                      f"with k of its {sanity['d_teacher']} last-layer units silenced (none silenced: "
                      f"{sanity['none'] * scale:.2f}).", "",
                      "| k | top-scored silenced | bottom-scored silenced | random (mean of 3) |", "|---:|---:|---:|---:|"]
            for k, row in sanity["by_k"].items():
                lines.append(f"| {k} | {row['top'] * scale:.2f} | {row['bottom'] * scale:.2f} | {row['random_mean'] * scale:.2f} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the benchmarks; write BENCHMARKS.md and benchmarks/results.json.")
    parser.add_argument("--profiles", nargs="+", default=["sst2-bench", "cola-bench", "alpaca-bench"], help="profile names or params files")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--work-dir", default=None, help="workspaces (default benchmarks/work; reused when complete)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param in every run (YAML value), e.g. --set distill.train.epochs=1")
    parser.add_argument("--rounds", type=int, default=12, help="interleaved rounds of the step-time benchmark")
    parser.add_argument("--output", default=None, help="where BENCHMARKS.md goes (default: the repository)")
    parser.add_argument("--render-from", default=None, metavar="RESULTS_JSON",
                        help="measure nothing: write BENCHMARKS.md from an earlier results.json, with the runtime "
                        "benchmark and device check sections of benchmarks/")
    parser.add_argument("--speed-from", default=None, metavar="RESULTS_JSON",
                        help="reuse the speed section of an earlier results.json (it names the workspace it was measured on)")
    parser.add_argument("--start-from", default=None, metavar="PROFILE",
                        help="start each seed's new workspace as a copy of PROFILE's finished workspace of the same "
                             "seed (under --work-dir): dvc repro there reruns only the stages whose params or code "
                             "differ, e.g. a profile that changes only the students reuses that run's teacher")
    parser.add_argument("--fresh", action="store_true",
                        help="write only this run's profiles and seeds (default: keep those of the results.json there)")
    args = parser.parse_args(argv)
    if args.render_from:
        results = {**json.loads(Path(args.render_from).read_text()), **runtime_sections()}
        out = Path(args.output) if args.output else REPO
        out.mkdir(parents=True, exist_ok=True)
        (out / "BENCHMARKS.md").write_text(render(results))
        print(f"wrote {out / 'BENCHMARKS.md'} from {args.render_from}")
        return 0
    from benchmarks.cli import overrides as cli_overrides

    overrides = cli_overrides(parser, args)
    try:
        benchmark_flow(profiles=args.profiles, seeds=args.seeds, work_dir=args.work_dir, overrides=overrides or None,
                       rounds=args.rounds, output=args.output, speed_from=args.speed_from, fresh=args.fresh,
                       start_from=args.start_from)
    except Exception as err:  # noqa: BLE001
        print(f"\nflexkd benchmark failed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
