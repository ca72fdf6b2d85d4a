"""Fill a dataset file's missing samples, in parallel, resumably: the loop every dataset producer shares.

A producer gives two picklable module-level functions: ``setup(*setup_args) -> state``, run once
in each process that makes samples (load a face model, open a source archive), and
``make(state, index) -> (sample, flags)``, one :meth:`DatasetWriter.write` sample and its producer flags (``{name: bool}`` for the writer's
``flags``, e.g. the generator's ``leaves_grid``; the finished file counts them for all its samples). :func:`write_pending` makes the samples the writer still lacks and writes them in
index order, so the file does not depend on the number of workers, and a killed run rerun with
the same writer parameters continues where it stopped. Each making process also encodes its samples as the file
stores them (:class:`~lightning_vrn.dataset_file.SampleEncoder`: checked, packed, compressed, checksummed), so the
writing process only copies bytes and more workers make more samples (benchmarks/results_data.md). :func:`parallel_map` is the same pool for other
per-item work (checking sources, preparing scans). Before anything is written, :func:`check_output` refuses an
output path that holds something else, and :func:`check_finished` a finished output made otherwise: the rerun
rule of every producer.
"""

from __future__ import annotations

import multiprocessing
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Sequence

import h5py
import numpy as np
from tqdm import tqdm

from lightning_vrn.dataset_file import (DatasetError, DatasetWriter, EncodedSample, FaceDatasetFile, SampleEncoder,
                                        open_dataset)
from lightning_vrn.geometry.grid import VoxelGrid
from lightning_vrn.metrics.pool import THREAD_VARIABLES

Made = tuple[int, EncodedSample, dict[str, bool]]
"""``(index, encoded sample, flags)``: what a making process sends back."""
Make = Callable[[Any, int], tuple[dict[str, np.ndarray], dict[str, bool]]]

_worker: dict[str, Any] = {}


def write_pending(writer: DatasetWriter, setup: Callable[..., Any], setup_args: tuple, make: Make,
                  workers: int = 1, desc: str | None = None, progress: bool = True) -> int:
    """Make and write every sample in ``writer.pending()``; returns how many were written.

    ``workers > 1`` makes samples in that many spawned processes (the calling script needs
    ``if __name__ == "__main__":``); this process writes them in ascending index order and shows a
    progress bar labelled ``desc``. The writer is neither finished nor closed: on an exception the
    caller's ``with DatasetWriter(...)`` keeps what was written for the next run.
    """
    pending = writer.pending()
    chunk = max(1, min(16, len(pending) // (4 * max(workers, 1))))
    chunks = [pending[i : i + chunk] for i in range(0, len(pending), chunk)]
    written = 0
    with tqdm(total=writer.num_samples, initial=writer.num_samples - len(pending), desc=desc, unit="sample",
              disable=not progress) as bar:
        results = parallel_map(_worker_chunk, chunks, workers, _init_worker, (setup, setup_args, make, writer.encoder))
        try:
            for batch in results:
                for index, encoded, flags in batch:
                    writer.write_encoded(index, encoded, flags)
                    written += 1
                bar.update(len(batch))
        finally:
            results.close()  # stops the worker processes
            _worker.clear()  # this process's state, when it made the samples itself
    return written


def _init_worker(setup: Callable[..., Any], setup_args: tuple, make: Make, encoder: SampleEncoder) -> None:
    """Build this making process's state once (in a pool worker, or in this process with one worker)."""
    _worker.update(state=setup(*setup_args), make=make, encoder=encoder)


def _worker_chunk(indices: np.ndarray) -> list[Made]:
    """Make and encode the samples ``indices`` with this worker's state (what the pool runs)."""
    results = []
    for index in indices:
        sample, flags = _worker["make"](_worker["state"], int(index))
        results.append((int(index), _worker["encoder"].encode(int(index), sample), flags))
    return results


def parallel_map(function, jobs: Sequence, workers: int, initializer, initargs: tuple = (), chunksize: int = 1):
    """Yield ``function(job)`` for each of ``jobs``, in order: in this process after ``initializer(*initargs)``
    when ``workers <= 1`` (or one job), else in ``workers`` spawned processes each set up by the initializer
    (terminated when the caller stops). ``function`` and ``initializer`` must be module-level functions."""
    if workers <= 1 or len(jobs) <= 1:
        initializer(*initargs)
        yield from map(function, jobs)
        return
    with _children_on_one_thread():
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer, initargs)
    try:
        yield from pool.imap(function, jobs, chunksize=chunksize)
    finally:
        pool.terminate()
        pool.join()


@contextmanager
def _children_on_one_thread():
    """Processes started in the block get one OpenMP/MKL/OpenBLAS thread each (unless the caller set a count):
    otherwise each worker's BLAS threads spin on every core, and 2 workers on 2 cores made 1.24x the samples of
    one instead of 1.88x (benchmarks/results_data.md)."""
    unset = [name for name in THREAD_VARIABLES if name not in os.environ]
    os.environ.update(dict.fromkeys(unset, "1"))
    try:
        yield
    finally:
        for name in unset:
            os.environ.pop(name, None)


def check_output(out: Path, files: Sequence[Path] | None = None, restart: bool = False) -> None:
    """Refuse, before anything is made or written, an output path that holds something else than what the command
    writes: one line naming the path, what it is and the fix. ``files`` None: ``out`` is the dataset file (aflw2000,
    florence, bu4dfe); else ``out`` is the folder of the dataset ``files`` (synthetic, w300lp). A folder, or a file
    that is not HDF5, where a dataset file goes is refused even with ``restart`` (which replaces dataset files only);
    an HDF5 file that is not a dataset file this code reads, unless ``restart``.
    """
    folder = out if files is not None else out.parent
    blocker = next(path for path in (folder, *folder.parents) if path.exists())
    if blocker == out and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder; delete it or choose another --out")
    if not blocker.is_dir():
        raise NotADirectoryError(f"--out {out}: {blocker} is a file, not a folder; choose another --out")
    for path in [out] if files is None else files:
        name = f"--out {path}" if files is None else str(path)
        if path.is_dir():
            fix = ("delete it or choose another --out" if files is not None
                   else f"give --out the path of a .h5 file (e.g. {path / 'test.h5'})")
            raise IsADirectoryError(f"{name} is a folder, not a dataset file; {fix}")
        if path.exists() and not h5py.is_hdf5(path):
            raise FileExistsError(f"{name} is a file that is not HDF5, not a dataset file; delete it or choose "
                                  f"another --out")
        if path.exists() and not restart:
            _open_finished(path)


def _open_finished(path: Path) -> FaceDatasetFile:
    """:func:`open_dataset` of an existing output; FileExistsError naming a producer's fix if it fails."""
    try:
        return open_dataset(path)
    except DatasetError as error:
        raise FileExistsError(f"{path} exists but is not a dataset file this code reads ({error.reason}); pass "
                              f"--restart to replace it, or choose another --out") from None


def check_finished(path: Path, grid: VoxelGrid, num_samples: int | None, attrs: dict, keys,
                   with_frontal: bool | None = None, need_expression: bool = False,
                   made_from: str = "with other arguments") -> None:
    """Raise :class:`FileExistsError` if the finished dataset file at ``path`` differs from what a rerun would write:
    grid, number of samples (unless None), the ``attrs`` named by ``keys``, frontal volumes (unless ``with_frontal``
    is None) and, with ``need_expression``, expression labels; or if it is not a dataset file this code reads.

    The rerun rule of every producer (synthetic, AFLW2000-3D, 300W-LP, Florence, BU-4DFE): a finished file made
    with the same arguments is left as it is; one made otherwise is refused unless ``--restart``. The finished
    file's ``.partial`` left by a kill between the final rename and its removal is removed.
    """
    dataset = _open_finished(path)
    differences = [f"grid {dataset.grid.describe()} vs {grid.describe()}"] if dataset.grid != grid else []
    if num_samples is not None and dataset.num_samples != num_samples:
        differences.append(f"{dataset.num_samples} samples vs {num_samples}")
    if with_frontal is not None and dataset.has_frontal != with_frontal:
        differences.append(f"frontal volumes {dataset.has_frontal} vs {with_frontal}")
    if need_expression and not dataset.has_expression:
        differences.append("no expression labels (made by older code)")
    for key in keys:
        stored, wanted = dataset.attrs.get(key), attrs.get(key)  # absent from both: the same
        if not np.array_equal(np.asarray(stored), np.asarray(wanted)):  # scalars, strings and arrays alike
            differences.append(f"{key} {stored!r} vs {wanted!r}")
    if differences:
        raise FileExistsError(f"{path} exists but was made {made_from} ({'; '.join(differences)}); "
                              f"pass --restart to replace it, or choose another --out")
    leftover = path.with_name(path.name + ".partial")
    if leftover.exists():
        leftover.unlink()
        warnings.warn(f"removed {leftover}: {path} was finished from it (a kill had stopped its removal)", stacklevel=2)
