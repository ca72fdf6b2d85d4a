"""Basel Face Model readers (data_prep.bfm): five layouts of fake files, the face-region cut, bad files."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import scipy.io

from data_prep.bfm import SIM_FILES, load_bfm, read_bfm
from data_prep.face_model import load_face_model
from lightning_vrn.safe_load import UnsafeFileError
from tests.helpers.fake_bfm import (NUM_EXP, NUM_SHAPE, SIM_EXP, SIM_SHAPE, WRITERS, fake_bfm_content,
                                    write_train_configs)

BASES = {"mean": (0, 0), "train_configs": (SIM_SHAPE, SIM_EXP)}
"""Components of each layout's fake where not the full (NUM_SHAPE, NUM_EXP)."""


@pytest.fixture(scope="module")
def content():
    return fake_bfm_content()


@pytest.mark.parametrize("layout", sorted(set(WRITERS) - {"3ddfa"}))  # the reference, checked against content below
def test_layouts_read_the_same_model(tmp_path, content, layout):
    WRITERS[layout](tmp_path / layout, content)
    model = load_face_model(f"bfm:{tmp_path / layout}")
    reference = load_bfm(_written(tmp_path / "ref", content, "3ddfa"))
    np.testing.assert_allclose(model.mean, reference.mean, rtol=1e-6, atol=1e-2)
    np.testing.assert_array_equal(model.triangles, reference.triangles)
    np.testing.assert_array_equal(model.landmark_vertices, reference.landmark_vertices)
    shape, expression = BASES.get(layout, (NUM_SHAPE, NUM_EXP))
    assert (len(model.identity_basis), len(model.expression_basis)) == (shape, expression)
    np.testing.assert_array_equal(model.identity_basis, reference.identity_basis[:shape])
    np.testing.assert_array_equal(model.expression_basis, reference.expression_basis[:expression])


def _written(folder, content, layout):
    WRITERS[layout](folder, content)
    return folder


def test_model_applies_parameters_unscaled_in_micrometres(tmp_path, content):
    model = load_bfm(_written(tmp_path, content, "3ddfa"))
    assert not model.leading_components  # all 199 and 29 columns: a .mat's parameters must match them exactly
    full = (content["mean_shape"] + content["mean_exp"]).reshape(-1, 3)
    kept = _kept_ids(model, full)
    shape, expression = np.arange(1.0, NUM_SHAPE + 1), np.array([0.5, -1.0, 2.0])
    expected = (full + (content["w"] @ shape).reshape(-1, 3) + (content["w_exp"] @ expression).reshape(-1, 3))[kept]
    np.testing.assert_allclose(model.shape(shape, expression), expected, rtol=1e-5, atol=0.5)


def _kept_ids(model, full_mean):
    """Original vertex id of each model vertex (the cut keeps their order)."""
    lookup = {tuple(np.round(v, 1)): i for i, v in enumerate(full_mean)}
    return np.array([lookup[tuple(np.round(v, 1))] for v in model.mean])


def test_face_region_cuts_neck_and_ear_keeps_face(tmp_path, content):
    model = load_bfm(_written(tmp_path, content, "3ddfa"))
    full = (content["mean_shape"] + content["mean_exp"]).reshape(-1, 3)
    kept = _kept_ids(model, full)
    assert content["neck"] not in kept and content["ear"] not in kept
    assert len(kept) > 0.7 * len(full)
    np.testing.assert_array_equal(kept[model.landmark_vertices], content["keypoints"])
    np.testing.assert_array_equal(model.face_region, np.arange(model.num_vertices))
    a, b, c = (model.mean[model.triangles[:, k]] for k in range(3))
    assert np.cross(b - a, c - a)[:, 2].sum() > 0  # counter-clockwise seen from the front


@pytest.mark.parametrize("triangles_in", ["tri.mat", "Model_Shape_Sim.mat"])
def test_train_configs_layout_reads_the_fake_arrays(tmp_path, content, triangles_in):
    write_train_configs(tmp_path, content, triangles_in)
    raw = read_bfm(tmp_path)
    assert raw.name == "bfm-3ddfa-sim" and triangles_in in raw.source and raw.leading_components
    assert load_bfm(tmp_path).leading_components  # so a .mat's longer parameter vectors are cut to its columns
    np.testing.assert_array_equal(raw.mean, content["mean_shape"] + content["mean_exp"])
    np.testing.assert_array_equal(raw.shape_basis, content["w"][:, :SIM_SHAPE])
    np.testing.assert_array_equal(raw.expression_basis, content["w_exp"][:, :SIM_EXP])
    np.testing.assert_array_equal(raw.triangles, content["tri"])
    np.testing.assert_array_equal(raw.keypoints, content["keypoints"])
    for name in ("w_shp_sim.npy", "u_exp.npy"):  # a file of the folder reads the folder
        np.testing.assert_array_equal(read_bfm(tmp_path / name).shape_basis, raw.shape_basis)


@pytest.mark.parametrize("missing", [*SIM_FILES, "triangles"])
def test_train_configs_missing_file_is_named(tmp_path, content, missing):
    write_train_configs(tmp_path, content)
    (tmp_path / ("tri.mat" if missing == "triangles" else missing)).unlink()
    message = (r"has no triangles: .*put 3DDFA's visualize/tri.mat or .*Model_Shape_Sim.mat" if missing == "triangles"
               else rf"has no {missing}: copy the whole train.configs folder")
    with pytest.raises(FileNotFoundError, match=message):
        load_face_model(f"bfm:{tmp_path}")


def test_shared_mean_bfm_keeps_the_face(shared_data):
    model = load_face_model(f"bfm:{shared_data / 'bfm_meta'}")
    assert model.name == "bfm-mean" and len(model.identity_basis) == 0
    assert 25_000 < model.num_vertices < 45_000  # of 53,215: ears, neck and the back of the jaw cut
    width = np.ptp(model.mean[:, 0])
    assert 130e3 < width < 160e3  # micrometres: the face is about 15 cm wide


@pytest.mark.parametrize("layout, breakage, message", [
    ("3ddfa", "no_w", r"Model_Shape.mat has no 'w'"),
    ("3ddfa", "short_basis", r"w has shape \(\d+, 5\), expected \(\d+, K\)"),
    ("3ddfa", "exp_other_version", r"Model_Exp.mat: mu_exp has \d+ vertices .* different BFM versions"),
    ("3ddfa", "no_exp_file", r"needs Model_Exp.mat beside it"),
    ("3ddfa", "corrupt", r"Model_Shape.mat is not a readable .mat file"),
    ("3ddfa", "keypoints_out_of_range", r"keypoints hold vertex ids .* outside"),
    ("face3d", "not_struct", r"'model' is not a MATLAB struct"),
    ("noneck", "bad_keypoints", r"'keypoints' must be 204 flat xyz indices"),
    ("noneck", "truncated_tri", r"tri.pkl is not a readable pickle .*triangles of bfm_noneck_v3.pkl.*download it"),
    ("mean", "no_u_exp", r"needs u_exp.npy"),
    ("train_configs", "basis_other_version", r"w_shp_sim.npy: the array has shape \(\d+, 3\), expected \(\d+, K\)"),
    ("train_configs", "pickled_array", r"keypoints_sim.npy is not a readable .npy array"),
])
def test_bad_bfm_files_fail_clearly(tmp_path, content, layout, breakage, message):
    folder = _written(tmp_path / "bfm", content, layout)
    if breakage == "no_w":
        data = scipy.io.loadmat(folder / "Model_Shape.mat")
        scipy.io.savemat(folder / "Model_Shape.mat", {k: v for k, v in data.items() if k in ("mu_shape", "tri", "keypoints")})
    elif breakage == "short_basis":
        scipy.io.savemat(folder / "Model_Shape.mat", {**_mat(folder / "Model_Shape.mat"), "w": content["w"][:-3]})
    elif breakage == "exp_other_version":
        scipy.io.savemat(folder / "Model_Exp.mat", {"mu_exp": content["mean_exp"][:-3, None], "w_exp": content["w_exp"][:-3]})
    elif breakage == "no_exp_file":
        (folder / "Model_Exp.mat").unlink()
    elif breakage == "corrupt":
        (folder / "Model_Shape.mat").write_bytes(b"MATLAB 5.0 MAT-file" + bytes(range(256)) * 4)
    elif breakage == "keypoints_out_of_range":
        scipy.io.savemat(folder / "Model_Shape.mat", {**_mat(folder / "Model_Shape.mat"),
                                                      "keypoints": np.full((1, 68), 10**6)})
    elif breakage == "not_struct":
        scipy.io.savemat(folder / "BFM.mat", {"model": np.zeros((3, 3))})
    elif breakage == "bad_keypoints":
        data = pickle.loads((folder / "bfm_noneck_v3.pkl").read_bytes())
        (folder / "bfm_noneck_v3.pkl").write_bytes(pickle.dumps({**data, "keypoints": np.arange(68)}))
    elif breakage == "truncated_tri":
        (folder / "tri.pkl").write_bytes(pickle.dumps(content["tri"].T)[:40])
    elif breakage == "no_u_exp":
        (folder / "u_exp.npy").unlink()
    elif breakage == "basis_other_version":
        np.save(folder / "w_shp_sim.npy", content["w"][:-3, :SIM_SHAPE])
    elif breakage == "pickled_array":
        np.save(folder / "keypoints_sim.npy", np.array([{"keypoints": 1}], dtype=object), allow_pickle=True)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_face_model(f"bfm:{folder}")


def _mat(path):
    return {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}


def test_unsafe_pickle_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this would run",))

    (tmp_path / "bfm_noneck_v3.pkl").write_bytes(pickle.dumps({"u": Payload()}))
    with pytest.raises(UnsafeFileError, match="could run code"):
        load_face_model(f"bfm:{tmp_path}")


def test_bfm_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="needs a file or folder"):
        load_face_model("bfm:")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_face_model(f"bfm:{tmp_path / 'missing'}")
    with pytest.raises(FileNotFoundError, match="no BFM files in folder"):
        load_face_model(f"bfm:{tmp_path}")
