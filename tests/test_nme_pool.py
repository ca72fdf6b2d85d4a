"""The NME scored in a pool of worker processes: the serial rows exactly, a worker's error with its message, one
thread per worker, workers that end with their process, the default number of workers, and how far the ICP
subsample moves the NME."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_vrn.metrics import pool as pool_module
from lightning_vrn.metrics.nme import NME, sample_nme
from lightning_vrn.metrics.pool import MAIN_PROCESS_SIGNALS, THREAD_VARIABLES, NMEPool, default_workers
from tests.helpers.ellipsoid import GRID, ellipsoid_front_points, ellipsoid_volume
from tests.test_nme import INTEROCULAR, rotation_about

SUBSAMPLE_BOUND = 1e-3
"""|NME with icp_subsample=50 - NME with every vertex| on the ellipsoid cases below (measured: at most 5.5e-4).
On faces it is far larger (docs/evaluation.md, "Speed"), which is why the default fits every vertex."""


@pytest.fixture(scope="module")
def pool():
    with NMEPool(2) as pool:
        yield pool


def batches():
    """Two batches of three: ellipsoid predictions rotated by 0-10 degrees about a tilted axis, the second batch's
    last one empty (a failed sample), against the unrotated ellipsoid's front."""
    volumes = [ellipsoid_volume(rotation_about([0.3, 1.0, 0.2], angle)) for angle in (0.0, 2.0, 4.0, 6.0, 8.0, 10.0)]
    volumes[-1] = np.zeros_like(volumes[-1])
    volumes = torch.from_numpy(np.stack(volumes))
    gt = torch.from_numpy(np.stack([ellipsoid_front_points(1500)] * 6))
    interocular, yaw = torch.linspace(18.0, 23.0, 6), torch.linspace(-1.0, 1.0, 6)
    index = torch.tensor([5, 0, 3, 1, 4, 2])
    return [(volumes[s], gt[s], interocular[s], yaw[s], index[s]) for s in (slice(0, 3), slice(3, 6))]


def test_pooled_rows_equal_serial_rows(pool):
    serial, pooled = NME(GRID), NME(GRID, pool=pool)
    for batch in batches():
        serial.update(*batch)
        pooled.update(*batch)
    expected, got = serial.per_sample(), pooled.per_sample()
    assert list(expected["failed"]) == [False, False, True, False, False, False]  # index 2: the empty volume
    assert np.all(np.diff(expected["nme"][~expected["failed"]]) != 0)  # six different rows, not one repeated
    assert got.keys() == expected.keys()
    for column in expected:  # every column to the last bit; NaN where serial has NaN
        np.testing.assert_array_equal(got[column], expected[column], strict=True)
    assert {key: float(value) for key, value in pooled.compute().items()} == \
        {key: float(value) for key, value in serial.compute().items()}


def test_an_error_in_a_worker_reaches_the_caller_with_its_message(pool):
    volumes, gt, *rest = batches()[0]
    gt = gt.clone()
    gt[1, 7, 2] = float("nan")
    serial = NME(GRID)
    serial.update(volumes, gt, *rest)
    with pytest.raises(ValueError) as serial_error:
        serial.per_sample()
    pooled = NME(GRID, pool=pool)
    pooled.update(volumes, gt, *rest)
    with pytest.raises(ValueError) as pooled_error:
        pooled.compute()
    assert str(pooled_error.value) == str(serial_error.value)
    assert "gt_vertices contain NaN" in str(pooled_error.value)
    after = NME(GRID, pool=pool)  # the pool goes on working
    after.update(*batches()[0])
    assert int(after.compute()["count"]) == 3


def _report(_volume: np.ndarray, seconds: float) -> dict:
    """A job that reports the worker's process, threads and signals, after ``seconds`` (so that both workers take
    one)."""
    import open3d

    time.sleep(seconds)
    with open("/proc/self/status") as status:
        threads = next(int(line.split()[1]) for line in status if line.startswith("Threads:"))
    return {"pid": os.getpid(), "torch": torch.get_num_threads(), "open3d": open3d.utility.get_max_threads(),
            "threads": threads, "ignored": [signal.getsignal(s) == signal.SIG_IGN for s in MAIN_PROCESS_SIGNALS],
            **{name: os.environ.get(name) for name in THREAD_VARIABLES}}


def test_each_worker_is_its_own_process_with_one_thread(pool):
    reports = [future.result() for future in [pool.submit(_report, np.zeros(4), 0.3) for _ in range(4)]]
    assert len({report["pid"] for report in reports}) == 2 and os.getpid() not in {r["pid"] for r in reports}
    for report in reports:
        assert report["torch"] == 1 and report["open3d"] == 1
        assert report["threads"] == 2  # the worker's, and the one that waits for the pool's process to end
        assert all(report[name] == "1" for name in THREAD_VARIABLES)
        assert all(report["ignored"])  # Ctrl-C, SIGTERM, SLURM's SIGUSR1: the main process stops the pool


def _pid(_volume: np.ndarray) -> int:
    time.sleep(0.3)
    return os.getpid()


def test_workers_end_when_the_process_that_made_the_pool_is_killed():
    code = ("import numpy as np, time; from lightning_vrn.metrics.pool import NMEPool; from tests.test_nme_pool "
            "import _pid; pool = NMEPool(2); print(*{f.result() for f in [pool.submit(_pid, np.zeros(1)) "
            "for _ in range(4)]}, flush=True); time.sleep(60)")
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                          cwd=Path(__file__).parents[1]) as process:
        workers = [int(pid) for pid in process.stdout.readline().split()]
        process.kill()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_running(pid) for pid in workers):
        time.sleep(0.1)
    assert len(workers) == 2 and not any(_running(pid) for pid in workers)


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_default_is_this_process_share_of_its_cores(monkeypatch):
    monkeypatch.setattr(pool_module.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert (default_workers(), default_workers(local_ranks=2), default_workers(local_ranks=16)) == (8, 4, 1)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")  # a SLURM task's cores: under srun already one rank's share
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    assert (default_workers(), default_workers(local_ranks=2)) == (3, 3)
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # Lightning starts the ranks in one task: they share it
    assert (default_workers(), default_workers(local_ranks=2), default_workers(local_ranks=4)) == (3, 1, 1)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")
    assert default_workers(local_ranks=2) == 4
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    with NMEPool(0) as pool:
        assert pool.workers == 3
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "32")  # never more than the affinity allows
    assert default_workers() == 8
    with pytest.raises(ValueError, match="workers must be >= 0"):
        NMEPool(-1)


def test_the_icp_subsample_moves_the_nme_within_its_bound():
    gt = ellipsoid_front_points()
    for axis, angle in (([0.3, 1.0, 0.2], 5.0), ([0.0, 1.0, 0.0], 3.0), ([1.0, 0.0, 0.0], 6.0), ([0, 0, 1.0], 8.0)):
        volume = ellipsoid_volume(rotation_about(axis, angle))
        full, every_50th = (sample_nme(volume, gt, INTEROCULAR, GRID, icp_max_distance=6.0, icp_subsample=k)
                            for k in (1, 50))
        assert full.nme > 0.03  # a real displacement, not the floor
        assert abs(every_50th.nme - full.nme) < SUBSAMPLE_BOUND
        assert every_50th.errors.shape == full.errors.shape == (len(gt),)  # the error is still over every vertex
    assert sample_nme(volume, gt, INTEROCULAR, GRID, icp_max_distance=6.0).nme == full.nme  # 1 is the default
    with pytest.raises(ValueError, match="icp_subsample"):
        sample_nme(volume, gt, INTEROCULAR, GRID, icp_subsample=0)


def test_a_closed_pool_refuses_jobs():
    closed = NMEPool(1)
    closed.close()
    with pytest.raises(RuntimeError, match="closed"):
        closed.submit(sample_nme, np.zeros((4, 8, 8), dtype=np.float32))
