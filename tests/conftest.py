"""Shared test fixtures: the optional reference data beside the repo, a tiny synthetic dataset. Plain shared
functions (running a command, what a refused command must leave unchanged, ...) are in tests/helpers/."""

from pathlib import Path

import pytest

from tests.helpers.paths import SHARED_DATA


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
