"""The authors' crop rule from 2D landmarks: box size and centre in the crop, points mapped with it."""

import numpy as np
import pytest

from lightning_vrn.geometry.crop import LANDMARK_BOX_FRACTION, CropTransform, landmark_crop, resample_crop


def box_landmarks(lo, hi) -> np.ndarray:
    """``(68, 2)`` points inside the box ``lo``-``hi`` with two of them on opposite corners."""
    points = np.random.default_rng(0).uniform(lo, hi, size=(68, 2))
    points[0], points[1] = lo, hi
    return points


def test_paper_crop_by_hand():
    # A 45 x 20 px box: sqrt(w * h) = 30 px must become 90 px in a 192 px crop, so scale 3; the box
    # centre (122.5, 50) goes to the crop centre (95.5, 95.5).
    crop = landmark_crop(box_landmarks((100.0, 40.0), (145.0, 60.0)), 192)
    assert crop.scale == pytest.approx(3.0)
    np.testing.assert_allclose(crop.translation, (95.5 - 3.0 * 122.5, 95.5 - 3.0 * 50.0))


@pytest.mark.parametrize("size, jitter, shift", [(192, 1.0, (0.0, 0.0)), (96, 0.9, (2.5, -1.0)),
                                                 (48, 1.1, (-1.0, 0.5))])
def test_cropped_landmark_box_has_the_authors_size_and_centre(size, jitter, shift):
    landmarks = box_landmarks((310.0, 120.0), (520.0, 400.0))
    crop = landmark_crop(landmarks, size, scale_jitter=jitter, centre_shift=shift)
    cropped = crop.apply(landmarks)
    lo, hi = cropped.min(axis=0), cropped.max(axis=0)
    assert np.sqrt(np.prod(hi - lo)) == pytest.approx(LANDMARK_BOX_FRACTION * size * jitter)
    np.testing.assert_allclose(0.5 * (lo + hi), (size - 1) / 2 + np.array(shift), atol=1e-9)


def test_apply_scales_z_by_the_same_factor_and_shifts_it():
    crop = CropTransform(2.0, (10.0, -4.0))
    points = np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, -2.0]])
    np.testing.assert_allclose(crop.apply(points, z_shift=7.0), [[12.0, 0.0, 13.0], [8.0, -3.0, 3.0]])
    np.testing.assert_allclose(crop.apply(points[:, :2]), crop.apply(points)[:, :2])
    with pytest.raises(ValueError, match=r"\(N, 2\) or \(N, 3\)"):
        crop.apply(np.zeros((4, 4)))


def test_rejects_bad_landmarks():
    with pytest.raises(ValueError, match=r"\(68, 2\)"):
        landmark_crop(np.zeros((5, 2)), 192)
    with pytest.raises(ValueError, match="finite"):
        landmark_crop(np.full((68, 2), np.nan), 192)
    flat = box_landmarks((0.0, 10.0), (50.0, 10.0))
    with pytest.raises(ValueError, match="flat"):
        landmark_crop(flat, 192)



def test_invert_maps_crop_coordinates_back_to_the_photo_within_half_a_pixel():
    rng = np.random.default_rng(3)
    landmarks = rng.uniform([100, 50], [500, 400], size=(68, 2))  # a face somewhere in a 640x480 photo
    crop = landmark_crop(landmarks, 192)
    in_crop = crop.apply(landmarks)
    lo, hi = in_crop.min(axis=0), in_crop.max(axis=0)
    assert np.sqrt(np.prod(hi - lo)) == pytest.approx(90.0)
    assert (lo + hi) / 2 == pytest.approx([95.5, 95.5])
    assert np.abs(crop.invert(in_crop) - landmarks).max() < 0.5
    points = np.column_stack([landmarks, rng.uniform(-30, 30, 68)])
    assert np.abs(crop.invert(crop.apply(points, z_shift=12.0), z_shift=12.0) - points).max() < 1e-9


def test_resample_crop_puts_pixel_centres_at_integers():
    ramp = np.broadcast_to(np.arange(64, dtype=np.uint8)[None, :, None] * 3, (64, 64, 3)).copy()
    shifted = resample_crop(ramp, CropTransform(1.0, (-10.0, -20.0)), 16)
    np.testing.assert_array_equal(shifted, ramp[20:36, 10:26])
    doubled = resample_crop(ramp, CropTransform(2.0, (-20.0, 0.0)), 32).astype(float)[5, 2:30, 0]
    np.testing.assert_allclose(doubled, 3 * (np.arange(2, 30) + 20.0) / 2.0, atol=1.0)
    outside = resample_crop(ramp, CropTransform(1.0, (5.0, 5.0)), 16)  # crop pixel i shows photo pixel i - 5
    assert outside[:4].max() == 0 and outside[:, :4].max() == 0
    np.testing.assert_array_equal(outside[6:, 6:], ramp[1:11, 1:11])
