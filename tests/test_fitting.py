"""3DMM fit to 2D landmarks: it recovers a built-in face's coefficients and pose from exact landmarks (a model
without bases: the pose alone), follows the crop conventions, and its regulariser shrinks the coefficients."""

import numpy as np
import pytest

from data_prep.builtin_face import IDENTITY_MODES, builtin_face_model
from lightning_vrn.geometry.fitting import fit_shape_to_landmarks
from lightning_vrn.geometry.pose import FLIP_YZ, crop_rotation, euler_to_matrix, model_to_crop

MODEL = builtin_face_model()
BASIS = np.concatenate([MODEL.identity_basis, MODEL.expression_basis]).transpose(1, 2, 0)  # (V, 3, K)
NUM_IDENTITY = len(MODEL.identity_basis)
SCALE = 0.45  # px per mm: a face about 60 px wide, as in a 96 px crop
TRANSLATION = np.array([47.5, 47.5, 3.0])
# face_width, face_length and face_depth stretch x, y and z by 3.5, 4 and 5% per unit: together a
# uniform scale, which the camera's scale absorbs; forehead_slope moves no landmark. The landmarks
# cannot tell these apart, so the true faces here have none of them.
UNIDENTIFIABLE = [IDENTITY_MODES.index(name) for name in ("face_width", "face_length", "face_depth", "forehead_slope")]


def posed_face(identity, expression, pose_deg):
    """``(vertices (V, 3) crop px, landmarks_2d (68, 2))`` of the built-in face posed by ``model_to_crop``."""
    vertices = model_to_crop(MODEL.shape(identity, expression), np.radians(pose_deg), SCALE, TRANSLATION)
    return vertices, vertices[MODEL.landmark_vertices, :2]


def rotation_angle_deg(a, b):
    return np.degrees(np.arccos(np.clip((np.trace(a.T @ b) - 1) / 2, -1, 1)))


@pytest.mark.parametrize("pose_deg, expression", [
    ((0, 0, 0), [0.6, 0, 0.4, 0, 0, 0]),
    ((10, 30, 5), [0, 0.8, 0, 0, 0, 0]),
    ((-15, 60, -10), [0, 0, 0, 0.5, 0.7, 0]),
    ((5, -80, 3), [0, 0, 0, 0, 0, 0.9]),
])
def test_fit_recovers_coefficients_and_pose_from_exact_landmarks(pose_deg, expression):
    rng = np.random.default_rng(abs(pose_deg[1]))
    identity = np.clip(rng.standard_normal(NUM_IDENTITY), -2.5, 2.5)
    identity[UNIDENTIFIABLE] = 0.0
    vertices, landmarks = posed_face(identity, expression, pose_deg)
    fit = fit_shape_to_landmarks(landmarks, MODEL.mean, BASIS, MODEL.landmark_vertices, regularisation=1e-3,
                                 iterations=1000)
    # Measured worst over these four: identity 0.07, expression 0.003, rotation and pose 0.05 deg,
    # scale 0.09%, vertices 0.17 px (of a 60 px face); near profile the alternation converges slowly.
    np.testing.assert_allclose(fit.coefficients[:NUM_IDENTITY], identity, atol=0.1)
    np.testing.assert_allclose(fit.coefficients[NUM_IDENTITY:], expression, atol=0.01)
    assert rotation_angle_deg(fit.rotation, FLIP_YZ @ euler_to_matrix(*np.radians(pose_deg))) < 0.1
    np.testing.assert_allclose(np.degrees(fit.pose), pose_deg, atol=0.1)
    assert fit.scale == pytest.approx(SCALE, rel=2e-3)
    np.testing.assert_allclose(fit.translation_2d, TRANSLATION[:2], atol=0.1)
    # Placed with the true mesh's nearest depth, the fitted mesh lies on the true one.
    assert np.abs(fit.crop_vertices(vertices[:, 2].min()) - vertices).max() < 0.25


def test_fitted_camera_follows_the_crop_conventions():
    vertices, landmarks = posed_face(np.zeros(NUM_IDENTITY), np.zeros(6), (-12, 40, 8))
    fit = fit_shape_to_landmarks(landmarks, MODEL.mean, BASIS, MODEL.landmark_vertices, regularisation=1.0)
    np.testing.assert_allclose(fit.rotation @ fit.rotation.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(fit.rotation) == pytest.approx(1.0)  # a rotation, not a mirror
    np.testing.assert_allclose(fit.crop_rotation, crop_rotation(fit.pose), atol=1e-12)
    # crop_vertices = model_to_crop with the fitted pose, scale and translation, moved in depth to z_front.
    posed = model_to_crop(fit.model_vertices, fit.pose, fit.scale, [*fit.translation_2d, 0.0])
    placed = fit.crop_vertices(z_front=-20.0)
    np.testing.assert_allclose(placed[:, :2], posed[:, :2], atol=1e-9)
    np.testing.assert_allclose(placed[:, 2], posed[:, 2] - posed[:, 2].min() - 20.0, atol=1e-9)
    np.testing.assert_allclose(fit.model_vertices, MODEL.mean + BASIS @ fit.coefficients, atol=1e-4)


def test_a_model_without_bases_fits_the_camera_of_its_mean_face():
    """A mean-only face model (the Basel mean face of real photos' conversion) has no coefficients to fit."""
    vertices, landmarks = posed_face(np.zeros(NUM_IDENTITY), np.zeros(6), (10, -35, 5))
    fit = fit_shape_to_landmarks(landmarks, MODEL.mean, BASIS[:, :, :0], MODEL.landmark_vertices, regularisation=3.0,
                                 iterations=100)
    assert fit.coefficients.shape == (0,)
    np.testing.assert_allclose(np.degrees(fit.pose), (10, -35, 5), atol=0.01)
    assert fit.scale == pytest.approx(SCALE, rel=1e-6)
    assert np.abs(fit.crop_vertices(vertices[:, 2].min()) - vertices).max() < 1e-3


def test_regulariser_shrinks_the_coefficients():
    identity = np.clip(np.random.default_rng(3).standard_normal(NUM_IDENTITY), -2.5, 2.5)
    _, landmarks = posed_face(identity, [0, 0.8, 0, 0, 0.5, 0], (5, 25, -5))
    fits = [fit_shape_to_landmarks(landmarks, MODEL.mean, BASIS, MODEL.landmark_vertices, weight)
            for weight in (0.01, 0.1, 1.0, 10.0, 100.0, 1e6)]
    norms = [np.linalg.norm(fit.coefficients) for fit in fits]
    assert all(a > b for a, b in zip(norms, norms[1:])), norms
    assert norms[-1] < 1e-3  # an overwhelming weight gives the mean face
    residuals = [np.abs(fit.scale * (fit.model_vertices[MODEL.landmark_vertices] @ fit.rotation[:2].T)
                        + fit.translation_2d - landmarks).mean() for fit in fits]
    assert all(a < b for a, b in zip(residuals, residuals[1:])), residuals


@pytest.mark.parametrize("change, message", [
    ({"landmarks_2d": np.zeros((67, 2))}, "landmarks must be finite"),
    ({"landmarks_2d": np.full((68, 2), np.nan)}, "landmarks must be finite"),
    ({"basis": BASIS[:, :2]}, "basis"),
    ({"regularisation": 0.0}, "regularisation must be > 0"),
    ({"iterations": 0}, "iterations >= 1"),
])
def test_bad_arguments_are_named(change, message):
    arguments = dict(landmarks_2d=np.zeros((68, 2)), mean=MODEL.mean, basis=BASIS,
                     landmark_vertices=MODEL.landmark_vertices, regularisation=1.0, iterations=5)
    with pytest.raises(ValueError, match=message):
        fit_shape_to_landmarks(**{**arguments, **change})
