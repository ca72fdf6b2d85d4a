"""NMECallback in a real CPU Trainer: a stub model whose steps return the ground-truth volume scores at the floor."""

import csv
import multiprocessing
import os

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from lightning_vrn.callbacks import NMECallback, NMESettings, ProcessGroupExit
from lightning_vrn.geometry.grid import VoxelGrid
from lightning_vrn.landmark_scheme import OUTER_EYE_CORNERS
from lightning_vrn.metrics.nme import sample_nme
from lightning_vrn.models import occupancy
from tests.helpers.stub_models import TargetVolumeModel

GRID = VoxelGrid.centred(48, 40, 40)
AXES = np.array([12.0, 14.0, 8.0])
YAWS = np.radians([-40.0, -10.0, 0.0, 25.0, 70.0])
EMPTY_SAMPLE = 4  # its predicted volume is empty: counted as failed


def unit_directions(count: int = 1500) -> np.ndarray:
    """(count, 3) evenly spread unit vectors (Fibonacci sphere)."""
    i = np.arange(count) + 0.5
    z = 1 - 2 * i / count
    azimuth = np.pi * (1 + 5**0.5) * i
    return np.stack([np.sqrt(1 - z**2) * np.cos(azimuth), np.sqrt(1 - z**2) * np.sin(azimuth), z], axis=-1)


def make_sample(index: int) -> dict:
    """A closed ellipsoid 'head' whose front half is the face region, its soft volume and landmarks."""
    centre = np.array([19.5 + index * 0.7, 20.0 - index * 0.4, 0.3])
    directions = unit_directions()
    vertices = centre + directions * AXES
    d, y, x = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in GRID.shape], indexing="ij")
    q = (np.stack([x, y, d / GRID.z_scale + GRID.z_offset], -1) - centre) / AXES
    distance = ((q**2).sum(-1) - 1) / np.linalg.norm(2 * q / AXES, axis=-1)
    logits = -distance / 0.7 if index != EMPTY_SAMPLE else np.full(GRID.shape, -10.0)
    landmarks = np.zeros((68, 3))
    landmarks[list(OUTER_EYE_CORNERS)] = centre + [[-9.0, -3.0, -4.0], [9.0, -3.0, -4.0]]
    return {
        "volume_logits": logits.astype(np.float32),
        "vertices": vertices.astype(np.float32),
        "landmarks_3d": landmarks.astype(np.float32),
        "pose": np.array([0.0, YAWS[index], 0.0], np.float32),
        "index": index,
    }


SAMPLES = [make_sample(i) for i in range(len(YAWS))]
FACE_REGION = np.flatnonzero(unit_directions()[:, 2] < -0.3)  # camera-facing part


class TinyFaces(pl.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.splits_asked = []

    def topology(self, split):
        self.splits_asked.append(split)
        return {"face_region": FACE_REGION}

    def _loader(self):
        return DataLoader(SAMPLES, batch_size=2)

    train_dataloader = val_dataloader = test_dataloader = _loader


class GroundTruthModel(pl.LightningModule):
    """Its validation step returns the ground truth's logits, its test step the soft volume; records predict calls."""

    def __init__(self):
        super().__init__()
        self.grid = GRID
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.predict_calls = 0

    def training_step(self, batch, batch_idx):
        return (self.weight - 1).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", (self.weight - 1).pow(2).sum(), batch_size=len(batch["index"]))
        return {"volume_logits": batch["volume_logits"]}

    def test_step(self, batch, batch_idx):
        return {"volume": occupancy(batch["volume_logits"])}

    def predict_step(self, batch, batch_idx):
        self.predict_calls += 1
        return occupancy(batch["volume_logits"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def expected_nme(index: int) -> float:
    sample = SAMPLES[index]
    interocular = np.linalg.norm(np.subtract(*sample["landmarks_3d"][list(OUTER_EYE_CORNERS)]))
    volume = occupancy(torch.from_numpy(sample["volume_logits"])).numpy()
    return sample_nme(volume, sample["vertices"][FACE_REGION], interocular, GRID).nme


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("nme")
    model = GroundTruthModel()
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[NMECallback(NMESettings(every_n_epochs=2, max_val_samples=3), out_dir=out_dir)],
    )
    datamodule = TinyFaces()
    trainer.fit(model, datamodule=datamodule)
    val_metrics = dict(trainer.callback_metrics)
    test_metrics = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    return out_dir, model, val_metrics, test_metrics, datamodule


def test_validation_and_test_nme_use_their_own_split_topology(finished_run):
    datamodule = finished_run[-1]
    assert datamodule.splits_asked == ["val", "test"]  # epoch 1 validation, then the test run


def test_validation_nme_runs_on_due_epochs_for_a_subset(finished_run):
    out_dir, model, val_metrics, _, _ = finished_run
    assert not (out_dir / "val_epoch0000.csv").exists()  # epoch 0 is not due with every_n_epochs=2
    rows = read_csv(out_dir / "val_epoch0001.csv")
    assert [int(row["index"]) for row in rows] == [0, 1, 2]  # max_val_samples=3
    assert float(val_metrics["val/nme"]) == pytest.approx(np.mean([expected_nme(i) for i in range(3)]), rel=1e-5)
    assert float(val_metrics["val/nme"]) < 0.01  # ground truth against itself: the floor
    assert float(val_metrics["val/nme_failed"]) == 0
    assert model.predict_calls == 0  # the callback scored the steps' outputs: no second forward pass


def test_test_nme_covers_every_sample_with_yaw_and_failures(finished_run):
    out_dir, _, _, test_metrics, _ = finished_run
    rows = read_csv(out_dir / "test.csv")
    assert list(rows[0]) == ["index", "yaw_deg", "expression", "nme", "nme_aligned", "nme_closest", "failed"]
    assert [int(row["index"]) for row in rows] == list(range(len(SAMPLES)))
    np.testing.assert_allclose([float(row["yaw_deg"]) for row in rows], np.degrees(YAWS), atol=1e-3)
    ok = [i for i in range(len(SAMPLES)) if i != EMPTY_SAMPLE]
    np.testing.assert_allclose([float(rows[i]["nme"]) for i in ok], [expected_nme(i) for i in ok], rtol=1e-4)
    assert rows[EMPTY_SAMPLE]["nme"] == "nan" and rows[EMPTY_SAMPLE]["failed"] == "1"
    assert test_metrics["test/nme_failed"] == 1
    assert test_metrics["test/nme"] == pytest.approx(np.mean([float(rows[i]["nme"]) for i in ok]), rel=1e-4)


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="every_n_epochs"):
        NMECallback(NMESettings(every_n_epochs=0))
    with pytest.raises(ValueError, match="max_val_samples"):
        NMESettings(max_val_samples=0)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [None, 2])  # None: each rank's share of the cores; 2: a pool in each rank
def test_two_process_ddp_reduces_and_rank_zero_writes_every_sample_once(tmp_path, workers):
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        # as training's Trainer (test_ddp_exit.py)
        callbacks=[NMECallback(NMESettings(workers=workers), out_dir=tmp_path), ProcessGroupExit()],
    )
    metrics = trainer.test(GroundTruthModel(), datamodule=TinyFaces(), verbose=False)[0]
    rows = read_csv(tmp_path / "test.csv")
    # The distributed sampler pads 5 samples to 6 with a repeat; the table lists each sample once.
    assert [int(row["index"]) for row in rows] == list(range(len(SAMPLES)))
    ok = [i for i in range(len(SAMPLES)) if i != EMPTY_SAMPLE]
    np.testing.assert_allclose([float(rows[i]["nme"]) for i in ok], [expected_nme(i) for i in ok], rtol=1e-4)
    assert metrics["test/nme_failed"] == 1
    assert metrics["test/nme"] < 0.01
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.csv", "test_summary.json"]  # no temporary left
    # Exactly what one process writes: the same rows, values and summary, the repeat counted once.
    single = tmp_path / "single"
    pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
               callbacks=[NMECallback(out_dir=single)]).test(GroundTruthModel(), datamodule=TinyFaces(), verbose=False)
    assert (single / "test.csv").read_text() == (tmp_path / "test.csv").read_text()
    assert (single / "test_summary.json").read_text() == (tmp_path / "test_summary.json").read_text()


def test_a_frontal_target_model_is_scored_against_the_frontalised_ground_truth(tmp_path):
    from data_prep.synthetic import generate_split
    from datamodules import FaceVolumeDataModule

    grid = VoxelGrid.parse("100,96,96")
    path = generate_split(tmp_path / "test.h5", "builtin", grid, 4, seed=3, split="test", with_frontal=True,
                          progress=False)
    datamodule = FaceVolumeDataModule(test_path=path, grid=grid, batch_size=4, num_workers=0,
                                      target_volume="frontal", persistent_workers=False)
    summaries = {}
    for frame in ("frontal", "aligned"):
        callback = NMECallback(out_dir=tmp_path / frame)
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[callback])
        trainer.test(TargetVolumeModel(grid, frame), datamodule=datamodule, verbose=False)
        summaries[frame] = callback.summaries["test"]
    yaws = np.abs([float(row["yaw_deg"]) for row in read_csv(tmp_path / "frontal" / "test.csv")])
    assert yaws.max() > 30  # posed faces, so the two frames differ
    # The frontal target against the frontalised ground truth is at the metric's floor ...
    assert summaries["frontal"]["nme_mean"] < 0.01  # measured 0.0034
    # ... and the same volume taken as image-aligned is far off.
    assert summaries["aligned"]["nme_mean"] > 10 * summaries["frontal"]["nme_mean"]  # measured 0.24


def test_a_pool_of_workers_writes_the_serial_report_and_ends_with_the_run(tmp_path):
    children_before = set(multiprocessing.active_children())
    for workers in (1, 2):
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                             enable_model_summary=False,
                             callbacks=[NMECallback(NMESettings(workers=workers), out_dir=tmp_path / str(workers))])
        trainer.test(GroundTruthModel(), datamodule=TinyFaces(), verbose=False)
        assert set(multiprocessing.active_children()) <= children_before  # the workers stopped with the run
    for name in ("test.csv", "test_summary.json"):
        assert (tmp_path / "2" / name).read_text() == (tmp_path / "1" / name).read_text()


class FailingModel(GroundTruthModel):
    """Its second test step fails, while the first batch's samples are still being scored."""

    def test_step(self, batch, batch_idx):
        if batch_idx == 1:
            raise RuntimeError("test step failed")
        return super().test_step(batch, batch_idx)


def shared_memory_blocks() -> set[str]:
    """Names of the shared-memory blocks of Python's multiprocessing (``psm_*``) on this machine."""
    return {name for name in os.listdir("/dev/shm") if name.startswith("psm_")}


def test_a_failing_run_stops_the_workers_and_frees_their_shared_memory(tmp_path):
    blocks_before, children_before = shared_memory_blocks(), set(multiprocessing.active_children())
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[NMECallback(NMESettings(workers=2), out_dir=tmp_path)])
    with pytest.raises(RuntimeError, match="test step failed"):
        trainer.test(FailingModel(), datamodule=TinyFaces(), verbose=False)
    assert set(multiprocessing.active_children()) <= children_before
    assert shared_memory_blocks() <= blocks_before
    assert not (tmp_path / "test.csv").exists()
