"""FaceVolumeDataset / FaceVolumeDataModule: the batch contract, both paths, seeds and epochs, workers,
the global batch split over processes, and clear errors."""

import shutil
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from datamodules.datamodule import FaceVolumeDataModule
from datamodules.dataset import FaceVolumeDataset
from lightning_vrn.dataset_file import DatasetError
from lightning_vrn.geometry.grid import VoxelGrid
from tests.helpers.toy_face import TOY_EXPRESSIONS, write_toy_dataset

GRID = VoxelGrid.centred(50, 48, 48)
AUGMENT = {"enabled": True, "on_device": False}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Train (8 samples, with frontal volumes and expression labels) and val/test (4 samples) files on the
    50x48x48 grid."""
    root = tmp_path_factory.mktemp("data")
    train = write_toy_dataset(root / "train.h5", GRID, 8, seed=0, frontal=True, expressions=True)
    val = write_toy_dataset(root / "val.h5", GRID, 4, seed=1)
    return SimpleNamespace(train=root / "train.h5", val=root / "val.h5", root=root, train_samples=train,
                           val_samples=val)


def make_dm(files, **overrides):
    kwargs = dict(train_path=files.train, val_path=files.val, test_path=files.val, grid=GRID.to_dict(), batch_size=4,
                  num_workers=0, augment=AUGMENT, heatmap_sigma=1.0, seed=0, pin_memory=False)
    return FaceVolumeDataModule(**{**kwargs, **overrides})


def first_batches(dm, count=2, epoch=0, stage="fit"):
    """The first ``count`` training batches of ``epoch``, finished as the trainer would (on_after_batch_transfer)."""
    dm.setup(stage)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    batches = []
    for batch in loader:
        batches.append(dm.on_after_batch_transfer(batch, 0))
        if len(batches) == count:
            break
    return batches


def assert_same_batch(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if key in ("image", "heatmaps", "pose"):
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key


def test_batches_follow_the_contract(files):
    dm = make_dm(files)
    batch = first_batches(dm, 1)[0]
    assert set(batch) == {"image", "volume", "landmarks_2d", "landmarks_3d", "pose", "heatmaps", "index", "expression"}
    expected = {"image": (4, 3, 48, 48), "volume": (4, 50, 48, 48), "landmarks_2d": (4, 68, 2),
                "landmarks_3d": (4, 68, 3), "pose": (4, 3), "heatmaps": (4, 68, 48, 48), "index": (4,),
                "expression": (4,)}
    for key, shape in expected.items():
        assert tuple(batch[key].shape) == shape, key
        assert batch[key].dtype == (torch.int64 if key in ("index", "expression") else torch.float32), key
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1
    assert set(batch["volume"].unique().tolist()) == {0.0, 1.0}
    # Heatmaps peak at the augmented landmarks that lie inside the crop.
    flat = batch["heatmaps"].flatten(2).argmax(-1)
    peaks = torch.stack([flat % 48, flat // 48], -1).float()
    inside = ((batch["landmarks_2d"] >= 0) & (batch["landmarks_2d"] <= 47)).all(-1)
    assert (peaks - batch["landmarks_2d"])[inside].abs().max() <= 0.5

    # Workers hand over uint8 volumes and no heatmaps; on_after_batch_transfer finishes them.
    unfinished = next(iter(dm.train_dataloader()))
    assert unfinished["volume"].dtype == torch.uint8 and "heatmaps" not in unfinished

    # Validation: not augmented, with vertices; equals the file's content.
    val = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert set(val) == set(expected) | {"vertices"}
    assert val["vertices"].shape == (4, len(files.val_samples[0]["vertices"]), 3)
    for i, sample in enumerate(files.val_samples):
        assert torch.equal(val["image"][i], torch.from_numpy(sample["image"]).permute(2, 0, 1).float() / 255)
        assert torch.equal(val["volume"][i].bool(), torch.from_numpy(sample["volume"]))
        assert torch.equal(val["landmarks_2d"][i], torch.from_numpy(sample["landmarks_2d"]))
        assert torch.equal(val["vertices"][i], torch.from_numpy(sample["vertices"]))


@pytest.mark.parametrize("heatmap_sigma", [None, 2.0])
def test_cpu_and_device_paths_give_identical_batches(files, heatmap_sigma):
    cpu = first_batches(make_dm(files, heatmap_sigma=heatmap_sigma), 2, epoch=1)
    device_dm = make_dm(files, heatmap_sigma=heatmap_sigma, augment={**AUGMENT, "on_device": True})
    device_dm.setup("fit")
    raw = next(iter(device_dm.train_dataloader()))
    assert raw["volume_packed"].dtype == torch.uint8 and raw["volume_packed"].shape == (4, 50, 48, 6)
    assert raw["image_uint8"].dtype == torch.uint8
    device = first_batches(device_dm, 2, epoch=1)
    for a, b in zip(cpu, device):
        assert_same_batch(a, b)
    # Validation batches are unpacked on the device too and match the CPU path.
    cpu_dm = make_dm(files, heatmap_sigma=heatmap_sigma)
    cpu_dm.setup("validate")
    val_cpu = cpu_dm.on_after_batch_transfer(next(iter(cpu_dm.val_dataloader())), 0)
    val_raw = next(iter(device_dm.val_dataloader()))
    assert_same_batch(val_cpu, device_dm.on_after_batch_transfer(val_raw, 0))


def test_expression_labels_ride_along_unchanged_on_both_paths(files, tmp_path):
    for on_device in (False, True):
        batches = first_batches(make_dm(files, augment={**AUGMENT, "on_device": on_device}), 2)
        for batch in batches:  # augmented (some flipped), labels as written: sample i has i % 3
            assert torch.equal(batch["expression"], batch["index"] % len(TOY_EXPRESSIONS))
    # A file without labels gives -1: the val file (version 2 without expression fields) and a version-1 file.
    version_1 = tmp_path / "v1.h5"
    shutil.copy(files.val, version_1)
    with h5py.File(version_1, "r+") as f:
        f.attrs["schema_version"] = 1
    for path in (files.val, version_1):
        for on_device in (False, True):
            dataset = FaceVolumeDataset(path, GRID, augment=AUGMENT, on_device=on_device)
            assert [dataset[i]["expression"].item() for i in range(len(dataset))] == [-1] * 4


def test_frontal_targets(files):
    dm = make_dm(files, target_volume="frontal", augment=None, val_path=files.train)
    batch = first_batches(dm, 1)[0]
    for i, index in enumerate(batch["index"].tolist()):
        assert torch.equal(batch["volume"][i].bool(), torch.from_numpy(files.train_samples[index]["volume_frontal"]))
    with pytest.raises(DatasetError, match="volumes_frontal"):
        make_dm(files, train_path=files.val, target_volume="frontal").setup("fit")


def fake_trainer(world_size=1, rank=0, epoch=0, steps_done=0, last_batch=False):
    """What train_dataloader reads of a Trainer: processes, rank, epoch and the (restored) step count in it."""
    progress = SimpleNamespace(is_last_batch=last_batch, current=SimpleNamespace(processed=steps_done))
    return SimpleNamespace(world_size=world_size, global_rank=rank, current_epoch=epoch,
                           fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))


def test_global_batch_is_split_over_processes(files):
    dm = make_dm(files, batch_size=4)
    dm.trainer = fake_trainer(world_size=2)
    dm.setup("fit")
    assert dm.batch_size_per_device == 2
    assert next(iter(dm.train_dataloader()))["image"].shape[0] == 2
    dm = make_dm(files, batch_size=3)
    dm.trainer = fake_trainer(world_size=2)
    with pytest.raises(ValueError, match="batch_size 3 .* world size 2"):
        dm.setup("fit")


def test_each_process_takes_its_share_of_one_permutation_and_can_start_part_way(files):
    def epoch_indices(world_size, rank, epoch=1, steps_done=0):
        dm = make_dm(files, batch_size=2 * world_size)
        dm.trainer = fake_trainer(world_size, rank, epoch, steps_done)
        dm.setup("fit")
        return [i for batch in dm.train_dataloader() for i in batch["index"].tolist()]

    whole = epoch_indices(1, 0)
    assert sorted(whole) == list(range(8))
    shares = [epoch_indices(3, rank) for rank in range(3)]  # 8 samples pad to 9: 3 each, 1 batch of 2 (drop_last)
    padded = whole + whole[:1]
    assert shares == [padded[rank::3][:2] for rank in range(3)]  # DistributedSampler's sharding of one permutation
    assert epoch_indices(1, 0, steps_done=3) == whole[6:]  # resumed after 3 steps of 2: the rest of the epoch
    from datamodules.dataset import EpochShuffleSampler
    few = [list(EpochShuffleSampler(2, num_replicas=5, rank=rank)) for rank in range(5)]  # fewer samples than processes
    assert [len(share) for share in few] == [1] * 5 and {index for share in few for _, index in share} == {0, 1}
    dm = make_dm(files, batch_size=2)
    dm.trainer = fake_trainer(epoch=1, steps_done=3)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 4  # the epoch still counts its 4 steps: Lightning continues at step 3
    loader.sampler.set_epoch(2)  # the next epoch is whole again
    assert len([batch for batch in loader]) == 4


class IndexRecorder(pl.LightningModule):
    """Records the sample indices of every training step."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["index"].tolist())
        return (self.weight - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SaveAtFirstEpochEnd(pl.Callback):
    """Saves ``last.ckpt`` in ``on_train_epoch_end`` (as RunCheckpoint does without validation), before the
    epoch is counted complete."""

    def __init__(self, folder):
        self.folder = folder

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            trainer.save_checkpoint(self.folder / "last.ckpt")


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop", ["mid-epoch", "last-step-of-an-epoch", "epoch-end", "in-on_train_epoch_end"])
def test_a_resumed_run_trains_on_the_same_samples_in_the_same_order(files, tmp_path, stop, workers):
    # Loader workers draw indices when the loader's iterator is made, before Lightning sets the epoch:
    # the epoch-end cases replayed the finished epoch with workers until the DataModule chose it itself.
    def fit(model, callbacks=(), ckpt_path=None, **limits):
        checkpointing = any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks)
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0, enable_checkpointing=checkpointing, callbacks=list(callbacks),
                             default_root_dir=tmp_path, **{"max_epochs": 3, **limits})
        trainer.fit(model, make_dm(files, batch_size=2, num_workers=workers, persistent_workers=workers > 0),
                    ckpt_path=ckpt_path)

    uninterrupted = IndexRecorder()
    fit(uninterrupted)
    every_step = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0,
                                              every_n_train_steps={"mid-epoch": 6, "last-step-of-an-epoch": 4}.get(stop, 0))
    saving, limits = {"mid-epoch": (every_step, {"max_steps": 6}),
                      "last-step-of-an-epoch": (every_step, {"max_steps": 4}),
                      "epoch-end": (every_step, {"max_epochs": 1}),
                      "in-on_train_epoch_end": (SaveAtFirstEpochEnd(tmp_path), {"max_epochs": 1})}[stop]
    first, resumed = IndexRecorder(), IndexRecorder()
    fit(first, [saving], **limits)
    fit(resumed, ckpt_path=tmp_path / "last.ckpt")
    assert len(uninterrupted.seen) == 12  # 3 epochs of 4 steps
    assert first.seen + resumed.seen == uninterrupted.seen


def test_seeded_and_epoch_dependent(files):
    a = first_batches(make_dm(files), 1)[0]
    b = first_batches(make_dm(files), 1)[0]
    assert_same_batch(a, b)
    other_seed = first_batches(make_dm(files, seed=1), 1)[0]
    assert not torch.equal(a["index"], other_seed["index"])
    next_epoch = first_batches(make_dm(files), 1, epoch=1)[0]
    assert not torch.equal(a["index"], next_epoch["index"])

    dataset = FaceVolumeDataset(files.train, GRID, augment=AUGMENT, seed=0)
    assert not torch.equal(dataset[(0, 3)]["landmarks_2d"], dataset[(1, 3)]["landmarks_2d"])  # new epoch, new draw
    dataset.set_epoch(1)
    assert torch.equal(dataset[3]["landmarks_2d"], dataset[(1, 3)]["landmarks_2d"])
    assert torch.equal(dataset[3]["index"], torch.tensor(3))


def test_workers_open_the_file_themselves_and_match(files):
    """Persistent workers: HDF5 opened per worker (not in the parent), epochs still reach the augmentation."""
    reference = [first_batches(make_dm(files), 2, epoch=e) for e in (0, 1)]
    dm = make_dm(files, num_workers=2, persistent_workers=True)
    dm.setup("fit")
    loader = dm.train_dataloader()
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        batches = list(loader)[:2]
        for a, b in zip(batches, reference[epoch]):
            assert_same_batch(dm.on_after_batch_transfer(a, 0), b)
    assert dm.datasets["train"].file._handle is None  # only the workers opened it
    del loader


def test_missing_files_and_grid_mismatch(files):
    with pytest.raises(FileNotFoundError, match="nowhere.h5"):
        make_dm(files, train_path=files.root / "nowhere.h5").setup("fit")
    with pytest.raises(DatasetError, match="50x48x48.*100x96x96"):
        make_dm(files, grid=VoxelGrid.centred(100, 96, 96)).setup("fit")
    with pytest.raises(ValueError, match="stage .test. needs the test split but none is set"):
        make_dm(files, test_path=None).setup("test")
    with pytest.raises(ValueError, match="target_volume"):
        make_dm(files, target_volume="sideways").setup("fit")


def test_topology_and_hyperparameters(files):
    dm = make_dm(files, grid=GRID)
    topology = dm.topology("val")
    sample = files.val_samples[0]
    assert np.array_equal(topology["triangles"], sample["triangles"])
    assert np.array_equal(topology["landmark_vertices"], sample["landmark_vertices"])
    assert np.array_equal(topology["face_region"], np.arange(len(sample["vertices"])))
    assert dm.hparams.grid == GRID.to_dict() and dm.hparams.augment["on_device"] is False
    without_val = make_dm(files, val_path=None)
    without_val.setup("fit")
    assert without_val.val_dataloader() == []


class _Recorder(pl.LightningModule):
    """Records what the trainer hands to training/validation steps."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(("train", self.current_epoch, {k: v.clone() for k, v in batch.items()}))
        return (self.weight - batch["volume"].mean()) ** 2

    def validation_step(self, batch, batch_idx):
        self.seen.append(("val", self.current_epoch, {k: v.clone() for k, v in batch.items()}))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_trainer_runs_the_device_path_with_epochs(files):
    dm = make_dm(files, augment={**AUGMENT, "on_device": True})
    model = _Recorder()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=1, limit_val_batches=1,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    trained = [(epoch, batch) for stage, epoch, batch in model.seen if stage == "train"]
    assert [epoch for epoch, _ in trained] == [0, 1]
    reference = FaceVolumeDataset(files.train, GRID, augment=AUGMENT, heatmap_sigma=1.0)
    for epoch, batch in trained:
        assert batch["volume"].dtype == torch.float32 and "volume_packed" not in batch
        for i, index in enumerate(batch["index"].tolist()):
            expected = reference[(epoch, index)]
            assert torch.equal(batch["volume"][i], expected["volume"])
            assert torch.equal(batch["landmarks_2d"][i], expected["landmarks_2d"])
    validated = [batch for stage, _, batch in model.seen if stage == "val"]
    assert validated and "vertices" in validated[0] and validated[0]["image"].dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_path_on_cuda_matches_cpu_path(files):
    from lightning_fabric.utilities.apply_func import move_data_to_device

    cpu = first_batches(make_dm(files), 2, epoch=1)
    dm = make_dm(files, augment={**AUGMENT, "on_device": True})
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    for raw, expected in zip(loader, cpu):
        batch = dm.on_after_batch_transfer(move_data_to_device(raw, torch.device("cuda")), 0)
        assert batch["volume"].is_cuda
        batch = {key: value.cpu() for key, value in batch.items()}
        # float64 trigonometry may differ in the last bit between devices: allow rare rounding ties.
        assert (batch["volume"] != expected["volume"]).float().mean() < 1e-4
        for key in ("image", "heatmaps", "landmarks_2d", "landmarks_3d", "pose"):
            torch.testing.assert_close(batch[key], expected[key], atol=1e-4, rtol=0, msg=key)
        assert torch.equal(batch["index"], expected["index"])
