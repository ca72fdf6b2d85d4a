"""The shared resumable writing loop: the file does not depend on the number of workers, and an
interrupted run resumes to the same bytes."""

from pathlib import Path

import h5py
import numpy as np
import pytest

from data_prep.writing import write_pending
from lightning_vrn.dataset_file import DatasetWriter
from lightning_vrn.geometry.grid import VoxelGrid

GRID = VoxelGrid.parse("8,8,8")
N, V = 12, 5
FAIL_AT = 5
ATTRS = {"face_model": "none", "source": "test", "created_by": "tests/test_writing.py"}


def setup(marker: str | None) -> dict:
    """Maker state: the path of a file whose absence makes sample ``FAIL_AT`` fail (once)."""
    return {"marker": None if marker is None else Path(marker)}


def make(state: dict, index: int) -> tuple[dict[str, np.ndarray], dict[str, bool]]:
    """A sample drawn from ``default_rng(index)``; flagged ``odd`` when ``index`` is odd."""
    marker = state["marker"]
    if marker is not None and index == FAIL_AT and not marker.exists():
        marker.touch()
        raise RuntimeError(f"sample {index} failed")
    rng = np.random.default_rng(index)
    sample = {
        "image": rng.integers(0, 256, (GRID.height, GRID.width, 3), dtype=np.uint8),
        "volume": rng.random(GRID.shape) < 0.5,
        "landmarks_2d": rng.normal(size=(68, 2)),
        "landmarks_3d": rng.normal(size=(68, 3)),
        "pose": rng.normal(size=3),
        "vertices": rng.normal(size=(V, 3)),
    }
    return sample, {"odd": index % 2 == 1}


def new_writer(path: Path) -> DatasetWriter:
    return DatasetWriter(path, GRID, N, V, [[0, 1, 2], [2, 3, 4]], np.arange(V), np.zeros(68, dtype=int), ATTRS,
                         flags=("odd",))


def write(path: Path, workers: int, marker: Path | None = None) -> int:
    """Write (or resume) the test file at ``path``; returns the number of samples written now."""
    with new_writer(path) as writer:
        written = write_pending(writer, setup, (None if marker is None else str(marker),), make, workers,
                                progress=False)
        writer.finish()
    return written


def contents(path: Path) -> dict:
    """Every dataset's bytes and every attribute of an HDF5 file."""
    with h5py.File(path, "r") as f:
        out = {f"attr {key}": np.asarray(value).tolist() for key, value in f.attrs.items()}
        out.update({name: (f[name].dtype.str, f[name][()].tobytes()) for name in f})
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("writing") / "one.h5"
    assert write(path, workers=1) == N
    with h5py.File(path, "r") as f:
        assert f.attrs["num_odd"] == N // 2  # the flags of every sample, counted on finish
    return path


def test_two_workers_write_the_same_file(tmp_path, reference):
    path = tmp_path / "two.h5"
    assert write(path, workers=2) == N
    assert path.read_bytes() == reference.read_bytes()


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_run_resumes_to_the_same_content(tmp_path, reference, workers):
    path, marker = tmp_path / "resumed.h5", tmp_path / "failed-once"
    with pytest.raises(RuntimeError, match=f"sample {FAIL_AT} failed"):
        write(path, workers, marker)
    assert not path.exists()
    with new_writer(path) as writer:
        pending = writer.pending()
    # Written in index order: a prefix is in (the failed sample's chunk is lost with it).
    assert 0 < pending[0] <= FAIL_AT and np.array_equal(pending, np.arange(pending[0], N))
    assert write(path, workers, marker) == len(pending)
    assert contents(path) == contents(reference)  # num_odd too: the flags of the first run's samples count
    assert path.read_bytes() == reference.read_bytes()


def test_a_failed_finish_keeps_the_partial_file_and_leaves_no_copy(tmp_path, reference, monkeypatch):
    path = tmp_path / "full-disk.h5"

    def disk_full(writer, f):
        raise OSError("No space left on device")

    monkeypatch.setattr(DatasetWriter, "_copy_chunks", disk_full)
    with pytest.raises(OSError, match="No space"):
        write(path, workers=1)
    assert [p.name for p in tmp_path.iterdir()] == ["full-disk.h5.partial"]
    monkeypatch.undo()
    assert write(path, workers=1) == 0  # every sample was in: the rerun only finishes
    assert path.read_bytes() == reference.read_bytes() and [p.name for p in tmp_path.iterdir()] == ["full-disk.h5"]
