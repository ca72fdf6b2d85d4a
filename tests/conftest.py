"""Shared test fixtures and helpers: paths to the optional reference data beside the repo, running a command as its
command line does (or killed part-way), what a refused command must leave unchanged."""

import contextlib
import io
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; skips the test when it is absent (as on a user's machine)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not found at {SHARED_DATA} (only present beside the repo in CI)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """A small synthetic dataset at the quickstart grid: train 8, val 4, test 4 samples, with frontal volumes."""
    from data_prep.synthetic import generate_split
    from lightning_vrn.geometry import VoxelGrid

    out = tmp_path_factory.mktemp("synthetic-96")
    grid = VoxelGrid.parse("100,96,96")
    for split, count in (("train", 8), ("val", 4), ("test", 4)):
        generate_split(out / f"{split}.h5", "builtin", grid, count, seed=0, split=split, with_frontal=True,
                       progress=False)
    return out


def run_cli(main, argv) -> tuple[int, list[str]]:
    """``main(argv)`` as its command line runs it (:func:`run_command`): the exit code and the stderr lines."""
    from lightning_vrn.cli import run_command

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run_command(main, argv)
    return code, err.getvalue().splitlines()


def files_under(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` -> its bytes (None for a folder): what a refused command must leave as it was."""
    return {str(path.relative_to(folder)): None if path.is_dir() else path.read_bytes()
            for path in sorted(folder.rglob("*"))}


KILLED_AT = """
import importlib, os, signal, sys
from lightning_vrn.dataset_file import DatasetWriter
init, write = DatasetWriter.__init__, DatasetWriter.write
def flushing_every(self, *args, **kwargs):
    init(self, *args, **kwargs, flush_every=int(sys.argv[3]))
def killed_at(self, index, *args):
    if index == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
    return write(self, index, *args)
DatasetWriter.__init__, DatasetWriter.write = flushing_every, killed_at
importlib.import_module(sys.argv[1]).main(sys.argv[4:])
"""


def run_killed(module: str, argv, index: int, flush_every: int = 4) -> None:
    """``python -m module argv`` in a process that SIGKILLs itself as it is about to write sample ``index``: the
    samples before it are written, those since the last flush not flagged. It flushes every ``flush_every`` samples
    (not 32) so that a small file has flagged samples when killed."""
    result = subprocess.run([sys.executable, "-c", KILLED_AT, module, str(index), str(flush_every), *map(str, argv)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr

