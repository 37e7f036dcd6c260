"""The benchmark's arithmetic and report: aggregation over seeds, the paired delta, the overhead split, the markdown."""

import json
import statistics

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
        "stages": {f"stage{i}": {"peak_rss_mb": 500.0 + i, "compute_seconds": c, "stage_seconds": c + 5}
                   for i, c in enumerate(compute)},
    }


RECORDS = [
    record(1, {"random/projector": 0.70, "random/flexkd": 0.72, "random/ft": 0.69}),
    record(2, {"random/projector": 0.71, "random/flexkd": 0.70, "random/ft": 0.68}),
    record(3, {"random/projector": 0.69, "random/flexkd": 0.73, "random/ft": 0.70}),
]


def test_aggregate_gives_mean_std_and_the_delta_paired_by_seed():
    result = aggregate(RECORDS)
    assert result["seeds"] == [1, 2, 3] and result["primary_metric"] == "accuracy"
    flex = result["scores"]["random/flexkd"]
    assert flex["mean"] == pytest.approx(statistics.fmean([0.72, 0.70, 0.73]))
    assert flex["std"] == pytest.approx(statistics.stdev([0.72, 0.70, 0.73]))
    delta = result["flexkd_minus_projector"]["random"]
    assert delta["values"] == pytest.approx([0.02, -0.01, 0.04])
    assert delta["std"] == pytest.approx(statistics.stdev([0.02, -0.01, 0.04]))
    assert result["scores"]["teacher"]["std"] == 0.0


def test_overhead_is_wall_minus_compute():
    split = overhead(RECORDS[0])
    assert split["compute_seconds"] == 90.0 and split["other_seconds"] == 10.0
    assert split["overhead_ratio"] == pytest.approx(0.1)


def split_record():
    """A run whose two stage processes logged their phases, and whose pipeline logged its own seconds."""
    rec = record(4, {"random/projector": 0.7, "random/flexkd": 0.7}, wall=200.0, compute=(60.0, 70.0))
    for stage, (startup, preflight, mlflow, process) in zip(rec["stages"].values(), [(6, 2, 3, 75), (5, 1, 4, 85)]):
        stage.update(startup_seconds=startup, preflight_seconds=preflight, mlflow_seconds=mlflow, process_seconds=process)
    rec["pipeline"] = {"pipeline_setup_seconds": 15.0, "dvc_repro_seconds": 180.0}
    return rec


def test_overhead_split_says_where_the_other_seconds_went_and_adds_up():
    result = overhead(split_record())
    split = result["split"]
    assert result["other_seconds"] == 70.0
    assert (split["startup"], split["preflight"], split["mlflow"]) == (11, 3, 7)
    assert split["in_stage"] == pytest.approx(160 - 11 - 3 - 7 - 130)  # process seconds less the named phases and compute
    assert split["dvc"] == pytest.approx(180 - 160) and split["pipeline"] == pytest.approx(200 - 180)
    assert sum(split[k] for k in ("startup", "preflight", "mlflow", "in_stage", "dvc", "pipeline")) == pytest.approx(70.0)
    assert "split" not in overhead(RECORDS[0])  # a run from before the phases were logged: no split, no guess


def test_report_holds_every_row_and_the_machine():
    results = {
        "machine": {"cpu": "Test CPU", "cores": 2, "memory_gib": 24.0, "gpu": None, "python": "3.11", "torch": "2.13.0",
                    "platform": "Linux", "date": "2026-11-29"},
        "profiles": ["sst2"], "seeds": [1, 2, 3], "overrides": {},
        "quality": {"sst2": {"task": "sst2", "quality": aggregate(RECORDS),
                             "runs": [{"seed": r["params"]["project"]["seed"], **overhead(r), "stages": r["stages"]}
                                      for r in [*RECORDS, split_record()]],
                             "sanity": {"metric": "accuracy", "d_teacher": 8, "none": 0.8,
                                        "by_k": {"2": {"top": 0.6, "bottom": 0.79, "random_mean": 0.78}}}}},
        "speed": {
            "workspace": "sst2-seed1", "measured": "2026-11-29 10:00 UTC",
            "relevance": {"batches": 4, "batch_size": 8, "seconds": {"relevance": 1.0, "plain": 1.0}, "ratio": 1.0},
            "distill_steps": {"student": "random", "batch_size": 8, "rounds": 3,
                              "ratio_to_plain_step": {"ft/online": 1.0, "flexkd/online": 2.0, "flexkd/cache": 1.1},
                              "cached_over_online": {"flexkd": 0.55}, "flexkd_term_share": 0.01},
            "cache_sizes": {"selected": {"bytes": 2**20, "columns": 4, "positions": 100},
                            "full": {"bytes": 2**21, "columns": 8, "positions": 100}, "selected_over_full": 0.5},
        },
    }
    text = render(results)
    assert "Test CPU, 2 cores" in text and "Measured on the `sst2-seed1` workspace (2026-11-29 10:00 UTC)." in text
    assert "**1.00x**, met (goal ≤ 1.3)" in text
    assert "| flexkd | 2.00 | 1.10 | 0.55 |" in text
    assert "**1.0%** of a flexkd step (teacher online), met (goal ≤ 5%)" in text and "**0.50x**" in text
    assert "NOT met (goal ≤ 10%)" in text and "About 35 s per stage process" in text
    assert "| sst2 seed 1 | 100 | 90 | 10 | 10.0% |" in text
    assert "| sst2 seed 4 | 2 | 11 s (16%) | 3 s (4%) | 7 s (10%) | 9 s (13%) | 20 s (29%) | 20 s (29%) |" in text
    assert "| sst2 seed 1 | 2 |" not in text  # runs without the split have no row in that table
    assert "| stage0 | 500 |" in text
    assert "| student | ft | projector | flexkd | flexkd − projector |" in text
    assert "| random | 69.00 ± 1.00 | 70.00 ± 1.00 | 71.67 ± 1.53 | 1.67 ± 2.52 |" in text
    assert "| 2 | 60.00 | 79.00 | 78.00 |" in text
    json.dumps(results)  # what results.json holds


def test_params_for_sets_the_seed_and_refuses_a_bad_override():
    params = params_for("sst2", 7, {"distill.train.epochs": 1})
    assert params["project"]["seed"] == 7 and params["distill"]["train"]["epochs"] == 1
    with pytest.raises(ConfigError, match="distill.train.epohcs"):
        params_for("sst2", 7, {"distill.train.epohcs": 1})
