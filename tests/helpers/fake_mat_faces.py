"""Fake 300W-LP / AFLW2000-3D samples (an image and its .mat) on a fake BFM: the README's formula, written out
independently of data_prep.mat_faces, so that their landmarks are exactly the model's keypoint vertices."""

from __future__ import annotations

import numpy as np
import scipy.io
from PIL import Image

IMAGE_SIZE = 450


def readme_vertices(content, shape, expression, pose_para, height=IMAGE_SIZE):
    """(3, V) 1-based image vertices: s R (mu_shape + mu_exp + w sp + w_exp ep) + t, then y = H + 1 - y."""
    pitch, yaw, roll, tx, ty, tz, s = pose_para
    c, n = np.cos, np.sin
    rx = np.array([[1, 0, 0], [0, c(pitch), n(pitch)], [0, -n(pitch), c(pitch)]])
    ry = np.array([[c(yaw), 0, -n(yaw)], [0, 1, 0], [n(yaw), 0, c(yaw)]])
    rz = np.array([[c(roll), n(roll), 0], [-n(roll), c(roll), 0], [0, 0, 1]])
    flat = (content["mean_shape"].astype(np.float64) + content["mean_exp"] + content["w"] @ shape
            + content["w_exp"] @ expression)
    vertices = s * (rx @ ry @ rz) @ flat.reshape(-1, 3).T + np.array([[tx], [ty], [tz]])
    vertices[1] = height + 1 - vertices[1]
    return vertices


def fake_pose(rng, yaw_deg=None):
    """Random ``Pose_Para``: pitch, yaw (``yaw_deg`` if given), roll, tx, ty, tz, scale."""
    yaw = np.radians(rng.uniform(-60, 60) if yaw_deg is None else yaw_deg)
    return np.array([np.radians(rng.uniform(-10, 10)), yaw, np.radians(rng.uniform(-10, 10)),
                     rng.uniform(200, 250), rng.uniform(200, 250), rng.uniform(-50, 50), 1.4e-3])


def write_fake_sample(folder, name, content, rng, landmark_field="pt3d_68", yaw_deg=None):
    """``name.jpg`` + ``name.mat`` whose landmarks are exactly the model's keypoint vertices."""
    shape, expression = rng.normal(0, 2.0, 5), rng.normal(0, 0.3, 3)
    pose_para = fake_pose(rng, yaw_deg)
    landmarks = readme_vertices(content, shape, expression, pose_para)[:, content["keypoints"]]
    fields = {"Pose_Para": pose_para[None].astype(np.float32), "Shape_Para": shape[:, None],
              "Exp_Para": expression[:, None], "roi": np.array([[1, 1, 450, 450]], dtype=np.int16)}
    fields[landmark_field] = landmarks if landmark_field == "pt3d_68" else landmarks[:2]
    if landmark_field == "pt3d_68":
        fields["pt2d"] = -np.ones((2, 21))
    folder.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(folder / f"{name}.mat", fields)
    pixels = rng.integers(0, 255, size=(IMAGE_SIZE // 10, IMAGE_SIZE // 10, 3), dtype=np.uint8)
    Image.fromarray(pixels).resize((IMAGE_SIZE, IMAGE_SIZE)).save(folder / f"{name}.jpg", quality=90)
