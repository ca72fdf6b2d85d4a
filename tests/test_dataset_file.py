"""Dataset file: bit packing, writer/reader round trip, atomic resumable writes, clear errors on bad files."""

import multiprocessing
import pickle
import shutil
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from lightning_vrn.dataset_file import (
    PER_SAMPLE_FIELDS,
    SCHEMA_VERSION,
    SHARED_FIELDS,
    DatasetError,
    DatasetWriter,
    open_dataset,
    pack_volume,
    unpack_volume,
)
from lightning_vrn.geometry.grid import VoxelGrid
from lightning_vrn.geometry.topology import as_vertex_ids
from tests.helpers.paths import REPO
from tests.helpers.random_samples import (
    ATTRS,
    EXPRESSION_NAMES,
    GRID,
    TOPOLOGY,
    E,
    N,
    V,
    make_samples,
    new_writer,
)


def write_file(path, samples):
    with new_writer(path) as writer:
        for i, sample in enumerate(samples):
            writer.write(i, sample)
        writer.finish()
    return path


@pytest.fixture(scope="module")
def samples():
    return make_samples()


@pytest.fixture(scope="module")
def written(tmp_path_factory, samples):
    return write_file(tmp_path_factory.mktemp("ds") / "train.h5", samples)


def assert_same_contents(path_a, path_b):
    with h5py.File(path_a, "r") as a, h5py.File(path_b, "r") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for name in a:
            np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=name)
        assert sorted(a.attrs.keys()) == sorted(b.attrs.keys())


# --- bit packing ---------------------------------------------------------------------------------

def test_pack_unpack_round_trip_and_big_bit_order():
    rng = np.random.default_rng(0)
    for shape in [(3, 5, 8), (7, 4, 24), (2, 16)]:
        volume = rng.random(shape) < 0.5
        packed = pack_volume(volume)
        assert packed.dtype == np.uint8 and packed.shape == (*shape[:-1], shape[-1] // 8)
        np.testing.assert_array_equal(unpack_volume(packed, shape[-1]), volume)
        # Independent bit arithmetic: voxel x is bit 7 - x % 8 of byte x // 8.
        x = np.arange(shape[-1])
        bits = (packed[..., x // 8] >> (7 - x % 8)) & 1
        np.testing.assert_array_equal(bits.astype(bool), volume)


def test_pack_rejects_width_not_multiple_of_8_and_unpack_wrong_width():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_volume(np.zeros((2, 3, 12), bool))
    with pytest.raises(ValueError, match="width 24"):
        unpack_volume(np.zeros((2, 3, 2), np.uint8), 24)


# --- writer -> reader ------------------------------------------------------------------------------

def test_round_trip_every_field_exactly(written, samples):
    ds = open_dataset(written, expected_grid=GRID)
    assert len(ds) == N and ds.num_samples == N and ds.has_frontal and ds.grid == GRID and ds.path == written
    assert ds.fields == PER_SAMPLE_FIELDS and ds.has_expression and ds.num_expression_coefficients == E
    assert ds.expression_names == EXPRESSION_NAMES
    for name in ("triangles", "face_region", "landmark_vertices"):
        np.testing.assert_array_equal(getattr(ds, name), TOPOLOGY[name])
    for i, sample in enumerate(samples):
        got = ds.read(i, PER_SAMPLE_FIELDS)
        assert set(got) == set(PER_SAMPLE_FIELDS)
        np.testing.assert_array_equal(got["images"], sample["image"])
        np.testing.assert_array_equal(unpack_volume(got["volumes"], GRID.width), sample["volume"])
        np.testing.assert_array_equal(unpack_volume(got["volumes_frontal"], GRID.width), sample["volume_frontal"])
        for key in ("landmarks_2d", "landmarks_3d", "pose", "vertices", "expression"):
            assert got[key].dtype == np.float32
            np.testing.assert_array_equal(got[key], sample[key])
        assert got["expression_label"].dtype == np.uint8 and got["expression_label"] == sample["expression_label"]
    assert set(ds.read(0, ["pose"])) == {"pose"}
    ds.close()


def test_attrs_chunks_and_no_written_flag(written):
    ds = open_dataset(written)
    assert ds.attrs["schema_version"] == SCHEMA_VERSION
    assert ds.attrs["grid_shape"] == list(GRID.shape)
    assert ds.attrs["grid_z_offset"] == GRID.z_offset and ds.attrs["grid_z_scale"] == GRID.z_scale
    assert ds.attrs["num_samples"] == N and ds.attrs["has_frontal"]
    assert ds.attrs["expression_names"] == list(EXPRESSION_NAMES)
    for key, value in ATTRS.items():
        assert ds.attrs[key] == value
    with h5py.File(written, "r") as f:
        assert "written" not in f
        for name in PER_SAMPLE_FIELDS:
            assert f[name].chunks == (1, *f[name].shape[1:]), name
        assert f["volumes"].compression == "gzip" and f["volumes"].compression_opts == 4
        assert not f["volumes"].shuffle
        assert f["images"].compression is None


def test_reader_survives_pickle_and_fork(written, samples):
    ds = open_dataset(written)
    ds.read(0, ["vertices"])  # the parent now holds an open handle
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone.read(2, ["vertices"])["vertices"], samples[2]["vertices"])
    with multiprocessing.get_context("fork").Pool(1) as pool:
        got = pool.apply(ds.read, (3, ["landmarks_3d"]))
    np.testing.assert_array_equal(got["landmarks_3d"], samples[3]["landmarks_3d"])
    np.testing.assert_array_equal(ds.read(1, ["pose"])["pose"], samples[1]["pose"])


def test_encoded_chunks_are_the_bytes_hdf5_writes_itself_in_any_process(tmp_path, samples):
    """The encoder's chunks (made in a making process) equal what h5py's own write stores with the same filters,
    so a file is the same whether its samples were encoded here, in a pickled copy, or written the plain way."""
    with new_writer(tmp_path / "x.h5") as writer:
        here = writer.encoder.encode(1, samples[1])
        copy = pickle.loads(pickle.dumps(writer.encoder))
        there = copy.encode(1, samples[1])
        with h5py.File(tmp_path / "plain.h5", "w") as plain:
            for field, (mask, chunk) in here.chunks.items():
                stored = writer._file[field]
                dataset = plain.create_dataset(field, shape=stored.shape, dtype=stored.dtype, chunks=stored.chunks,
                                               compression=stored.compression, compression_opts=stored.compression_opts,
                                               shuffle=stored.shuffle, fletcher32=stored.fletcher32)
                dataset[1] = writer.encoder.checked(1, samples[1])[field]
                assert (mask, chunk) == dataset.id.read_direct_chunk((1, *[0] * (dataset.ndim - 1))), field
                assert there.chunks[field] == (mask, chunk), field
    assert set(here.chunks) == set(writer._fields) and here.mesh is None


def test_writer_rejects_bad_samples(tmp_path, samples):
    with new_writer(tmp_path / "x.h5") as writer:
        bad_shape = dict(samples[0], vertices=np.zeros((V + 1, 3), np.float32))
        with pytest.raises(ValueError, match="vertices: shape"):
            writer.write(0, bad_shape)
        with pytest.raises(ValueError, match="NaN"):
            writer.write(0, dict(samples[0], pose=np.array([0, np.nan, 0], np.float32)))
        with pytest.raises(ValueError, match="expected bool"):
            writer.write(0, dict(samples[0], volume=samples[0]["volume"].astype(np.float32)))
        with pytest.raises(ValueError, match="keys"):
            writer.write(0, {k: v for k, v in samples[0].items() if k != "volume_frontal"})
        with pytest.raises(IndexError):
            writer.write(N, samples[0])
        with pytest.raises(ValueError, match="not written"):
            writer.finish()
    with pytest.raises(ValueError, match="face_model"):
        DatasetWriter(tmp_path / "y.h5", GRID, N, V, attrs={"source": "x"}, **TOPOLOGY)


def test_expression_fields_are_all_or_nothing(tmp_path, samples):
    """A writer made with expression fields refuses samples without them, and vice versa."""
    without = {key: value for key, value in samples[0].items() if not key.startswith("expression")}
    with new_writer(tmp_path / "with.h5") as writer:
        for sample in (without, dict(samples[0], expression_label=len(EXPRESSION_NAMES)),
                       dict(samples[0], expression_label=1.0)):
            with pytest.raises(ValueError, match="keys|expression_names"):
                writer.write(0, sample)
        with pytest.raises(ValueError, match=r"expression: shape \(3,\), expected \(4,\)"):
            writer.write(0, dict(samples[0], expression=np.zeros(3, np.float32)))
    with new_writer(tmp_path / "without.h5", expression_names=None, num_expression_coefficients=0) as writer:
        with pytest.raises(ValueError, match="keys"):
            writer.write(0, samples[0])
        for i in range(N):
            writer.write(i, {key: value for key, value in samples[i].items() if not key.startswith("expression")})
        writer.finish()
    ds = open_dataset(tmp_path / "without.h5")
    assert not ds.has_expression and ds.expression_names == () and ds.num_expression_coefficients == 0
    assert ds.fields == tuple(f for f in PER_SAMPLE_FIELDS if not f.startswith("expression"))
    with pytest.raises(DatasetError, match="has no expression_label: its producer did not record expressions"):
        ds.read(0, ["expression_label"])
    for names in [("smile", "neutral"), ("neutral", "smile", "smile"), ()]:
        with pytest.raises(ValueError, match="expression_names must be distinct"):
            new_writer(tmp_path / "bad.h5", expression_names=names)


def write_version_1(path, samples):
    """A file in the version-1 layout, written with h5py alone: no expression fields, no checksums."""
    with h5py.File(path, "w") as f:
        f.attrs.update({**ATTRS, "schema_version": 1, **GRID.to_attrs(), "num_samples": N, "has_frontal": False})
        for name in SHARED_FIELDS:
            f.create_dataset(name, data=TOPOLOGY[name].astype(np.int32))
        f.create_dataset("images", data=np.stack([s["image"] for s in samples]), chunks=(1, 16, 16, 3))
        f.create_dataset("volumes", data=np.stack([np.packbits(s["volume"], axis=-1) for s in samples]),
                         chunks=(1, 12, 16, 2), compression="gzip")
        for key in ("landmarks_2d", "landmarks_3d", "pose", "vertices"):
            f.create_dataset(key, data=np.stack([s[key] for s in samples]))


def test_version_1_file_still_opens(tmp_path, samples):
    path = tmp_path / "v1.h5"
    write_version_1(path, samples)
    ds = open_dataset(path, expected_grid=GRID)
    assert ds.attrs["schema_version"] == 1 and len(ds) == N and not ds.has_frontal and not ds.has_expression
    assert ds.fields == ("images", "volumes", "landmarks_2d", "landmarks_3d", "pose", "vertices")
    got = ds.read(3, ds.fields)
    np.testing.assert_array_equal(unpack_volume(got["volumes"], GRID.width), samples[3]["volume"])
    np.testing.assert_array_equal(got["vertices"], samples[3]["vertices"])
    with pytest.raises(DatasetError, match="has no expression: .*version-1 file"):
        ds.read(0, ["expression"])


@pytest.mark.parametrize("field, values, message", [
    ("face_region", np.arange(V) < 10, r"face_region must be vertex ids, got a boolean mask.*np\.flatnonzero\(mask\)"),
    ("face_region", np.arange(5, 35) + 0.0, "face_region must be integer vertex ids, got dtype float64"),
    ("face_region", [1, 2, 2, 3, 3], r"face_region repeats 2 vertex ids \(first: \[2, 3\]\)"),
    ("face_region", [0, V], rf"face_region has vertex ids outside \[0, {V}\): min 0, max {V}"),
    ("face_region", [-1, 3], rf"face_region has vertex ids outside \[0, {V}\): min -1"),
    ("landmark_vertices", np.ones(68, dtype=bool), "landmark_vertices must be vertex ids, got a boolean mask"),
    ("landmark_vertices", np.full(68, V), "landmark_vertices has vertex ids outside"),
    ("triangles", np.zeros((3, 3)), "triangles must be integer vertex ids"),
])
def test_writer_rejects_bad_vertex_ids(tmp_path, field, values, message):
    with pytest.raises(ValueError, match=rf"DatasetWriter for .*x\.h5: {message}"):
        DatasetWriter(tmp_path / "x.h5", GRID, N, V, attrs=ATTRS, **{**TOPOLOGY, field: values})
    assert not list(tmp_path.iterdir())


def test_vertex_ids_come_back_as_int64_and_landmarks_may_share_a_vertex():
    ids = as_vertex_ids(np.array([3, 1, 2], dtype=np.uint8), 4, "ids")
    assert ids.dtype == np.int64 and ids.tolist() == [3, 1, 2]
    assert as_vertex_ids([], 4, "ids").shape == (0,)
    # The SFM's inner mouth corners reuse its outer ones: landmark ids may repeat.
    assert as_vertex_ids([0, 0, 1], 4, "landmark_vertices", unique=False).tolist() == [0, 0, 1]


# --- atomic, resumable writes ----------------------------------------------------------------------

def test_final_name_appears_only_on_finish(tmp_path, samples):
    path = tmp_path / "split.h5"
    with new_writer(path) as writer:
        for i, sample in enumerate(samples):
            writer.write(i, sample)
            assert not path.exists() and writer.partial_path.exists()
        assert len(writer.pending()) == 0
        writer.finish()
    assert path.exists() and not writer.partial_path.exists()
    with pytest.raises(FileExistsError, match="restart"):
        new_writer(path)


def test_resume_after_interruption_equals_one_shot_write(tmp_path, samples, written):
    path = tmp_path / "split.h5"
    with pytest.raises(KeyboardInterrupt):
        with new_writer(path) as writer:
            for i in range(N // 2):
                writer.write(i, samples[i])
            raise KeyboardInterrupt
    assert not path.exists()
    with new_writer(path) as writer:
        np.testing.assert_array_equal(writer.pending(), np.arange(N // 2, N))
        for i in writer.pending():  # already packed volumes are stored as they are
            packed = {key: pack_volume(samples[i][key]) for key in ("volume", "volume_frontal")}
            writer.write(i, {**samples[i], **packed})
        writer.finish()
    assert_same_contents(path, written)


def test_resume_after_hard_kill(tmp_path, samples, written):
    """A process killed without closing the file loses at most the samples since the last flush."""
    path = tmp_path / "killed.h5"
    np.savez(tmp_path / "samples.npz", **{f"{i}/{k}": v for i, s in enumerate(samples) for k, v in s.items()})
    script = textwrap.dedent(f"""
        import os, numpy as np
        from tests.helpers.random_samples import new_writer
        data = np.load({str(tmp_path / "samples.npz")!r})
        writer = new_writer({str(path)!r}, flush_every=2)
        for i in range(5):
            writer.write(i, {{k.split("/")[1]: data[k] for k in data.files if k.startswith(f"{{i}}/")}})
        os._exit(3)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 3, result.stderr
    assert not path.exists()
    with new_writer(path) as writer:
        np.testing.assert_array_equal(writer.pending(), [4, 5])  # flushed after samples 2 and 4
        for i in writer.pending():
            writer.write(i, samples[i])
        writer.finish()
    assert_same_contents(path, written)


def test_resume_with_other_parameters_fails_clearly_or_restarts(tmp_path, samples):
    path = tmp_path / "split.h5"
    with new_writer(path) as writer:
        writer.write(0, samples[0])
    for kwargs in [{"attrs": dict(ATTRS, seed=8)}, {"num_samples": N + 1}, {"grid": VoxelGrid.centred(12, 16, 24)},
                   {"expression_names": EXPRESSION_NAMES[:2]}, {"num_expression_coefficients": 0}]:
        with pytest.raises(DatasetError) as err:
            new_writer(path, **kwargs)
        assert str(writer.partial_path) in str(err.value) and "restart" in str(err.value)
    assert "seed" in str(pytest.raises(DatasetError, new_writer, path, attrs=dict(ATTRS, seed=8)).value)
    with new_writer(path, attrs=dict(ATTRS, seed=8), restart=True) as writer:
        assert len(writer.pending()) == N


def test_damaged_partial_fails_clearly_or_restarts(tmp_path):
    path = tmp_path / "split.h5"
    (tmp_path / "split.h5.partial").write_bytes(b"not hdf5 at all" * 100)
    with pytest.raises(DatasetError, match="damaged.*restart"):
        new_writer(path)
    with new_writer(path, restart=True) as writer:
        assert len(writer.pending()) == N


# --- bad files -------------------------------------------------------------------------------------

def expect_error(path, kind, *phrases, **kwargs):
    with pytest.raises(kind) as err:
        open_dataset(path, **kwargs)
    message = str(err.value)
    assert str(path) in message
    for phrase in phrases:
        assert phrase in message, message


def test_missing_file_suggests_generator(tmp_path):
    expect_error(tmp_path / "nope.h5", FileNotFoundError, "python -m data_prep.synthetic")
    (tmp_path / "nope.h5.partial").write_bytes(b"")
    expect_error(tmp_path / "nope.h5", FileNotFoundError, "unfinished", "rerun")


def test_truncated_and_random_files(tmp_path, written):
    truncated = tmp_path / "truncated.h5"
    data = written.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    expect_error(truncated, DatasetError, "truncated or not an HDF5 file", "regenerate")
    noise = tmp_path / "noise.h5"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    expect_error(noise, DatasetError, "truncated or not an HDF5 file", "regenerate")


def damaged_copy(tmp_path, written, damage):
    path = tmp_path / "damaged.h5"
    shutil.copy(written, path)
    with h5py.File(path, "r+") as f:
        damage(f)
    return path


def test_wrong_schema_version(tmp_path, written):
    path = damaged_copy(tmp_path, written, lambda f: f.attrs.__setitem__("schema_version", SCHEMA_VERSION + 1))
    expect_error(path, DatasetError, "schema_version", "regenerate")


def test_missing_dataset(tmp_path, written):
    path = damaged_copy(tmp_path, written, lambda f: f.__delitem__("landmarks_3d"))
    expect_error(path, DatasetError, "missing datasets ['landmarks_3d']", "regenerate")


def test_wrong_shape(tmp_path, written):
    def shrink_volumes(f):
        del f["volumes"]
        f.create_dataset("volumes", data=np.zeros((N, GRID.depth, GRID.height, 1), np.uint8))

    expect_error(damaged_copy(tmp_path, written, shrink_volumes), DatasetError, "volumes has shape", "regenerate")


def test_grid_mismatch_names_both_grids_and_the_fix(written):
    expect_error(written, DatasetError, "12x16x16", "10x16x16", "--grid 10,16,16", "change grid in the config",
                 expected_grid=VoxelGrid.centred(10, 16, 16))


def test_nan_in_vertices_is_reported_on_read(tmp_path, written):
    def poison(f):
        f["vertices"][2, 5, 1] = np.nan

    ds = open_dataset(damaged_copy(tmp_path, written, poison))
    ds.read(1, ["vertices"])
    with pytest.raises(DatasetError) as err:
        ds.read(2, ["vertices", "images"])
    assert str(ds.path) in str(err.value) and "sample 2" in str(err.value) and "vertices" in str(err.value)
    with pytest.raises(KeyError, match="unknown fields"):
        ds.read(0, ["image"])


def test_an_encoded_sample_missing_a_dataset_is_refused(tmp_path, samples):
    with new_writer(tmp_path / "x.h5") as writer:
        encoded = writer.encoder.encode(0, samples[0])
        del encoded.chunks["pose"]
        with pytest.raises(ValueError, match="encoded datasets"):
            writer.write_encoded(0, encoded)
        assert 0 in writer.pending()   # not flagged as written
