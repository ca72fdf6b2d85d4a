"""Triangle mesh files: Wavefront OBJ and PLY, with optional per-vertex colours.

Readers return ``(vertices (V, 3) float64, triangles (T, 3) int64 0-based, colors (V, 3)
float64 or None)``, colours in [0, 1] for the files written here. Writers take colours as floats
in [0, 1] or uint8. OBJ stores
colours as ``v x y z r g b`` (floats in [0, 1], as MeshLab and Open3D read them) and 1-based
faces; PLY is written as binary little-endian with float32 coordinates, uchar colours and int32
indices, and read in ascii or binary form. Writers write a temporary file in the target directory
and rename it (``os.replace``), so a crash never leaves a complete-looking file. Parsing and
formatting are vectorised over the whole file; only a malformed file is re-scanned line by line
to name the offending line. Textured scans (OBJ with ``vt``, VRML) are read by :mod:`data_prep.scans.reading`.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from lightning_vrn.atomic import atomic_path
from lightning_vrn.geometry.mesh_check import check_mesh, check_triangle_ids

MESH_SUFFIXES = (".obj", ".ply")

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}  # fmt: skip


def write_mesh(path, vertices: np.ndarray, triangles: np.ndarray, colors: np.ndarray | None = None) -> None:
    """Write a mesh as OBJ or PLY, chosen by the suffix of ``path`` (see :func:`write_obj`, :func:`write_ply`)."""
    writer = {".obj": write_obj, ".ply": write_ply}.get(_suffix(path))
    writer(path, vertices, triangles, colors)


def read_mesh(path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Read an OBJ or PLY mesh, chosen by the suffix of ``path``: ``(vertices, triangles, colors | None)``."""
    reader = {".obj": read_obj, ".ply": read_ply}.get(_suffix(path))
    return reader(path)


def write_obj(path, vertices: np.ndarray, triangles: np.ndarray, colors: np.ndarray | None = None) -> None:
    """Write ``(V, 3)`` vertices, ``(T, 3)`` 0-based triangles and optional ``(V, 3)`` colours as OBJ.

    Coordinates are printed with 9 significant digits (exact for float32), colours as floats in
    [0, 1] with 6 digits (exact for uint8 after ``round(c * 255)``); faces are 1-based.
    """
    vertices, triangles, colors = _checked_mesh(path, vertices, triangles, colors)
    if colors is None:
        vertex_text = ("v %.9g %.9g %.9g\n" * len(vertices)) % tuple(vertices.ravel())
    else:
        rows = np.hstack([vertices, colors.astype(np.float64) / 255.0])
        vertex_text = ("v %.9g %.9g %.9g %.6g %.6g %.6g\n" * len(vertices)) % tuple(rows.ravel())
    face_text = ("f %d %d %d\n" * len(triangles)) % tuple((triangles + 1).ravel())
    header = f"# {len(vertices)} vertices, {len(triangles)} triangles, written by lightning_vrn\n"
    _atomic_write(path, (header + vertex_text + face_text).encode("ascii"))


def read_obj(path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Read vertices, triangles and optional ``v x y z r g b`` colours (returned as stored) from an OBJ file.

    Face entries may be ``i``, ``i/t``, ``i//n`` or ``i/t/n``; negative entries count back from the
    end of the vertex list; polygons are split into triangle fans. Texture coordinates, normals,
    groups and materials are ignored.
    """
    path = Path(path)
    text = read_file_bytes(path).decode("utf-8", errors="replace")
    vertex_lines = re.findall(r"^v[ \t]+([^\n]*)", text, flags=re.MULTILINE)
    face_lines = re.findall(r"^f[ \t]+([^\n]*)", text, flags=re.MULTILINE)
    if not vertex_lines:
        raise ValueError(f"{path}: no vertex ('v x y z') lines: not an OBJ mesh")
    vertex_block = "\n".join(vertex_lines)
    face_block = re.sub(r"/\S*", "", "\n".join(face_lines))  # keep the vertex index of 'i/t/n'

    n_vertices = len(vertex_lines)
    width = len(vertex_lines[0].split())
    consistent = width in (3, 6) and _lines_of_width(vertex_block, width) == n_vertices
    values = parse_numbers(vertex_block) if consistent else None
    if values is None:
        problem = "expected 'v x y z' or 'v x y z r g b' with numbers, the same on every line"
        _raise_at_bad_line(path, text, "v", problem)
    values = values.reshape(n_vertices, width)
    vertices, colors = values[:, :3], (values[:, 3:] if width == 6 else None)

    try:
        if _lines_of_width(face_block, 3) == len(face_lines):
            corners = np.array(face_block.split(), dtype=np.int64).reshape(-1, 3)
        else:  # polygons: split each into a triangle fan (slow path, rare)
            polygons = [line.split() for line in face_block.split("\n")]
            if min(map(len, polygons)) < 3:
                raise ValueError("a face needs at least 3 vertices")
            fans = [(p[0], p[i], p[i + 1]) for p in polygons for i in range(1, len(p) - 1)]
            corners = np.array(fans, dtype=np.int64)
    except ValueError:
        problem = "expected 'f a b c' with at least 3 integer entries like '7', '7/2' or '7/2/5'"
        _raise_at_bad_line(path, text, "f", problem)
    triangles = np.where(corners < 0, corners + n_vertices, corners - 1).reshape(-1, 3)
    check_triangle_ids(triangles, n_vertices, f"{path}: face")
    return vertices, triangles, colors


def write_ply(path, vertices: np.ndarray, triangles: np.ndarray, colors: np.ndarray | None = None) -> None:
    """Write a binary little-endian PLY: float32 ``x y z``, optional uchar ``red green blue``, int32 faces."""
    vertices, triangles, colors = _checked_mesh(path, vertices, triangles, colors)
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if colors is not None:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    records = np.empty(len(vertices), dtype=fields)
    for axis, name in enumerate("xyz"):
        records[name] = vertices[:, axis]
    if colors is not None:
        for channel, name in enumerate(("red", "green", "blue")):
            records[name] = colors[:, channel]
    faces = np.empty(len(triangles), dtype=[("count", "u1"), ("indices", "<i4", (3,))])
    faces["count"] = 3
    faces["indices"] = triangles
    colour_header = "property uchar red\nproperty uchar green\nproperty uchar blue\n" if colors is not None else ""
    header = (
        "ply\nformat binary_little_endian 1.0\ncomment written by lightning_vrn\n"
        f"element vertex {len(vertices)}\nproperty float x\nproperty float y\nproperty float z\n{colour_header}"
        f"element face {len(triangles)}\nproperty list uchar int vertex_indices\nend_header\n"
    )
    _atomic_write(path, header.encode("ascii") + records.tobytes() + faces.tobytes())


def read_ply(path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Read an ascii or binary PLY triangle mesh (``vertex`` x/y/z and optional red/green/blue, ``face`` lists).

    Other elements and properties are skipped; faces must be triangles. uchar colours are scaled to
    [0, 1], float colours are returned as stored.
    """
    path = Path(path)
    data = read_file_bytes(path)
    fmt, elements, body_start = _parse_ply_header(path, data)
    tables = {}
    if fmt == "ascii":
        lines = data[body_start:].decode("ascii", errors="replace").splitlines()
        start = 0
        for name, count, properties in elements:
            if start + count > len(lines):
                raise ValueError(
                    f"{path}: file truncated in element '{name}': "
                    f"{count} items declared, {len(lines) - start} lines left"
                )
            tables[name] = _ascii_ply_element(path, name, lines[start : start + count], properties)
            start += count
    else:
        order = "<" if fmt == "binary_little_endian" else ">"
        offset = body_start
        for name, count, properties in elements:
            dtype = _ply_dtype(path, name, properties, order)
            size = count * dtype.itemsize
            if offset + size > len(data):
                raise ValueError(
                    f"{path}: file truncated in element '{name}': needs {size} bytes for {count} items, "
                    f"{len(data) - offset} left"
                )
            tables[name] = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
            offset += size

    if "vertex" not in tables or not {"x", "y", "z"} <= set(tables["vertex"].dtype.names):
        raise ValueError(f"{path}: PLY has no 'vertex' element with x, y, z properties")
    vertex = tables["vertex"]
    vertices = np.column_stack([vertex[a].astype(np.float64) for a in "xyz"])
    colors = None
    if {"red", "green", "blue"} <= set(vertex.dtype.names):
        colors = np.column_stack([vertex[c].astype(np.float64) for c in ("red", "green", "blue")])
        if vertex.dtype["red"] == np.uint8:
            colors /= 255.0
    face = tables.get("face")
    if face is None:
        triangles = np.zeros((0, 3), dtype=np.int64)
    elif "count" not in face.dtype.names:
        raise ValueError(f"{path}: element 'face' has no 'vertex_indices' list property")
    else:
        bad = np.flatnonzero(face["count"] != 3)
        if len(bad):
            raise ValueError(
                f"{path}: element 'face' item {bad[0]} has {face['count'][bad[0]]} vertices; "
                "only triangle meshes are supported"
            )
        triangles = face["indices"].astype(np.int64).reshape(-1, 3)
    check_triangle_ids(triangles, len(vertices), f"{path}: element 'face'")
    return vertices, triangles, colors


def _suffix(path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in MESH_SUFFIXES:
        raise ValueError(f"unsupported mesh format {suffix or '(no suffix)'!r} for {path}; use one of {MESH_SUFFIXES}")
    return suffix


def _checked_mesh(path, vertices, triangles, colors):
    """Validate writer inputs (:func:`check_mesh`); return float64 vertices, int64 triangles, uint8 colours or None."""
    vertices, triangles = check_mesh(vertices, triangles, f"writing {path}")
    if colors is None:
        return vertices, triangles, None
    colors = np.asarray(colors)
    if colors.shape != vertices.shape:
        raise ValueError(
            f"writing {path}: colors must have shape {vertices.shape} like the vertices, got {colors.shape}"
        )
    if colors.dtype == np.uint8:
        return vertices, triangles, colors
    colors = colors.astype(np.float64)
    if not (np.isfinite(colors).all() and colors.min(initial=0) >= 0 and colors.max(initial=0) <= 1):
        raise ValueError(f"writing {path}: float colors must lie in [0, 1] (or pass uint8 in 0..255)")
    return vertices, triangles, np.round(colors * 255).astype(np.uint8)


def _atomic_write(path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` through a temporary file (:func:`lightning_vrn.atomic.atomic_path`)."""
    with atomic_path(path) as temp:
        temp.write_bytes(payload)


def read_file_bytes(path: Path) -> bytes:
    """The bytes of a mesh file; FileNotFoundError naming it when it is missing."""
    if not path.is_file():
        raise FileNotFoundError(f"mesh file not found: {path}")
    return path.read_bytes()


def _lines_of_width(block: str, width: int) -> int:
    """Number of lines of ``block`` holding exactly ``width`` whitespace-separated tokens."""
    return len(re.findall(rf"^\S+(?:[ \t]+\S+){{{width - 1}}}[ \t\r]*$", block, flags=re.MULTILINE))


def _raise_at_bad_line(path, text, kind, problem):
    """Slow path, only on error: find the first malformed ``v`` or ``f`` line and raise naming it."""
    widths = set()
    for number, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens or tokens[0] != kind:
            continue
        entries = tokens[1:] if kind == "v" else [t.split("/")[0] for t in tokens[1:]]
        try:
            [float(e) if kind == "v" else int(e) for e in entries]  # raises on a non-number
            numeric = True
        except ValueError:
            numeric = False
        widths.add(len(entries))
        if kind == "v":
            valid = numeric and len(entries) in (3, 6) and len(widths) == 1
        else:
            valid = numeric and len(entries) >= 3
        if not valid:
            raise ValueError(f"{path}: line {number}: {problem}; got {line.strip()!r}")
    raise ValueError(f"{path}: malformed '{kind}' lines: {problem}")


def _parse_ply_header(path, data: bytes):
    """-> ``(format, [(element, count, [(property, type or ('list', count type, item type))]), body offset)``."""
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise ValueError(f"{path}: not a PLY file (it must start with 'ply' and have an 'end_header' line)")
    body_start = data.index(b"\n", end) + 1 if b"\n" in data[end:] else len(data)
    fmt, elements = None, []
    for number, line in enumerate(data[:end].decode("ascii", errors="replace").splitlines(), start=1):
        tokens = line.split()
        try:
            if not tokens or tokens[0] in ("ply", "comment", "obj_info"):
                continue
            if tokens[0] == "format":
                fmt = tokens[1]
                if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
                    raise ValueError(f"unknown format {fmt!r}")
            elif tokens[0] == "element":
                elements.append((tokens[1], int(tokens[2]), []))
            elif tokens[0] == "property" and tokens[1] == "list":
                elements[-1][2].append((tokens[4], ("list", _PLY_TYPES[tokens[2]], _PLY_TYPES[tokens[3]])))
            elif tokens[0] == "property":
                elements[-1][2].append((tokens[2], _PLY_TYPES[tokens[1]]))
            else:
                raise ValueError(f"unknown keyword {tokens[0]!r}")
        except (IndexError, KeyError, ValueError) as error:
            raise ValueError(f"{path}: PLY header line {number} {line.strip()!r} is malformed ({error})") from None
    if fmt is None:
        raise ValueError(f"{path}: PLY header has no 'format' line")
    return fmt, elements, body_start


def _ply_dtype(path, name, properties, order) -> np.dtype:
    """Record layout of one element; a face's vertex list becomes fields ``count`` and ``indices`` (3,)."""
    fields = []
    for prop, kind in properties:
        if isinstance(kind, tuple):
            if name != "face" or prop not in ("vertex_indices", "vertex_index"):
                raise ValueError(
                    f"{path}: element '{name}' has a list property '{prop}'; only face vertex lists are supported"
                )
            fields += [("count", order + kind[1]), ("indices", order + kind[2], (3,))]
        else:
            fields.append((prop, order + kind))
    return np.dtype(fields)


def _ascii_ply_element(path, name, lines, properties):
    """Parse the ascii lines of one element into records of :func:`_ply_dtype` (triangles only for faces)."""
    dtype = _ply_dtype(path, name, properties, "=")
    sizes = [int(np.prod(dtype[field].shape)) for field in dtype.names]
    values = parse_numbers(" ".join(lines))
    if values is None or values.size != sum(sizes) * len(lines):
        for index, line in enumerate(lines):
            if len(line.split()) != sum(sizes) or parse_numbers(line) is None:
                hint = " (only triangle faces are supported)" if name == "face" else ""
                raise ValueError(
                    f"{path}: element '{name}' item {index}: expected {sum(sizes)} numbers{hint}, got {line.strip()!r}"
                )
        raise ValueError(f"{path}: element '{name}' is malformed")
    values = values.reshape(len(lines), -1)
    records = np.empty(len(lines), dtype=dtype)
    for field, start, size in zip(dtype.names, np.cumsum([0] + sizes), sizes):
        records[field] = values[:, start : start + size].reshape(records[field].shape)
    return records


def parse_numbers(text: str) -> np.ndarray | None:
    """Whitespace-separated numbers of ``text`` as a flat float64 array, or None if one is not a number."""
    try:
        return np.array(text.split(), dtype=np.float64)
    except ValueError:
        return None


# ----------------------------------------------------------------------------- winding


def front_facing(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """``(T, 3)`` ``triangles`` wound counter-clockwise seen from the front (+z, the model frame): reversed
    (``[:, ::-1]``) when the area-weighted normals point mostly to -z. Scanners and face models ship either
    winding; the suite's renderer and voxeliser expect this one."""
    corners = np.asarray(vertices, dtype=np.float64)[triangles]
    normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    return triangles if normals[:, 2].sum() >= 0 else triangles[:, ::-1].copy()
