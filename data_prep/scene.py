"""What a synthetic image shows besides the face: the model's own head, a drawn head, and the edges of the photo.

:func:`scene_mesh` puts together everything rendered of one sample: the face (first, so the renderer can tell its
pixels), a face model's own head (:class:`~data_prep.face_model.ModelHead`: the ICT model's head, mouth, teeth,
eyeballs, lashes), the head of :mod:`data_prep.head` with ``--heads``, the glasses, hats, microphones and locks
of hair of :mod:`data_prep.accessories` with ``--accessories``. :func:`sample_photo_edges` and
:func:`cut_at_photo_edges` black out what lies beyond the photo a crop was cut from (``--photo-edges``).
Options and their measured effect on real photos: docs/synthetic_images.md.
"""

from __future__ import annotations

import numpy as np

from data_prep.accessories import Accessories, accessory_mesh
from data_prep.face_model import HEAD_PARTS, FaceModel, ModelHead
from data_prep.head import (FrontalDepth, HeadSettings, beard_weight, face_hair, hair_albedo, head_albedo, head_mesh,
                            scalp_hair)
from data_prep.render import TEETH, RenderSettings, eye_albedo, vertex_albedo

PHOTO_EDGE_MARGIN = (0.25, 0.75)
"""Range of the distance from the landmark box to a photo edge, in landmark-box sizes: in the 190 aflw2000_val crops
the edges lie 0.23-0.41 (10th percentile), 0.40-0.56 (median) and 0.55-0.58 (90th) box sizes out, per side."""
PHOTO_EDGE_ABSENT = 0.2
"""Chance that one side of the crop has no photo edge in it. With ``--photo-edges 0.9`` the black share of a crop
has quantiles 0 / 0.06 / 0.14 / 0.21 / 0.26 (10/25/50/75/90%, 60 demo-grid samples) against 0.01 / 0.06 / 0.13 /
0.26 / 0.44 in the 190 aflw2000_val crops."""


def sample_photo_edges(rng: np.random.Generator) -> np.ndarray:
    """``(4,)`` distances from the landmark box to the photo's left, right, top and bottom edges, in landmark-box
    sizes (``sqrt(w * h)``): each uniform in :data:`PHOTO_EDGE_MARGIN`, or ``inf`` (no edge in the crop) with
    probability :data:`PHOTO_EDGE_ABSENT`."""
    margins = rng.uniform(*PHOTO_EDGE_MARGIN, size=4)
    return np.where(rng.random(4) < PHOTO_EDGE_ABSENT, np.inf, margins)


def cut_at_photo_edges(image: np.ndarray, landmarks_2d: np.ndarray, margins: np.ndarray) -> np.ndarray:
    """``image`` (S, S, 3) with black beyond the photo's edges: pixels whose centre lies more than ``margins`` (4,)
    (left, right, top, bottom, in landmark-box sizes; inf: no edge) outside the ``(68, 2)`` landmarks' box, as
    the authors' crop pads a photo that ends close to the face (166 of the 190 aflw2000_val crops)."""
    low, high = landmarks_2d.min(axis=0), landmarks_2d.max(axis=0)
    size = np.sqrt(np.prod(high - low))
    left, right, top, bottom = margins * size
    cols, rows = np.arange(image.shape[1]), np.arange(image.shape[0])
    inside = ((rows >= low[1] - top) & (rows <= high[1] + bottom))[:, None] & \
        ((cols >= low[0] - left) & (cols <= high[0] + right))[None, :]
    return np.where(inside[..., None], image, 0).astype(image.dtype)


def scene_mesh(model: FaceModel, mesh_mm: np.ndarray, identity: np.ndarray, expression: np.ndarray,
           settings: RenderSettings, head: HeadSettings | None,
           accessories: Accessories | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Everything rendered of one sample, in the model frame: vertices (N, 3) mm, triangles (T, 3), albedo (N, 3).

    The face ``mesh_mm`` (V, 3) and its triangles come first (the face's triangles are the first
    ``len(model.triangles)``); then the model's own head (:class:`~data_prep.face_model.ModelHead`, moved by the
    same coefficients); then, with ``head``, the head of :mod:`data_prep.head` (only its hair and shoulders when the
    model has a head of its own) and a beard painted over the face; last, the ``accessories``
    (:mod:`data_prep.accessories`)."""
    own_head = model.head is not None
    albedo = vertex_albedo(mesh_mm, settings, model.landmark_vertices, paint_eyes=not own_head)
    if head is not None:  # a beard and the hair above the hairline change the face's colour, never its shape
        albedo += (head.hair_colour - albedo) * beard_weight(mesh_mm, model.landmark_vertices, head)[:, None]
        albedo = hair_albedo(mesh_mm, albedo, face_hair(mesh_mm, model.landmark_vertices, head), head)
    vertices, triangles, colours = [mesh_mm], [model.triangles], [albedo]
    if own_head:
        head_vertices = model.head_shape(identity, expression)
        head_colours = head_part_albedo(model.head, vertex_albedo(head_vertices, settings), settings)
        if head is not None:  # hair on the model's own scalp
            skin = model.head.part == HEAD_PARTS.index("skin")
            head_vertices[skin], hair = scalp_hair(head_vertices[skin], mesh_mm, model.landmark_vertices, head)
            head_colours[skin] = hair_albedo(head_vertices[skin], head_colours[skin], hair, head)
        vertices.append(head_vertices)
        triangles.append(model.head.triangles)
        colours.append(head_colours)
    depth = None if head is None and accessories is None else FrontalDepth(mesh_mm, model.triangles)
    if head is not None:
        mesh = head_mesh(mesh_mm, depth, model.landmark_vertices, head, own_head=own_head)
        triangles.append(mesh.triangles + sum(map(len, vertices)))
        vertices.append(mesh.vertices)
        colours.append(head_albedo(mesh, vertex_albedo(mesh.vertices, settings), head))
    if accessories is not None:
        worn, worn_triangles, worn_colours = accessory_mesh(mesh_mm, depth, model.landmark_vertices,
                                                            accessories, settings.brow_colour)
        triangles.append(worn_triangles + sum(map(len, vertices)))
        vertices.append(worn)
        colours.append(worn_colours)
    return np.vstack(vertices), np.vstack(triangles), np.vstack(colours)


def head_part_albedo(head: ModelHead, skin: np.ndarray, settings: RenderSettings) -> np.ndarray:
    """``(R, 3)`` albedo of a model's own head: ``skin`` (R, 3) on the skin; a dark
    mouth; teeth; gums; eyeballs with sclera, iris and pupil around the axis through each eyeball's front (found
    on the model's mean head, so the iris turns with the eye); lashes in the brows' colour."""
    albedo = skin.copy()
    lip_colour = settings.skin_tone * settings.lip_tint
    for name, colour in (("mouth", 0.25 * lip_colour), ("teeth", TEETH), ("gums", 0.8 * lip_colour),
                         ("lashes", settings.brow_colour)):
        albedo[head.part == HEAD_PARTS.index(name)] = colour
    eye = head.part == HEAD_PARTS.index("eye")
    for side in (head.mean[:, 0] < 0, head.mean[:, 0] >= 0):
        ball = eye & side
        if not ball.any():
            continue
        centre = head.mean[ball].mean(axis=0)
        direction = head.mean[ball] - centre
        forward = direction[:, 2] / np.maximum(np.linalg.norm(direction, axis=1), 1e-9)   # cos of angle to +z
        iris = np.clip((forward - 0.86) / 0.02, 0.0, 1.0)     # within about 30 degrees of the axis
        pupil = np.clip((forward - 0.96) / 0.01, 0.0, 1.0)    # within about 16 degrees
        albedo[ball] = eye_albedo(iris, pupil, settings.iris_colour)
    return albedo
