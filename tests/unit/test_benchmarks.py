"""The benchmark's arithmetic and report: aggregation over seeds, the paired delta, the overhead split, the markdown.

Expected values are worked out here from the inputs with the statistics module, not copied from a report."""

import json
import statistics
import subprocess
from pathlib import Path

import pytest

from benchmarks.quality import aggregate, overhead, params_for
from benchmarks.run import render
from flexkd.errors import ConfigError


def record(seed, scores, teacher=0.8, wall=100.0, compute=(40.0, 50.0)):
    return {
        "params": {"project": {"seed": seed}},
        "wall_seconds": wall,
        "evaluation": {"primary_metric": "accuracy", "task": "sst2", "teacher": {"accuracy": teacher},
                       "students": {name: {"accuracy": value} for name, value in scores.items()}},
        "stages": {f"stage{i}": {"peak_rss_mb": 500.0 + 7 * i + seed, "compute_seconds": c, "stage_seconds": c + 5}
                   for i, c in enumerate(compute)},
    }


SCORES = {  # seed -> student/method -> accuracy
    1: {"random/projector": 0.70, "random/flexkd": 0.72, "random/ft": 0.69, "pruned/projector": 0.75,
        "pruned/flexkd": 0.74},
    2: {"random/projector": 0.71, "random/flexkd": 0.70, "random/ft": 0.68, "pruned/projector": 0.77,
        "pruned/flexkd": 0.79},
    3: {"random/projector": 0.69, "random/flexkd": 0.73, "random/ft": 0.70, "pruned/projector": 0.76,
        "pruned/flexkd": 0.80},
}
TEACHER = {1: 0.80, 2: 0.83, 3: 0.81}
RECORDS = [
    record(1, SCORES[1], TEACHER[1], wall=100.0, compute=(40.0, 50.0)),
    record(2, SCORES[2], TEACHER[2], wall=120.0, compute=(45.0, 50.0)),
    record(3, SCORES[3], TEACHER[3], wall=90.0, compute=(30.0, 55.0)),
]


def column(name):
    return [SCORES[seed][name] for seed in (1, 2, 3)]


def test_aggregate_gives_mean_std_and_the_delta_paired_by_seed():
    result = aggregate(RECORDS)
    assert result["seeds"] == [1, 2, 3] and result["primary_metric"] == "accuracy"
    assert set(result["scores"]) == {"teacher", *SCORES[1]}
    for name in SCORES[1]:
        stats = result["scores"][name]
        assert stats["values"] == column(name) and stats["n"] == 3
        assert stats["mean"] == pytest.approx(statistics.fmean(column(name)))
        assert stats["std"] == pytest.approx(statistics.stdev(column(name)))  # sample std (n - 1)
    teacher = result["scores"]["teacher"]
    assert teacher["mean"] == pytest.approx(statistics.fmean(TEACHER.values()))
    assert teacher["std"] == pytest.approx(statistics.stdev(TEACHER.values()))
    assert set(result["flexkd_minus_projector"]) == {"random", "pruned"}
    for student in ("random", "pruned"):
        paired = [f - p for f, p in zip(column(f"{student}/flexkd"), column(f"{student}/projector"))]
        delta = result["flexkd_minus_projector"][student]
        assert delta["values"] == pytest.approx(paired)
        assert delta["mean"] == pytest.approx(statistics.fmean(paired))
        # the std of the per-seed differences, not of the two columns apart
        assert delta["std"] == pytest.approx(statistics.stdev(paired))


def test_aggregate_of_one_seed_has_std_zero_and_no_delta_without_both_methods():
    one = aggregate([record(5, {"random/flexkd": 0.6, "random/projector": 0.5, "pruned/flexkd": 0.7}, 0.9)])
    assert one["scores"]["random/flexkd"] == {"mean": 0.6, "std": 0.0, "n": 1, "values": [0.6]}
    assert one["flexkd_minus_projector"]["random"]["mean"] == pytest.approx(0.1)
    assert "pruned" not in one["flexkd_minus_projector"]  # no projector run to pair with
    # a seed that lost one method's run: the columns no longer pair up, so no delta (rather than a wrong one)
    uneven = aggregate([record(1, {"random/flexkd": 0.6, "random/projector": 0.5}),
                        record(2, {"random/flexkd": 0.7})])
    assert uneven["scores"]["random/flexkd"]["n"] == 2 and "random" not in uneven["flexkd_minus_projector"]


def test_aggregate_and_overhead_round_trip_through_json():
    """results.json holds them: no tuples, sets or other types that come back different (or not at all)."""
    for value in (aggregate(RECORDS), overhead(RECORDS[0]), overhead(split_record())):
        assert json.loads(json.dumps(value)) == value


def test_overhead_is_wall_minus_compute():
    for rec in RECORDS:
        compute = sum(stage["compute_seconds"] for stage in rec["stages"].values())
        split = overhead(rec)
        assert split["wall_seconds"] == rec["wall_seconds"] and split["compute_seconds"] == pytest.approx(compute)
        assert split["other_seconds"] == pytest.approx(rec["wall_seconds"] - compute)
        assert split["overhead_ratio"] == pytest.approx((rec["wall_seconds"] - compute) / rec["wall_seconds"])
    assert overhead(record(1, {}, wall=0.0, compute=(0.0,)))["overhead_ratio"] is None  # no division by zero


PHASES = [(6, 2, 3, 75), (5, 1, 4, 85)]  # (startup, preflight, mlflow, process) seconds of the two stage processes
PIPELINE = {"pipeline_setup_seconds": 15.0, "dvc_repro_seconds": 180.0}


def split_record():
    """A run whose two stage processes logged their phases, and whose pipeline logged its own seconds."""
    rec = record(4, {"random/projector": 0.7, "random/flexkd": 0.7}, wall=200.0, compute=(60.0, 70.0))
    for stage, (startup, preflight, mlflow, process) in zip(rec["stages"].values(), PHASES):
        stage.update(startup_seconds=startup, preflight_seconds=preflight, mlflow_seconds=mlflow, process_seconds=process)
    rec["pipeline"] = dict(PIPELINE)
    return rec


def expected_split(rec):
    """The split worked out from the record's inputs: each phase summed over the stage processes."""
    stages = list(rec["stages"].values())
    total = {key: sum(stage[f"{key}_seconds"] for stage in stages) for key in ("startup", "preflight", "mlflow", "process")}
    compute = sum(stage["compute_seconds"] for stage in stages)
    return {"startup": total["startup"], "preflight": total["preflight"], "mlflow": total["mlflow"],
            "in_stage": total["process"] - total["startup"] - total["preflight"] - total["mlflow"] - compute,
            "dvc": rec["pipeline"]["dvc_repro_seconds"] - total["process"],
            "pipeline": rec["wall_seconds"] - rec["pipeline"]["dvc_repro_seconds"]}


PARTS = ("startup", "preflight", "mlflow", "in_stage", "dvc", "pipeline")


def test_overhead_split_says_where_the_other_seconds_went_and_adds_up():
    rec = split_record()
    result = overhead(rec)
    split = result["split"]
    assert result["other_seconds"] == pytest.approx(200.0 - 130.0)
    assert split["stage_processes"] == 2
    for key, value in expected_split(rec).items():
        assert split[key] == pytest.approx(value), key
    assert sum(split[k] for k in PARTS) == pytest.approx(result["wall_seconds"] - result["compute_seconds"])
    assert "split" not in overhead(RECORDS[0])  # a run from before the phases were logged: no split, no guess
    partial = split_record()
    del partial["stages"]["stage1"]["process_seconds"]  # one stage without its phases: no split either
    assert "split" not in overhead(partial)


def speed(relevance_ratio=1.21, term_share=0.013, flexkd_online=2.37, flexkd_cache=1.14, cached_over_online=0.48):
    return {
        "workspace": "sst2-seed1", "measured": "2026-11-29 10:00 UTC",
        "relevance": {"batches": 4, "batch_size": 8, "seconds": {"relevance": 1.0, "plain": 1.0}, "ratio": relevance_ratio},
        "distill_steps": {"student": "random", "batch_size": 8, "rounds": 3,
                          "ratio_to_plain_step": {"ft/online": 1.0, "flexkd/online": flexkd_online,
                                                  "flexkd/cache": flexkd_cache},
                          "cached_over_online": {"flexkd": cached_over_online}, "flexkd_term_share": term_share,
                          "padding": {"grouped": {"real_tokens": 54536, "padded_tokens": 60000, "padding_tokens": 5464},
                                      "ungrouped": {"real_tokens": 54536, "padded_tokens": 121224,
                                                    "padding_tokens": 66688}}},
        "cache_sizes": {"selected": {"bytes": 3 * 2**20, "columns": 4, "positions": 12345},
                        "full": {"bytes": 12 * 2**20, "columns": 16, "positions": 12345}, "selected_over_full": 0.25},
    }


SANITY = {"metric": "accuracy", "d_teacher": 8, "none": 0.8125,
          "by_k": {"2": {"top": 0.6, "bottom": 0.79, "random_mean": 0.7833}, "6": {"top": 0.5, "bottom": 0.7, "random_mean": 0.61}}}


def results_for(speed_section, runs=RECORDS):
    """A results.json: the quality of RECORDS' three seeds, the overhead of ``runs``."""
    return {
        "machine": {"cpu": "Test CPU", "cores": 2, "memory_gib": 24.0, "gpu": None, "python": "3.11", "torch": "2.13.0",
                    "platform": "Linux", "date": "2026-11-29"},
        "profiles": ["sst2"], "seeds": [1, 2, 3], "overrides": {},
        "quality": {"sst2": {"task": "sst2", "quality": aggregate(RECORDS),
                             "runs": [{"seed": r["params"]["project"]["seed"], **overhead(r), "stages": r["stages"]}
                                      for r in runs],
                             "sanity": SANITY}},
        "speed": speed_section,
    }


def pm(values, scale=100.0):
    """mean ± sample std × 100, as the report prints it, worked out here."""
    return f"{statistics.fmean(values) * scale:.2f} ± {statistics.stdev(values) * scale:.2f}"


def test_report_holds_the_numbers_computed_from_the_inputs():
    records = [*RECORDS, split_record()]
    text = render(results_for(speed(), runs=records))
    assert "Test CPU, 2 cores" in text and "Measured on the `sst2-seed1` workspace (2026-11-29 10:00 UTC)." in text

    # quality: one row per student, the methods in METHODS order, the paired delta last
    assert "| student | ft | projector | flexkd | flexkd − projector |" in text
    for student in ("random", "pruned"):
        paired = [f - p for f, p in zip(column(f"{student}/flexkd"), column(f"{student}/projector"))]
        ft = pm(column(f"{student}/ft")) if f"{student}/ft" in SCORES[1] else ""
        row = (f"| {student} | {ft} | {pm(column(f'{student}/projector'))} | {pm(column(f'{student}/flexkd'))} | "
               f"{pm(paired)} |")
        assert row in text, row
    assert f"Teacher: {pm(list(TEACHER.values()))}." in text
    for k, row in SANITY["by_k"].items():
        assert f"| {k} | {row['top'] * 100:.2f} | {row['bottom'] * 100:.2f} | {row['random_mean'] * 100:.2f} |" in text
    assert f"none silenced: {SANITY['none'] * 100:.2f}" in text

    # overhead: a row per run, the mean and its goal
    ratios, others = [], []
    for rec in records:
        compute = sum(stage["compute_seconds"] for stage in rec["stages"].values())
        other = rec["wall_seconds"] - compute
        ratios.append(other / rec["wall_seconds"])
        others.append(other)
        seed = rec["params"]["project"]["seed"]
        row = f"| sst2 seed {seed} | {rec['wall_seconds']:.0f} | {compute:.0f} | {other:.0f} | {ratios[-1]:.1%} |"
        assert row in text, row
    mean = statistics.fmean(ratios)
    assert f"Mean overhead **{mean:.1%}**, {'met' if mean <= 0.10 else 'NOT met'} (goal ≤ 10%)." in text
    assert f"(mean {statistics.fmean(others):.0f} s:" in text
    assert f"once compute passes {9 * statistics.fmean(others) / 60:.0f} minutes" in text

    # the split: only the run that logged it, each part with its share of the other seconds
    rec = split_record()
    other = others[-1]
    parts = expected_split(rec)
    cells = " | ".join(f"{parts[key]:.0f} s ({parts[key] / other:.0%})" for key in PARTS)
    assert f"| sst2 seed 4 | 2 | {cells} |" in text
    assert sum(parts.values()) == pytest.approx(other)
    assert "| sst2 seed 1 | 2 |" not in text  # runs without the split have no row in that table
    assert f"About {other / 2:.0f} s per stage process" in text

    # peak memory: the first run's stages
    for name, stage in RECORDS[0]["stages"].items():
        assert f"| {name} | {stage['peak_rss_mb']:.0f} | {stage['compute_seconds']:.1f} | {stage['stage_seconds']:.1f} |" in text
    assert f"| stage1 | {RECORDS[1]['stages']['stage1']['peak_rss_mb']:.0f} |" not in text


@pytest.mark.parametrize("fast", [True, False])
def test_report_speed_section_follows_the_measured_ratios(fast):
    section = speed(relevance_ratio=1.21 if fast else 1.46, term_share=0.013 if fast else 0.071,
                    flexkd_online=2.37 if fast else 3.18, flexkd_cache=1.14 if fast else 1.52,
                    cached_over_online=0.48 if fast else 0.61)
    text = render(results_for(section))
    rel = section["relevance"]["ratio"]
    assert f"**{rel:.2f}x**, {'met' if rel <= 1.3 else 'NOT met'} (goal ≤ 1.3)" in text
    steps = section["distill_steps"]
    ratios = steps["ratio_to_plain_step"]
    assert "| ft | 1.00 |  |  |" in text  # ft has no cached variant
    assert (f"| flexkd | {ratios['flexkd/online']:.2f} | {ratios['flexkd/cache']:.2f} | "
            f"{steps['cached_over_online']['flexkd']:.2f} |") in text
    assert (f"54,536 real tokens; padded to 121,224 in permutation order, 60,000 with length-grouped batches "
            f"(runtime.group_by_length): **{121224 / 60000:.2f}x** fewer") in text
    share = steps["flexkd_term_share"]
    assert f"**{share:.1%}** of a flexkd step (teacher online), {'met' if share <= 0.05 else 'NOT met'} (goal ≤ 5%)" in text
    sizes = section["cache_sizes"]
    assert (f"({sizes['selected']['positions']:,} token positions): selected units ({sizes['selected']['columns']}) "
            f"{sizes['selected']['bytes'] / 2**20:.1f} MiB vs. every teacher unit ({sizes['full']['columns']}) "
            f"{sizes['full']['bytes'] / 2**20:.1f} MiB: **{sizes['selected_over_full']:.2f}x**") in text
    assert ("NOT met" in text.split("## Where the time goes")[1].split("Teacher cache")[0]) is not fast


def test_params_for_sets_the_seed_and_refuses_a_bad_override():
    params = params_for("sst2", 7, {"distill.train.epochs": 1})
    assert params["project"]["seed"] == 7 and params["distill"]["train"]["epochs"] == 1
    with pytest.raises(ConfigError, match="distill.train.epohcs"):
        params_for("sst2", 7, {"distill.train.epohcs": 1})


def runtime_result(teacher_seconds, student_seconds, teacher_test, student_test, epochs=(1, 2)):
    """One (seed, configuration) result of benchmarks/runtime.py."""
    return {
        "teacher": {"train_seconds": teacher_seconds, "epochs": epochs[0], "validation": {"accuracy": teacher_test - 0.01},
                    "test": {"accuracy": teacher_test}},
        "students": {"pruned/flexkd": {"train_seconds": student_seconds, "epochs": epochs[1],
                                       "validation": {"accuracy": student_test + 0.01}, "test": {"accuracy": student_test}}},
        "wall_seconds": {"teacher": teacher_seconds + 10, "distill/pruned/flexkd": student_seconds + 6},
    }


def test_runtime_benchmark_summary_gives_per_epoch_speedups_and_differences_paired_by_seed():
    from benchmarks.runtime import render as render_runtime
    from benchmarks.runtime import summarise

    results = {
        "before": {1: runtime_result(100.0, 40.0, 0.80, 0.75), 2: runtime_result(90.0, 44.0, 0.82, 0.77)},
        "default": {1: runtime_result(45.0, 18.0, 0.81, 0.76), 2: runtime_result(40.0, 22.0, 0.82, 0.75)},
    }
    summary = summarise(results, "accuracy")
    assert summary["seeds"] == [1, 2] and summary["baseline"] == "before"
    teacher = summary["models"]["teacher"]["default"]
    assert teacher["train_seconds_per_epoch"]["mean"] == pytest.approx(42.5)
    assert teacher["speedup_train"] == pytest.approx(95.0 / 42.5)
    assert teacher["speedup_stage"] == pytest.approx(105.0 / 52.5)
    student = summary["models"]["pruned/flexkd"]["default"]
    assert student["train_seconds_per_epoch"]["mean"] == pytest.approx(10.0)  # 2 epochs: (18 + 22) / 2 / 2
    assert student["speedup_train"] == pytest.approx(21.0 / 10.0)
    assert student["test_minus_baseline"]["mean"] == pytest.approx(((0.76 - 0.75) + (0.75 - 0.77)) / 2)
    assert summary["models"]["pruned/flexkd"]["before"]["speedup_train"] == pytest.approx(1.0)
    table = render_runtime(summary, {"cpu_has_bf16": False, "batch": 32, "seq": 48, "fp32_seconds": 0.7,
                                     "bf16_seconds": 14.0, "bf16_over_fp32": 20.0})
    assert "| teacher | default | 42.5 (52.5) | 2.24x (2.00x) | 81.50 ± 0.71 | +0.50 ± 0.71 |" in table
    assert "| pruned/flexkd | default | 10.0 (13.0) | 2.10x (1.85x) | 75.50 ± 0.71 | -0.50 ± 2.12 |" in table
    assert "without bfloat16 instructions" in table and "**20.0x** the time" in table
    assert "`precision: auto` keeps fp32 on the CPU" in table


def test_the_runtime_section_names_the_budget_it_timed():
    from benchmarks.run import render_runtime

    from pathlib import Path

    runtime = json.loads((Path(__file__).resolve().parents[2] / "benchmarks" / "runtime.json").read_text())
    text = "\n".join(render_runtime({"runtime": runtime}))
    assert "(params.yaml of that date with data.max_train 3000, teacher.finetune.epochs 1, distill.train.epochs 2)" in text


def test_the_report_says_when_no_gpu_ran_the_device_check():
    from benchmarks.run import render_runtime

    assert "**not run yet**: no GPU has been lent" in "\n".join(render_runtime({}))
    tiny_only = {"device_check": {"tiny": True}}
    assert "**not run yet**" in "\n".join(render_runtime(tiny_only))


def test_the_report_shows_each_tuning_file_with_its_picks(tmp_path):
    from benchmarks.run import render_tuning, runtime_sections

    block = {"task": "sst2", "seed": 42, "trials": 2, "primary_metric": "accuracy", "teacher_validation": 0.86,
             "space": {"lr": "student lr x 10^[-0.75, 0.75]", "alpha": "[0.1, 0.9]", "temperature": "2^[0, 3]",
                       "feature_weight": "10^[-3, 0]"},
             "budget": {"data.max_train": 6000, "distill.train.epochs": 2},
             "results": {"pruned/flexkd": {
                 "trials": [{"trial": 0, "settings": {"lr": 3e-4, "alpha": 0.5, "temperature": 2.0, "feature_weight": 0.1},
                             "validation": 0.80},
                            {"trial": 1, "settings": {"lr": 1e-4, "alpha": 0.7, "temperature": 4.0, "feature_weight": 0.03},
                             "validation": 0.83}],
                 "default_validation": 0.80,
                 "pick": {"trial": 1, "settings": {"lr": 1e-4, "alpha": 0.7, "temperature": 4.0, "feature_weight": 0.03},
                          "validation": 0.83, "test": 0.815}},
                 "pruned/ft": {
                 "trials": [{"trial": 0, "settings": {"lr": 3e-4, "alpha": 0.5, "temperature": 2.0, "feature_weight": 0.0},
                             "validation": 0.78}],
                 "default_validation": 0.78,
                 "pick": {"trial": 0, "settings": {"lr": 3e-4}, "validation": 0.78, "test": 0.77}}}}
    (tmp_path / "tuning-sst2.json").write_text(json.dumps(block))
    sections = runtime_sections(tmp_path)
    assert set(sections["tuning"]) == {"sst2"}
    text = "\n".join(render_tuning(sections))
    assert "## Tuning: the same trials for every method, on validation" in text
    assert "| pruned | flexkd | 80.00 | 83.00 (trial 1) | 81.50 | 0.0001 | 0.7 | 4 | 0.03 |" in text
    assert "| pruned | ft | 78.00 | 78.00 (trial 0) | 77.00 | 0.0003 |  |  |  |" in text
    assert "2 trials per method" in text and "data.max_train 6000" in text
    assert render_tuning({}) == []


def test_a_tuning_file_names_its_profile_and_how_validation_was_held_out(tmp_path):
    from benchmarks.run import render_tuning, runtime_sections
    from benchmarks.tune import tune_budget

    raw = {"data": {"max_train": None, "validation_from": "whole_texts"}, "distill": {"train": {"epochs": 1}}}
    assert tune_budget(raw) == {"data.max_train": None, "data.validation_from": "whole_texts", "distill.train.epochs": 1}
    assert "data.validation_from" not in tune_budget({**raw, "data": {"max_train": 6000}})
    block = {"task": "sst2", "seed": 42, "trials": 1, "primary_metric": "accuracy", "teacher_validation": 0.88,
             "space": {"lr": "student lr x 10^[-0.75, 0.75]", "alpha": "[0.1, 0.9]", "temperature": "2^[0, 3]",
                       "feature_weight": "10^[-3, 0]"},
             "budget": tune_budget(raw), "params": "profiles/sst2-deploy.yaml",
             "results": {"pruned/kd": {
                 "trials": [{"trial": 0, "settings": {"lr": 3e-4, "alpha": 0.5, "temperature": 2.0}, "validation": 0.84}],
                 "default_validation": 0.84,
                 "pick": {"trial": 0, "settings": {"lr": 3e-4, "alpha": 0.5, "temperature": 2.0}, "validation": 0.84,
                          "test": 0.86}}}}
    (tmp_path / "tuning-sst2-deploy.json").write_text(json.dumps(block))
    text = "\n".join(render_tuning(runtime_sections(tmp_path)))
    assert "(`profiles/sst2-deploy.yaml`: sst2, seed 42, 1 trials per method" in text
    assert "budget: data.max_train all, data.validation_from whole_texts, distill.train.epochs 1)" in text
    from benchmarks.tune import REPO, profile_name

    assert profile_name(str(REPO / "params.yaml")) == "params.yaml"  # not the machine's absolute path
    assert profile_name("/elsewhere/my-profile.yaml") == "my-profile.yaml"


def test_the_report_shows_each_ablation_file(tmp_path):
    from benchmarks.run import render_tuning, runtime_sections

    row = lambda name, student, values, diff: {  # noqa: E731
        "variant": name, "student": student, "values": values, "mean": sum(values) / len(values), "std": 0.0,
        "minus_base": diff, "minus_base_std": 0.0}
    block = {"task": "cola", "primary_metric": "mcc", "seeds": [42], "students": ["random", "pruned"],
             "variants": {"base": {}, "order:score": {"relevance.order": "score"}},
             "table": {"base/random": row("base", "random", [0.2], 0.0), "base/pruned": row("base", "pruned", [0.3], 0.0),
                       "order:score/random": row("order:score", "random", [0.25], 0.05)},
             "budget": {"data.max_train": None, "distill.train.epochs": 3}, "tuning": "tuning-cola.json"}
    (tmp_path / "ablation-cola.json").write_text(json.dumps(block))
    text = "\n".join(render_tuning(runtime_sections(tmp_path)))
    assert "## Ablations: what Flex-KD leaves open, on validation" in text
    assert "| base | 20.00 ± 0.00 |  | 30.00 ± 0.00 |  |" in text
    assert "| order:score (`relevance.order: score`) | 25.00 ± 0.00 | +5.00 ± 0.00 | n/a |  |" in text
    assert "tuned flexkd settings from tuning-cola.json" in text


def picked(rec, best, params_teacher=100, params_student=30):
    """``rec`` with the validation pick and parameter counts an evaluate stage writes."""
    out = json.loads(json.dumps(rec))
    out["evaluation"]["selection"] = {"split": "validation", "best": best}
    out["evaluation"]["teacher"]["parameters"] = params_teacher
    for scores in out["evaluation"]["students"].values():
        scores["parameters"] = params_student
    out["params"].update(data={"max_train": None}, teacher={"finetune": {"epochs": 3, "patience": 4}},
                         distill={"train": {"epochs": 1}})
    return out


def block_of(records):
    from benchmarks.quality import budget

    return {"task": "sst2", "quality": aggregate(records),
            "runs": [{"seed": r["params"]["project"]["seed"], **overhead(r), "stages": r["stages"]} for r in records],
            "records": [{"params": r["params"], "evaluation": r["evaluation"]} for r in records],
            "budget": budget(records[0]["params"]), "sanity": None}


def test_the_best_student_is_the_validation_pick_over_the_teacher_at_the_parameter_ratio():
    records = [picked(RECORDS[0], "pruned/projector"), picked(RECORDS[1], "pruned/flexkd"),
               picked(RECORDS[2], "pruned/flexkd")]
    best = aggregate(records)["best_student"]
    expected = [SCORES[1]["pruned/projector"] / TEACHER[1], SCORES[2]["pruned/flexkd"] / TEACHER[2],
                SCORES[3]["pruned/flexkd"] / TEACHER[3]]
    assert best["picks"] == ["pruned/projector", "pruned/flexkd", "pruned/flexkd"]
    assert best["over_teacher"]["mean"] == pytest.approx(statistics.fmean(expected))
    assert best["parameter_ratio"]["mean"] == pytest.approx(0.3)
    text = render({**results_for(speed()), "quality": {"sst2-bench": block_of(records)}})
    assert (f"The student each run picked on validation (pruned/flexkd ×2, pruned/projector ×1): test accuracy "
            f"**{pm(expected)}%** of the teacher's, with 30.0% of its parameters.") in text
    assert "Budget: data.max_train all, teacher epochs 3, teacher patience 4, student epochs 1." in text


def test_the_budget_says_when_validation_was_held_out_as_whole_texts_even_for_an_older_block():
    records = [picked(RECORDS[0], "pruned/projector")]
    records[0]["params"]["data"]["validation_from"] = "whole_texts"
    block = block_of(records)
    block["budget"] = {"data.max_train": None, "student epochs": 1}  # written before the key existed
    text = render({**results_for(speed()), "quality": {"sst2-deploy": block}})
    assert ("Budget: data.max_train all, validation from whole texts, teacher epochs 3, teacher patience 4, "
            "student epochs 1.") in text
    records[0]["params"]["data"]["validation_from"] = "rows"  # the default is not spelled out
    assert "Budget: data.max_train all, teacher epochs 3," in render({**results_for(speed()),
                                                                      "quality": {"sst2-deploy": block_of(records)}})


def test_the_budget_says_when_the_students_trained_on_teacher_labelled_copies():
    records = [picked(RECORDS[0], "pruned/projector")]
    records[0]["params"]["augment"] = {"enabled": True, "copies": 4, "min_words": 10}
    text = render({**results_for(speed()), "quality": {"sst2-deploy": block_of(records)}})
    assert ("Budget: data.max_train all, students augmented with 4 teacher-labelled copies of each training text "
            "of 10+ words, teacher epochs 3, teacher patience 4, student epochs 1.") in text
    records[0]["params"]["augment"]["enabled"] = False
    assert "teacher-labelled" not in render({**results_for(speed()), "quality": {"sst2-deploy": block_of(records)}})


def test_a_benchmark_run_adds_its_seeds_and_profiles_to_the_earlier_results():
    from benchmarks.quality import merge

    records = [picked(r, "pruned/flexkd") for r in RECORDS]
    earlier = {"sst2-bench": block_of(records[:2]), "cola-bench": block_of(records[:1])}
    merged = merge(earlier, {"sst2-bench": block_of(records[2:])})
    assert merged["cola-bench"] == earlier["cola-bench"]  # untouched profile kept
    assert merged["sst2-bench"]["quality"] == aggregate(records)  # seeds 1, 2 kept, 3 added
    assert [r["seed"] for r in merged["sst2-bench"]["runs"]] == [1, 2, 3]
    rerun = picked(record(2, {**SCORES[2], "pruned/flexkd": 0.5}, TEACHER[2]), "pruned/flexkd")
    merged = merge(merged, {"sst2-bench": block_of([rerun])})  # a rerun seed replaces its own record
    assert merged["sst2-bench"]["quality"]["scores"]["pruned/flexkd"]["values"] == [0.74, 0.5, 0.80]
    changed = picked(record(4, SCORES[1], TEACHER[1]), "pruned/flexkd")
    changed["params"]["distill"]["train"]["epochs"] = 2  # other params: the earlier seeds do not mix with it
    merged = merge(merged, {"sst2-bench": block_of([changed])})
    assert merged["sst2-bench"]["quality"]["seeds"] == [4]


def test_a_generation_table_adds_test_nll_per_method_and_its_paired_delta():
    nll = {1: {"pruned/kd": 3.1, "pruned/projector": 3.4, "pruned/flexkd": 3.2},
           2: {"pruned/kd": 3.0, "pruned/projector": 3.5, "pruned/flexkd": 3.1}}
    records = []
    for seed in (1, 2):
        rec = picked(record(seed, {name: 0.1 * seed + value / 100 for name, value in nll[seed].items()}, 0.3),
                     "pruned/kd")
        rec["evaluation"]["primary_metric"] = "rougeL"
        rec["evaluation"]["task"] = "alpaca"
        for scores in [rec["evaluation"]["teacher"], *rec["evaluation"]["students"].values()]:
            scores["rougeL"] = scores.pop("accuracy")
        rec["evaluation"]["teacher"]["nll"] = 2.0
        for name, scores in rec["evaluation"]["students"].items():
            scores["nll"] = nll[seed][name]
        rec["params"]["teacher"]["finetune"]["enabled"] = False
        records.append(rec)
    quality = aggregate(records)
    table = quality["secondary"]["nll"]
    assert table["scores"]["pruned/kd"]["values"] == [3.1, 3.0]
    assert table["scores"]["teacher"]["mean"] == pytest.approx(2.0)
    paired = [nll[s]["pruned/flexkd"] - nll[s]["pruned/projector"] for s in (1, 2)]
    assert table["flexkd_minus_projector"]["pruned"]["mean"] == pytest.approx(statistics.fmean(paired))
    assert "secondary" not in aggregate(RECORDS)  # classification: no NLL, no second table
    block = {**block_of(records), "task": "alpaca"}
    text = render({**results_for(speed()), "quality": {"alpaca-bench": block}})
    assert "Test nll (lower is better), mean ± std over seeds [1, 2]:" in text
    row = next(line for line in text.splitlines()[text.splitlines().index(
        "Test nll (lower is better), mean ± std over seeds [1, 2]:"):] if line.startswith("| pruned |"))
    assert row.startswith("| pruned | 3.050 ± 0.071 | 3.450 ± 0.071 | 3.150 ± 0.071 | -0.300 ± 0.141 |"), row
    assert "### alpaca-bench (alpaca): test rougeL, mean ± std over seeds [1, 2]" in text  # points already: no × 100
    assert "Budget: data.max_train all, teacher not fine-tuned, student epochs 1." in text


def test_benchmark_commands_read_a_profile_with_overrides_and_refuse_bad_ones(tmp_path, capsys):
    import argparse

    from benchmarks.cli import REPO as CLI_REPO, add_profile_args, read_profile, work_dir

    parser = argparse.ArgumentParser()
    add_profile_args(parser)
    parser.add_argument("--work-dir", default=None)
    args = parser.parse_args(["--set", "distill.train.epochs=3", "--set", "distill.methods=[ft, flexkd]"])
    raw = read_profile(parser, args)
    assert raw["distill"]["train"]["epochs"] == 3 and raw["distill"]["methods"] == ["ft", "flexkd"]
    seed = raw["project"]["seed"]
    assert work_dir(args, raw, "tune") == CLI_REPO / "benchmarks" / "work" / f"tune-{raw['data']['task']}-seed{seed}"
    assert work_dir(parser.parse_args(["--work-dir", str(tmp_path)]), raw, "tune") == tmp_path
    for argv, words in ((["--set", "distill.train.epochs"], "expected KEY=VALUE"),
                        (["--params", str(tmp_path / "nope.yaml")], "no such file"),
                        (["--set", "data.task.x=1"], "data.task is a value")):
        with pytest.raises(SystemExit) as stop:
            read_profile(parser, parser.parse_args(argv))
        assert stop.value.code == 2 and words in capsys.readouterr().err


def test_the_shared_stages_key_ignores_what_only_the_distill_stage_reads():
    """--teacher-from and the tuning workspaces reuse a teacher while the shared stages' params hold: a student's
    tuned settings and its vocabulary do not touch them; its width (k: relevance and cache) and the seed do."""
    from pathlib import Path

    import yaml

    from benchmarks.tune import shared_key

    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    changed = json.loads(json.dumps(raw))
    changed["students"]["pruned"].update(vocabulary="train", lr=1e-4, per_method={"kd": {"alpha": 0.3}})
    changed["distill"]["alpha"] = 0.9
    assert shared_key(changed) == shared_key(raw)
    for dotted, value in (("students.pruned.hidden_size", 96), ("project.seed", 43), ("teacher.finetune.lr", 1e-4)):
        other = json.loads(json.dumps(raw))
        group, *middle, last = dotted.split(".")
        node = other[group]
        for key in middle:
            node = node[key]
        node[last] = value
        assert shared_key(other) != shared_key(raw), dotted


def test_the_table_reports_each_methods_tuned_settings_where_a_student_has_them():
    records = [picked(RECORDS[0], "pruned/projector")]
    records[0]["params"]["distill"].update(students=["pruned"], methods=["ft", "kd", "flexkd"])
    records[0]["params"]["students"] = {"pruned": {"per_method": {
        "kd": {"lr": 0.000255, "alpha": 0.77, "temperature": 1.16},
        "flexkd": {"lr": 0.000255, "alpha": 0.77, "temperature": 1.16, "feature_weight": 0.0706},
        "cka": {"lr": 0.1}}}}  # a method this run did not train is not named
    text = render({**results_for(speed()), "quality": {"sst2-deploy": block_of(records)}})
    assert ("Per-method settings (`students.<s>.per_method`, tuned on validation; the methods not named train at "
            "distill's): pruned kd (lr 0.000255, alpha 0.77, T 1.16); pruned flexkd (lr 0.000255, alpha 0.77, T 1.16, "
            "beta 0.0706).") in text
    records[0]["params"]["students"]["pruned"]["per_method"] = {}
    assert "Per-method settings" not in render({**results_for(speed()), "quality": {"sst2-deploy": block_of(records)}})


def test_the_mean_overhead_leaves_out_runs_that_reused_an_earlier_runs_stages():
    results = results_for(speed())
    runs = results["quality"]["sst2"]["runs"]
    whole = [run["overhead_ratio"] for run in runs[1:]]
    runs[0] = {**runs[0], "continued": True, "overhead_ratio": 0.9}
    text = render(results)
    seed = runs[0]["seed"]
    assert f"| sst2 seed {seed} (continued) |" in text and "| 90.0% |" in text
    assert f"Mean overhead **{statistics.fmean(whole):.1%}**" in text
    assert "The mean leaves out the runs that reused an earlier run's stages" in text
    assert "The mean leaves out" not in render(results_for(speed()))


def test_a_workspace_run_again_is_recorded_as_continued(tmp_path, monkeypatch):
    from benchmarks import quality

    workspace = tmp_path / "sst2-seed42"
    workspace.mkdir()
    (workspace / "dvc.lock").write_text("schema: '2.0'\n")

    def pipeline(*args, cwd, **kwargs):
        (Path(cwd) / "metrics").mkdir(exist_ok=True)
        (Path(cwd) / "metrics" / "evaluation.json").write_text("{}")
        return subprocess.CompletedProcess(args, 0)

    monkeypatch.setattr(quality, "make_workspace", lambda directory, params: directory)
    monkeypatch.setattr(quality.subprocess, "run", pipeline)
    monkeypatch.setattr(quality, "run_resources", lambda workspace, params: {"stages": {}, "pipeline": {}})
    assert quality.run_pipeline.fn(workspace, {"project": {"seed": 42}})["continued"] is True
    fresh = tmp_path / "sst2-seed43"
    fresh.mkdir()
    assert "continued" not in quality.run_pipeline.fn(fresh, {"project": {"seed": 43}})
