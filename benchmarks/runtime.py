"""The runtime benchmark: ``python -m benchmarks.runtime``: what length-grouped batches and bf16 autocast buy.

The teacher and distill stages of a profile (default: ``params.yaml``, the default run) side by side under
runtime configurations, seed by seed, interleaved (seed 42 under each configuration, then seed 43, ...), so that
a noisy machine slows them alike:

- ``before``: the runtime as it was before issue 11: fp32, batches in permutation order (``group_by_length: false``)
  and the foreach AdamW kernel (``fused_optimizer: false``);
- ``default``: today's default on a CPU: length-grouped batches, fused AdamW, fp32;
- ``default-bf16`` (not run unless named: on a CPU without AVX512-BF16 or AMX, bf16 is emulated and many times
  slower): the same under bf16 autocast.

Each (seed, configuration) is a workspace of its own under ``--work-dir`` that runs the library's stages
(:mod:`flexkd.stages`: the code the pipeline's flows run, without Prefect, MLflow or DVC): prepare, fine-tune the
teacher, relevance, teacher cache, then each student set-up and method of ``--students`` / ``--methods``; then the
test and validation scores of the teacher and the students. A finished workspace (its ``result.json``) is reused,
so an interrupted benchmark continues. Reported: seconds per epoch (training steps only, and stage wall time) and
the ratio to ``before``; test and validation accuracy, mean ± std over seeds and the paired difference to
``before``. Writes ``--output`` (JSON) and prints a Markdown table (``--markdown`` writes it to a file).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from benchmarks.cli import SET_HELP
from benchmarks.cli import overrides as cli_overrides

REPO = Path(__file__).resolve().parents[1]

CONFIGS = {
    "before": {"runtime.group_by_length": False, "runtime.precision": "fp32", "runtime.fused_optimizer": False},
    "default": {"runtime.group_by_length": True, "runtime.precision": "fp32", "runtime.fused_optimizer": True},
    "default-bf16": {"runtime.group_by_length": True, "runtime.precision": "bf16", "runtime.fused_optimizer": True},
}
DEFAULT_CONFIGS = ["before", "default"]


def run_workspace(root: Path, raw: dict, students: list[str], methods: list[str]) -> dict:
    """The stages of one (seed, configuration) in ``root``; its result (reused when ``result.json`` is there)."""
    from flexkd import stages
    from flexkd.config import parse_config
    from flexkd.models import load_tokenizer
    from flexkd.project import Paths, read_json, write_json
    from flexkd.tasks import task_for
    from flexkd.train import set_threads

    done = root / "result.json"
    if done.exists():
        result = read_json(done)
        if result.get("params") == raw:
            print(f"{root.name}: reused")
            return result
        shutil.rmtree(root)
    cfg = parse_config(raw, source=str(root))
    paths = Paths(root, cfg.data.task, cfg.project.runs_dir, cfg.project.work_dir)
    task = task_for(cfg)
    set_threads()
    wall: dict[str, float] = {}

    def timed(name, fn, *args, **kwargs):
        began = time.perf_counter()
        out = fn(*args, **kwargs)
        wall[name] = round(time.perf_counter() - began, 2)
        return out

    timed("prepare", lambda: task.prepare(task.load_raw(), paths.prepared))
    teacher = timed("teacher", stages.finetune_teacher, cfg, paths, task)
    timed("relevance", stages.select_units, cfg, paths, task, plot=False)
    timed("teacher_cache", stages.teacher_cache, cfg, paths, task)
    students_out = {}
    for student in students:
        for method in methods:
            out = timed(f"distill/{student}/{method}", stages.distill, cfg, paths, task, student, method)
            students_out[f"{student}/{method}"] = {"train_seconds": out["summary"]["train_seconds"],
                                                   "epochs": cfg.distill.train.epochs, "validation": out["scores"]}
    def test(directory):
        model = task.load_model(str(directory)).to(task.runtime.device)
        return task.test_scores(model, load_tokenizer(str(directory)), paths.prepared)[0]  # the model's own tokenizer

    result = {
        "params": raw, "runtime": task.runtime.describe(), "wall_seconds": wall,
        "primary_metric": cfg.evaluate.primary_metric,
        "teacher": {"train_seconds": teacher["timing"]["train_seconds"], "epochs": cfg.teacher.finetune.epochs,
                    "validation": teacher["validation"], "test": test(paths.teacher)},
        "students": {key: {**value, "test": test(paths.student(*key.split("/")))} for key, value in students_out.items()},
    }
    write_json(done, result)
    return result


def bf16_probe(params: Path, rounds: int = 3, batch_size: int = 32, seq: int = 48) -> dict:
    """The teacher's training step (forward, backward, fused AdamW) in fp32 and under bf16 autocast on this CPU,
    interleaved round by round: the reason ``precision: auto`` keeps fp32 on a CPU without bfloat16 instructions."""
    import torch

    from flexkd.config import load_config
    from flexkd.runtime import Runtime, cpu_has_bf16
    from flexkd.tasks import task_for

    cfg = load_config(params)
    model = task_for(cfg).load_model(cfg.teacher.model)
    model.train()
    ids = torch.randint(1000, 2000, (batch_size, seq), generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(batch_size, dtype=torch.long)
    seconds: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(rounds + 1):  # the first round warms up
        for precision in seconds:
            runtime = Runtime(precision=precision)
            optimizer = runtime.optimizer([{"params": list(model.parameters())}], lr=1e-9)
            began = time.perf_counter()
            with runtime.autocast():
                loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds[precision].append(time.perf_counter() - began)
    fp32, bf16 = (statistics.median(v[1:]) for v in (seconds["fp32"], seconds["bf16"]))
    return {"cpu_has_bf16": cpu_has_bf16(), "batch": batch_size, "seq": seq, "fp32_seconds": round(fp32, 3),
            "bf16_seconds": round(bf16, 3), "bf16_over_fp32": round(bf16 / fp32, 2)}


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def summarise(results: dict[str, dict[int, dict]], metric: str) -> dict:
    """Per configuration: seconds per epoch and scores, mean ± std over seeds; ratios and paired differences
    to the first configuration."""
    configs = list(results)
    base = configs[0]
    seeds = sorted(set.intersection(*(set(r) for r in results.values())))
    models = ["teacher"] + list(results[base][seeds[0]]["students"])

    def entry(result, model):
        return result["teacher"] if model == "teacher" else result["students"][model]

    def wall_key(model):
        return "teacher" if model == "teacher" else f"distill/{model}"

    out: dict = {"seeds": seeds, "metric": metric, "baseline": base, "models": {}}
    for model in models:
        rows = {}
        for config in configs:
            runs = [results[config][s] for s in seeds]
            per_epoch = [entry(r, model)["train_seconds"] / entry(r, model)["epochs"] for r in runs]
            wall_epoch = [r["wall_seconds"][wall_key(model)] / entry(r, model)["epochs"] for r in runs]
            rows[config] = {
                "train_seconds_per_epoch": _stats(per_epoch), "stage_seconds_per_epoch": _stats(wall_epoch),
                "test": _stats([entry(r, model)["test"][metric] for r in runs]),
                "validation": _stats([entry(r, model)["validation"][metric] for r in runs]),
            }
        for config in configs:
            row = rows[config]
            row["speedup_train"] = rows[base]["train_seconds_per_epoch"]["mean"] / row["train_seconds_per_epoch"]["mean"]
            row["speedup_stage"] = rows[base]["stage_seconds_per_epoch"]["mean"] / row["stage_seconds_per_epoch"]["mean"]
            for split in ("test", "validation"):
                diffs = [entry(results[config][s], model)[split][metric] - entry(results[base][s], model)[split][metric]
                         for s in seeds]
                row[f"{split}_minus_baseline"] = _stats(diffs)
        out["models"][model] = rows
    return out


def render(summary: dict, probe: dict | None = None) -> str:
    metric, base = summary["metric"], summary["baseline"]
    lines = [f"Seeds {', '.join(map(str, summary['seeds']))}; each model's seconds per epoch of training steps "
             f"(stage wall time per epoch in brackets: data, evaluation and saving included), speed-up over `{base}`, "
             f"and test / validation {metric} × 100 (mean ± std; Δ: paired by seed, against `{base}`).", "",
             "| model | runtime | s / epoch | speed-up | test | Δ test | validation | Δ validation |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    pm = lambda s, scale=100.0: f"{s['mean'] * scale:.2f} ± {s['std'] * scale:.2f}"  # noqa: E731
    def delta(row, config, split):
        diff = row[f"{split}_minus_baseline"]
        return "" if config == base else f"{diff['mean'] * 100:+.2f} ± {diff['std'] * 100:.2f}"

    for model, rows in summary["models"].items():
        for config, row in rows.items():
            lines.append(
                f"| {model} | {config} | {row['train_seconds_per_epoch']['mean']:.1f} "
                f"({row['stage_seconds_per_epoch']['mean']:.1f}) | {row['speedup_train']:.2f}x ({row['speedup_stage']:.2f}x) "
                f"| {pm(row['test'])} | {delta(row, config, 'test')} | {pm(row['validation'])} "
                f"| {delta(row, config, 'validation')} |")
    if probe:
        lines += ["", f"bf16 autocast on this CPU ({'with' if probe['cpu_has_bf16'] else 'without'} bfloat16 instructions): "
                      f"the teacher's training step (batch {probe['batch']} x {probe['seq']} tokens) takes "
                      f"{probe['bf16_seconds']:.2f} s against {probe['fp32_seconds']:.2f} s in fp32: "
                      f"**{probe['bf16_over_fp32']:.1f}x** the time."
                      + ("" if probe["cpu_has_bf16"] else
                         " So `precision: auto` keeps fp32 on the CPU, and the three-seed bf16 accuracy run that would "
                         "let it pick bf16 was not made here (it would take many hours); on a CPU with AVX512-BF16 or "
                         "AMX, `python -m benchmarks.runtime --configs before default default-bf16` measures it.")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Teacher and distill stages side by side under runtime configurations.")
    parser.add_argument("--params", default=str(REPO / "params.yaml"), help="the profile (default: params.yaml)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    parser.add_argument("--students", nargs="+", default=["random", "pruned"])
    parser.add_argument("--methods", nargs="+", default=["flexkd"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=f"in every run: {SET_HELP}")
    parser.add_argument("--work-dir", default=str(REPO / "benchmarks" / "work" / "runtime"))
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "runtime.json"))
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    parser.add_argument("--no-bf16-probe", action="store_true", help="skip the fp32 vs bf16 step-time probe")
    args = parser.parse_args(argv)
    from flexkd.overrides import load_profile

    overrides = cli_overrides(parser, args)
    work = Path(args.work_dir)
    results: dict[str, dict[int, dict]] = {c: {} for c in args.configs}
    for seed in args.seeds:
        for config in args.configs:
            raw = load_profile(Path(args.params), {**overrides, **CONFIGS[config], "project.seed": seed,
                                                   "distill.students": args.students, "distill.methods": args.methods})
            print(f"== seed {seed}, {config}")
            results[config][seed] = run_workspace(work / f"seed{seed}-{config}", raw, args.students, args.methods)
    metric = results[args.configs[0]][args.seeds[0]]["primary_metric"]
    summary = summarise(results, metric)
    from benchmarks.run import machine

    budget = {"data.max_train": raw["data"].get("max_train"),  # the data and epoch budget the timings are for
              "teacher.finetune.epochs": raw["teacher"]["finetune"].get("epochs"),
              "distill.train.epochs": raw["distill"]["train"].get("epochs")}
    payload = {"machine": machine(), "configs": {c: CONFIGS[c] for c in args.configs}, "overrides": overrides,
               "budget": budget,
               "students": args.students, "methods": args.methods, "summary": summary,
               "bf16_probe": None if args.no_bf16_probe else bf16_probe(Path(args.params))}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(payload, indent=1) + "\n")
    table = render(summary, payload["bf16_probe"])
    if args.markdown:
        Path(args.markdown).write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
