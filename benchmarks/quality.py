"""The seeded quality benchmark: every method, every student set-up, several seeds, on several tasks.

One Prefect flow. For each (profile, seed) it makes a workspace under ``benchmarks/work/<profile>-seed<seed>/``
(the project's code, dvc.yaml and the profile's params with ``project.seed`` set), runs the real pipeline there
(``python -m flows.pipeline``: ``dvc repro`` of every stage, each tracked in the workspace's MLflow store) and
reads back ``metrics/evaluation.json``. A workspace whose pipeline finished with the same params is reused, so
an interrupted benchmark continues where it stopped. Then it aggregates mean ± std per student and method, and the
flexkd - projector delta paired by seed, and runs the relevance sanity check on each task's first seed.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from prefect import flow, task

REPO = Path(__file__).resolve().parents[1]
CODE = ("flexkd", "flows", "dvc.yaml", ".dvcignore")
PROCESS_PHASES = ("startup", "preflight", "mlflow", "process")  # resources/*_seconds of each stage run


def make_workspace(directory: Path, params: dict) -> Path:
    """A project copy that runs on its own: code, dvc.yaml, params.yaml; DVC without git (no commits needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in CODE:
        source, target = REPO / name, directory / name
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, target)
    (directory / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if not (directory / ".dvc").exists():
        subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=directory, check=True)
        subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=directory, check=True)
    return directory


def params_for(profile: str | Path, seed: int, overrides: dict | None = None) -> dict:
    path = Path(profile) if str(profile).endswith(".yaml") else REPO / "profiles" / f"{profile}.yaml"
    params = yaml.safe_load(path.read_text())
    params.setdefault("project", {})["seed"] = int(seed)
    from flexkd.overrides import set_dotted

    for dotted, value in (overrides or {}).items():
        set_dotted(params, dotted, value)
    from flexkd.config import parse_config

    parse_config(params, source=f"{path.name} (seed {seed})")  # a wrong override stops here, before any run
    return params


FINISHED = ("benchmark_run.json", "metrics/evaluation.json")  # a workspace whose pipeline ran to its end


def finished(workspace: Path) -> bool:
    return all((workspace / name).exists() for name in FINISHED)


def start_from(workspace: Path, source: Path) -> str | None:
    """Make a new ``workspace`` a copy of the finished workspace ``source`` (another profile, same seed; ``quality_flow``
    checks every source before any run) without its benchmark record and evaluation, so that ``dvc repro`` there
    reruns only the stages whose params, code or inputs differ from the source's run: a teacher with the same teacher
    params, data and code is not trained again, one that differs in any of them is (DVC decides, from the copied
    dvc.lock). Returns the source's name, or None when ``workspace`` already exists (it continues on its own)."""
    if workspace.exists():
        return None
    skip = {"benchmark_run.json", "pipeline.log", "evaluation.json", "__pycache__", ".flexkd"}  # .flexkd: scratch
    shutil.copytree(source, workspace, symlinks=True, ignore=lambda _, names: [n for n in names if n in skip])
    return source.name


@task(name="pipeline-run")
def run_pipeline(workspace: Path, params: dict, source: Path | None = None) -> dict:
    """Run the whole pipeline in ``workspace`` unless it already finished with these params; return its record.
    With ``source`` (a finished workspace of another profile), a new workspace starts as its copy (``start_from``)."""
    record_path = workspace / "benchmark_run.json"
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if record.get("params") == params and (workspace / "metrics" / "evaluation.json").exists():
            print(f"{workspace.name}: finished before with the same params; reused")
            if "pipeline" not in record and (workspace / "mlflow.db").exists():  # recorded by an older benchmark
                record.update(run_resources(workspace, params))
                record_path.write_text(json.dumps(record, indent=1))
            return record
    continued = (workspace / "dvc.lock").exists()  # an earlier run's workspace: dvc repro skips its cached stages
    started = start_from(workspace, source) if source is not None else None
    if started:
        print(f"{workspace.name}: started from a copy of {started}; dvc repro reruns what differs")
    make_workspace(workspace, params)
    env = dict(os.environ, FLEXKD_PROJECT_ROOT=str(workspace))
    env.pop("FLEXKD_PIPELINE_RUN_ID", None)
    began = time.perf_counter()
    log = workspace / "pipeline.log"
    with open(log, "w") as handle:
        completed = subprocess.run([sys.executable, "-m", "flows.pipeline"], cwd=workspace, env=env, stdout=handle,
                                   stderr=subprocess.STDOUT)
    wall = time.perf_counter() - began
    if completed.returncode != 0:
        raise RuntimeError(f"{workspace.name}: the pipeline failed (exit {completed.returncode}); see {log}")
    record = {"params": params, "wall_seconds": wall, **({"started_from": started} if started else {}),
              **({"continued": True} if continued else {}),
              "evaluation": json.loads((workspace / "metrics" / "evaluation.json").read_text()),
              **run_resources(workspace, params)}
    record_path.write_text(json.dumps(record, indent=1))
    return record


def run_resources(workspace: Path, params: dict) -> dict:
    """From the workspace's MLflow store, its last pipeline run: ``stages`` (peak RSS, compute, wall and process-phase
    seconds of each stage run) and ``pipeline`` (the pipeline process's seconds before ``dvc repro`` and the seconds
    of ``dvc repro``, from the parent run)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(params["project"]["experiment"])
    parent = (workspace / ".flexkd" / "pipeline_run_id").read_text().strip()
    runs = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent}'", max_results=500)
    stages: dict[str, dict] = {}
    for run in runs:
        metrics = run.data.metrics
        if "resources/peak_rss_mb" not in metrics:
            continue
        name = run.info.run_name or run.data.tags.get("flexkd.stage", "?")
        stages[name] = {"peak_rss_mb": metrics["resources/peak_rss_mb"],
                        "compute_seconds": metrics.get("resources/compute_seconds", 0.0),
                        "stage_seconds": metrics.get("resources/stage_seconds", 0.0),
                        **{f"{key}_seconds": metrics[f"resources/{key}_seconds"] for key in PROCESS_PHASES
                           if f"resources/{key}_seconds" in metrics}}
    metrics = client.get_run(parent).data.metrics
    pipeline = {key: metrics[f"resources/{key}"] for key in ("pipeline_setup_seconds", "dvc_repro_seconds")
                if f"resources/{key}" in metrics}
    return {"stages": dict(sorted(stages.items())), "pipeline": pipeline}


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


SECONDARY_METRICS = ("nll",)  # generation: teacher-forced test NLL beside ROUGE-L (partial learning shows there)


def _table(records: list[dict], metric: str) -> tuple[dict, dict]:
    """mean ± std of ``metric`` per student/method (and the teacher) over seeds; flexkd - projector paired by seed."""
    table: dict[str, list[float]] = {"teacher": []}
    for record in records:
        evaluation = record["evaluation"]
        table["teacher"].append(evaluation["teacher"][metric])
        for name, scores in evaluation["students"].items():
            table.setdefault(name, []).append(scores[metric])
    deltas = {}
    for student in {name.split("/")[0] for name in table if "/" in name}:
        flex, proj = table.get(f"{student}/flexkd"), table.get(f"{student}/projector")
        if flex and proj and len(flex) == len(proj):
            deltas[student] = _mean_std([f - p for f, p in zip(flex, proj)])
    return {name: _mean_std(values) for name, values in table.items()}, deltas


def aggregate(records: list[dict]) -> dict:
    """mean ± std per student/method (and teacher) of the primary metric over seeds; flexkd - projector per seed;
    the same for the secondary metrics the evaluation has (generation: test NLL) under ``secondary``."""
    primary = records[0]["evaluation"]["primary_metric"]
    scores, deltas = _table(records, primary)
    result = {"primary_metric": primary, "seeds": [r["params"]["project"]["seed"] for r in records],
              "scores": scores, "flexkd_minus_projector": deltas}
    for metric in SECONDARY_METRICS:
        if all(metric in r["evaluation"]["teacher"] for r in records):
            scores, deltas = _table(records, metric)
            result.setdefault("secondary", {})[metric] = {"scores": scores, "flexkd_minus_projector": deltas}
    picks = [(r["evaluation"]["selection"]["best"], r["evaluation"]) for r in records
             if (r["evaluation"].get("selection") or {}).get("best")]
    if picks:  # the student each run picked on validation (the registered one): its test score over the teacher's
        result["best_student"] = {
            "picks": [name for name, _ in picks],
            "over_teacher": _mean_std([e["students"][name][primary] / e["teacher"][primary] for name, e in picks]),
            "parameter_ratio": _mean_std([e["students"][name]["parameters"] / e["teacher"]["parameters"]
                                          for name, e in picks if e["teacher"].get("parameters")]),
        }
    return result


def budget(params: dict) -> dict:
    """The data and training budget of a run's params (said beside its table), with how validation was held out
    where it is not random rows and the augmentation the students trained on, where enabled."""
    teacher, train = params["teacher"]["finetune"], params["distill"]["train"]
    taught = ({"teacher epochs": teacher.get("epochs"), "teacher patience": teacher.get("patience")}
              if teacher.get("enabled", True) else {"teacher": "not fine-tuned"})
    held_out = params["data"].get("validation_from", "rows")
    augment = params.get("augment") or {}
    return {"data.max_train": params["data"].get("max_train"),
            **({"validation from": held_out.replace("_", " ")} if held_out != "rows" else {}),
            **({"students augmented with": f"{augment.get('copies')} teacher-labelled copies of each training text "
                f"of {augment.get('min_words')}+ words"} if augment.get("enabled") else {}),
            **taught, "student epochs": train.get("epochs"),
            **({"student max_steps": train["max_steps"]} if train.get("max_steps") else {})}


def method_settings(params: dict) -> list[str]:
    """Each trained student's per-method settings (``students.<s>.per_method``, e.g. the values
    ``benchmarks.tune`` picked on validation), one phrase per student and method, for the line beside the table."""
    short = {"lr": "lr", "alpha": "alpha", "temperature": "T", "feature_weight": "beta"}
    phrases = []
    for student in params["distill"].get("students") or []:
        per_method = (params.get("students", {}).get(student) or {}).get("per_method") or {}
        for method in params["distill"].get("methods") or []:
            settings = per_method.get(method) or {}
            values = ", ".join(f"{short[key]} {settings[key]:.3g}" for key in short if settings.get(key) is not None)
            if values:
                phrases.append(f"{student} {method} ({values})")
    return phrases


def merge(old: dict | None, new: dict) -> dict:
    """The quality section of an earlier results.json with this run's: a profile this run did not touch is kept as
    it was; a profile run again keeps the earlier seeds this run did not rerun (same params but the seed), so the
    table grows seed by seed across runs. Blocks without per-seed records (older files) are replaced."""
    merged = dict(old or {})
    for name, block in new.items():
        before = merged.get(name)
        if not before or "records" not in before or "records" not in block:
            merged[name] = block
            continue
        def unseeded(params):
            return {**params, "project": {k: v for k, v in params["project"].items() if k != "seed"}}

        seeds = {r["params"]["project"]["seed"] for r in block["records"]}
        kept = [r for r in before["records"] if r["params"]["project"]["seed"] not in seeds
                and unseeded(r["params"]) == unseeded(block["records"][0]["params"])]
        records = sorted(kept + block["records"], key=lambda r: r["params"]["project"]["seed"])
        kept_seeds = {r["params"]["project"]["seed"] for r in kept}
        runs = sorted([r for r in before["runs"] if r["seed"] in kept_seeds] + block["runs"], key=lambda r: r["seed"])
        merged[name] = {**block, "records": records, "runs": runs, "quality": aggregate(records),
                        "sanity": block.get("sanity") or before.get("sanity")}
    return merged


@task(name="relevance-sanity")
def relevance_sanity(workspace: Path, params: dict) -> dict:
    """METHOD.md's check: silence the top-scored vs. the bottom-scored k teacher units; the teacher's accuracy."""
    from benchmarks.sanity import ablation

    return ablation(workspace)


def overhead(record: dict) -> dict:
    """The pipeline's wall time split into compute (training, scoring, caching, evaluation, validation) and the rest.

    Runs that logged the process phases (flexkd.resources) also get ``split``: the other seconds by where they went,
    summed over the stage processes: ``startup`` (interpreter, imports, the Prefect flow run), ``preflight``,
    ``mlflow`` (every tracking call, model logging included), ``in_stage`` (the rest inside a stage: loading and
    saving models, tokenising), ``dvc`` (``dvc repro`` beyond its stage processes: hashing and caching outputs,
    process exits) and ``pipeline`` (the pipeline process outside ``dvc repro``: imports, the temporary Prefect
    server, its own pre-flight and MLflow set-up). The parts add up to the other seconds."""
    stages = record["stages"].values()
    compute = sum(stage["compute_seconds"] for stage in stages)
    wall = record["wall_seconds"]
    result = {"wall_seconds": wall, "compute_seconds": compute, "other_seconds": wall - compute,
              "overhead_ratio": (wall - compute) / wall if wall else None}
    pipeline = record.get("pipeline") or {}
    if stages and "dvc_repro_seconds" in pipeline and all("process_seconds" in stage for stage in stages):
        total = {key: sum(stage[f"{key}_seconds"] for stage in stages) for key in PROCESS_PHASES}
        result["split"] = {
            "startup": total["startup"], "preflight": total["preflight"], "mlflow": total["mlflow"],
            "in_stage": total["process"] - total["startup"] - total["preflight"] - total["mlflow"] - compute,
            "dvc": pipeline["dvc_repro_seconds"] - total["process"],
            "pipeline": wall - pipeline["dvc_repro_seconds"],
            "stage_processes": len(record["stages"]),
        }
    return result


def _generation(record: dict) -> bool:
    """The sanity ablation silences units of a classifier; a generation profile has no such check (yet)."""
    from flexkd.config import parse_config

    return parse_config(record["params"], source="benchmark record").data.is_generation


@flow(name="flexkd-benchmark-quality", log_prints=True)
def quality_flow(profiles: list[str] = ("sst2-bench", "cola-bench", "alpaca-bench"), seeds: list[int] = (42, 43, 44), work_dir: str | None = None,
                 overrides: dict | None = None, sanity: bool = True, start: str | None = None) -> dict:
    """With ``start`` (a profile name), each seed's new workspace starts from ``<start>-seed<seed>``'s (``start_from``)."""
    work = Path(work_dir) if work_dir else REPO / "benchmarks" / "work"
    sources = {seed: work / f"{Path(start).stem}-seed{seed}" for seed in seeds} if start else {}
    unfinished = [str(source) for source in sources.values() if not finished(source)]
    if unfinished:  # checked before any run, not after the first seeds
        raise RuntimeError(f"--start-from {start}: these workspaces have not finished their pipeline: "
                           f"{', '.join(unfinished)}; run that profile with those seeds first, or leave --start-from out")
    results = {}
    for profile in profiles:
        records = []
        for seed in seeds:
            params = params_for(profile, seed, overrides)
            name = Path(profile).stem if str(profile).endswith(".yaml") else profile
            records.append(run_pipeline(work / f"{name}-seed{seed}", params, sources.get(seed)))
            print(f"{name} seed {seed}: done in {records[-1]['wall_seconds']:.0f}s")
        name = Path(profile).stem if str(profile).endswith(".yaml") else profile
        first = work / f"{name}-seed{seeds[0]}"
        results[name] = {
            "task": records[0]["evaluation"]["task"],
            "quality": aggregate(records),
            "runs": [{"seed": r["params"]["project"]["seed"], **overhead(r), "stages": r["stages"],
                      **{key: r[key] for key in ("started_from", "continued") if r.get(key)}} for r in records],
            "records": [{"params": r["params"], "evaluation": r["evaluation"]} for r in records],
            "budget": budget(records[0]["params"]),
            "sanity": ({**relevance_sanity(first, records[0]["params"]), "seed": seeds[0]}
                       if sanity and not _generation(records[0]) else None),
        }
    return results
