"""The dataset file (HDF5, docs/conventions.md, "Dataset file"): the one module that knows the schema.

One file per split. Per-sample datasets (first axis N, one chunk per sample):

========================  =====================  ==========================================
``images``                (N, H, W, 3) uint8     the crop
``volumes``               (N, D, H, W/8) uint8   occupancy, ``np.packbits(volume, axis=-1)``
``volumes_frontal``       (N, D, H, W/8) uint8   optional: frontal (unaligned) targets
``landmarks_2d``          (N, 68, 2) float32     crop pixels
``landmarks_3d``          (N, 68, 3) float32     crop coordinates
``pose``                  (N, 3) float32         pitch, yaw, roll in radians
``vertices``              (N, V, 3) float32      ground-truth mesh in crop coordinates
``expression``            (N, E) float32         optional: the face model's expression coefficients
``expression_label``      (N,) uint8             optional: dominant expression, an id into ``expression_names``
========================  =====================  ==========================================

Optional ``landmarks_2d_reannotated`` (N, 68, 2) float32: a second ground truth of ``landmarks_2d`` in crop
pixels (AFLW2000-3D's re-annotation, scored beside the original); files without it read as before.

Shared datasets: ``triangles`` (T, 3), ``face_region`` (F,), ``landmark_vertices`` (68,).
File attributes: ``schema_version``, the grid (:meth:`VoxelGrid.to_attrs`), ``num_samples``,
``face_model``, ``source``, ``seed``, ``created_by``, ``expression_names`` (label id -> name, id 0
``"neutral"``; with ``expression_label``) and whatever else the producer adds.

Version 2 added the two expression datasets and ``expression_names``; version-1 files (without
them) are still read.

Version 3 added files WITHOUT a shared topology (real scans, attribute ``per_sample_topology``): each
sample's ground-truth mesh has its own vertices and triangles, stored variable-length with an
offsets index instead of ``vertices`` and the shared datasets:

========================  =====================  ==========================================
``vertices_flat``         (sum V_i, 3) float32   every sample's vertices (crop coordinates), one after another
``vertex_ranges``         (N, 2) int64           sample i's vertices: ``vertices_flat[start:start + count]``
``triangles_flat``        (sum T_i, 3) int32     every sample's triangles, ids into the sample's own vertices
``triangle_ranges``       (N, 2) int64           sample i's triangles: ``triangles_flat[start:start + count]``
========================  =====================  ==========================================

There, every stored vertex is a face-region vertex (the NME is measured on all of them) and
:meth:`FaceDatasetFile.read` returns each sample's own ``vertices`` (V_i, 3) and ``triangles`` (T_i, 3);
the file's ``triangles``, ``face_region`` and ``landmark_vertices`` are None. Version 1 and 2 files are
still read.

:class:`DatasetWriter` writes ``<path>.partial`` with a per-sample ``written`` flag, so a killed
run resumes where it stopped, and copies it to ``<path>`` only when every sample is in, laid out the
same way however often it was resumed (byte-identical to an uninterrupted run's).
:class:`FaceDatasetFile` (:func:`open_dataset`) validates a file on open and reads samples
lazily, opening its HDF5 handle in whichever process reads (safe for forked DataLoader workers).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import h5py
import numpy as np

from lightning_vrn.geometry.grid import VoxelGrid
from lightning_vrn.geometry.topology import as_vertex_ids
from lightning_vrn.landmark_scheme import NUM_LANDMARKS

SCHEMA_VERSION = 3
READABLE_SCHEMA_VERSIONS = (1, 2, 3)
"""Versions :class:`FaceDatasetFile` opens: version 1 is version 2 without the expression fields, version 2 is
version 3 without per-sample topology files."""

PER_SAMPLE_FIELDS = ("images", "volumes", "volumes_frontal", "landmarks_2d", "landmarks_3d", "pose", "vertices",
                     "expression", "expression_label")
"""Names of the per-sample datasets (those of :data:`OPTIONAL_FIELDS` only in some files)."""
TEST_FIELDS = ("landmarks_2d_reannotated",)
"""Optional per-sample datasets beyond :data:`PER_SAMPLE_FIELDS` that only test sets carry: a second landmark
ground truth, scored beside ``landmarks_2d``."""
OPTIONAL_FIELDS = {
    "volumes_frontal": "regenerate it with --frontal",
    "expression": "its producer did not record expression coefficients (or it is a version-1 file)",
    "expression_label": "its producer did not record expressions (or it is a version-1 file)",
    "landmarks_2d_reannotated": "it has no second landmark annotation (AFLW2000-3D: convert with "
                                "--reannotated FILE.npy)",
}
"""Per-sample datasets a file may lack -> why it lacks them, for the error on reading one."""
NEUTRAL = "neutral"
"""Name of expression label 0."""
SHARED_FIELDS = ("triangles", "face_region", "landmark_vertices")
"""Names of the shared (topology) datasets: vertex ids."""
UNIQUE_ID_FIELDS = ("face_region",)
"""Shared datasets whose ids must be distinct (a landmark may reuse a vertex: the SFM's inner mouth corners)."""
FLOAT_FIELDS = ("landmarks_2d", "landmarks_3d", "pose", "vertices", "expression", "landmarks_2d_reannotated")
PER_SAMPLE_TOPOLOGY_FIELDS = ("vertices_flat", "vertex_ranges", "triangles_flat", "triangle_ranges")
"""Datasets of a per-sample topology file (schema version 3) in place of ``vertices`` and the shared ones."""
MESH_FIELDS = ("vertices", "triangles")
"""What :meth:`FaceDatasetFile.read` returns of a per-sample topology file's meshes (each sample's own)."""
FLAT_CHUNK_ROWS = 16384
"""Rows per chunk of ``vertices_flat`` / ``triangles_flat`` (192 KiB of vertices): a 20k-vertex face reads 2-3 chunks."""

SAMPLE_KEYS = {
    "image": "images",
    "volume": "volumes",
    "volume_frontal": "volumes_frontal",
    "landmarks_2d": "landmarks_2d",
    "landmarks_3d": "landmarks_3d",
    "pose": "pose",
    "vertices": "vertices",
    "expression": "expression",
    "expression_label": "expression_label",
    "landmarks_2d_reannotated": "landmarks_2d_reannotated",
    "triangles": "triangles",
}
"""Key of :meth:`DatasetWriter.write`'s sample dict -> dataset name (``triangles``: per-sample topology only)."""

REQUIRED_ATTRS = ("face_model", "source", "created_by")
"""Attributes a producer must pass to :class:`DatasetWriter` (``seed`` too when the data is random)."""

GENERATE_HINT = "python -m data_prep.synthetic --out DIR --split train=4000 --split val=200 --split test=500"

# Packed volumes compress well and still read fast (gzip-4); vertices gzip-1 with byte shuffle (only
# evaluation reads them); images stay raw: rendered noise and texture leave gzip little to save for a
# slower read. Sizes and read times: benchmarks/results_settings.md.
COMPRESSION = {
    "volumes": {"compression": "gzip", "compression_opts": 4, "shuffle": False},
    "volumes_frontal": {"compression": "gzip", "compression_opts": 4, "shuffle": False},
    "vertices": {"compression": "gzip", "compression_opts": 1, "shuffle": True},
}
CHECKSUM = {"fletcher32": True}
"""HDF5's Fletcher-32 filter on every per-sample dataset: a damaged chunk fails its read instead of
returning wrong pixels (4 bytes per chunk; files written before it are read without the check)."""
_WRITTEN = "written"
_FLAG_PREFIX = "flag_"
"""Per-sample producer flags live in the partial file as ``flag_{name}`` and become the attribute
``num_{name}`` (how many samples of the whole file have it) when the file is finished."""


class DatasetError(ValueError):
    """A dataset file is missing pieces, damaged or does not match what the caller expects; ``reason`` is what is
    wrong without the fix (for a caller whose fix differs, e.g. a converter's ``--restart``)."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


def pack_volume(volume: np.ndarray) -> np.ndarray:
    """Bool occupancy ``(..., W)`` -> uint8 ``(..., W/8)``, bits packed along x (big bit order)."""
    volume = np.asarray(volume)
    if volume.shape[-1] % 8:
        raise ValueError(f"volume width {volume.shape[-1]} (shape {volume.shape}) must be a multiple of 8 to pack")
    return np.packbits(volume.astype(bool, copy=False), axis=-1)


def unpack_volume(packed: np.ndarray, width: int) -> np.ndarray:
    """uint8 ``(..., W/8)`` -> bool ``(..., W)``; inverse of :func:`pack_volume`."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.shape[-1] * 8 != width:
        raise ValueError(f"packed volume {packed.shape} {packed.dtype} does not unpack to width {width} "
                         f"(needs uint8 with last axis {width // 8})")
    return np.unpackbits(packed, axis=-1).view(bool)


def sample_shapes(grid: VoxelGrid, num_vertices: int, num_expression: int = 0) -> dict[str, tuple[int, ...]]:
    """Per-sample shape (without the N axis) of every per-sample dataset for ``grid``, ``V`` vertices and
    ``E`` expression coefficients."""
    d, h, w = grid.shape
    return {
        "images": (h, w, 3),
        "volumes": (d, h, w // 8),
        "volumes_frontal": (d, h, w // 8),
        "landmarks_2d": (NUM_LANDMARKS, 2),
        "landmarks_3d": (NUM_LANDMARKS, 3),
        "pose": (3,),
        "vertices": (num_vertices, 3),
        "expression": (num_expression,),
        "expression_label": (),
        "landmarks_2d_reannotated": (NUM_LANDMARKS, 2),
    }


def _dtype(field: str) -> type:
    return np.uint8 if field in ("images", "volumes", "volumes_frontal", "expression_label") else np.float32


def _attrs_equal(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind in "OSU" or b.dtype.kind in "OSU":
        return a.shape == b.shape and all(str(x) == str(y) for x, y in zip(a.ravel(), b.ravel()))
    return a.shape == b.shape and bool(np.array_equal(a, b))


def _plain(value: Any) -> Any:
    """HDF5 attribute value -> plain Python (str, int, float, list)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


class DatasetWriter:
    """Write one split to ``path`` via ``<path>.partial``; resumable after a kill.

    ``grid`` fixes the image and volume shapes; ``num_samples`` N and ``num_vertices`` V the
    per-sample datasets; ``triangles`` (T, 3), ``face_region`` (F,) and ``landmark_vertices``
    (68,) are the shared topology; ``attrs`` the file attributes (must hold :data:`REQUIRED_ATTRS`).
    ``expression_names`` (label id -> name, the first :data:`NEUTRAL`) adds the per-sample
    ``expression_label`` and the attribute ``expression_names``; ``num_expression_coefficients`` E > 0
    adds the per-sample ``expression`` (E,); ``with_reannotated`` the per-sample ``landmarks_2d_reannotated``
    (68, 2). Each sample must then carry them, and only then.

    If ``<path>.partial`` exists with the same parameters, writing continues: :meth:`pending`
    lists the samples still missing. Different parameters or a damaged partial file raise
    :class:`DatasetError` unless ``restart=True``, which starts over. An existing complete
    ``path`` raises :class:`FileExistsError` unless ``restart=True`` (it is replaced on finish).
    The written flags are flushed every ``flush_every`` samples (and on :meth:`close`), so a
    kill loses at most that many samples of work.

    ``per_sample_topology=True`` (scans, :meth:`for_scans`) writes a file without a shared topology:
    ``num_vertices``, ``triangles``, ``face_region`` and ``landmark_vertices`` must be None and each
    sample carries its own ``vertices`` (V_i, 3) and ``triangles`` (T_i, 3), stored variable-length.
    """

    def __init__(self, path, grid: VoxelGrid, num_samples: int, num_vertices: int | None, triangles, face_region,
                 landmark_vertices, attrs: Mapping[str, Any], with_frontal: bool = False, restart: bool = False,
                 flush_every: int = 32, flags: Sequence[str] = (), expression_names: Sequence[str] | None = None,
                 num_expression_coefficients: int = 0, per_sample_topology: bool = False,
                 with_reannotated: bool = False):
        self.path = Path(path)
        self.partial_path = self.path.with_name(self.path.name + ".partial")
        self.grid = grid
        self.num_samples = int(num_samples)
        self.per_sample_topology = bool(per_sample_topology)
        self.with_frontal = bool(with_frontal)
        self.flush_every = int(flush_every)
        self.flags = tuple(flags)
        missing = [key for key in REQUIRED_ATTRS if key not in attrs]
        if missing:
            raise ValueError(f"DatasetWriter for {self.path}: attrs lack {missing}; pass them in attrs")
        if self.per_sample_topology:
            given = [name for name, value in zip(("num_vertices", *SHARED_FIELDS),
                                                 (num_vertices, triangles, face_region, landmark_vertices))
                     if value is not None]
            if given:
                raise ValueError(f"DatasetWriter for {self.path}: a per-sample topology file has no shared "
                                 f"{given}; pass None (each sample carries its own vertices and triangles)")
            self.num_vertices = None
            self._shared = {}
        else:
            self.num_vertices = int(num_vertices)
            if self.num_vertices <= 0:
                raise ValueError(f"DatasetWriter for {self.path}: num_vertices ({num_vertices}) must be positive")
            self._shared = self._checked_shared(triangles, face_region, landmark_vertices)
        if self.num_samples <= 0:
            raise ValueError(f"DatasetWriter for {self.path}: num_samples ({num_samples}) must be positive")
        self.expression_names = None if expression_names is None else self._checked_names(expression_names)
        if num_expression_coefficients < 0:
            raise ValueError(f"DatasetWriter for {self.path}: num_expression_coefficients must be >= 0, "
                             f"got {num_expression_coefficients}")
        self._attrs = {
            **dict(attrs),
            "schema_version": SCHEMA_VERSION,
            **grid.to_attrs(),
            "num_samples": self.num_samples,
            "has_frontal": self.with_frontal,
            **({} if self.expression_names is None else {"expression_names": list(self.expression_names)}),
            **({"per_sample_topology": True} if self.per_sample_topology else {}),
        }
        self._shapes = sample_shapes(grid, self.num_vertices or 0, num_expression_coefficients)
        present = {"volumes_frontal": self.with_frontal, "expression": num_expression_coefficients > 0,
                   "expression_label": self.expression_names is not None, "vertices": not self.per_sample_topology,
                   "landmarks_2d_reannotated": bool(with_reannotated)}
        self._fields = [f for f in PER_SAMPLE_FIELDS + TEST_FIELDS if present.get(f, True)]
        self._flat_ends = {"vertices_flat": 0, "triangles_flat": 0}
        self.encoder = SampleEncoder(self.path, grid, self._shapes, self._fields, self.expression_names,
                                     self.per_sample_topology)

        if self.path.exists() and not restart:
            raise FileExistsError(f"{self.path} already exists; delete it or pass restart=True (--restart) to replace it")
        if self.partial_path.exists() and not restart:
            self._file, self._written = self._resume()
        else:
            self._file, self._written = self._create()
        self._unflushed = 0

    @classmethod
    def for_scans(cls, path, grid: VoxelGrid, num_samples: int, attrs: Mapping[str, Any], **options) -> "DatasetWriter":
        """A writer of a per-sample topology file (``per_sample_topology=True``); ``options`` as for the constructor."""
        return cls(path, grid, num_samples, None, None, None, None, attrs, per_sample_topology=True, **options)

    def _checked_shared(self, triangles, face_region, landmark_vertices) -> dict[str, np.ndarray]:
        """The shared topology as stored (int32), after checking shapes and vertex ids."""
        shared = {
            name: as_vertex_ids(values, self.num_vertices, f"DatasetWriter for {self.path}: {name}",
                                unique=name in UNIQUE_ID_FIELDS).astype(np.int32)
            for name, values in zip(SHARED_FIELDS, (triangles, face_region, landmark_vertices))
        }
        if shared["triangles"].ndim != 2 or shared["triangles"].shape[1] != 3:
            raise ValueError(f"DatasetWriter for {self.path}: triangles must be (T, 3), "
                             f"got {shared['triangles'].shape}")
        if shared["landmark_vertices"].shape != (NUM_LANDMARKS,):
            raise ValueError(f"DatasetWriter for {self.path}: landmark_vertices must be ({NUM_LANDMARKS},), "
                             f"got {shared['landmark_vertices'].shape}")
        return shared

    def _checked_names(self, names: Sequence[str]) -> tuple[str, ...]:
        """``expression_names`` as stored, after checking label 0 is neutral, names are distinct and fit uint8 ids."""
        names = tuple(str(name) for name in names)
        if not names or names[0] != NEUTRAL or len(set(names)) != len(names) or len(names) > 256:
            raise ValueError(f"DatasetWriter for {self.path}: expression_names must be distinct, at most 256, "
                             f"the first {NEUTRAL!r} (label 0); got {list(names)}")
        return names

    def _create(self) -> tuple[h5py.File, np.ndarray]:
        self.partial_path.parent.mkdir(parents=True, exist_ok=True)
        self.partial_path.unlink(missing_ok=True)
        f = h5py.File(self.partial_path, "w")
        self._lay_out(f, self._attrs)
        written = np.zeros(self.num_samples, dtype=bool)
        f.create_dataset(_WRITTEN, data=written.astype(np.uint8))
        for flag in self.flags:
            f.create_dataset(_FLAG_PREFIX + flag, data=np.zeros(self.num_samples, dtype=np.uint8))
        f.flush()
        return f, written

    def _lay_out(self, f: h5py.File, attrs: Mapping[str, Any], partial: h5py.File | None = None) -> None:
        """Give the new file ``f`` the ``attrs``, the shared datasets and the (empty) per-sample ones, in this
        order; the flat mesh datasets get ``partial``'s length and the mesh ranges its values (none without it)."""
        for key, value in attrs.items():
            f.attrs[key] = value
        for name, values in self._shared.items():
            f.create_dataset(name, data=values)
        for field in self._fields:
            shape = self._shapes[field]
            f.create_dataset(field, shape=(self.num_samples, *shape), dtype=_dtype(field), chunks=(1, *shape),
                             **COMPRESSION.get(field, {}), **CHECKSUM)
        if self.per_sample_topology:
            for name, dtype in (("vertices_flat", np.float32), ("triangles_flat", np.int32)):
                rows = 0 if partial is None else len(partial[name])
                f.create_dataset(name, shape=(rows, 3), maxshape=(None, 3), dtype=dtype, chunks=(FLAT_CHUNK_ROWS, 3),
                                 **COMPRESSION["vertices"], **CHECKSUM)
            for name in ("vertex_ranges", "triangle_ranges"):
                f.create_dataset(name, data=np.zeros((self.num_samples, 2), dtype=np.int64) if partial is None
                                 else partial[name][()])

    def _resume(self) -> tuple[h5py.File, np.ndarray]:
        restart_hint = "pass restart=True (--restart) to start over, or delete it"
        try:
            f = h5py.File(self.partial_path, "r+")
        except OSError as err:
            if "lock" in str(err):
                raise DatasetError(f"unfinished {self.partial_path} is open in another process (is another run "
                                   f"still writing it?); wait for it or stop it, then rerun") from None
            raise DatasetError(f"unfinished {self.partial_path} is damaged and cannot be resumed ({err}); "
                               f"{restart_hint}") from None
        try:
            differences = self._differences(f)
        except (KeyError, OSError, ValueError) as err:
            f.close()
            raise DatasetError(f"unfinished {self.partial_path} is damaged and cannot be resumed ({err}); "
                               f"{restart_hint}") from None
        if differences:
            f.close()
            raise DatasetError(f"unfinished {self.partial_path} was written with other parameters "
                               f"({'; '.join(differences)}); rerun with the original parameters to resume, "
                               f"or {restart_hint}")
        written = f[_WRITTEN][()].astype(bool)
        if self.per_sample_topology:
            self._drop_unflagged_meshes(f, written)
        return f, written

    def _drop_unflagged_meshes(self, f: h5py.File, written: np.ndarray) -> None:
        """Cut the flat mesh datasets after the last flagged sample's rows: meshes appended after the last
        flush belong to samples that are not flagged as written (they are made again)."""
        for name, ranges in (("vertices_flat", "vertex_ranges"), ("triangles_flat", "triangle_ranges")):
            rows = f[ranges][()][written]
            end = int((rows[:, 0] + rows[:, 1]).max()) if len(rows) else 0
            f[name].resize(end, axis=0)
            self._flat_ends[name] = end

    def _differences(self, f: h5py.File) -> list[str]:
        """What differs between the open partial file and this writer's parameters (empty when resumable)."""
        differences = [f"attr {key}: file {_plain(f.attrs[key])!r} vs now {_plain(value)!r}"
                       if key in f.attrs else f"attr {key} missing in the file"
                       for key, value in self._attrs.items() if key not in f.attrs or not _attrs_equal(f.attrs[key], value)]
        differences += [f"attr {key} only in the file" for key in f.attrs if key not in self._attrs]
        for name, values in self._shared.items():
            if not np.array_equal(f[name][()], values):
                differences.append(f"{name} differ")
        stored_fields = [field for field in PER_SAMPLE_FIELDS + TEST_FIELDS if field in f]
        if stored_fields != self._fields:
            differences.append(f"per-sample datasets {stored_fields} vs now {self._fields}")
        if self.per_sample_topology:
            missing = [name for name in PER_SAMPLE_TOPOLOGY_FIELDS if name not in f]
            if missing:
                differences.append(f"per-sample topology datasets {missing} missing")
        for field in (field for field in self._fields if field in f):
            expected = (self.num_samples, *self._shapes[field])
            if f[field].shape != expected:
                differences.append(f"{field} shape {f[field].shape} vs now {expected}")
        if f[_WRITTEN].shape != (self.num_samples,):
            differences.append(f"{_WRITTEN} flags shape {f[_WRITTEN].shape} vs now ({self.num_samples},)")
        stored = sorted(name[len(_FLAG_PREFIX):] for name in f if name.startswith(_FLAG_PREFIX))
        if stored != sorted(self.flags):
            differences.append(f"per-sample flags {stored} vs now {sorted(self.flags)}")
        return differences

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def pending(self) -> np.ndarray:
        """Indices (int64, ascending) of the samples not written yet."""
        return np.flatnonzero(~self._written)

    def write(self, index: int, sample: Mapping[str, np.ndarray], flags: Mapping[str, bool] | None = None) -> None:
        """Store sample ``index``: keys of :data:`SAMPLE_KEYS` (``volume_frontal`` only ``with_frontal``),
        and its producer ``flags`` (names given to the writer; a flag not given is False).

        ``image`` (H, W, 3) uint8; ``volume`` / ``volume_frontal`` (D, H, W) bool, or already packed
        uint8 (D, H, W/8) (:func:`pack_volume`); ``landmarks_2d`` (68, 2), ``landmarks_3d`` (68, 3),
        ``pose`` (3,), ``vertices`` (V, 3), ``expression`` (E,), ``landmarks_2d_reannotated`` (68, 2) floats,
        all finite; ``expression_label``
        an integer id into ``expression_names``. A per-sample topology writer takes ``vertices`` (V_i, 3)
        of any V_i >= 3 and the sample's ``triangles`` (T_i, 3) integer ids into them (T_i >= 1).
        """
        self.write_encoded(index, self.encoder.encode(index, sample), flags)

    def write_encoded(self, index: int, encoded: "EncodedSample", flags: Mapping[str, bool] | None = None) -> None:
        """Store sample ``index`` as :meth:`SampleEncoder.encode` made it (in this process or a making one):
        its chunks are copied as they are, so the encoding's cost is paid where the sample was made."""
        if self._file is None:
            raise ValueError(f"DatasetWriter for {self.path} is closed")
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample index {index} outside 0..{self.num_samples - 1} for {self.path}")
        if set(encoded.chunks) != set(self._fields):
            raise ValueError(f"sample {index} for {self.path}: encoded datasets {sorted(encoded.chunks)} but the file "
                             f"has {sorted(self._fields)}: encode it with this writer's encoder")
        if encoded.mesh is not None:
            self._write_mesh(index, *encoded.mesh)
        for field, (filter_mask, chunk) in encoded.chunks.items():
            self._file[field].id.write_direct_chunk((index, *[0] * len(self._shapes[field])), chunk, filter_mask)
        unknown = set(flags or {}) - set(self.flags)
        if unknown:
            raise ValueError(f"sample {index} for {self.path}: unknown flags {sorted(unknown)}; the writer has {self.flags}")
        for flag in self.flags:
            self._file[_FLAG_PREFIX + flag][index] = bool((flags or {}).get(flag, False))
        self._written[index] = True
        self._unflushed += 1
        if self._unflushed >= self.flush_every:
            self.flush()

    def _write_mesh(self, index: int, vertices, triangles) -> None:
        """Append sample ``index``'s own ``(V_i, 3)`` vertices and ``(T_i, 3)`` triangles and record their ranges."""
        vertices, triangles = np.asarray(vertices), np.asarray(triangles)
        if vertices.ndim != 2 or vertices.shape[1] != 3 or len(vertices) < 3:
            raise ValueError(f"{self.path}: sample {index} vertices: shape {vertices.shape}, "
                             f"expected (V, 3) with V >= 3")
        if not np.isfinite(vertices).all():
            raise ValueError(f"{self.path}: sample {index} vertices: contains NaN or inf")
        if (triangles.ndim != 2 or triangles.shape[1] != 3 or len(triangles) == 0
                or not np.issubdtype(triangles.dtype, np.integer)):
            raise ValueError(f"{self.path}: sample {index} triangles: {triangles.dtype} {triangles.shape}, "
                             f"expected integer (T, 3), T >= 1")
        if triangles.min() < 0 or triangles.max() >= len(vertices):
            raise ValueError(f"{self.path}: sample {index} triangles: ids in [{triangles.min()}, {triangles.max()}], "
                             f"outside the sample's {len(vertices)} vertices")
        for name, ranges, values, dtype in (("vertices_flat", "vertex_ranges", vertices, np.float32),
                                            ("triangles_flat", "triangle_ranges", triangles, np.int32)):
            start = self._flat_ends[name]
            self._file[name].resize(start + len(values), axis=0)
            self._file[name][start:] = values.astype(dtype, copy=False)
            self._file[ranges][index] = (start, len(values))
            self._flat_ends[name] = start + len(values)

    def flush(self) -> None:
        """Put written samples on disk, then their flags, so a kill never flags a sample that is not there."""
        self._file.flush()
        self._file[_WRITTEN][...] = self._written.astype(np.uint8)
        self._file.flush()
        self._unflushed = 0

    def close(self) -> None:
        """Flush and close without finishing: the partial file stays for a later resume."""
        self.encoder.close()
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None

    def finish(self) -> Path:
        """Check every sample is written, copy the partial file to ``path`` (:meth:`_copy_chunks`; the per-sample
        flags become ``num_{flag}`` attributes) and remove it.

        The copy lays the file out the same way whatever the partial file went through (kills, resumes, flushes),
        so a resumed run finishes byte-identical to an uninterrupted one. It is written as ``<path>.finishing``,
        synced and renamed: for a moment the disk holds the partial file and its copy.
        """
        pending = self.pending()
        if len(pending):
            raise ValueError(f"cannot finish {self.path}: {len(pending)} of {self.num_samples} samples not written "
                             f"(first missing: {pending[:5].tolist()})")
        if self._file is None:
            raise ValueError(f"DatasetWriter for {self.path} is closed")
        self.flush()
        counts = {f"num_{flag}": int(self._file[_FLAG_PREFIX + flag][()].sum()) for flag in self.flags}
        finishing = self.path.with_name(self.path.name + ".finishing")
        try:
            with h5py.File(finishing, "w") as f:
                self._lay_out(f, {**self._attrs, **counts}, self._file)
                self._copy_chunks(f)
        except BaseException:
            finishing.unlink(missing_ok=True)
            raise
        self._file.close()
        self._file = None
        with open(finishing, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(finishing, self.path)
        self.partial_path.unlink()
        return self.path

    def _copy_chunks(self, f: h5py.File) -> None:
        """Copy every chunk of the partial file's per-sample datasets (sample by sample, in index order) and flat
        mesh datasets into ``f`` as stored: compressed bytes and checksums, no recompression."""
        flat = ("vertices_flat", "triangles_flat") if self.per_sample_topology else ()
        ids = {name: (self._file[name].id, f[name].id) for name in (*self._fields, *flat)}
        offsets = [(name, (index, *[0] * len(self._shapes[name])))
                   for index in range(self.num_samples) for name in self._fields]
        offsets += [(name, (start, 0)) for name in flat for start in range(0, len(self._file[name]), FLAT_CHUNK_ROWS)]
        for name, offset in offsets:
            source, target = ids[name]
            filter_mask, chunk = source.read_direct_chunk(offset)
            target.write_direct_chunk(offset, chunk, filter_mask)


class EncodedSample:
    """One sample as its file stores it: ``chunks`` {dataset: (filter mask, the chunk's compressed and checksummed
    bytes)} and, in a per-sample topology file, its ``mesh`` (vertices (V_i, 3), triangles (T_i, 3)), else None."""

    def __init__(self, chunks: dict[str, tuple[int, bytes]], mesh: tuple[np.ndarray, np.ndarray] | None):
        self.chunks, self.mesh = chunks, mesh


class SampleEncoder:
    """Checks a sample against a :class:`DatasetWriter`'s per-sample datasets and encodes it as their chunks (one
    per sample and dataset): HDF5's own filters (:data:`COMPRESSION`, :data:`CHECKSUM`) applied in a scratch
    in-memory file, so the bytes are those the writer's file would make itself. Picklable: the processes that make
    samples encode them (data_prep.writing), which spreads the compression over all of them."""

    def __init__(self, path: Path, grid: VoxelGrid, shapes: Mapping[str, tuple[int, ...]], fields: Sequence[str],
                 expression_names: tuple[str, ...] | None, per_sample_topology: bool):
        self.path, self.grid, self.shapes, self.fields = path, grid, dict(shapes), tuple(fields)
        self.expression_names, self.per_sample_topology = expression_names, per_sample_topology
        self._scratch: h5py.File | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_scratch": None}   # each process opens its own scratch file

    def close(self) -> None:
        """Close this process's scratch file (a later :meth:`encode` opens a new one)."""
        if self._scratch is not None:
            self._scratch.close()
            self._scratch = None

    def encode(self, index: int, sample: Mapping[str, np.ndarray]) -> EncodedSample:
        """Sample ``index`` (as :meth:`DatasetWriter.write` takes it) checked and encoded."""
        values = self.checked(index, sample)
        if self._scratch is None:
            self._scratch = h5py.File(f"scratch-{id(self)}", "w", driver="core", backing_store=False)
            for field in self.fields:
                shape = self.shapes[field]
                self._scratch.create_dataset(field, shape=(1, *shape), dtype=_dtype(field), chunks=(1, *shape),
                                             **COMPRESSION.get(field, {}), **CHECKSUM)
        chunks = {}
        for field, value in values.items():
            self._scratch[field][0] = value
            chunks[field] = self._scratch[field].id.read_direct_chunk((0, *[0] * len(self.shapes[field])))
        mesh = (sample["vertices"], sample["triangles"]) if self.per_sample_topology else None
        return EncodedSample(chunks, mesh)

    def checked(self, index: int, sample: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """{dataset: sample ``index``'s value in its stored dtype}: the keys, shapes, dtypes and values checked
        (a bool volume is packed), each problem a ValueError naming the file, the sample and the key."""
        expected_keys = {key for key, field in SAMPLE_KEYS.items()
                         if field in self.fields or (self.per_sample_topology and field in MESH_FIELDS)}
        if set(sample) != expected_keys:
            raise ValueError(f"sample {index} for {self.path}: keys {sorted(sample)} but expected {sorted(expected_keys)}")
        values = {}
        for key, value in sample.items():
            field = SAMPLE_KEYS[key]
            if field not in self.fields:
                continue
            value = np.asarray(value)
            if field.startswith("volumes") and value.shape == self.grid.shape and value.dtype == bool:
                value = pack_volume(value)
            elif field.startswith("volumes") and (value.shape, value.dtype) != (self.shapes[field], np.uint8):
                raise ValueError(f"{self.path}: sample {index} {key}: {value.dtype} {value.shape}, expected bool "
                                 f"{self.grid.shape} or packed uint8 {self.shapes[field]}")
            elif value.shape != self.shapes[field]:
                raise ValueError(f"{self.path}: sample {index} {key}: shape {value.shape}, "
                                 f"expected {self.shapes[field]}")
            if field == "images" and value.dtype != np.uint8:
                raise ValueError(f"{self.path}: sample {index} {key}: dtype {value.dtype}, expected uint8")
            if field == "expression_label" and not (np.issubdtype(value.dtype, np.integer)
                                                    and 0 <= value < len(self.expression_names)):
                raise ValueError(f"{self.path}: sample {index} {key}: {value!r} is not an integer id into "
                                 f"expression_names {list(self.expression_names)}")
            if field in FLOAT_FIELDS and not np.isfinite(value).all():
                raise ValueError(f"{self.path}: sample {index} {key}: contains NaN or inf")
            values[field] = value.astype(_dtype(field), copy=False)
        return values


class FaceDatasetFile:
    """A validated, lazily opened dataset file (see the module docstring for the schema).

    Opening checks the file exists, is HDF5, has a readable schema version and every required
    dataset with the dtype and shape the schema gives for N and the grid, and (if given) that its
    grid equals ``expected_grid`` (which came from ``grid_source``: "the config", a checkpoint).
    What it found: ``fields`` (the per-sample datasets present), ``has_frontal``, ``has_expression``
    (``expression_label`` present) with ``expression_names`` (label id -> name; empty without labels),
    ``num_expression_coefficients`` (E; 0 without ``expression``), ``grid``, ``num_samples``,
    ``num_vertices``, the topology and ``attrs``. ``per_sample_topology``: each sample has its own mesh
    (scans; ``num_vertices``, ``triangles``, ``face_region`` and ``landmark_vertices`` are None, and
    :meth:`read` gives each sample's ``vertices`` and ``triangles``).
    Samples are read with :meth:`read`; the HDF5 handle is opened in the process that reads, so the
    object can be handed to forked or spawned DataLoader workers. Each read checks that the file is
    still the one validated (same inode, size and modification time): a file replaced while a run
    reads it is an error, not a silent mix of two files. A chunk that fails its Fletcher-32
    checksum (or does not decompress) is an error naming the file, the dataset and the sample.
    """

    def __init__(self, path, expected_grid: VoxelGrid | None = None, grid_source: str = "the config"):
        self.path = Path(path)
        self._handle: h5py.File | None = None
        self._pid: int | None = None
        self._identity = self._stat()
        with self._open() as f:
            self._validate(f, expected_grid, grid_source)

    def _stat(self) -> tuple[int, int, int, int] | None:
        """``(device, inode, size, mtime_ns)`` of the file, or None when it does not exist."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _check_unchanged(self) -> None:
        if self._stat() != self._identity:
            raise DatasetError(f"dataset file {self.path} was replaced or modified after this run opened it "
                               f"(its size, modification time or inode changed); restart the run so that every "
                               f"process reads one version of the file")

    def _open(self) -> h5py.File:
        if not self.path.exists():
            partial = self.path.with_name(self.path.name + ".partial")
            hint = (f"an unfinished {partial} exists: rerun the command that made it to finish it"
                    if partial.exists() else f"create it with `{GENERATE_HINT}`")
            raise FileNotFoundError(f"dataset file {self.path} not found; {hint}")
        try:
            return h5py.File(self.path, "r", rdcc_nbytes=0)  # no chunk cache: each sample's chunk is read once
        except OSError as err:
            reason = f"truncated or not an HDF5 file ({err})"
            raise DatasetError(f"dataset file {self.path} is {reason}; regenerate it (e.g. `{GENERATE_HINT}`)",
                               reason) from None

    def _error(self, what: str) -> DatasetError:
        return DatasetError(f"dataset file {self.path}: {what}; regenerate it with the current code "
                            f"(e.g. `{GENERATE_HINT}`)", what)

    def _validate(self, f: h5py.File, expected_grid: VoxelGrid | None, grid_source: str) -> None:
        version = f.attrs.get("schema_version")
        if version is None or int(version) not in READABLE_SCHEMA_VERSIONS:
            raise self._error(f"schema_version is {None if version is None else int(version)}, "
                              f"this code reads versions {', '.join(map(str, READABLE_SCHEMA_VERSIONS))}")
        if _WRITTEN in f:
            raise self._error("it is an unfinished partial file (it still has per-sample written flags)")
        try:
            self.grid = VoxelGrid.from_attrs(f.attrs)
        except (KeyError, ValueError, TypeError) as err:
            raise self._error(f"bad or missing grid attributes grid_shape/grid_z_scale/grid_z_offset ({err})") from None
        self.per_sample_topology = bool(f.attrs.get("per_sample_topology", False))
        if self.per_sample_topology:
            required = [name for name in (*PER_SAMPLE_FIELDS, *PER_SAMPLE_TOPOLOGY_FIELDS)
                        if name not in OPTIONAL_FIELDS and name != "vertices"]
        else:
            required = [name for name in (*PER_SAMPLE_FIELDS, *SHARED_FIELDS) if name not in OPTIONAL_FIELDS]
        missing = [name for name in required if name not in f]
        if missing:
            raise self._error(f"missing datasets {missing}")
        self.fields = tuple(field for field in PER_SAMPLE_FIELDS + TEST_FIELDS
                            if field in f or (field == "vertices" and self.per_sample_topology))
        self.num_samples = int(f["images"].shape[0])
        self.num_vertices = (None if self.per_sample_topology else
                             int(f["vertices"].shape[1]) if f["vertices"].ndim == 3 else -1)
        self.num_expression_coefficients = (0 if "expression" not in f else
                                            int(f["expression"].shape[1]) if f["expression"].ndim == 2 else -1)
        self.has_frontal = "volumes_frontal" in f
        self.has_expression = "expression_label" in f
        for field, shape in sample_shapes(self.grid, self.num_vertices or 0, self.num_expression_coefficients).items():
            if field == "vertices" and self.per_sample_topology:
                continue
            if field in f and f[field].shape != (self.num_samples, *shape):
                raise self._error(f"dataset {field} has shape {f[field].shape}, expected {(self.num_samples, *shape)} "
                                  f"for N={self.num_samples}, grid {self.grid.describe()}, V={self.num_vertices} "
                                  f"and E={self.num_expression_coefficients}")
            if field in f and f[field].dtype != _dtype(field):
                raise self._error(f"dataset {field} has dtype {f[field].dtype}, the schema's is "
                                  f"{np.dtype(_dtype(field))} (float images would train on near-black inputs)")
        if "num_samples" in f.attrs and int(f.attrs["num_samples"]) != self.num_samples:
            raise self._error(f"attr num_samples={int(f.attrs['num_samples'])} but datasets hold {self.num_samples}")
        if self.per_sample_topology:
            self._validate_meshes(f)
            self.triangles = self.face_region = self.landmark_vertices = None
        else:
            self._validate_shared(f)
        self.attrs = {key: _plain(value) for key, value in f.attrs.items()}
        self.expression_names = tuple(self.attrs.get("expression_names", ()))
        if self.has_expression and self.expression_names[:1] != (NEUTRAL,):
            raise self._error(f"it has expression_label but its attribute expression_names is "
                              f"{list(self.expression_names) or 'missing'} (label id -> name, the first {NEUTRAL!r})")
        if expected_grid is not None and expected_grid != self.grid:
            fix = ("change grid in the config" if grid_source == "the config"
                   else "use a model trained on this grid")
            raise DatasetError(
                f"dataset {self.path}: dataset grid {self.grid.describe()} differs from the grid of {grid_source}, "
                f"{expected_grid.describe()}: regenerate with --grid "
                f"{expected_grid.depth},{expected_grid.height},{expected_grid.width} or {fix}")

    def _validate_shared(self, f: h5py.File) -> None:
        """Read and check the shared topology (``triangles``, ``face_region``, ``landmark_vertices``)."""
        for name in SHARED_FIELDS:
            if not np.issubdtype(f[name].dtype, np.integer):
                raise self._error(f"dataset {name} has dtype {f[name].dtype}; vertex ids must be integers")
        self.triangles = f["triangles"][()].astype(np.int64)
        self.face_region = f["face_region"][()].astype(np.int64)
        self.landmark_vertices = f["landmark_vertices"][()].astype(np.int64)
        if self.triangles.ndim != 2 or self.triangles.shape[1] != 3:
            raise self._error(f"triangles have shape {self.triangles.shape}, expected (T, 3)")
        if self.landmark_vertices.shape != (NUM_LANDMARKS,):
            raise self._error(f"landmark_vertices have shape {self.landmark_vertices.shape}, expected ({NUM_LANDMARKS},)")
        for name in SHARED_FIELDS:
            try:
                as_vertex_ids(getattr(self, name), self.num_vertices, name, unique=name in UNIQUE_ID_FIELDS)
            except ValueError as err:
                raise self._error(str(err)) from None

    def _validate_meshes(self, f: h5py.File) -> None:
        """Check the per-sample topology datasets and keep the ranges (the offsets index) in memory."""
        self._ranges = {}
        for flat, ranges, kind, least in (("vertices_flat", "vertex_ranges", "f", 3),
                                          ("triangles_flat", "triangle_ranges", "i", 1)):
            if f[flat].ndim != 2 or f[flat].shape[1] != 3 or f[flat].dtype.kind != kind:
                raise self._error(f"dataset {flat} is {f[flat].dtype} {f[flat].shape}, expected "
                                  f"{'float' if kind == 'f' else 'integer'} (M, 3)")
            rows = f[ranges][()]
            if rows.shape != (self.num_samples, 2) or rows.dtype.kind not in "iu":
                raise self._error(f"dataset {ranges} is {rows.dtype} {rows.shape}, expected integer "
                                  f"({self.num_samples}, 2) rows of start, count")
            rows = rows.astype(np.int64)
            bad = np.flatnonzero((rows[:, 0] < 0) | (rows[:, 1] < least) | (rows.sum(1) > len(f[flat])))
            if len(bad):
                raise self._error(f"dataset {ranges} row {bad[0]} ({rows[bad[0]].tolist()}) is not a range of at "
                                  f"least {least} rows inside {flat}'s {len(f[flat])}")
            self._ranges[flat] = rows

    def __len__(self) -> int:
        return self.num_samples

    def _file(self) -> h5py.File:
        """The HDF5 handle of this process (a forked worker opens its own)."""
        if self._handle is None or self._pid != os.getpid():
            self._handle = self._open()
            self._pid = os.getpid()
        return self._handle

    def read(self, index: int, fields: Sequence[str]) -> dict[str, np.ndarray]:
        """Sample ``index`` as ``{field: array}`` for dataset names in ``fields`` (:data:`PER_SAMPLE_FIELDS`,
        :data:`TEST_FIELDS`).

        Volumes come back packed, uint8 ``(D, H, W/8)``: unpack with :func:`unpack_volume`. Of a
        per-sample topology file, ``vertices`` is the sample's own (V_i, 3) and ``triangles`` (T_i, 3)
        int64 may be asked for too. Raises :class:`DatasetError` if a float field holds NaN or inf.
        """
        known = PER_SAMPLE_FIELDS + TEST_FIELDS + (("triangles",) if self.per_sample_topology else ())
        unknown = [field for field in fields if field not in known]
        if unknown:
            shared = " (triangles are shared here: the file's .triangles)" if "triangles" in unknown else ""
            raise KeyError(f"unknown fields {unknown}; a dataset file has {list(known)}{shared}")
        for field in fields:
            if field in OPTIONAL_FIELDS and field not in self.fields:
                raise DatasetError(f"dataset file {self.path} has no {field}: {OPTIONAL_FIELDS[field]}")
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"sample index {index} outside 0..{self.num_samples - 1} in {self.path}")
        self._check_unchanged()
        f = self._file()
        out = {}
        for field in fields:
            try:
                if self.per_sample_topology and field in MESH_FIELDS:
                    out[field] = self._read_mesh_part(f, field, index % self.num_samples)
                else:
                    out[field] = f[field][index]
            except OSError as error:  # a failed checksum or a chunk that does not decompress
                raise DatasetError(f"dataset file {self.path}: dataset {field}, sample {index} cannot be read "
                                   f"({' '.join(str(error).split())}); the file is damaged: regenerate it") from None
        for field in FLOAT_FIELDS:
            if field in out and not np.isfinite(out[field]).all():
                raise DatasetError(f"dataset file {self.path}: sample {index} has NaN or inf in {field}; "
                                   f"the file is damaged, regenerate it")
        return out

    def _read_mesh_part(self, f: h5py.File, field: str, index: int) -> np.ndarray:
        """Sample ``index``'s own ``vertices`` (V_i, 3) float32 or ``triangles`` (T_i, 3) int64 (ids checked)."""
        flat = f"{field}_flat"
        start, count = self._ranges[flat][index]
        values = f[flat][start:start + count]
        if field == "vertices":
            return values
        num_vertices = self._ranges["vertices_flat"][index, 1]
        if values.min() < 0 or values.max() >= num_vertices:
            raise DatasetError(f"dataset file {self.path}: sample {index}'s triangles use vertex ids outside its "
                               f"{num_vertices} vertices; the file is damaged, regenerate it")
        return values.astype(np.int64)

    def close(self) -> None:
        """Close this process's HDF5 handle (a later :meth:`read` reopens it)."""
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = None

    def __enter__(self) -> "FaceDatasetFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handle"] = None
        state["_pid"] = None
        return state


def open_dataset(path, expected_grid: VoxelGrid | None = None, grid_source: str = "the config") -> FaceDatasetFile:
    """Open and validate a dataset file; see :class:`FaceDatasetFile`."""
    return FaceDatasetFile(path, expected_grid, grid_source)
