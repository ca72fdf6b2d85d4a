"""300W-LP / AFLW2000-3D conversion (data_prep.mat_faces, aflw2000, w300lp) on fake and real files; resumes and
refusals; what every dataset command does with an output path that is not a dataset file."""

from __future__ import annotations

import csv
import shutil
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
from scipy import ndimage
from PIL import Image

from data_prep import aflw2000, bu4dfe, florence, mat_faces, synthetic, w300lp
from data_prep.bfm import load_bfm
from data_prep.mat_faces import (Conversion, SampleSkipped, check_conversion, convert, image_vertices,
                                 parameters_for_model, read_mat)
from lightning_vrn.dataset_file import open_dataset, unpack_volume
from lightning_vrn.geometry.crop import LANDMARK_BOX_FRACTION, CropTransform
from lightning_vrn.geometry.grid import VoxelGrid
from lightning_vrn.landmark_scheme import FLIP
from tests.helpers.cli import run_cli, run_killed
from tests.helpers.fake_bfm import (SIM_EXP, SIM_SHAPE, fake_bfm_content, write_3ddfa, write_mean_only,
                                    write_train_configs)
from tests.helpers.fake_mat_faces import IMAGE_SIZE, readme_vertices, write_fake_sample
from tests.helpers.files import files_under

GRID = "100,96,96"
SMALL_GRID = "32,32,32"
"""For the tests of resumes, reruns and refusals: the grid does not matter to them."""
MEAN_FACE_COVERAGE = {"tolerance_px": 0.05 * 96, "min_inside": 0.7}
"""The mean face (no bases) covers real landmarks only roughly: on the 16 real samples at 96 px every
landmark lies within 4.1 px of the silhouette and at least 73% on it (identity and expression would add the rest)."""
ALL_FIELDS = ["images", "volumes", "volumes_frontal", "landmarks_2d", "landmarks_3d", "pose", "vertices"]


# --- broken fake samples (good ones: tests/helpers/fake_mat_faces.py) -----------------------------

BREAKAGES = ("missing_field", "not_finite", "unreadable_mat", "missing_image", "unreadable_image", "mesh_off_crop",
             "bad_shape")


def break_sample(folder, name, breakage):
    """Damage sample ``name`` so that it is skipped for ``breakage`` (a reason of mat_faces.SKIP_REASONS)."""
    mat = folder / f"{name}.mat"
    fields = {k: v for k, v in scipy.io.loadmat(mat).items() if not k.startswith("__")}
    if breakage == "missing_field":
        del fields["Exp_Para"]
    elif breakage == "not_finite":
        fields["Shape_Para"][2] = np.nan
    elif breakage == "bad_shape":
        fields["Pose_Para"] = fields["Pose_Para"][:, :6]
    elif breakage == "mesh_off_crop":
        landmark_field = "pt3d_68" if "pt3d_68" in fields else "pt2d"
        fields[landmark_field][0] += 150.0  # annotation and parameters disagree by 150 px
    if breakage == "unreadable_mat":
        mat.write_bytes(mat.read_bytes()[:100])
    elif breakage == "missing_image":
        (folder / f"{name}.jpg").unlink()
    elif breakage == "unreadable_image":
        image = folder / f"{name}.jpg"
        image.write_bytes(image.read_bytes()[:300])
    else:
        scipy.io.savemat(mat, fields)


@pytest.fixture(scope="module")
def content():
    return fake_bfm_content(seed=1)


@pytest.fixture(scope="module")
def fake_bfm(tmp_path_factory, content):
    folder = tmp_path_factory.mktemp("bfm")
    write_3ddfa(folder, content)
    return folder


@pytest.fixture(scope="module")
def fake_aflw(tmp_path_factory, content):
    """8 good AFLW2000-3D-layout samples and one broken per :data:`BREAKAGES`."""
    folder = tmp_path_factory.mktemp("aflw")
    rng = np.random.default_rng(3)
    for i in range(8 + len(BREAKAGES)):
        write_fake_sample(folder, f"image{i:05d}", content, rng)
    for i, breakage in enumerate(BREAKAGES):
        break_sample(folder, f"image{8 + i:05d}", breakage)
    return folder


# --- the conventions --------------------------------------------------------------------------------

def test_image_vertices_follow_the_readme_formula(tmp_path, content, fake_bfm):
    write_fake_sample(tmp_path, "image00001", content, np.random.default_rng(0))
    params = read_mat(tmp_path / "image00001.mat", "pt3d_68")
    model = load_bfm(fake_bfm)
    data = scipy.io.loadmat(tmp_path / "image00001.mat")
    expected = readme_vertices(content, data["Shape_Para"].ravel(), data["Exp_Para"].ravel(),
                               data["Pose_Para"].ravel().astype(np.float64)).T
    expected = (expected - [1.0, 1.0, 0.0]) * [1.0, 1.0, -1.0]  # 0-based pixel centres, z away from the camera
    ids = model.landmark_vertices
    np.testing.assert_allclose(image_vertices(model, params, IMAGE_SIZE, False, ids), expected[content["keypoints"]],
                               atol=1e-3)
    np.testing.assert_allclose(params.landmarks, expected[content["keypoints"]], atol=1e-3)


# --- AFLW2000-3D ------------------------------------------------------------------------------------

def test_aflw2000_converts_good_samples_and_reports_broken(tmp_path, fake_aflw, fake_bfm, capsys):
    out = tmp_path / "aflw.h5"
    assert aflw2000.main(["--root", str(fake_aflw), "--bfm", str(fake_bfm), "--out", str(out), "--grid", GRID]) == 0
    assert "skipped 7 of 15" in capsys.readouterr().err
    with open(tmp_path / "aflw.skipped.csv") as handle:
        report = {row["source"]: row["reason"] for row in csv.DictReader(handle)}
    assert report == {f"image{8 + i:05d}": reason for i, reason in enumerate(BREAKAGES)}
    assert (tmp_path / "aflw.sources.txt").read_text().split() == [f"image{i:05d}" for i in range(8)]
    dataset = open_dataset(out)
    assert dataset.num_samples == 8 and dataset.has_frontal and dataset.attrs["num_skipped"] == 7
    assert dataset.attrs["source"] == "AFLW2000-3D" and dataset.attrs["face_model"] == "bfm-3ddfa"
    assert dataset.attrs["ground_truth"] == "all 5 Shape_Para and 3 Exp_Para on the bfm-3ddfa bases"
    grid = dataset.grid
    for i in range(8):
        sample = dataset.read(i, ALL_FIELDS)
        landmarks = sample["landmarks_3d"]
        # the fake landmarks are the keypoint vertices: the mesh and the annotation agree exactly
        np.testing.assert_allclose(sample["vertices"][dataset.landmark_vertices], landmarks, atol=1e-3)
        np.testing.assert_array_equal(sample["landmarks_2d"], landmarks[:, :2])
        box = landmarks[:, :2].max(axis=0) - landmarks[:, :2].min(axis=0)
        assert np.sqrt(box.prod()) == pytest.approx(LANDMARK_BOX_FRACTION * grid.crop_size, rel=1e-4)
        _assert_volume_covers(unpack_volume(sample["volumes"], grid.width), landmarks, grid)
        assert sample["images"].std() > 10  # the photo was resampled into the crop


def _assert_volume_covers(volume, landmarks, grid, tolerance_px=1.5, min_inside=0.9):
    """Every landmark's (x, y) lies within ``tolerance_px`` of the volume's silhouette in the crop, and at
    least ``min_inside`` of them on it."""
    silhouette = volume.any(axis=0)
    distance = ndimage.distance_transform_edt(~silhouette)
    x, y = np.clip(np.round(landmarks[:, :2]).astype(int), 0, grid.crop_size - 1).T
    assert distance[y, x].max() <= tolerance_px, f"landmarks {np.flatnonzero(distance[y, x] > tolerance_px)} uncovered"
    assert np.mean(distance[y, x] == 0) >= min_inside


def test_aflw2000_resumes_after_a_kill(tmp_path, fake_aflw, fake_bfm, monkeypatch):
    fresh = tmp_path / "fresh.h5"
    aflw2000.main(["--root", str(fake_aflw), "--bfm", str(fake_bfm), "--out", str(fresh), "--grid", GRID])
    resumed = tmp_path / "resumed.h5"
    real_make = mat_faces.make_sample
    made = []

    def killed_after_five(*args, **kwargs):
        if len(made) == 5:
            raise KeyboardInterrupt
        made.append(1)
        return real_make(*args, **kwargs)

    monkeypatch.setattr(mat_faces, "make_sample", killed_after_five)
    with pytest.raises(KeyboardInterrupt):
        aflw2000.main(["--root", str(fake_aflw), "--bfm", str(fake_bfm), "--out", str(resumed), "--grid", GRID])
    partial = resumed.with_name("resumed.h5.partial")
    assert not resumed.exists() and partial.exists()
    with h5py.File(partial, "r") as f:
        written_before = int(f["written"][()].sum())
    assert 0 < written_before < 8
    made.clear()
    monkeypatch.setattr(mat_faces, "make_sample", lambda *a, **k: (made.append(1), real_make(*a, **k))[1])
    aflw2000.main(["--root", str(fake_aflw), "--bfm", str(fake_bfm), "--out", str(resumed), "--grid", GRID])
    assert len(made) == 8 - written_before  # only the samples the killed run had not written
    a, b = open_dataset(fresh), open_dataset(resumed)
    for i in range(a.num_samples):
        for field, value in a.read(i, ALL_FIELDS).items():
            np.testing.assert_array_equal(value, b.read(i, [field])[field])


@pytest.mark.filterwarnings("ignore:.*reach outside grid:UserWarning")  # at SMALL_GRID
def test_a_killed_and_resumed_conversion_is_byte_identical_to_an_uninterrupted_one(tmp_path, fake_aflw, fake_bfm):
    """SIGKILL part-way (4 samples flushed and flagged, 2 more written but not flagged), then the same command
    again: the file, its skip report and its source list have the bytes of an uninterrupted conversion's."""
    args = ["--root", str(fake_aflw), "--bfm", str(fake_bfm), "--grid", SMALL_GRID]
    assert aflw2000.main([*args, "--out", str(tmp_path / "whole" / "aflw.h5")]) == 0
    killed = tmp_path / "killed" / "aflw.h5"
    run_killed("data_prep.aflw2000", [*args, "--out", killed], index=6)
    with h5py.File(killed.with_name("aflw.h5.partial"), "r") as f:
        assert f["written"][()].tolist() == [1] * 4 + [0] * 4
    assert aflw2000.main([*args, "--out", str(killed)]) == 0
    assert files_under(killed.parent) == files_under(tmp_path / "whole")  # and nothing else left beside them


@pytest.fixture(scope="module")
def finished_aflw(tmp_path_factory, fake_aflw, fake_bfm) -> Path:
    """``aflw.h5`` converted from :func:`fake_aflw`, beside its skip report and source list."""
    out = tmp_path_factory.mktemp("finished") / "aflw.h5"
    assert aflw2000.main(["--root", str(fake_aflw), "--bfm", str(fake_bfm), "--out", str(out), "--grid",
                          SMALL_GRID]) == 0
    return out


@pytest.mark.filterwarnings("ignore:.*reach outside grid:UserWarning")  # at SMALL_GRID
@pytest.mark.parametrize("refusal, expected", [
    ("other sources", "exists but was made from other sources or with other arguments (8 samples vs 7; sources_sha"),
    ("other grid", "exists but was made from other sources or with other arguments (grid 32x32x32"),
    ("no source converts", "no sample of 7 can be converted"),
])
def test_a_refused_conversion_changes_nothing(tmp_path, fake_aflw, fake_bfm, finished_aflw, refusal, expected):
    root, grid = tmp_path / "root", "40,32,32" if refusal == "other grid" else SMALL_GRID
    root.mkdir()
    numbers = {"other sources": range(1, 8), "other grid": range(15), "no source converts": range(8, 15)}[refusal]
    for path in fake_aflw.iterdir():  # 0-7 are good, 8-14 broken
        if int(path.stem.removeprefix("image")) in numbers:
            (root / path.name).symlink_to(path)
    before = files_under(finished_aflw.parent)
    code, err = run_cli(aflw2000.main, ["--root", str(root), "--bfm", str(fake_bfm), "--out", str(finished_aflw),
                                        "--grid", grid])
    assert code == 1 and expected in err[-1], err
    assert files_under(finished_aflw.parent) == before  # the .h5, .skipped.csv and .sources.txt


def test_mean_only_bfm_needs_the_flag(tmp_path, fake_aflw, content):
    write_mean_only(tmp_path / "mean", content)
    args = ["--root", str(fake_aflw), "--bfm", str(tmp_path / "mean"), "--out", str(tmp_path / "a.h5"), "--grid", GRID]
    with pytest.raises(ValueError, match="no shape or expression bases .* pass --mean-only"):
        aflw2000.main(args)
    assert aflw2000.main([*args, "--mean-only"]) == 0
    assert open_dataset(tmp_path / "a.h5").attrs["ground_truth"] == ("mean face of bfm-mean at the fitted pose "
                                                                      "(Shape_Para and Exp_Para ignored)")


def test_train_configs_bfm_applies_the_leading_parameters(tmp_path, content, fake_aflw):
    """3DDFA's train.configs (fake: the first 3 + 2 of 5 + 3 components) takes the first Shape_Para / Exp_Para."""
    write_train_configs(tmp_path / "bfm", content)
    model = load_bfm(tmp_path / "bfm")
    write_fake_sample(tmp_path, "image00001", content, np.random.default_rng(0))
    params = parameters_for_model(model, read_mat(tmp_path / "image00001.mat", "pt3d_68"), False)
    data = scipy.io.loadmat(tmp_path / "image00001.mat")
    shape, expression = data["Shape_Para"].ravel()[:SIM_SHAPE], data["Exp_Para"].ravel()[:SIM_EXP]
    np.testing.assert_array_equal(params.shape, shape)
    np.testing.assert_array_equal(params.expression, expression)
    leading = {**content, "w": content["w"][:, :SIM_SHAPE], "w_exp": content["w_exp"][:, :SIM_EXP]}
    expected = readme_vertices(leading, shape, expression, data["Pose_Para"].ravel().astype(np.float64)).T
    expected = (expected - [1.0, 1.0, 0.0]) * [1.0, 1.0, -1.0]
    np.testing.assert_allclose(image_vertices(model, params, IMAGE_SIZE, False, model.landmark_vertices),
                               expected[content["keypoints"]], atol=1e-3)
    short = replace(params, shape=params.shape[:SIM_SHAPE - 1])
    with pytest.raises(SampleSkipped, match=r"Shape_Para has 2 values, the BFM 'bfm-3ddfa-sim' uses the first 3"):
        parameters_for_model(model, short, False)
    checked = check_conversion(Conversion(sources=aflw2000.aflw2000_sources(fake_aflw),
                                          model_spec=f"bfm:{tmp_path / 'bfm'}", grid=VoxelGrid.parse(SMALL_GRID),
                                          landmark_field="pt3d_68", mean_only=False, attrs={}),
                               tmp_path / "a.h5", progress=False)
    assert len(checked.kept) == 8 and checked.attrs["face_model"] == "bfm-3ddfa-sim"
    assert checked.attrs["ground_truth"] == "first 3 Shape_Para and first 2 Exp_Para on the bfm-3ddfa-sim bases"


def test_bfm_with_other_component_counts_is_a_clear_error(tmp_path, fake_aflw, content):
    write_3ddfa(tmp_path / "bfm", {**content, "w": content["w"][:, :4]})
    with pytest.raises(ValueError, match=r"no sample of 15 .*Shape_Para has 5 values, the BFM 'bfm-3ddfa' has 4 comp"):
        aflw2000.main(["--root", str(fake_aflw), "--bfm", str(tmp_path / "bfm"), "--out", str(tmp_path / "a.h5"),
                       "--grid", GRID])


# --- 300W-LP ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fake_300wlp(tmp_path_factory, content):
    """Four subjects (one per part; LFPW names have no face number) with two views each, plus folders the reader
    must ignore."""
    root = tmp_path_factory.mktemp("300wlp")
    rng = np.random.default_rng(5)
    for folder, stem in (("AFW", "AFW_134212_1"), ("HELEN", "HELEN_232194_1"), ("IBUG", "IBUG_image_008_1"),
                         ("LFPW", "LFPW_image_train_0645")):
        for view in range(2):
            write_fake_sample(root / folder, f"{stem}_{view}", content, rng, "pt2d", yaw_deg=-40 + 50 * view)
    write_fake_sample(root / "AFW_Flip", "AFW_134212_1_0", content, rng, "pt2d")
    write_fake_sample(root / "landmarks" / "AFW", "AFW_134212_1_0", content, rng, "pt2d")
    return root


SUBJECTS_300WLP = {
    # the four parts of 300W-LP: NAME_<face>_<view>, except LFPW (one number: the view)
    "AFW_134212_1_0": "AFW_134212", "AFW_134212_1_17": "AFW_134212", "AFW_134212_2_3": "AFW_134212",
    "AFW_1051618982_1_5": "AFW_1051618982",
    "HELEN_1000459319_1_0": "HELEN_1000459319", "HELEN_1000459319_1_9": "HELEN_1000459319",
    "HELEN_232194_1_2": "HELEN_232194",
    "IBUG_image_008_1_0": "IBUG_image_008", "IBUG_image_008_1_4": "IBUG_image_008",
    "IBUG_image_092_2_1": "IBUG_image_092",
    "LFPW_image_train_0645_1": "LFPW_image_train_0645", "LFPW_image_train_0645_0": "LFPW_image_train_0645",
    "LFPW_image_train_0646_3": "LFPW_image_train_0646",
    "LFPW_image_test_0001_0": "LFPW_image_test_0001", "LFPW_image_test_0001_7": "LFPW_image_test_0001",
    # a prefix before the part's name stays (the shared sample's name)
    "300WLP_IBUG_image_008_1_0": "300WLP_IBUG_image_008",
    # no known part: without a trailing _N_M, else the whole name
    "someset_12_1_0": "someset_12", "someset_3": "someset_3", "plain": "plain",
}


def test_300wlp_subjects_of_every_part():
    for name, subject in SUBJECTS_300WLP.items():
        assert w300lp.subject_of(name) == subject, name
    sources = tuple(mat_faces.Source(Path(f"/nowhere/{name}.mat"), None) for name in SUBJECTS_300WLP)
    for fraction in (0.2, 0.5, 0.8):
        splits = w300lp.split_sources(sources, fraction)
        subjects = {part: {SUBJECTS_300WLP[s.mat_path.stem] for s in splits[part]} for part in splits}
        assert not subjects["train"] & subjects["val"], fraction
        assert sum(len(part) for part in splits.values()) == len(SUBJECTS_300WLP)


def test_300wlp_sources_skip_flip_folders_and_split_by_subject(fake_300wlp):
    sources = w300lp.w300lp_sources(fake_300wlp, flip=False)
    assert [s.mat_path.parent.name for s in sources] == ["AFW"] * 2 + ["HELEN"] * 2 + ["IBUG"] * 2 + ["LFPW"] * 2
    assert [w300lp.subject_of(s.mat_path.stem) for s in sources[::2]] == [
        "AFW_134212", "HELEN_232194", "IBUG_image_008", "LFPW_image_train_0645"]
    for fraction in (0.3, 0.5, 0.7):
        splits = w300lp.split_sources(sources, fraction)
        subjects = {name: {w300lp.subject_of(s.mat_path.stem) for s in part} for name, part in splits.items()}
        assert not subjects["train"] & subjects["val"]
        assert sum(len(part) for part in splits.values()) == 8
    hashed = [w300lp.is_validation(f"subject{i}", 0.2) for i in range(2000)]
    assert 0.17 < np.mean(hashed) < 0.23


def test_a_mirrored_source_shares_its_originals_check_and_each_file_is_read_once(tmp_path, fake_300wlp, fake_bfm,
                                                                                  monkeypatch):
    root = tmp_path / "300wlp"
    shutil.copytree(fake_300wlp, root)
    sources = w300lp.w300lp_sources(root, flip=True)
    sources[0].mat_path.write_bytes(sources[0].mat_path.read_bytes()[:100])  # a truncated .mat
    checked = []
    inspect = mat_faces.inspect_source
    monkeypatch.setattr(mat_faces, "inspect_source", lambda model, source, *a: (checked.append(source),
                                                                                inspect(model, source, *a))[1])
    conversion = Conversion(sources=tuple(sources), model_spec=f"bfm:{fake_bfm}", grid=VoxelGrid.parse(GRID),
                            landmark_field="pt2d", mean_only=False, attrs={})
    outcomes = mat_faces.check_sources(conversion, workers=1, progress=False, desc="test")
    assert [s.flip for s in sources[:2]] == [False, True] and sources[1].mat_path == sources[0].mat_path
    assert outcomes[0][0] and outcomes[1] == outcomes[0]  # the damaged original and its mirror: one reason
    assert all(reason == "" for reason, _ in outcomes[2:])
    assert sorted(s.name for s in checked) == sorted(s.name for s in sources if not s.flip)  # once per file


def test_300wlp_flip_adds_exact_mirrors(tmp_path, fake_300wlp, fake_bfm):
    out = tmp_path / "out"
    assert w300lp.main(["--root", str(fake_300wlp), "--bfm", str(fake_bfm), "--out", str(out), "--grid", GRID,
                        "--flip", "--val-fraction", "0"]) == 0
    assert not (out / "val.h5").exists()
    dataset = open_dataset(out / "train.h5")
    assert dataset.num_samples == 16 and dataset.attrs["source"] == "300W-LP"
    assert (out / "train.sources.txt").read_text().split()[:2] == ["AFW_134212_1_0", "AFW_134212_1_0#flip"]
    last = dataset.grid.crop_size - 1
    for i in range(0, 16, 2):
        original, mirrored = dataset.read(i, ALL_FIELDS), dataset.read(i + 1, ALL_FIELDS)
        np.testing.assert_array_equal(mirrored["images"], original["images"][:, ::-1])
        width = dataset.grid.width
        for key in ("volumes", "volumes_frontal"):
            np.testing.assert_array_equal(unpack_volume(mirrored[key], width),
                                          unpack_volume(original[key], width)[..., ::-1])
        # the mesh: x -> S - 1 - x, y and z kept, vertex order kept (the shared triangles stay valid)
        assert mirrored["vertices"].shape == original["vertices"].shape
        np.testing.assert_allclose(mirrored["vertices"][:, 0], last - original["vertices"][:, 0], atol=1e-4)
        np.testing.assert_array_equal(mirrored["vertices"][:, 1:], original["vertices"][:, 1:])
        for key in ("landmarks_2d", "landmarks_3d"):
            expected = original[key][FLIP].copy()
            expected[:, 0] = last - expected[:, 0]
            np.testing.assert_allclose(mirrored[key], expected, atol=1e-4)
        np.testing.assert_allclose(mirrored["pose"], original["pose"] * [1, -1, -1], atol=1e-5)
        # 300W-LP's 3D landmarks are the keypoint vertices; its 2D ones the annotation (equal in these fakes)
        np.testing.assert_allclose(original["landmarks_3d"][:, :2], original["landmarks_2d"], atol=1e-3)


@pytest.mark.filterwarnings("ignore:.*reach outside grid:UserWarning")  # at SMALL_GRID
def test_300wlp_refuses_a_split_before_it_writes_any(tmp_path, fake_300wlp, fake_bfm):
    out = tmp_path / "out"
    args = ["--root", str(fake_300wlp), "--bfm", str(fake_bfm), "--out", str(out), "--grid", SMALL_GRID,
            "--val-fraction", "0.7"]
    assert w300lp.main(args) == 0 and open_dataset(out / "val.h5").num_samples == 2
    for name in ("train.h5", "train.skipped.csv", "train.sources.txt"):
        (out / name).unlink()
    before = files_under(out)
    code, err = run_cli(w300lp.main, [*args, "--flip"])  # val.h5 was made without mirrored copies
    assert code == 1 and f"{out / 'val.h5'} exists but was made from other sources" in err[-1], err
    assert files_under(out) == before  # train.h5 not written either


# --- the real files in ../shared/data ---------------------------------------------------------------

@pytest.fixture(scope="module")
def mean_bfm(shared_data):
    return load_bfm(shared_data / "bfm_meta")


def test_real_aflw2000_keypoints_land_on_pt3d_68(shared_data, mean_bfm):
    mats = sorted((shared_data / "aflw2000_samples").glob("*.mat"))
    assert len(mats) == 16
    for mat in mats:
        params = read_mat(mat, "pt3d_68")
        height = Image.open(mat.with_suffix(".jpg")).size[1]
        keypoints = image_vertices(mean_bfm, params, height, True, mean_bfm.landmark_vertices)
        error = np.linalg.norm(keypoints[:, :2] - params.landmarks[:, :2], axis=1).mean()
        assert error < 8.0, f"{mat.name}: mean keypoint error {error:.1f} px (a wrong convention is tens of px off)"


def test_real_aflw2000_samples_convert_and_cover_landmarks(tmp_path, shared_data):
    out = tmp_path / "aflw.h5"
    assert aflw2000.main(["--root", str(shared_data / "aflw2000_samples"), "--bfm", str(shared_data / "bfm_meta"),
                          "--out", str(out), "--grid", GRID, "--mean-only"]) == 0
    dataset = open_dataset(out)
    assert dataset.num_samples == 16 and dataset.attrs["num_skipped"] == 0
    for i in range(16):
        sample = dataset.read(i, ["volumes", "landmarks_3d"])
        _assert_volume_covers(unpack_volume(sample["volumes"], dataset.grid.width), sample["landmarks_3d"],
                              dataset.grid, **MEAN_FACE_COVERAGE)


def test_real_300wlp_sample_converts(tmp_path, shared_data):
    root = tmp_path / "300W_LP" / "IBUG"
    root.mkdir(parents=True)
    for path in (shared_data / "300wlp_sample").iterdir():
        (root / path.name).symlink_to(path)
    out = tmp_path / "out"
    assert w300lp.main(["--root", str(root.parent), "--bfm", str(shared_data / "bfm_meta"), "--out", str(out),
                        "--grid", GRID, "--mean-only", "--flip", "--val-fraction", "0"]) == 0
    dataset = open_dataset(out / "train.h5")
    assert dataset.num_samples == 2
    original, mirrored = dataset.read(0, ["pose", "volumes"]), dataset.read(1, ["pose"])
    assert np.degrees(original["pose"][1]) == pytest.approx(-44.0, abs=0.1)
    assert mirrored["pose"][1] == pytest.approx(-original["pose"][1], abs=1e-5)
    assert unpack_volume(original["volumes"], dataset.grid.width).mean() > 0.05
    # each volume covers the annotated landmarks (pt2d) and the model's keypoints in the crop (the mirrored copy
    # too), as for AFLW2000-3D
    for i in range(2):
        sample = dataset.read(i, ["volumes", "landmarks_2d", "landmarks_3d"])
        for key in ("landmarks_2d", "landmarks_3d"):
            _assert_volume_covers(unpack_volume(sample["volumes"], dataset.grid.width), sample[key], dataset.grid,
                                  **MEAN_FACE_COVERAGE)


# --- a folder at the full set's size: real samples, generated ones, broken ones ----------------------

def build_aflw_folder(shared_data, folder, num_pairs: int, break_every: int, seed: int = 0) -> dict[str, str]:
    """``num_pairs`` AFLW2000-3D-layout pairs: the 16 real ones, then copies of them with moved poses; every
    ``break_every``-th generated pair broken (cycling through :data:`BREAKAGES`). Returns ``{name: reason}``
    of the broken ones."""
    rng = np.random.default_rng(seed)
    real = sorted((shared_data / "aflw2000_samples").glob("*.mat"))
    folder.mkdir(parents=True, exist_ok=True)
    for mat in real:
        shutil.copy(mat, folder / mat.name)
        (folder / mat.with_suffix(".jpg").name).symlink_to(mat.with_suffix(".jpg"))
    broken = {}
    for index in range(len(real), num_pairs):
        template = real[index % len(real)]
        name = f"image{10000 + index:05d}"
        fields = {k: v for k, v in scipy.io.loadmat(template).items() if not k.startswith("__")}
        shift = rng.uniform(-20, 20, size=2)
        fields["Pose_Para"][0, 3] += shift[0]
        fields["Pose_Para"][0, 4] += shift[1]
        fields["pt3d_68"][0] += shift[0]
        fields["pt3d_68"][1] -= shift[1]  # y is flipped in the image
        scipy.io.savemat(folder / f"{name}.mat", fields)
        shutil.copy(template.with_suffix(".jpg"), folder / f"{name}.jpg")
        if (index - len(real)) % break_every == 0:
            breakage = BREAKAGES[len(broken) % len(BREAKAGES)]
            break_sample(folder, name, breakage)
            broken[name] = breakage
    return broken


def _convert_full_folder(tmp_path, shared_data, num_pairs, break_every):
    folder = tmp_path / "AFLW2000"
    broken = build_aflw_folder(shared_data, folder, num_pairs, break_every)
    assert set(broken.values()) == set(BREAKAGES)
    conversion = Conversion(sources=aflw2000.aflw2000_sources(folder), model_spec=f"bfm:{shared_data / 'bfm_meta'}",
                            grid=VoxelGrid.parse(GRID), landmark_field="pt3d_68", mean_only=True,
                            attrs={"source": "AFLW2000-3D", "created_by": "test"})
    path, skipped = convert(conversion, tmp_path / "aflw.h5", workers=2, progress=False)
    with open(tmp_path / "aflw.skipped.csv") as handle:
        report = {row["source"]: row["reason"] for row in csv.DictReader(handle)}
    assert report == broken and skipped == len(broken)
    dataset = open_dataset(path)
    assert dataset.num_samples == num_pairs - len(broken)
    sample = dataset.read(dataset.num_samples - 1, ["volumes", "landmarks_3d"])
    _assert_volume_covers(unpack_volume(sample["volumes"], dataset.grid.width), sample["landmarks_3d"], dataset.grid,
                          **MEAN_FACE_COVERAGE)


def test_full_size_folder_fast_version(tmp_path, shared_data):
    _convert_full_folder(tmp_path, shared_data, 40, break_every=3)


@pytest.mark.slow
def test_full_size_folder_of_2000_pairs(tmp_path, shared_data):
    _convert_full_folder(tmp_path, shared_data, 2000, break_every=25)


# --- every dataset command: an output path that is not a dataset file ----------------------------

NOT_DATASET_FILES = ("text file", "folder", "foreign HDF5", "text file, --restart", "a file where a folder goes")


def put_not_a_dataset_file(path: Path, kind: str) -> None:
    """Put at ``path`` something that is not a dataset file (a kind of :data:`NOT_DATASET_FILES`)."""
    if kind == "folder":
        path.mkdir()
    elif kind == "foreign HDF5":
        with h5py.File(path, "w") as f:
            f["weights"] = [1.0, 2.0]
    else:
        path.write_text("not a dataset\n")


def output_command(command: str, tmp_path: Path, fake_aflw: Path, fake_300wlp: Path, fake_bfm: Path):
    """``(main, argv without --out, the dataset file name if --out is its folder)`` of a dataset command whose
    inputs are fine (the scan files exist, empty: the output is checked before they are read)."""
    scans = {"florence": "subject_01/Model/frontal1/obj/scan.obj", "bu4dfe": "F001/Happy/000.wrl"}
    if command in scans:
        (tmp_path / "scans" / scans[command]).parent.mkdir(parents=True)
        (tmp_path / "scans" / scans[command]).touch()
        (tmp_path / "landmarks").mkdir()
        main = {"florence": florence.main, "bu4dfe": bu4dfe.main}[command]
        return main, ["--root", str(tmp_path / "scans"), "--landmarks", str(tmp_path / "landmarks")], None
    return {"synthetic": (synthetic.main, ["--split", "test=1"], "test.h5"),
            "aflw2000": (aflw2000.main, ["--root", str(fake_aflw), "--bfm", str(fake_bfm)], None),
            "w300lp": (w300lp.main, ["--root", str(fake_300wlp), "--bfm", str(fake_bfm), "--val-fraction", "0"],
                       "train.h5")}[command]


@pytest.mark.parametrize("kind", NOT_DATASET_FILES)
@pytest.mark.parametrize("command", ["synthetic", "aflw2000", "w300lp", "florence", "bu4dfe"])
def test_an_output_that_is_not_a_dataset_file_is_refused_in_one_line(tmp_path, fake_aflw, fake_300wlp, fake_bfm,
                                                                      command, kind):
    main, argv, file_name = output_command(command, tmp_path, fake_aflw, fake_300wlp, fake_bfm)
    work = tmp_path / "work"
    work.mkdir()
    if kind == "a file where a folder goes":
        blocker = work / "notes"
        put_not_a_dataset_file(blocker, kind)
        out = blocker if file_name else blocker / "test.h5"
        expected = (f"--out {out} is a file, not a folder; delete it or choose another --out" if file_name
                    else f"--out {out}: {blocker} is a file, not a folder; choose another --out")
    else:
        if file_name:  # --out is the folder of file_name
            out = work / "out"
            out.mkdir()
            path, name, folder_fix = out / file_name, str(out / file_name), "delete it or choose another --out"
        else:
            out = path = work / "test.h5"
            name, folder_fix = f"--out {path}", f"give --out the path of a .h5 file (e.g. {path / 'test.h5'})"
        put_not_a_dataset_file(path, kind.removesuffix(", --restart"))
        expected = {"folder": f"{name} is a folder, not a dataset file; {folder_fix}",
                    "foreign HDF5": f"{path} exists but is not a dataset file this code reads (schema_version is None, "
                                    f"this code reads versions 1, 2, 3); pass --restart to replace it, or choose "
                                    f"another --out"}.get(
            kind, f"{name} is a file that is not HDF5, not a dataset file; delete it or choose another --out")
    before = files_under(work)
    code, err = run_cli(main, [*argv, "--out", str(out), "--grid", SMALL_GRID, *["--restart"] * ("--restart" in kind)])
    assert code == 1 and len(err) == 1 and err[0].startswith(f"error: {expected} [--debug"), err
    assert files_under(work) == before
