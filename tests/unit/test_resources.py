"""flexkd.resources: phases are counted exclusively (an inner phase pauses the outer clock), also as a decorator;
process age and peak memory."""

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

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


def test_phase_seconds_add_up_to_the_elapsed_time_three_levels_deep(clock):
    with resources.phase("preflight"):
        clock(1.0)
        with resources.compute():
            clock(2.0)
            with resources.phase("mlflow"):
                clock(4.0)
            clock(8.0)
            with resources.phase("mlflow"):
                clock(16.0)
        clock(32.0)
    assert resources.seconds("preflight") == pytest.approx(33.0)
    assert resources.compute_seconds() == pytest.approx(10.0)
    assert resources.seconds("mlflow") == pytest.approx(20.0)
    total = sum(resources.seconds(name) for name in ("preflight", "compute", "mlflow"))
    assert total == pytest.approx(63.0)  # every elapsed second counted once


def test_an_open_block_is_not_counted_yet(clock):
    with resources.compute():
        clock(3.0)
        assert resources.compute_seconds() == 0.0
        with resources.phase("mlflow"):  # entering a phase banks the outer block's seconds so far
            assert resources.compute_seconds() == pytest.approx(3.0)
            clock(1.0)
            assert resources.seconds("mlflow") == 0.0
    assert resources.compute_seconds() == pytest.approx(3.0) and resources.seconds("mlflow") == pytest.approx(1.0)


def test_another_threads_phase_does_not_pause_this_threads_compute(clock):
    def log():
        with resources.phase("mlflow"):
            clock(0.5)

    with resources.compute():
        clock(1.0)
        worker = threading.Thread(target=log)
        worker.start()
        worker.join()
        clock(1.0)
    assert resources.compute_seconds() == pytest.approx(2.5)  # the main thread computed all along
    assert resources.seconds("mlflow") == pytest.approx(0.5)


def test_process_age_is_now_minus_the_process_start(monkeypatch):
    import psutil

    started = psutil.Process().create_time()
    monkeypatch.setattr(resources.time, "time", lambda: started + 12.5)
    assert resources.process_age() == pytest.approx(12.5)
    # without psutil: the age since flexkd.resources was imported
    monkeypatch.setitem(sys.modules, "psutil", None)
    monkeypatch.setattr(resources, "_IMPORTED", started + 2.5)
    assert resources.process_age() == pytest.approx(10.0)


def test_peak_rss_grows_by_a_buffer_allocated_and_touched():
    """A 200 MiB buffer raises the peak by about 200 MiB, in MiB. Measured in a process of its own (this one's peak
    is whatever earlier tests reached), started by a small process: Linux hands a child started by this big one this
    one's peak, and should a peak be inherited anyway, the buffer first grows past it."""
    code = textwrap.dedent("""
        import numpy as np
        import psutil
        from flexkd import resources
        before = resources.peak_rss_mb()
        headroom = max(0, int((before - psutil.Process().memory_info().rss / 2**20) * 2**20))
        buffer = np.ones(headroom + 200 * 2**20, dtype=np.uint8)  # every page written
        print(before, resources.peak_rss_mb(), headroom // 2**20)
    """)
    starter = "import subprocess, sys; sys.exit(subprocess.run([sys.executable, '-c', sys.argv[1]]).returncode)"
    out = subprocess.run([sys.executable, "-c", starter, code], cwd=Path(__file__).resolve().parents[2],
                         capture_output=True, text=True, check=True).stdout.split()
    before, after = float(out[0]), float(out[1])
    assert before > 0
    assert 0.8 * 200 <= after - before <= 1.25 * 200
