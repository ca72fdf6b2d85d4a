"""The iBUG 68-point landmark scheme (0-based in code)."""

from __future__ import annotations

import numpy as np

NUM_LANDMARKS = 68

# Outer eye corners: iBUG 37 and 46 (1-based), the NME normaliser's end points.
OUTER_EYE_CORNERS = (36, 45)

# Groups of the scheme, 0-based, in annotation order.
GROUPS = {
    "jaw": range(0, 17),
    "right_brow": range(17, 22),
    "left_brow": range(22, 27),
    "nose_bridge": range(27, 31),
    "nostrils": range(31, 36),
    "right_eye": range(36, 42),
    "left_eye": range(42, 48),
    "outer_lips": range(48, 60),
    "inner_lips": range(60, 68),
}


def _mirror_permutation() -> np.ndarray:
    """Index map for a horizontal flip: landmark ``i`` of the flipped face is ``FLIP[i]`` of the original."""
    pairs = [(i, 16 - i) for i in range(17)]                      # jaw
    pairs += [(17 + i, 26 - i) for i in range(5)]                 # brows
    pairs += [(i, i) for i in range(27, 31)]                      # nose bridge
    pairs += [(31 + i, 35 - i) for i in range(5)]                 # nostrils
    pairs += list(zip(range(36, 42), [45, 44, 43, 42, 47, 46]))   # eyes
    pairs += [(48 + i, 54 - i) for i in range(7)]                 # upper outer lip
    pairs += list(zip(range(55, 60), [59, 58, 57, 56, 55]))       # lower outer lip
    pairs += [(60 + i, 64 - i) for i in range(5)]                 # upper inner lip
    pairs += list(zip(range(65, 68), [67, 66, 65]))               # lower inner lip
    flip = np.full(NUM_LANDMARKS, -1, dtype=np.int64)
    for a, b in pairs:
        flip[a], flip[b] = b, a
    assert (flip >= 0).all() and (flip[flip] == np.arange(NUM_LANDMARKS)).all()
    return flip


FLIP = _mirror_permutation()


def outer_interocular(landmarks: np.ndarray) -> np.ndarray:
    """Distance between the outer eye corners of ``(..., 68, D)`` landmarks -> ``(...)``."""
    a, b = OUTER_EYE_CORNERS
    return np.linalg.norm(landmarks[..., a, :] - landmarks[..., b, :], axis=-1)
