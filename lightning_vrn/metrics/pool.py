"""Worker processes that score NME samples in parallel (``nme.workers``; docs/evaluation.md, "Speed").

:class:`NMEPool` runs ``fn(volume, *args)``, one sample per call, in ``workers`` processes and returns a
:class:`~concurrent.futures.Future` per call; collected in the order they were submitted, the results are a
serial loop's, in its order. With one worker it calls ``fn`` in this process (no processes, no copies), on one
Open3D thread as a worker does, so that every number of workers gives the same bits.

- **Start.** Workers are forked by a ``forkserver``: plain ``fork`` is unsafe once torch's threads, CUDA or
  Lightning's threads exist, and ``spawn`` would import the program's main module (about 5 s for
  ``experiments.evaluate``) in every worker; the forkserver imports it and the NME's modules once, as soon as
  the first pool is made, and forks every worker of every pool of this process from there.
- **Threads.** Each worker runs one thread in every library (torch, Open3D's TBB, OpenMP and BLAS libraries
  loaded after it starts), so ``workers`` processes busy ``workers`` cores: a worker left with every core's
  threads makes the cores' threads fight, which on 2 cores slowed a training 15-fold.
- **End.** :meth:`NMEPool.close` stops the workers. They ignore the signals the main process handles (Ctrl-C,
  SIGTERM, SLURM's SIGUSR1), which then closes the pool, and they end by themselves when that process ends,
  even killed.
- **Volumes** travel through shared memory, in blocks reused from job to job (pickling a 200x192x192 float32
  volume costs the sending process ~30 ms, a copy into a mapped block ~4 ms: with 16 workers pickling alone would
  keep this process busy). At most ``2 x workers`` jobs are in flight: :meth:`NMEPool.submit` waits for a block,
  so a fast GPU cannot queue a whole test set in memory.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import sys
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import forkserver, shared_memory
from typing import Any, Callable

import numpy as np

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
"""Thread counts that OpenMP, MKL and OpenBLAS read when they load; a worker sets each to 1."""

SERVER_PRELOAD = ["lightning_vrn.metrics.nme", "open3d"]
"""What the forkserver imports before it forks workers (a module that is not installed is skipped), after the
program's own main module, by its name (:func:`start_forkserver`)."""

MAIN_PROCESS_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
"""Ctrl-C, preemption and SLURM's warning before its time limit (sent to every process of a job step): the main
process handles them (a clean stop, a checkpoint, a requeue) and closes the pool; a worker would die of them."""

JOBS_PER_WORKER = 2
"""Jobs in flight per worker: one running and one waiting, so no worker idles while this process copies."""


def slurm_task_cores(local_ranks: int = 1) -> int | None:
    """This process's share of the cores SLURM gave its task (``SLURM_CPUS_PER_TASK``), at least 1; None outside
    SLURM or when that is not a positive whole number.

    Under ``srun`` Lightning makes each SLURM task one DDP rank (the suite's job scripts), which has the task's
    cores to itself. In an interactive allocation (job name ``bash`` or ``interactive``, where Lightning does not
    use SLURM's tasks) Lightning starts the ``local_ranks`` ranks of the node itself, inside one task, and they
    share its cores."""
    cores = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if not (cores.isdigit() and int(cores) > 0):
        return None
    from lightning_fabric.plugins.environments import SLURMEnvironment  # only under SLURM: it imports Lightning

    sharing = 1 if SLURMEnvironment.detect() else max(1, local_ranks)
    return max(1, int(cores) // sharing)


def default_workers(local_ranks: int = 1) -> int:
    """NME workers for this process, one of ``local_ranks`` DDP ranks on its node: the cores it may use, at least 1.

    The cores are its CPU affinity (``os.sched_getaffinity``), at most its share of its SLURM task's
    (:func:`slurm_task_cores`); outside SLURM the ``local_ranks`` processes (DDP ranks from one launcher) share
    those cores and each gets its part.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    slurm = slurm_task_cores(local_ranks)
    if slurm is not None:
        return max(1, min(cores, slurm))
    return max(1, cores // max(1, local_ranks))


def start_forkserver() -> None:
    """Start this process's forkserver, if it has none, with :data:`SERVER_PRELOAD`: it imports them in the
    background, while this process goes on (a program that will score the NME may call this before its own
    imports, so that both import at once)."""
    # Python 3.11's forkserver drops a "__main__" preload (CPython gh-126631), and each worker then imports the
    # main program again as __mp_main__: preloaded by its module name, its imports are already in every worker.
    main = getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", None)
    preload = [main] if main and main != "__main__" else []
    multiprocessing.get_context("forkserver").set_forkserver_preload(preload + SERVER_PRELOAD)  # for a server now
    forkserver.ensure_running()


class NMEPool:
    """``workers`` processes (1: this process) that run ``fn(volume, *args)`` jobs; a context manager.

    ``workers``: None or 0 for :func:`default_workers`. Close it (:meth:`close`, or ``with``) to stop the workers
    and free the shared memory; jobs in flight are cancelled or waited for.
    """

    def __init__(self, workers: int | None = None):
        if workers is not None and workers < 0:
            raise ValueError(f"NME workers must be >= 0 (0 or None: one per core this process may use), got {workers}")
        self.workers = workers or default_workers()
        self._executor: ProcessPoolExecutor | None = None
        self._closed = False
        if self.workers > 1:
            start_forkserver()
            self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("forkserver"),
                                                 initializer=_worker_start)
            self._in_flight = threading.BoundedSemaphore(JOBS_PER_WORKER * self.workers)
            self._lock = threading.Lock()
            self._free: list[shared_memory.SharedMemory] = []
            self._blocks: list[shared_memory.SharedMemory] = []

    def submit(self, fn: Callable[..., Any], volume: np.ndarray, *args: Any) -> Future:
        """The future of ``fn(volume, *args)``; ``fn`` a module-level function, ``args`` picklable, ``volume``
        an array of any shape and dtype (the worker reads it from shared memory, read-only)."""
        if self._closed:
            raise RuntimeError("this NME pool is closed; make a new NMEPool")
        volume = np.ascontiguousarray(volume)
        if self._executor is None:
            future = Future()
            try:
                with _one_open3d_thread():
                    future.set_result(fn(volume, *args))
            except Exception as error:  # raised where the result is collected, as from a worker
                future.set_exception(error)
            return future
        self._in_flight.acquire()
        block = None
        try:
            block = self._block(volume.nbytes)
            np.ndarray(volume.shape, volume.dtype, buffer=block.buf)[...] = volume
            future = self._executor.submit(_run, fn, block.name, volume.shape, volume.dtype.str, args)
        except BaseException:
            self._release(block)
            raise
        future.add_done_callback(lambda _: self._release(block))
        return future

    def close(self) -> None:
        """Stop the workers (cancelling jobs not started) and free the shared memory; the pool is unusable after."""
        self._closed = True
        if self._executor is None:
            return
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._executor = None
        for block in self._blocks:
            block.close()
            block.unlink()
        self._blocks, self._free = [], []

    def __enter__(self) -> "NMEPool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _block(self, nbytes: int) -> shared_memory.SharedMemory:
        """A free shared-memory block of at least ``nbytes`` (a new one when none is free)."""
        with self._lock:
            for index, block in enumerate(self._free):
                if block.size >= nbytes:
                    return self._free.pop(index)
        room = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else nbytes
        if room < nbytes:  # writing past a full /dev/shm kills this process with SIGBUS
            raise MemoryError(f"/dev/shm has {room / 2**20:.0f} MiB free, an NME job needs {nbytes / 2**20:.0f} MiB: "
                              f"give the container more shared memory (docker run --shm-size) or use fewer NME "
                              f"workers (nme.workers)")
        block = shared_memory.SharedMemory(create=True, size=max(1, nbytes))
        with self._lock:
            self._blocks.append(block)
        return block

    def _release(self, block: shared_memory.SharedMemory | None) -> None:
        """A job's end (done, failed or cancelled): its block is free again, and so is its place in flight."""
        if block is not None:
            with self._lock:
                self._free.append(block)
        self._in_flight.release()


_ATTACHED: dict[str, shared_memory.SharedMemory] = {}
"""A worker's shared-memory blocks, attached once each (the pool reuses them)."""


def _run(fn: Callable[..., Any], block: str, shape: tuple[int, ...], dtype: str, args: tuple) -> Any:
    """In a worker: ``fn`` of the volume in shared-memory block ``block`` and ``args``."""
    if block not in _ATTACHED:
        _ATTACHED[block] = shared_memory.SharedMemory(name=block)
    volume = np.ndarray(shape, dtype, buffer=_ATTACHED[block].buf)
    volume.flags.writeable = False
    return fn(volume, *args)


def _exit_with(parent: multiprocessing.process.BaseProcess) -> None:
    """In a worker's own thread: wait for ``parent`` to end, then end the worker."""
    parent.join()
    os._exit(1)


@contextmanager
def _one_open3d_thread():
    """Open3D (>= 0.20) on one thread in this process, as in a worker, for the block; then as it was. Its threads
    sum ICP's terms in an order that varies, which can move a rounded transform by 1e-8 (docs/evaluation.md):
    on one thread every worker count gives the same bits."""
    try:
        from open3d import utility
    except ImportError:  # a job that needs it raises the NME's ImportError, which says how to install it
        utility = None
    if not hasattr(utility, "set_max_threads"):
        yield
        return
    before = utility.get_max_threads()
    utility.set_max_threads(1)
    try:
        yield
    finally:
        utility.set_max_threads(before)


def _worker_start() -> None:
    """Worker initializer: one thread in torch, Open3D and every OpenMP/MKL/OpenBLAS library loaded from now on;
    the signals that the main process handles ignored (:data:`MAIN_PROCESS_SIGNALS`); and a thread that ends the
    worker when the process that made the pool ends, even killed (a worker waiting for a job would wait forever).
    Without Open3D the jobs themselves raise the NME's ImportError, which says how to install it."""
    for signum in MAIN_PROCESS_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(multiprocessing.parent_process(),), daemon=True).start()
    os.environ.update(dict.fromkeys(THREAD_VARIABLES, "1"))
    import torch

    torch.set_num_threads(1)
    try:
        from open3d import utility
    except ImportError:
        return
    if hasattr(utility, "set_max_threads"):  # Open3D >= 0.20 (TBB); older ones use OpenMP, set above
        utility.set_max_threads(1)

