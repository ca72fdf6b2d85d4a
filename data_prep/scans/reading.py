"""Reading real textured 3D scans (Florence / MICC, BU-4DFE): finding them under a dataset root, the textured
``.obj`` and VRML ``.wrl`` readers, and per-vertex albedo sampled from the texture (docs/datasets_scans.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from lightning_vrn.geometry.mesh_check import check_triangle_ids
from lightning_vrn.geometry.mesh_io import front_facing, parse_numbers, read_file_bytes, read_obj

TEXTURED_SUFFIXES = (".obj", ".wrl")


class ScanError(ValueError):
    """A scan that cannot become samples (unreadable, untextured, no face): skipped and reported."""


@dataclass
class Scan:
    """A scan ready to render: ``vertices`` (V, 3) in its own units (model frame: y up, z towards the
    camera), ``triangles`` (T, 3) counter-clockwise seen from the front, ``albedo`` (V, 3) in [0, 1]."""

    vertices: np.ndarray
    triangles: np.ndarray
    albedo: np.ndarray


# ----------------------------------------------------------------------------- finding scans


@dataclass(frozen=True)
class ScanSet:
    """What a dataset CLI found: ``paths`` of the scans, their ``ids`` (paths under the root without suffix),
    ``labels`` (expression label id per scan, or None) with ``expression_names``, and ``poses_deg`` (P, 3)."""

    name: str
    paths: Sequence[Path]
    ids: Sequence[str]
    poses_deg: np.ndarray
    labels: Sequence[int] | None = None
    expression_names: Sequence[str] | None = None


def find_scans(root: Path, pattern: str, suffix_hint: str) -> list[Path]:
    """Sorted files under ``root`` matching the glob ``pattern``; an error naming both when there is none."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--root {root} is not a folder; pass the dataset's top folder")
    paths = sorted(path for path in root.glob(pattern) if path.is_file())
    if not paths:
        raise FileNotFoundError(f"no scan matches {pattern!r} under {root}; check --root, or pass --pattern for "
                                f"another layout (the {suffix_hint} files)")
    return paths


def scan_id(path: Path, root: Path) -> str:
    """A scan's id: its path under ``root`` without the suffix (``subject_01/Model/frontal1/obj/110920150452``)."""
    return Path(path).relative_to(root).with_suffix("").as_posix()


# ----------------------------------------------------------------------------- textured meshes


@dataclass(frozen=True)
class TexturedMesh:
    """A triangle mesh with a texture map, as 3D scanners export it.

    ``vertices`` (V, 3) float64 in the file's units; ``triangles`` (T, 3) int64 0-based vertex ids;
    ``uv`` (K, 2) float64 texture coordinates (u right, v UP, the image spans [0, 1]^2);
    ``uv_triangles`` (T, 3) int64 ids into ``uv`` for each triangle corner; ``texture_path`` the image.
    """

    vertices: np.ndarray
    triangles: np.ndarray
    uv: np.ndarray
    uv_triangles: np.ndarray
    texture_path: Path


def read_textured_mesh(path) -> TexturedMesh:
    """Read a textured ``.obj`` (:func:`read_textured_obj`) or VRML ``.wrl`` (:func:`read_wrl`) by suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in TEXTURED_SUFFIXES:
        raise ValueError(f"unsupported textured mesh format {suffix or '(no suffix)'!r} for {path}; "
                         f"use one of {TEXTURED_SUFFIXES}")
    return read_textured_obj(path) if suffix == ".obj" else read_wrl(path)


def read_textured_obj(path) -> TexturedMesh:
    """A Wavefront OBJ with ``vt`` texture coordinates, ``f v/vt ...`` faces and its texture image.

    The image is the ``map_Kd`` of the material library named by ``mtllib`` (paths relative to the
    OBJ's folder); without a library, an image beside the OBJ with the same stem (.bmp, .png, .jpg).
    Polygons are split into triangle fans as in :func:`~lightning_vrn.geometry.mesh_io.read_obj`.
    """
    path = Path(path)
    vertices, triangles, _ = read_obj(path)
    text = read_file_bytes(path).decode("utf-8", errors="replace")
    uv = _texture_coordinates(path, re.findall(r"^vt[ \t]+([^\n]*)", text, flags=re.MULTILINE))
    face_block = "\n".join(re.findall(r"^f[ \t]+([^\n]*)", text, flags=re.MULTILINE))
    corners = re.findall(r"\S+", face_block)
    if any(len(corner.split("/")) < 2 or not corner.split("/")[1] for corner in corners):
        raise ValueError(f"{path}: faces without texture indices (expected 'f v/vt v/vt v/vt'); "
                         f"export the scan with its texture coordinates")
    uv_block = re.sub(r"(?m)(^|[ \t])[^/\s]*/([^/\s]*)\S*", r"\1\2", face_block)
    uv_triangles = _fans(path, [line.split() for line in uv_block.split("\n")], len(uv), "face texture index")
    if uv_triangles.shape != triangles.shape:
        raise ValueError(f"{path}: {len(uv_triangles)} textured triangles but {len(triangles)} triangles")
    return TexturedMesh(vertices, triangles, uv, uv_triangles, _obj_texture(path, text))


def read_wrl(path) -> TexturedMesh:
    """A VRML ``.wrl`` textured ``IndexedFaceSet`` (BU-3DFE / BU-4DFE scans): the first one in the file.

    VRML 2.0 (``coord Coordinate { point [...] }``, ``coordIndex``, ``texCoord TextureCoordinate
    { point [...] }``, ``texCoordIndex``, ``ImageTexture { url "..." }``) and VRML 1.0 (``Coordinate3``,
    ``TextureCoordinate2``, ``textureCoordIndex``, ``Texture2 { filename "..." }``). Faces are
    ``-1``-terminated polygons, split into fans; without ``texCoordIndex`` the texture coordinates
    follow ``coordIndex`` (the VRML rule). The image path is relative to the ``.wrl``'s folder.
    """
    path = Path(path)
    text = read_file_bytes(path).decode("utf-8", errors="replace")
    if not text.lstrip().startswith("#VRML"):
        raise ValueError(f"{path}: not a VRML file (it must start with '#VRML V2.0' or '#VRML V1.0')")

    def block(pattern: str) -> str | None:
        match = re.search(pattern + r"\s*\[([^\]]*)\]", text)
        return None if match is None else match.group(1).replace(",", " ")

    point_text = block(r"(?<!Texture)Coordinate3?\s*\{\s*point")
    index_text = block(r"\bcoordIndex")
    if point_text is None or index_text is None:
        raise ValueError(f"{path}: no IndexedFaceSet with 'coord Coordinate {{ point [...] }}' and 'coordIndex [...]'")
    points = parse_numbers(point_text)
    if points is None or points.size % 3 or not points.size:
        raise ValueError(f"{path}: Coordinate point list is not x y z number triples")
    vertices = points.reshape(-1, 3)
    triangles = _fans(path, _polygons(path, index_text, "coordIndex"), len(vertices), "coordIndex")
    uv_text = block(r"TextureCoordinate2?\s*\{\s*point")
    if uv_text is None:
        raise ValueError(f"{path}: no 'texCoord TextureCoordinate {{ point [...] }}': the scan has no texture "
                         f"mapping; use the textured export")
    uv = _texture_coordinates(path, [uv_text], pairs=True)
    uv_index_text = block(r"\b(?:texCoordIndex|textureCoordIndex)")
    if uv_index_text is None:
        if triangles.max() >= len(uv):
            raise ValueError(f"{path}: no texCoordIndex, so the texture coordinates follow coordIndex, but there are "
                             f"{len(uv)} texture coordinates for {len(vertices)} vertices (coordIndex uses ids up to "
                             f"{triangles.max()}); the file is truncated or not a textured export")
        uv_triangles = triangles
    else:
        uv_triangles = _fans(path, _polygons(path, uv_index_text, "texCoordIndex"), len(uv), "texCoordIndex")
    if uv_triangles.shape != triangles.shape:
        raise ValueError(f"{path}: texCoordIndex gives {len(uv_triangles)} triangles, coordIndex {len(triangles)}")
    match = re.search(r"(?:url|filename)\s*\[?\s*\"([^\"]+)\"", text)
    if match is None:
        raise ValueError(f"{path}: no texture image ('ImageTexture {{ url \"...\" }}'); use the textured export")
    texture = path.parent / match.group(1)
    if not texture.is_file():
        raise FileNotFoundError(f"{path}: texture image {texture} (its ImageTexture url) not found; put the image "
                                f"beside the .wrl as the dataset ships it")
    return TexturedMesh(vertices, triangles, uv, uv_triangles, texture)


def _texture_coordinates(path: Path, lines: list[str], pairs: bool = False) -> np.ndarray:
    """``(K, 2)`` u, v from the contents of ``vt`` lines (``u v`` or ``u v w``), or with ``pairs`` from one VRML
    point list of u v pairs."""
    if not lines:
        raise ValueError(f"{path}: no texture coordinates ('vt u v' lines): the scan has no texture mapping; "
                         f"export it with its texture")
    if pairs:
        values = parse_numbers(lines[0])
        if values is None or values.size % 2 or not values.size:
            raise ValueError(f"{path}: TextureCoordinate point list is not u v number pairs")
        return values.reshape(-1, 2)
    width = len(lines[0].split())
    values = parse_numbers("\n".join(lines)) if width in (2, 3) else None
    if values is None or values.size != width * len(lines):
        raise ValueError(f"{path}: malformed 'vt' lines (expected 'vt u v' or 'vt u v w', the same on every line)")
    return values.reshape(len(lines), width)[:, :2]


def _polygons(path: Path, text: str, what: str) -> list[list[str]]:
    """A VRML ``-1``-terminated index list -> polygons as lists of index strings."""
    values = text.split()
    polygons, current = [], []
    for value in values:
        if value == "-1":
            polygons.append(current)
            current = []
        else:
            current.append(value)
    if current:
        polygons.append(current)
    if not polygons:
        raise ValueError(f"{path}: {what} is empty")
    return polygons


def _fans(path: Path, polygons: list[list[str]], count: int, what: str) -> np.ndarray:
    """Polygons of 0-based (VRML) or 1-based / negative (OBJ texture) id strings -> ``(T, 3)`` int64 triangle fans.

    ``what`` names the list in errors; OBJ lists ("face texture index") are 1-based, negative counting back.
    """
    if min(map(len, polygons)) < 3:
        raise ValueError(f"{path}: a {what} polygon has fewer than 3 corners")
    try:
        if all(len(p) == 3 for p in polygons):
            ids = np.array(polygons, dtype=np.int64)
        else:
            ids = np.array([(p[0], p[i], p[i + 1]) for p in polygons for i in range(1, len(p) - 1)], dtype=np.int64)
    except ValueError:
        raise ValueError(f"{path}: {what} entries must be integers") from None
    if what.startswith("face"):
        ids = np.where(ids < 0, ids + count, ids - 1)
    check_triangle_ids(ids, count, f"{path}: {what} of triangle")
    return ids


def _obj_texture(path: Path, text: str) -> Path:
    """The texture image of an OBJ: its material library's ``map_Kd``, else an image of the OBJ's stem."""
    library = re.search(r"^mtllib[ \t]+([^\n]+?)[ \t\r]*$", text, flags=re.MULTILINE)
    if library is not None:
        mtl = path.parent / library.group(1)
        if not mtl.is_file():
            raise FileNotFoundError(f"{path}: material library {mtl} (its mtllib) not found; put it beside the .obj")
        maps = re.findall(r"^[ \t]*map_Kd[ \t]+([^\n]+?)[ \t\r]*$", mtl.read_text(errors="replace"), flags=re.MULTILINE)
        if not maps:
            raise ValueError(f"{mtl}: no 'map_Kd IMAGE' line: the material has no texture image")
        texture = mtl.parent / maps[0].split()[-1]
        if not texture.is_file():
            raise FileNotFoundError(f"{path}: texture image {texture} (map_Kd of {mtl.name}) not found; put the "
                                    f"image beside the .mtl as the dataset ships it")
        return texture
    for suffix in (".bmp", ".png", ".jpg", ".jpeg"):
        if path.with_suffix(suffix).is_file():
            return path.with_suffix(suffix)
    raise FileNotFoundError(f"{path}: no texture image: no 'mtllib' line and no {path.stem}.bmp/.png/.jpg beside it")


# ----------------------------------------------------------------------------- scans ready to render


def load_scan(path) -> Scan:
    """Read a textured ``.obj`` / ``.wrl`` scan and its texture; :class:`ScanError` names the file and the problem."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        mesh = read_textured_mesh(path)
    except (OSError, ValueError) as error:
        raise ScanError(str(error)) from None
    try:
        with Image.open(mesh.texture_path) as image:
            texture = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    except (OSError, UnidentifiedImageError) as error:
        raise ScanError(f"{path}: texture image {mesh.texture_path} cannot be read ({error})") from None
    if not np.isfinite(mesh.vertices).all():
        raise ScanError(f"{path}: the scan has NaN or inf coordinates")
    triangles = front_facing(mesh.vertices, mesh.triangles)
    return Scan(mesh.vertices, triangles, texture_albedo(mesh, texture))


def texture_albedo(mesh: TexturedMesh, texture: np.ndarray) -> np.ndarray:
    """``(V, 3)`` per-vertex albedo: the mean over a vertex's triangle corners of the bilinear sample of the
    ``(H, W, 3)`` texture (in [0, 1]) at the corner's texture coordinate (v up; clamped to the image).
    Vertices in no triangle get mid grey."""
    height, width = texture.shape[:2]
    uv = mesh.uv[mesh.uv_triangles.ravel()]                                   # (3T, 2)
    x = np.clip(uv[:, 0], 0.0, 1.0) * (width - 1)
    y = (1.0 - np.clip(uv[:, 1], 0.0, 1.0)) * (height - 1)
    x0 = np.clip(x.astype(np.int64), 0, max(width - 2, 0))
    y0 = np.clip(y.astype(np.int64), 0, max(height - 2, 0))
    x1, y1 = np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    samples = ((1 - fy) * ((1 - fx) * texture[y0, x0] + fx * texture[y0, x1])
               + fy * ((1 - fx) * texture[y1, x0] + fx * texture[y1, x1]))
    corner_vertex = mesh.triangles.ravel()
    count = np.bincount(corner_vertex, minlength=len(mesh.vertices))
    albedo = np.stack([np.bincount(corner_vertex, samples[:, c], minlength=len(mesh.vertices)) for c in range(3)], 1)
    albedo[count == 0] = 0.5
    return albedo / np.maximum(count, 1)[:, None]
