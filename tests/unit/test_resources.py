"""flexkd.resources: phases are counted exclusively (an inner phase pauses the outer clock), also as a decorator."""

import pytest

from flexkd import resources


@pytest.fixture
def clock(monkeypatch):
    """A fake perf_counter that advances only when told, and fresh phase totals."""
    now = [100.0]
    monkeypatch.setattr(resources.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(resources, "_seconds", type(resources._seconds)(float))

    def advance(seconds):
        now[0] += seconds

    return advance


def test_nested_phases_are_exclusive(clock):
    with resources.compute():
        clock(2.0)
        with resources.phase("mlflow"):
            clock(0.5)
        clock(1.0)
    assert resources.compute_seconds() == pytest.approx(3.0)
    assert resources.seconds("mlflow") == pytest.approx(0.5)
    assert resources.seconds("preflight") == 0.0


def test_phase_as_decorator_counts_every_call_and_survives_an_exception(clock):
    @resources.phase("mlflow")
    def log(fail=False):
        clock(0.25)
        if fail:
            raise RuntimeError("server down")

    with resources.compute():
        log()
        clock(1.0)
        with pytest.raises(RuntimeError, match="server down"):
            log(fail=True)
    assert resources.seconds("mlflow") == pytest.approx(0.5)
    assert resources.compute_seconds() == pytest.approx(1.0)


def test_process_age_is_positive_and_grows():
    first = resources.process_age()
    assert first > 0
    assert resources.process_age() >= first
