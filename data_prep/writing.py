"""Fill a dataset file's missing samples, in parallel, resumably: the loop every dataset producer shares.

A producer gives two picklable module-level functions: ``setup(*setup_args) -> state``, run once
in each process that makes samples (load a face model, open a source archive), and
``make(state, index) -> (sample, flags)``, one :meth:`DatasetWriter.write` sample (volumes bool
``(D, H, W)``: they are packed here) and its producer flags (``{name: bool}`` for the writer's
``flags``, e.g. the generator's ``leaves_grid``; the finished file counts them for all its samples). :func:`write_pending` makes the samples the writer still lacks and writes them in
index order, so the file does not depend on the number of workers, and a killed run rerun with
the same writer parameters continues where it stopped.
"""

from __future__ import annotations

import multiprocessing
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from lightning_vrn.dataset_file import DatasetWriter, pack_volume

VOLUME_KEYS = ("volume", "volume_frontal")
"""Sample keys packed in the making process: 8x fewer bytes to send to the writing one."""

Made = tuple[int, dict[str, np.ndarray], dict[str, bool]]
"""``(index, sample with packed volumes, flags)``: what a making process sends back."""
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
        if workers <= 1:
            state = setup(*setup_args)
            results = (_make_chunk(make, state, indices) for indices in chunks)
            pool = None
        else:
            pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (setup, setup_args, make))
            results = pool.imap(_worker_chunk, chunks)
        try:
            for batch in results:
                for index, sample, flags in batch:
                    writer.write(index, sample, flags)
                    written += 1
                bar.update(len(batch))
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    return written


def _make_chunk(make: Make, state: Any, indices: np.ndarray) -> list[Made]:
    """Make the samples ``indices`` and pack their volumes."""
    results = []
    for index in indices:
        sample, flags = make(state, int(index))
        for key in VOLUME_KEYS:
            if key in sample:
                sample[key] = pack_volume(sample[key])
        results.append((int(index), sample, flags))
    return results


def _init_worker(setup: Callable[..., Any], setup_args: tuple, make: Make) -> None:
    """Pool initializer: build this worker's state once."""
    _worker.update(state=setup(*setup_args), make=make)


def _worker_chunk(indices: np.ndarray) -> list[Made]:
    """:func:`_make_chunk` with this worker's state (what the pool runs)."""
    return _make_chunk(_worker["make"], _worker["state"], indices)
