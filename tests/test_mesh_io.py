"""OBJ / PLY mesh I/O: round trips, agreement with Open3D's readers, clear errors."""

import numpy as np
import open3d as o3d
import pytest

from lightning_vrn.geometry.mesh_io import read_mesh, read_obj, read_ply, write_mesh, write_obj, write_ply


@pytest.fixture(scope="module")
def mesh():
    """A 30 x 40 grid surface (every vertex used by a triangle) with random heights and colours."""
    rng = np.random.default_rng(7)
    rows, cols = 30, 40
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float64)
    vertices = np.column_stack([x.ravel() * 1.7 + 20.25, y.ravel() * 1.3 - 5.5, rng.normal(0, 10, rows * cols)])
    index = np.arange(rows * cols).reshape(rows, cols)
    quads = np.stack([index[:-1, :-1], index[:-1, 1:], index[1:, :-1], index[1:, 1:]], -1).reshape(-1, 4)
    triangles = np.concatenate([quads[:, [0, 1, 2]], quads[:, [1, 3, 2]]])
    colors = rng.random((rows * cols, 3))
    return vertices, triangles, colors


@pytest.mark.parametrize("suffix", [".obj", ".ply"])
@pytest.mark.parametrize("colour_kind", [None, "float", "uint8"])
def test_round_trip(tmp_path, mesh, suffix, colour_kind):
    vertices, triangles, colors = mesh
    given = {None: None, "float": colors, "uint8": np.round(colors * 255).astype(np.uint8)}[colour_kind]
    path = tmp_path / f"mesh{suffix}"
    write_mesh(path, vertices, triangles, given)
    read_vertices, read_triangles, read_colors = read_mesh(path)

    assert read_vertices.shape == vertices.shape and read_triangles.dtype == np.int64
    np.testing.assert_array_equal(read_triangles, triangles)
    if suffix == ".ply":  # float32 storage: exact to float32
        np.testing.assert_array_equal(read_vertices, vertices.astype(np.float32).astype(np.float64))
    else:  # 9 significant digits
        np.testing.assert_allclose(read_vertices, vertices, rtol=1e-8, atol=1e-7)
    if colour_kind is None:
        assert read_colors is None
    else:  # both formats keep colours to 8 bits
        np.testing.assert_array_equal(np.round(read_colors * 255), np.round(colors * 255))
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "temporary file left behind"


@pytest.mark.parametrize("suffix", [".obj", ".ply"])
def test_open3d_reads_our_files(tmp_path, mesh, suffix):
    vertices, triangles, colors = mesh
    path = tmp_path / f"mesh{suffix}"
    write_mesh(path, vertices, triangles, colors)
    theirs = o3d.io.read_triangle_mesh(str(path))
    # Open3D's OBJ reader renumbers vertices by first use, so compare triangle corners, in order.
    their_corners = np.asarray(theirs.triangles)
    assert len(np.asarray(theirs.vertices)) == len(vertices) and their_corners.shape == triangles.shape
    np.testing.assert_allclose(np.asarray(theirs.vertices)[their_corners], vertices[triangles], atol=1e-4)
    their_colors = np.asarray(theirs.vertex_colors)[their_corners]
    np.testing.assert_allclose(their_colors, colors[triangles], atol=0.5 / 255 + 1e-6)
    if suffix == ".ply":
        np.testing.assert_array_equal(their_corners, triangles)


def test_reads_open3d_ascii_ply_and_obj(tmp_path, mesh):
    vertices, triangles, colors = mesh
    theirs = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(vertices), o3d.utility.Vector3iVector(triangles))
    theirs.vertex_colors = o3d.utility.Vector3dVector(colors)
    for name, options in [("ascii.ply", {"write_ascii": True}), ("binary.ply", {}), ("o3d.obj", {})]:
        path = tmp_path / name
        assert o3d.io.write_triangle_mesh(str(path), theirs, **options)
        read_vertices, read_triangles, read_colors = read_mesh(path)
        np.testing.assert_allclose(read_vertices, vertices, atol=1e-4)
        np.testing.assert_array_equal(read_triangles, triangles)
        np.testing.assert_allclose(read_colors, colors, atol=0.5 / 255 + 1e-6)


def test_obj_faces_with_texture_indices_negative_indices_and_quads(tmp_path):
    path = tmp_path / "quad.obj"
    path.write_text(
        "# comment\nv 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nvt 0 0\nvn 0 0 1\n"
        "f 1/1/1 2/1/1 3/1/1\nf -4//1 -2//1 -1//1\nf 1 2 3 4\n"
    )
    vertices, triangles, colors = read_obj(path)
    assert vertices.shape == (4, 3) and colors is None
    np.testing.assert_array_equal(triangles, [[0, 1, 2], [0, 2, 3], [0, 1, 2], [0, 2, 3]])


def test_ascii_ply_with_extra_properties(tmp_path):
    path = tmp_path / "extra.ply"
    path.write_text(
        "ply\nformat ascii 1.0\ncomment hand written\nelement vertex 3\nproperty float x\nproperty float y\n"
        "property float z\nproperty float nx\nproperty uchar red\nproperty uchar green\nproperty uchar blue\n"
        "element face 1\nproperty list uchar int vertex_indices\nproperty uchar flags\nend_header\n"
        "0 0 0 1 255 0 0\n1 0 0 1 0 255 0\n0 1 0.5 1 0 0 51\n3 0 1 2 9\n"
    )
    vertices, triangles, colors = read_ply(path)
    np.testing.assert_array_equal(vertices, [[0, 0, 0], [1, 0, 0], [0, 1, 0.5]])
    np.testing.assert_array_equal(triangles, [[0, 1, 2]])
    np.testing.assert_allclose(colors, [[1, 0, 0], [0, 1, 0], [0, 0, 0.2]])


def test_missing_file_and_unknown_suffix(tmp_path, mesh):
    with pytest.raises(FileNotFoundError, match="absent.ply"):
        read_ply(tmp_path / "absent.ply")
    with pytest.raises(FileNotFoundError, match="absent.obj"):
        read_mesh(tmp_path / "absent.obj")
    with pytest.raises(ValueError, match=r"unsupported mesh format '\.stl'.*\.obj"):
        write_mesh(tmp_path / "mesh.stl", *mesh[:2])
    with pytest.raises(ValueError, match="unsupported mesh format"):
        read_mesh(tmp_path / "mesh.off")


@pytest.mark.parametrize(
    "text, message",
    [
        ("v 0 0 0\nv 1 0\nv 0 1 0\nf 1 2 3\n", r"line 2: expected 'v x y z'"),
        ("v 0 0 0\nv 1 0 zero\nv 0 1 0\nf 1 2 3\n", r"line 2: expected 'v x y z'"),
        ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 x\n", r"line 4: expected 'f a b c'"),
        ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2\n", r"line 4: expected 'f a b c'"),
        ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 4\n", r"face 0 refers to vertex \[0, 1, 3\], but there are 3 vertices"),
        ("hello\n", "no vertex"),
    ],
)
def test_malformed_obj(tmp_path, text, message):
    path = tmp_path / "bad.obj"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        read_obj(path)
    assert str(path) in str(error.value)


PLY_HEADER = (
    "ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\n"
    "element face 1\nproperty list uchar int vertex_indices\nend_header\n"
)


@pytest.mark.parametrize(
    "text, message",
    [
        ("solid\n", "not a PLY file"),
        (PLY_HEADER.replace("ascii", "utf8"), r"header line 2 .*unknown format"),
        (PLY_HEADER.replace("property float z", "property quaternion z"), r"header line 6"),
        (PLY_HEADER + "0 0 0\n1 0 0\n0 1\n3 0 1 2\n", r"element 'vertex' item 2: expected 3 numbers"),
        (PLY_HEADER + "0 0 0\n1 0 0\n0 1 0\n4 0 1 2 2\n", r"element 'face' item 0: expected 4 numbers \(only triangle"),
        (PLY_HEADER + "0 0 0\n1 0 0\n0 1 0\n3 0 1 7\n", r"element 'face' 0 refers to vertex \[0, 1, 7\]"),
        (PLY_HEADER + "0 0 0\n1 0 0\n", r"truncated in element 'vertex'"),
    ],
)
def test_malformed_ascii_ply(tmp_path, text, message):
    path = tmp_path / "bad.ply"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        read_ply(path)
    assert str(path) in str(error.value)


def test_malformed_binary_ply(tmp_path, mesh):
    vertices, triangles, _ = mesh
    path = tmp_path / "mesh.ply"
    write_ply(path, vertices, triangles)
    data = path.read_bytes()
    (tmp_path / "short.ply").write_bytes(data[:-5])
    with pytest.raises(ValueError, match=r"short.ply: file truncated in element 'face'"):
        read_ply(tmp_path / "short.ply")
    body = data.index(b"end_header\n") + len(b"end_header\n") + 12 * len(vertices)
    quad = bytearray(data)
    quad[body + 13 * 5] = 4  # the count byte of face 5
    (tmp_path / "quad.ply").write_bytes(bytes(quad))
    with pytest.raises(ValueError, match=r"quad.ply: element 'face' item 5 has 4 vertices"):
        read_ply(tmp_path / "quad.ply")


def test_writer_validates_and_leaves_nothing_on_error(tmp_path, mesh):
    vertices, triangles, colors = mesh
    with pytest.raises(ValueError, match=r"triangles 0 refers to vertex"):
        write_obj(tmp_path / "a.obj", vertices, triangles + len(vertices))
    with pytest.raises(ValueError, match=r"colors must lie in \[0, 1\]"):
        write_ply(tmp_path / "a.ply", vertices, triangles, colors * 255)
    with pytest.raises(ValueError, match=r"colors must have shape \(1200, 3\)"):
        write_ply(tmp_path / "a.ply", vertices, triangles, colors[:10])
    bad = vertices.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="1 non-finite vertices"):
        write_ply(tmp_path / "a.ply", bad, triangles)
    with pytest.raises(ValueError, match=r"vertices must have shape \(V, 3\)"):
        write_obj(tmp_path / "a.obj", vertices[:, :2], triangles)
    assert list(tmp_path.iterdir()) == []
