"""Samples of a dataset file as tensors, with optional augmentation, on either path.

The file format is in docs/conventions.md, "Dataset file".

Two paths give identical samples (see :mod:`datamodules.augment`):

- CPU (``on_device=False``): ``__getitem__`` unpacks and augments in the DataLoader worker and
  returns a finished sample (the batch contract below), or with ``finish=False`` one whose volume is
  still uint8 and without heatmaps, for :func:`finish_batch` on the accelerator.
- device (``on_device=True``): ``__getitem__`` returns the RAW sample: ``image_uint8`` (H, W, 3)
  uint8, ``volume_packed`` (D, H, W/8) uint8, the float fields, ``index``, ``expression`` and, when
  augmenting, ``augment`` (the sample's parameters) and ``frontal_pivot``; :func:`decode_batch` then
  :func:`finish_batch` finish a collated raw batch on the accelerator (the DataModule calls them in
  ``on_after_batch_transfer``).

Finished batch: ``image`` (B, 3, H, W) float32 in [0, 1]; ``volume`` (B, D, H, W) float32 in {0, 1}
(aligned, or frontal with ``target_volume="frontal"``); ``landmarks_2d`` (B, 68, 2),
``landmarks_3d`` (B, 68, 3), ``pose`` (B, 3) float32; ``heatmaps`` (B, 68, H, W) float32 when a
heatmap sigma is set; ``vertices`` (B, V, 3) float32 when loaded (a file with per-sample topology, scans:
a list of B (V_i, 3) tensors when the sizes differ, :func:`collate_samples`); ``index`` (B,) int64;
``expression`` (B,) int64, the dominant-expression label (an id into the file's ``expression_names``;
-1 when the file records none), on both paths, never changed by augmentation;
``landmarks_2d_reannotated`` (B, 68, 2) float32, a second landmark ground truth (crop pixels), when the
file has it and augmentation is off (a test set's field: augmentation does not move it).

Augmentation parameters are drawn from a generator seeded by ``(seed, epoch, index)``: a sample
is augmented the same way in any worker, on either path, in any order. The epoch comes from
:meth:`FaceVolumeDataset.set_epoch` or, robust to persistent workers, with the index itself:
:class:`EpochShuffleSampler` yields ``(epoch, index)`` pairs.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, default_collate

from datamodules.augment import AugmentSettings, augment_batch, sample_params
from lightning_vrn.dataset_file import DatasetError, open_dataset, unpack_volume
from lightning_vrn.geometry.grid import VoxelGrid
from lightning_vrn.heatmaps import gaussian_heatmaps

TARGET_VOLUMES = ("aligned", "frontal")
NO_EXPRESSION = -1
"""The batch's ``expression`` label for a file that records no expressions."""
_BIT_SHIFTS = (7, 6, 5, 4, 3, 2, 1, 0)  # np.packbits' big bit order: the first voxel is the high bit
VARIABLE_LENGTH_KEYS = ("vertices",)
"""Sample keys whose size may differ between samples (scans' own meshes): :func:`collate_samples` lists them."""


def mix_seed(*values: int) -> int:
    """Well-mixed 63-bit seed from integers (``seed, epoch, index``), for ``torch.Generator.manual_seed``."""
    low, high = np.random.SeedSequence([int(v) for v in values]).generate_state(2, dtype=np.uint32)
    return (int(high) << 31) ^ int(low)


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``(..., W/8)`` bits packed along x (``np.packbits``) -> uint8 ``(..., W)`` of 0/1, on its device.

    On the CPU :func:`lightning_vrn.dataset_file.unpack_volume` (numpy, much faster there than the bit
    operations: benchmarks/results_settings.md); elsewhere :func:`unpack_bits_torch`.
    """
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed volumes must be uint8, got {packed.dtype}")
    if packed.device.type == "cpu":
        return torch.from_numpy(unpack_volume(packed.numpy(), 8 * packed.shape[-1]).view(np.uint8))
    return unpack_bits_torch(packed)


def unpack_bits_torch(packed: torch.Tensor) -> torch.Tensor:
    """:func:`unpack_bits` with torch bit operations (shift and mask), for any device."""
    shifts = torch.tensor(_BIT_SHIFTS, dtype=torch.uint8, device=packed.device)
    return ((packed[..., None] >> shifts) & 1).flatten(-2)


def collate_samples(samples: list[Mapping[str, Any]]) -> dict[str, Any]:
    """``default_collate``, except that a :data:`VARIABLE_LENGTH_KEYS` entry whose shapes differ between the
    samples becomes a list of the B tensors (a scan file's ground-truth meshes) instead of failing to stack."""
    ragged = [key for key in VARIABLE_LENGTH_KEYS
              if key in samples[0] and len({tuple(sample[key].shape) for sample in samples}) > 1]
    batch = default_collate([{key: value for key, value in sample.items() if key not in ragged} for sample in samples])
    for key in ragged:
        batch[key] = [sample[key] for sample in samples]
    return batch


def decode_batch(raw: Mapping[str, Any], grid: VoxelGrid) -> dict[str, torch.Tensor]:
    """Unpack and (when it carries ``augment`` parameters) augment a collated RAW batch on its device.

    Returns the batch with ``image`` float32 (B, 3, H, W) in [0, 1] and ``volume`` uint8 (B, D, H, W)
    of 0/1; :func:`finish_batch` completes it.
    """
    batch = {key: value for key, value in raw.items()
             if key not in ("image_uint8", "volume_packed", "augment", "frontal_pivot")}
    image = raw["image_uint8"].permute(0, 3, 1, 2)
    batch["image"] = image.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
    batch["volume"] = unpack_bits(raw["volume_packed"])
    if "augment" in raw:
        batch = augment_batch(batch, raw["augment"], grid, frontal_pivot=raw.get("frontal_pivot"))
    return batch


def finish_batch(batch: Mapping[str, torch.Tensor], grid: VoxelGrid, heatmap_sigma: float | None = None
                 ) -> dict[str, torch.Tensor]:
    """Decoded batch -> the batch contract: ``volume`` as float32, ``heatmaps`` added when a sigma is set."""
    batch = dict(batch)
    batch["volume"] = batch["volume"].float()
    if heatmap_sigma is not None and "heatmaps" not in batch:
        batch["heatmaps"] = gaussian_heatmaps(batch["landmarks_2d"], grid.height, grid.width, heatmap_sigma)
    return batch


class FaceVolumeDataset(Dataset):
    """One split of a dataset file as (optionally augmented) samples.

    ``path``: the HDF5 file; ``grid``: the grid it must have (None: take the file's);
    ``augment``: :class:`AugmentSettings`, a dict of its fields, or None (no augmentation);
    ``seed``: augmentation seed; ``heatmap_sigma``: landmark heatmap sigma in pixels (None: no
    heatmaps); ``target_volume``: ``"aligned"`` or ``"frontal"`` (the file's ``volumes_frontal``);
    ``load_vertices``: add the ground-truth mesh; ``on_device``: return raw samples for
    :func:`decode_batch` (default: the augment config's ``on_device``); ``finish``: return
    contract samples (float32 volume, heatmaps). The DataModule passes ``finish=False`` and calls
    :func:`finish_batch` on the device: a uint8 volume moves 4x fewer bytes than float32.
    ``grid_source`` names where ``grid`` came from ("the config", "checkpoint X") in the error for a
    file of another grid.
    The file is validated here but its HDF5 handle is opened by whichever process reads.
    """

    def __init__(self, path, grid: VoxelGrid | None = None, augment: AugmentSettings | Mapping | None = None,
                 seed: int = 0, heatmap_sigma: float | None = None, target_volume: str = "aligned",
                 load_vertices: bool = False, on_device: bool | None = None, finish: bool = True,
                 grid_source: str = "the config"):
        if target_volume not in TARGET_VOLUMES:
            raise ValueError(f"target_volume must be one of {TARGET_VOLUMES}, got {target_volume!r}")
        if heatmap_sigma is not None and heatmap_sigma <= 0:
            raise ValueError(f"heatmap_sigma must be positive (pixels) or None, got {heatmap_sigma}")
        config = AugmentSettings.from_any(augment)
        self.file = open_dataset(path, expected_grid=grid, grid_source=grid_source)
        self.grid = self.file.grid
        self.augment = config if config.enabled else None
        self.on_device = config.on_device if on_device is None else bool(on_device)
        self.seed = int(seed)
        self.heatmap_sigma = heatmap_sigma
        self.target_volume = target_volume
        self.load_vertices = bool(load_vertices)
        self.finish = bool(finish)
        self.epoch = 0
        if self.augment is not None and self.file.per_sample_topology:
            raise DatasetError(f"dataset file {self.file.path} has per-sample topology (real scans: each sample has "
                               f"its own ground-truth mesh), which augmentation cannot transform (augment_batch takes "
                               f"one (B, V, 3) vertex batch); such files are test sets: load them with augmentation "
                               f"off (augment=None, or enabled: false in the config)")
        if target_volume == "frontal" and not self.file.has_frontal:
            raise DatasetError(f"dataset file {self.file.path} has no volumes_frontal, needed for "
                               f"target_volume='frontal'; regenerate it with --frontal")
        # Frontal targets move about the mesh's mean vertex, so augmenting them needs the vertices.
        self._read_vertices = self.load_vertices or (self.augment is not None and target_volume == "frontal")
        self._reannotated = self.augment is None and "landmarks_2d_reannotated" in self.file.fields
        self._fields = ["images", "volumes_frontal" if target_volume == "frontal" else "volumes",
                        "landmarks_2d", "landmarks_3d", "pose"] + (["vertices"] if self._read_vertices else []) \
            + (["expression_label"] if self.file.has_expression else []) \
            + (["landmarks_2d_reannotated"] if self._reannotated else [])

    def __len__(self) -> int:
        return len(self.file)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for augmentation seeds of plain integer indices."""
        self.epoch = int(epoch)

    def augment_params(self, index: int, epoch: int) -> dict[str, torch.Tensor]:
        """Sample ``index``'s augmentation parameters in ``epoch`` (scalars, ``colour`` (3,))."""
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, index))
        params = sample_params(generator, 1, self.grid.crop_size, self.augment)
        return {key: value[0] for key, value in params.items()}

    def raw_sample(self, index: int, epoch: int | None = None) -> dict[str, Any]:
        """Sample ``index`` undecoded (packed volume, uint8 image), with its parameters when augmenting."""
        data = self.file.read(index, self._fields)
        raw = {
            "image_uint8": torch.from_numpy(data["images"]),
            "volume_packed": torch.from_numpy(data[self._fields[1]]),
            "landmarks_2d": torch.from_numpy(data["landmarks_2d"]),
            "landmarks_3d": torch.from_numpy(data["landmarks_3d"]),
            "pose": torch.from_numpy(data["pose"]),
            "index": torch.tensor(index, dtype=torch.int64),
            "expression": torch.tensor(int(data.get("expression_label", NO_EXPRESSION)), dtype=torch.int64),
        }
        if self.load_vertices:
            raw["vertices"] = torch.from_numpy(data["vertices"])
        if self._reannotated:
            raw["landmarks_2d_reannotated"] = torch.from_numpy(data["landmarks_2d_reannotated"])
        if self.augment is not None:
            raw["augment"] = self.augment_params(index, self.epoch if epoch is None else epoch)
            if self.target_volume == "frontal":
                raw["frontal_pivot"] = torch.from_numpy(data["vertices"].mean(axis=0, dtype=np.float64))
        return raw

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        """``item``: a sample index, or ``(epoch, index)`` as :class:`EpochShuffleSampler` yields."""
        epoch, index = item if isinstance(item, (tuple, list)) else (None, item)
        index = int(index)
        if index < 0:
            index += len(self)
        raw = self.raw_sample(index, epoch)
        if self.on_device:
            return raw
        one = decode_batch(collate_samples([raw]), self.grid)
        if self.finish:
            one = finish_batch(one, self.grid, self.heatmap_sigma)
        return {key: value[0] for key, value in one.items()}


class EpochShuffleSampler(DistributedSampler):
    """Yields ``(epoch, index)`` for this process's share of a permutation of ``range(num_samples)``
    seeded by ``(seed, epoch)``, and can start an epoch part-way, so a resumed run sees the same data
    in the same order as one that was never interrupted.

    The epoch travels with every index, so augmentation seeds follow the epoch even in persistent
    DataLoader workers. Lightning calls :meth:`set_epoch` at each epoch start. With ``num_replicas``
    processes (DDP), the permutation is padded with its own first indices to a multiple of
    ``num_replicas`` and process ``rank`` takes every ``num_replicas``-th from position ``rank``, as
    ``DistributedSampler`` does; being one, Lightning does not wrap it again. :meth:`resume_at` skips
    the first samples of one epoch's share (those a checkpoint's steps already trained on); the
    length stays the whole share, so the epoch still ends after the same number of steps.
    """

    def __init__(self, num_samples: int, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        super().__init__(range(int(num_samples)), num_replicas=num_replicas, rank=rank, shuffle=True, seed=int(seed))
        self.skip_epoch, self.skip = None, 0

    def resume_at(self, epoch: int, samples_done: int) -> None:
        """In epoch ``epoch`` only, leave out the first ``samples_done`` samples of this process's share."""
        if not 0 <= samples_done <= self.num_samples:
            raise ValueError(f"samples_done must be in [0, {self.num_samples}] (this process's share of an epoch), "
                             f"got {samples_done}")
        self.skip_epoch, self.skip = int(epoch), int(samples_done)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        order = (order * -(-self.total_size // len(order)))[: self.total_size]  # pad to a multiple of num_replicas
        share = order[self.rank : self.total_size : self.num_replicas]
        skip = self.skip if self.epoch == self.skip_epoch else 0
        return iter([(self.epoch, index) for index in share[skip:]])
