"""Vertex normals: radial on a sphere, +-z on a flat grid by winding, area weighting, isolated vertices."""

import numpy as np
import open3d as o3d
import pytest

from lightning_vrn.geometry.normals import vertex_normals

CENTRE = np.array([3.0, -2.0, 5.0])
RADIUS = 4.0


def icosphere() -> tuple[np.ndarray, np.ndarray]:
    """Subdivided icosahedron (2562 vertices) of radius ``RADIUS`` about ``CENTRE``, as Open3D winds it."""
    mesh = o3d.geometry.TriangleMesh.create_icosahedron(1.0).subdivide_midpoint(number_of_iterations=4)
    directions = np.asarray(mesh.vertices)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return CENTRE + RADIUS * directions, np.asarray(mesh.triangles)


def flat_grid(rows: int = 5, columns: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Unevenly spaced grid in the plane z = 2, triangles counter-clockwise seen from +z."""
    y, x = np.meshgrid(np.cumsum(np.arange(1.0, rows + 1)), np.linspace(0.0, 9.0, columns) ** 1.5, indexing="ij")
    vertices = np.stack([x.ravel(), y.ravel(), np.full(x.size, 2.0)], axis=1)
    ids = np.arange(rows * columns).reshape(rows, columns)
    corner, right, up, diagonal = ids[:-1, :-1], ids[:-1, 1:], ids[1:, :-1], ids[1:, 1:]
    quads = np.stack([corner, right, diagonal, up], axis=-1).reshape(-1, 4)
    return vertices, np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])


def face_normals(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    corners = vertices[triangles]
    return np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])


def test_sphere_normals_are_radial_and_outward_for_outward_winding():
    vertices, triangles = icosphere()
    radial = (vertices - CENTRE) / RADIUS
    centroids = vertices[triangles].mean(axis=1) - CENTRE
    # The fixture's winding is counter-clockwise seen from outside: every face normal points out.
    assert (np.einsum("tc,tc->t", face_normals(vertices, triangles), centroids) > 0).all()
    normals = vertex_normals(vertices, triangles)
    assert normals.shape == vertices.shape and normals.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(normals, radial, atol=1e-2)
    assert np.einsum("vc,vc->v", normals, radial).min() > 0.999
    # Reversed winding turns every normal inward.
    np.testing.assert_allclose(vertex_normals(vertices, triangles[:, ::-1]), -normals, atol=1e-12)


def test_flat_grid_normals_follow_the_winding():
    vertices, triangles = flat_grid()
    up = np.tile([0.0, 0.0, 1.0], (len(vertices), 1))
    np.testing.assert_allclose(vertex_normals(vertices, triangles), up, atol=1e-12)
    np.testing.assert_allclose(vertex_normals(vertices, triangles[:, ::-1]), -up, atol=1e-12)


def test_normals_are_area_weighted():
    # Vertex 0 is shared by a large triangle facing +z (area 8) and a small one facing +x (area 0.5).
    vertices = np.array([[0, 0, 0], [4, 0, 0], [0, 4, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    triangles = np.array([[0, 1, 2], [0, 3, 4]], dtype=np.int32)
    expected = np.array([0.5, 0.0, 8.0]) / np.hypot(0.5, 8.0)
    np.testing.assert_allclose(vertex_normals(vertices, triangles)[0], expected, atol=1e-12)


def test_unused_vertices_and_cancelling_normals_give_zero():
    vertices, triangles = flat_grid(3, 3)
    vertices = np.vstack([vertices, [[50.0, 50.0, 50.0]]])  # used by no triangle
    corner = 2  # the grid's bottom-right corner lies on one triangle only
    (only,) = triangles[(triangles == corner).any(axis=1)]
    normals = vertex_normals(vertices, np.vstack([triangles, only[::-1]]))  # that triangle again, reversed
    np.testing.assert_array_equal(normals[-1], 0.0)
    np.testing.assert_array_equal(normals[corner], 0.0)
    np.testing.assert_allclose(normals[3], [0.0, 0.0, 1.0], atol=1e-12)  # elsewhere still unit +z
    assert vertex_normals(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)).shape == (0, 3)


def test_bad_shapes_are_named():
    vertices, triangles = flat_grid(3, 3)
    with pytest.raises(ValueError, match=r"vertices must have shape \(V, 3\)"):
        vertex_normals(vertices[:, :2], triangles)
    with pytest.raises(ValueError, match=r"triangles must be an integer array of shape \(T, 3\)"):
        vertex_normals(vertices, triangles.astype(np.float64))
