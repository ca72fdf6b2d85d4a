"""Fake Basel Face Model files: a small BFM-like model built on the built-in face (plus a neck and an ear vertex
that the face-region cut removes), written in the five layouts that data_prep.bfm reads."""

from __future__ import annotations

import pickle

import numpy as np
import scipy.io

from data_prep.face_model import load_face_model

MICROMETRES_PER_MM = 1000.0
NUM_SHAPE, NUM_EXP = 5, 3
SIM_SHAPE, SIM_EXP = 3, 2
"""Components of the fake train.configs layout: the leading columns of the fake's 5 + 3 (the real one: 40 of 199,
10 of 29)."""


def fake_bfm_content(seed: int = 0) -> dict[str, np.ndarray]:
    """A small BFM-like model in micrometres: the built-in face plus a neck and an ear vertex (cut away).

    Flat xyz-interleaved ``mean_shape``, ``mean_exp`` (3V,), ``w`` (3V, 5), ``w_exp`` (3V, 3),
    ``tri`` (T, 3) and ``keypoints`` (68,) 0-based; ``neck`` and ``ear`` are the extra vertex ids.
    """
    model = load_face_model("builtin")
    rng = np.random.default_rng(seed)
    vertices = model.mean.astype(np.float64) * MICROMETRES_PER_MM
    chin = vertices[model.landmark_vertices[8]]
    jaw_top = vertices[model.landmark_vertices[0]]
    neck = chin + [0.0, -30e3, -40e3]
    ear = jaw_top + [-15e3, 0.0, -20e3]
    vertices = np.vstack([vertices, neck, ear])
    num = len(vertices)
    triangles = np.vstack([model.triangles, [[model.landmark_vertices[7], model.landmark_vertices[8], num - 2],
                                             [model.landmark_vertices[0], model.landmark_vertices[1], num - 1]]])
    mean_exp = rng.normal(0, 500.0, size=3 * num)
    return {
        "mean_shape": (vertices.reshape(-1) - mean_exp).astype(np.float32),
        "mean_exp": mean_exp.astype(np.float32),
        "w": rng.normal(0, 1.0, size=(3 * num, NUM_SHAPE)).astype(np.float32),
        "w_exp": rng.normal(0, 1000.0, size=(3 * num, NUM_EXP)).astype(np.float32),
        "tri": triangles.astype(np.int64),
        "keypoints": model.landmark_vertices.astype(np.int64),
        "neck": num - 2,
        "ear": num - 1,
    }


def write_3ddfa(folder, content) -> None:
    """``Model_Shape.mat`` + ``Model_Exp.mat`` (MATLAB 1-based ids, column vectors)."""
    folder.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(folder / "Model_Shape.mat", {
        "mu_shape": content["mean_shape"][:, None], "w": content["w"], "sigma": np.ones((NUM_SHAPE, 1)),
        "tri": (content["tri"].T + 1).astype(np.uint16), "keypoints": (content["keypoints"][None] + 1).astype(np.uint16)})
    scipy.io.savemat(folder / "Model_Exp.mat", {"mu_exp": content["mean_exp"][:, None], "w_exp": content["w_exp"]})


def write_face3d(folder, content) -> None:
    """face3d's ``BFM.mat``: a struct ``model``."""
    folder.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(folder / "BFM.mat", {"model": {
        "shapeMU": content["mean_shape"][:, None], "shapePC": content["w"], "shapeEV": np.ones((NUM_SHAPE, 1)),
        "expMU": content["mean_exp"][:, None], "expPC": content["w_exp"], "expEV": np.ones((NUM_EXP, 1)),
        "texMU": np.zeros((content["mean_shape"].size, 1)), "tri": content["tri"].T + 1,
        "kpt_ind": content["keypoints"][None] + 1, "tri_mouth": np.ones((3, 1))}})


def write_noneck_pickle(folder, content) -> None:
    """3DDFA_V2's ``bfm_noneck_v3.pkl``: 0-based, keypoints as flat xyz indices."""
    folder.mkdir(parents=True, exist_ok=True)
    flat_keypoints = (3 * content["keypoints"][:, None] + np.arange(3)).reshape(-1)
    with open(folder / "bfm_noneck_v3.pkl", "wb") as handle:
        pickle.dump({"u": (content["mean_shape"] + content["mean_exp"])[:, None], "w_shp": content["w"],
                     "w_exp": content["w_exp"], "tri": content["tri"].T, "keypoints": flat_keypoints}, handle)


def write_mean_only(folder, content) -> None:
    """``Model_Shape_Sim.mat`` + ``u_exp.npy`` (no bases), as ../shared/data/bfm_meta."""
    folder.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(folder / "Model_Shape_Sim.mat", {
        "mu_shape": content["mean_shape"][:, None], "tri": content["tri"].T + 1, "keypoints": content["keypoints"][None] + 1})
    np.save(folder / "u_exp.npy", content["mean_exp"][:, None])


def write_train_configs(folder, content, triangles_in="tri.mat") -> None:
    """3DDFA's ``train.configs``: ``u_shp.npy``, ``u_exp.npy`` (3V, 1) float32, ``w_shp_sim.npy`` / ``w_exp_sim.npy``
    the leading :data:`SIM_SHAPE` / :data:`SIM_EXP` columns of the bases, ``keypoints_sim.npy`` (204,) int64 flat xyz
    indices; plus the triangles it lacks, ``tri`` (3, T) 1-based in ``triangles_in`` (``tri.mat`` as 3DDFA's
    ``visualize/``, or ``Model_Shape_Sim.mat`` with ``mu_shape`` and ``keypoints`` as the AFLW2000-3D code's)."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "u_shp.npy", content["mean_shape"][:, None])
    np.save(folder / "u_exp.npy", content["mean_exp"][:, None])
    np.save(folder / "w_shp_sim.npy", np.ascontiguousarray(content["w"][:, :SIM_SHAPE]))
    np.save(folder / "w_exp_sim.npy", np.ascontiguousarray(content["w_exp"][:, :SIM_EXP]))
    np.save(folder / "keypoints_sim.npy", (3 * content["keypoints"][:, None] + np.arange(3)).reshape(-1))
    if triangles_in == "Model_Shape_Sim.mat":
        write_mean_only(folder, content)
    else:
        scipy.io.savemat(folder / triangles_in, {"tri": (content["tri"].T + 1).astype(np.uint16)})


WRITERS = {"3ddfa": write_3ddfa, "face3d": write_face3d, "noneck": write_noneck_pickle, "mean": write_mean_only,
           "train_configs": write_train_configs}
