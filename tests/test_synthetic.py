"""Synthetic generator: reproducible samples, the authors' crop, volumes that match the mesh, resume, CLI."""

import subprocess
import sys
import warnings
from dataclasses import replace

import h5py
import numpy as np
import pytest
from scipy.ndimage import binary_erosion

from data_prep import scene, synthetic
from data_prep.face_model import expression_label, load_face_model
from data_prep.render import vertex_normals
from data_prep.synthetic import (
    ImageOptions,
    PITCH_ROLL_STD_DEG,
    POSE_LIMITS_DEG,
    TRANSLATION_JITTER_FRACTION,
    generate_split,
    main,
    make_sample,
    sample_pose,
    sample_rng,
)
from lightning_vrn.dataset_file import open_dataset, pack_volume, unpack_volume
from lightning_vrn.geometry.crop import LANDMARK_BOX_FRACTION
from lightning_vrn.geometry.grid import PAPER_GRID, VoxelGrid
from lightning_vrn.geometry.pose import crop_rotation
from lightning_vrn.geometry.raster import rasterise
from lightning_vrn.geometry.voxelise import voxelise
from tests.helpers.cli import run_cli, run_killed
from tests.helpers.files import files_under
from tests.helpers.paths import REPO

GRID = VoxelGrid.parse("100,96,96")
N = 4
ARGS = dict(model_spec="builtin", grid=GRID, num_samples=N, seed=0, split="train", progress=False)
OPTIONS = ImageOptions(occluder_prob=0.5)


def generate(path, **overrides):
    """The test split at ``path``: ARGS and OPTIONS, with ``overrides`` of either."""
    options = {key: overrides.pop(key) for key in list(overrides) if key in ImageOptions.__dataclass_fields__}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # clipped backs at large yaw are expected
        return generate_split(path, **{**ARGS, **overrides}, options=replace(OPTIONS, **options))


@pytest.fixture(scope="module")
def model():
    return load_face_model("builtin")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The split generated in one uninterrupted single-process run."""
    return generate(tmp_path_factory.mktemp("synthetic") / "train.h5")


@pytest.fixture(scope="module")
def samples(reference):
    return read_all(reference)[1]


def read_all(path):
    ds = open_dataset(path)
    return ds, [ds.read(i, ds.fields) for i in range(len(ds))]


def killed_after_two_samples(path, monkeypatch, **overrides):
    """``generate(path, **overrides)`` interrupted (KeyboardInterrupt) when it asks for its third sample."""
    real_make_sample, calls = synthetic.make_sample, []

    def dies_after_two(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real_make_sample(*args, **kwargs)

    monkeypatch.setattr(synthetic, "make_sample", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        generate(path, **overrides)
    monkeypatch.setattr(synthetic, "make_sample", real_make_sample)


def assert_same_dataset(path_a, path_b):
    (a, samples_a), (b, samples_b) = read_all(path_a), read_all(path_b)
    assert a.attrs == b.attrs
    np.testing.assert_array_equal(a.triangles, b.triangles)
    for sample_a, sample_b in zip(samples_a, samples_b):
        for field in sample_a:
            np.testing.assert_array_equal(sample_a[field], sample_b[field], err_msg=field)


def test_file_contents_and_attrs(reference, samples, model):
    ds = open_dataset(reference, expected_grid=GRID)
    assert len(ds) == N and not ds.has_frontal
    assert ds.attrs["source"] == "synthetic" and ds.attrs["seed"] == 0 and ds.attrs["face_model"] == model.name
    assert ds.attrs["created_by"].startswith("lightning_vrn.data_prep.synthetic")
    np.testing.assert_array_equal(ds.landmark_vertices, model.landmark_vertices)
    np.testing.assert_array_equal(ds.triangles, model.triangles)
    assert samples[0]["images"].shape == (96, 96, 3) and samples[0]["vertices"].shape == (model.num_vertices, 3)


def test_samples_carry_their_expression_and_its_label(reference, samples, model):
    ds = open_dataset(reference)
    assert ds.expression_names == ("neutral", *model.expression_names)
    assert ds.num_expression_coefficients == len(model.expression_basis)
    for i, sample in enumerate(samples):
        _, expression = model.sample_coefficients(sample_rng(0, "train", i))  # the sample's first draw
        np.testing.assert_array_equal(sample["expression"], expression)
        assert sample["expression_label"] == expression_label(expression)


def test_every_sample_comes_from_its_own_generator(samples, model):
    """Sample i is make_sample with default_rng([seed, crc32(split), i]): nothing else is random."""
    again = make_sample(model, GRID, sample_rng(0, "train", 2), options=OPTIONS)
    np.testing.assert_array_equal(samples[2]["volumes"], pack_volume(again["volume"]))
    np.testing.assert_array_equal(samples[2]["images"], again["image"])
    np.testing.assert_array_equal(samples[2]["vertices"], again["vertices"])
    assert not np.array_equal(samples[1]["vertices"], samples[2]["vertices"])


def test_occluders_change_only_the_image(model):
    plain = make_sample(model, GRID, sample_rng(5, "val", 0))
    occluded = make_sample(model, GRID, sample_rng(5, "val", 0), True, ImageOptions(occluder_prob=1.0))
    for key in ("volume", "vertices", "pose", "landmarks_3d"):
        np.testing.assert_array_equal(plain[key], occluded[key])
    assert not np.array_equal(plain["image"], occluded["image"])
    assert occluded["volume_frontal"].shape == GRID.shape and occluded["volume_frontal"].any()


def test_the_photographic_camera_changes_only_the_image(model):
    basic = make_sample(model, GRID, sample_rng(5, "val", 1))
    photographic = make_sample(model, GRID, sample_rng(5, "val", 1), options=ImageOptions(camera="photographic"))
    for key in ("volume", "vertices", "pose", "landmarks_3d", "expression"):
        np.testing.assert_array_equal(basic[key], photographic[key])
    assert np.abs(basic["image"].astype(int) - photographic["image"]).mean() > 2


def test_heads_change_only_the_image_and_are_recorded(model, tmp_path):
    plain = make_sample(model, GRID, sample_rng(5, "val", 2))
    headed = make_sample(model, GRID, sample_rng(5, "val", 2), options=ImageOptions(heads=True))
    for key in ("volume", "vertices", "pose", "landmarks_3d", "expression"):
        np.testing.assert_array_equal(plain[key], headed[key])
    # The volume is the face's alone: no skull, ears, neck or hair in it.
    np.testing.assert_array_equal(headed["volume"], voxelise(headed["vertices"], model.triangles,
                                                             crop_rotation(headed["pose"]), GRID))
    assert np.abs(plain["image"].astype(int) - headed["image"]).mean() > 2
    path = generate(tmp_path / "heads.h5", heads=True, workers=2)
    assert open_dataset(path).attrs["heads"] == synthetic.HEADS_VERSION
    assert generate(tmp_path / "again.h5", heads=True).read_bytes() == path.read_bytes()  # whatever the workers


def test_photo_edges_black_out_what_lies_beyond_the_photo_and_nothing_else(model):
    blacked = 0
    for index in range(4):
        plain = make_sample(model, GRID, sample_rng(5, "val", index), options=ImageOptions(photo_edges=0.0))
        cut = make_sample(model, GRID, sample_rng(5, "val", index), options=ImageOptions(photo_edges=1.0))
        for key in ("volume", "vertices", "pose", "landmarks_3d", "expression"):
            np.testing.assert_array_equal(plain[key], cut[key])
        black = (cut["image"] == 0).all(axis=-1) & (plain["image"] != 0).any(axis=-1)
        np.testing.assert_array_equal(cut["image"][~black], plain["image"][~black])
        rows, cols = np.nonzero(~black)  # what is left is one axis-aligned rectangle around the landmarks
        assert (~black).sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
        low, high = cut["landmarks_2d"].min(0), cut["landmarks_2d"].max(0)
        assert cols.min() <= low[0] and cols.max() >= high[0] and rows.min() <= low[1] and rows.max() >= high[1]
        blacked += black.any()
    assert blacked >= 2  # an edge may also fall outside the crop


def test_cut_at_photo_edges_measures_margins_in_landmark_box_sizes():
    image = np.full((40, 40, 3), 200, np.uint8)
    landmarks = np.array([[10.0, 12.0], [20.0, 22.0]])  # a 10 x 10 box
    cut = scene.cut_at_photo_edges(image, landmarks, np.array([0.5, np.inf, 0.0, 1.0]))
    kept = (cut > 0).all(-1)
    rows, cols = np.nonzero(kept)
    assert (cols.min(), cols.max(), rows.min(), rows.max()) == (5, 39, 12, 32)


def test_photo_edges_come_with_their_probability_and_are_recorded(model, tmp_path, reference):
    edged = [(make_sample(model, GRID, sample_rng(2, "p", i), options=ImageOptions(photo_edges=0.5))["image"] == 0)
             .all(-1).any() for i in range(60)]
    assert 0.3 < np.mean(edged) < 0.7
    assert open_dataset(reference).attrs["photo_edges"] == synthetic.PHOTO_EDGES == 0.9  # the default
    path = generate(tmp_path / "none.h5", photo_edges=0.0)
    assert "photo_edges" not in open_dataset(path).attrs  # as in files made before the option
    with pytest.raises(FileExistsError, match="photo_edges"):
        generate(path)


@pytest.mark.parametrize("option, value", [("lighting", "rich"), ("skin", "detailed")])
def test_rich_lighting_and_detailed_skin_change_only_the_image_and_are_recorded(model, tmp_path, reference,
                                                                               option, value):
    plain = make_sample(model, GRID, sample_rng(5, "val", 6))
    changed = make_sample(model, GRID, sample_rng(5, "val", 6), options=ImageOptions(**{option: value}))
    for key in ("volume", "vertices", "pose", "landmarks_3d", "expression"):
        np.testing.assert_array_equal(plain[key], changed[key])
    assert np.abs(plain["image"].astype(int) - changed["image"]).mean() > 0.5
    assert option not in open_dataset(reference).attrs
    assert open_dataset(generate(tmp_path / "changed.h5", **{option: value})).attrs[option] == value


def test_bystanders_stand_behind_the_face_and_change_nothing_else(model, tmp_path):
    plain = make_sample(model, GRID, sample_rng(5, "val", 7))
    crowd = make_sample(model, GRID, sample_rng(5, "val", 7), options=ImageOptions(bystanders=1.0))
    for key in ("volume", "vertices", "pose", "landmarks_3d", "expression"):
        np.testing.assert_array_equal(plain[key], crowd[key])
    face = binary_erosion(rasterise(plain["vertices"].astype(float), model.triangles, GRID.height, GRID.width).mask,
                          iterations=2)  # away from the outline, where blur mixes in the background
    np.testing.assert_array_equal(crowd["image"][face], plain["image"][face])
    assert (np.abs(crowd["image"].astype(int) - plain["image"])[~face].max(-1) > 20).mean() > 0.05  # someone is there
    assert open_dataset(generate(tmp_path / "crowd.h5", bystanders=0.5)).attrs["bystanders"] == 0.5


def test_every_image_option_together_is_seeded_whatever_the_workers_and_resumes_to_the_same_samples(tmp_path,
                                                                                                    monkeypatch):
    everything = dict(occluder_prob=0.5, camera="photographic", heads=True, photo_edges=0.9, lighting="rich",
                      skin="detailed", bystanders=1.0, accessories=1.0)
    assert set(everything) == set(ImageOptions.__dataclass_fields__)  # a new option joins this test
    one = generate(tmp_path / "one.h5", **everything)
    assert generate(tmp_path / "two.h5", workers=2, **everything).read_bytes() == one.read_bytes()
    killed_after_two_samples(tmp_path / "resumed.h5", monkeypatch, **everything)
    assert_same_dataset(generate(tmp_path / "resumed.h5", **everything), one)


def test_the_camera_is_recorded_only_when_photographic_and_a_rerun_with_another_is_refused(tmp_path, reference):
    assert "camera" not in open_dataset(reference).attrs  # basic files stay as they were before the option
    path = generate(tmp_path / "train.h5", camera="photographic", workers=2)
    assert open_dataset(path).attrs["camera"] == "photographic"
    assert generate(tmp_path / "again.h5", camera="photographic").read_bytes() == path.read_bytes()
    with pytest.raises(FileExistsError, match="camera 'photographic' vs None"):
        generate(path)


def test_landmarks_are_the_projected_landmark_vertices(samples, model):
    for sample in samples:
        np.testing.assert_array_equal(sample["landmarks_3d"], sample["vertices"][model.landmark_vertices])
        np.testing.assert_array_equal(sample["landmarks_2d"], sample["landmarks_3d"][:, :2])


def test_landmark_box_is_the_authors_crop(samples):
    size = GRID.crop_size
    for sample in samples:
        lo, hi = sample["landmarks_2d"].min(0), sample["landmarks_2d"].max(0)
        box = np.sqrt(np.prod(hi - lo)) / (LANDMARK_BOX_FRACTION * size)
        assert 0.9 - 1e-4 <= box <= 1.1 + 1e-4
        offset = 0.5 * (lo + hi) - (size - 1) / 2
        assert np.all(np.abs(offset) <= TRANSLATION_JITTER_FRACTION * size + 1e-3)


def test_pose_covers_300w_lp_ranges():
    poses = np.degrees([sample_pose(sample_rng(0, "pose", i)) for i in range(3000)])
    assert np.all(np.abs(poses) <= POSE_LIMITS_DEG)
    assert poses[:, 1].min() < -88 and poses[:, 1].max() > 88
    np.testing.assert_allclose(poses[:, [0, 2]].std(0), PITCH_ROLL_STD_DEG, rtol=0.1)  # truncation barely narrows them
    assert np.abs(poses[:, 0]).max() > 25 and np.abs(poses[:, 2]).max() > 20
    yaw_bins = np.histogram(poses[:, 1], bins=6, range=(-90, 90))[0] / len(poses)
    np.testing.assert_allclose(yaw_bins, 1 / 6, atol=0.03)


def face_mask_and_depth(vertices, triangles):
    """The rendered face mask (no occluders) and front-surface depth, by z-buffering the stored mesh."""
    raster = rasterise(vertices.astype(np.float64), triangles, GRID.height, GRID.width)
    normals = raster.interpolate(vertex_normals(vertices.astype(np.float64), triangles), triangles)
    facing = -normals[..., 2] / np.maximum(np.linalg.norm(normals, axis=-1), 1e-12)
    return raster.mask, raster.depth, facing


def test_volume_columns_match_the_face_mask(samples, model, monkeypatch):
    # Any pose: the face is inside the volume's occupied columns (the filled back may stick out).
    for sample in samples:
        mask = face_mask_and_depth(sample["vertices"], model.triangles)[0]
        columns = unpack_volume(sample["volumes"], GRID.width).any(axis=0)
        assert (mask & columns).sum() / mask.sum() > 0.98
    # Near-frontal: mask and columns agree.
    monkeypatch.setattr(synthetic, "sample_pose", lambda rng: np.radians([3.0, -8.0, 5.0]))
    sample = make_sample(model, GRID, sample_rng(1, "frontal", 0))
    mask = face_mask_and_depth(sample["vertices"], model.triangles)[0]
    columns = sample["volume"].any(axis=0)
    assert (mask & columns).sum() / (mask | columns).sum() > 0.95


def test_volume_front_surface_is_the_mesh_surface(samples, model):
    for sample in samples:
        volume = unpack_volume(sample["volumes"], GRID.width)
        assert not volume[0].any(), "the visible face must never be clipped at the front of the grid"
        mask, depth, facing = face_mask_and_depth(sample["vertices"], model.triangles)
        visible = mask & volume.any(axis=0) & (facing > 0.5)
        front_d = np.argmax(volume, axis=0)
        error_voxels = np.abs(GRID.z_to_d(depth[visible]) - front_d[visible])
        assert np.median(error_voxels) < 0.75
        assert np.mean(error_voxels <= 1.0) > 0.9


def test_workers_give_byte_identical_files(tmp_path, reference):
    parallel = generate(tmp_path / "train.h5", workers=2)
    assert parallel.read_bytes() == reference.read_bytes()


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, reference, monkeypatch):
    path = tmp_path / "train.h5"
    killed_after_two_samples(path, monkeypatch)
    assert not path.exists() and path.with_name("train.h5.partial").exists()
    generate(path)
    assert_same_dataset(path, reference)
    # A finished file is left alone when the arguments match and refused when they differ.
    mtime = path.stat().st_mtime_ns
    generate(path)
    assert path.stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match="seed.*--restart"):
        generate(path, seed=1)
    # A finished file from before the expression fields is refused too.
    with h5py.File(path, "r+") as f:
        del f["expression_label"]
    with pytest.raises(FileExistsError, match="no expression labels.*--restart"):
        generate(path)


def test_paper_grid_sample(tmp_path, model):
    path = generate(tmp_path / "full.h5", grid=PAPER_GRID, num_samples=2, split="full")
    ds, full = read_all(path)
    assert ds.grid == PAPER_GRID and full[0]["volumes"].shape == (200, 192, 24)
    for sample in full:
        lo, hi = sample["landmarks_2d"].min(0), sample["landmarks_2d"].max(0)
        assert 81 <= np.sqrt(np.prod(hi - lo)) <= 99
        volume = unpack_volume(sample["volumes"], 192)
        assert volume.any() and not volume[0].any()


def test_cli_end_to_end(tmp_path):
    command = [sys.executable, "-m", "data_prep.synthetic", "--out", str(tmp_path), "--split", "tiny=2",
               "--grid", "40,32,32", "--seed", "3", "--frontal", "--occluders", "1"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    ds = open_dataset(tmp_path / "tiny.h5", expected_grid=VoxelGrid.parse("40,32,32"))
    assert len(ds) == 2 and ds.has_frontal and ds.attrs["seed"] == 3 and ds.attrs["occluder_prob"] == 1.0
    assert unpack_volume(ds.read(1, ["volumes_frontal"])["volumes_frontal"], 32).any()


@pytest.mark.parametrize("argv, message", [
    (["--split", "train:5"], "NAME=COUNT"),
    (["--split", "train=0"], "NAME=COUNT"),
    (["--split", "a=1", "--split", "a=2"], "distinct"),
    (["--split", "a=1", "--grid", "200,192"], "D,H,W"),
    (["--split", "a=1", "--grid", "200,192,190"], "multiple of 8"),
    (["--split", "a=1", "--face-model", "bfm"], "unknown face model"),
    (["--split", "a=1", "--face-model", "sfm:/no/such/dir"], "/no/such/dir"),
    (["--split", "a=1", "--occluders", "2"], "probability"),
    (["--split", "a=1", "--photo-edges", "-0.1"], "probability"),
    (["--split", "a=1", "--workers", "0"], "--workers"),
])
def test_cli_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_killed_and_resumed_generation_is_byte_identical_to_an_uninterrupted_one(tmp_path):
    """SIGKILL part-way (8 samples flushed and flagged, 2 more written but not flagged), then the same command
    again: the finished file has the same bytes as one made without interruption (docs/failures.md)."""
    argv = ["--split", "tiny=12", "--grid", "16,16,16"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # faces outside the tiny grid
        assert main(["--out", str(tmp_path / "whole"), *argv]) == 0
        killed = tmp_path / "killed"
        run_killed("data_prep.synthetic", ["--out", killed, *argv], index=10)
        with h5py.File(killed / "tiny.h5.partial", "r") as f:
            assert f["written"][()].tolist() == [1] * 8 + [0] * 4
        assert main(["--out", str(killed), *argv]) == 0
    assert (killed / "tiny.h5").read_bytes() == (tmp_path / "whole" / "tiny.h5").read_bytes()
    assert [path.name for path in killed.iterdir()] == ["tiny.h5"]


def test_a_refused_split_is_refused_before_any_split_is_written(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a face outside the tiny grid
        assert main(["--out", str(tmp_path), "--split", "b=1", "--grid", "16,16,16"]) == 0
    before = files_under(tmp_path)
    code, err = run_cli(main, ["--out", str(tmp_path), "--split", "a=1", "--split", "b=1", "--grid", "16,16,16",
                               "--seed", "1"])
    assert code == 1 and len(err) == 1 and "b.h5 exists but was made with other arguments (seed 0 vs 1)" in err[0]
    assert files_under(tmp_path) == before  # no a.h5, no a.h5.partial


def test_a_partial_file_left_beside_its_finished_file_is_removed_by_the_rerun(tmp_path):
    # A kill between the final rename and the partial file's removal left the partial file (as large as the data).
    argv = ["--out", str(tmp_path), "--split", "tiny=2", "--grid", "16,16,16"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # faces outside the tiny grid
        assert main(argv) == 0
    finished = (tmp_path / "tiny.h5").read_bytes()
    (tmp_path / "tiny.h5.partial").write_bytes(finished)
    with pytest.warns(UserWarning, match=r"removed .*tiny.h5.partial: .*tiny.h5 was finished from it"):
        assert main(argv) == 0
    assert [path.name for path in tmp_path.iterdir()] == ["tiny.h5"] and (tmp_path / "tiny.h5").read_bytes() == finished
