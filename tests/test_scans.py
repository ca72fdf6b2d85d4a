"""Real-scan test sets (Florence, BU-4DFE) on fake scans: readers, renders at the paper's poses, lifted landmarks,
variable-length ground truth, the scan NME against an independent computation, the CLIs end to end."""

import json
import math

import h5py
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from data_prep import bu4dfe, florence
from data_prep.face_model import load_face_model
from data_prep.render import RenderSettings
from data_prep.scans import cache, conversion
from data_prep.scans.landmarks import (
    FACE_RADIUS_RATIO,
    FRONTAL_SIZE,
    NOSE_TIP,
    LandmarkDetector,
    face_region,
    frontal_view,
    neutral_settings,
    read_landmark_file,
)
from data_prep.scans.reading import ScanError, ScanSet, load_scan, read_textured_mesh, scan_id
from datamodules import FaceVolumeDataModule
from lightning_vrn.atomic import file_sha256
from lightning_vrn.callbacks import NMECallback
from lightning_vrn.dataset_file import SCHEMA_VERSION, DatasetError, DatasetWriter, open_dataset
from lightning_vrn.geometry.grid import VoxelGrid
from lightning_vrn.landmark_scheme import outer_interocular
from lightning_vrn.metrics.nme import NME
from tests.helpers.stub_models import TargetVolumeModel

MODEL = load_face_model("builtin")
TRUTH = MODEL.mean[MODEL.landmark_vertices].astype(np.float64)  # (68, 3) mm: the fake scan's landmarks
GRID = VoxelGrid.parse("100,96,96")  # the quickstart grid
TEXTURE_SIZE = 128
ATTRS = {"face_model": "none (scans)", "source": "unit-test", "seed": 0, "created_by": "tests"}


# ----------------------------------------------------------------------------- fake scans


def fake_uv(points: np.ndarray) -> np.ndarray:
    """Texture coordinates of the fake scan: its frontal x, y box mapped onto [0, 1]^2."""
    lo, hi = MODEL.mean[:, :2].min(0), MODEL.mean[:, :2].max(0)
    return (points[:, :2] - lo) / (hi - lo)


def fake_texture() -> np.ndarray:
    """(S, S, 3) uint8 texture that encodes its own coordinates: RGB = (0.2 + 0.6 u, 0.2 + 0.6 v, 0.5)."""
    u, v = np.meshgrid(np.arange(TEXTURE_SIZE) / (TEXTURE_SIZE - 1), 1 - np.arange(TEXTURE_SIZE) / (TEXTURE_SIZE - 1))
    return np.round(np.stack([0.2 + 0.6 * u, 0.2 + 0.6 * v, np.full_like(u, 0.5)], -1) * 255).astype(np.uint8)


def decode_uv(image: np.ndarray) -> np.ndarray:
    """(H, W, 2) texture coordinates of a render of the fake scan under grey light (R/B and G/B are shading-free)."""
    rgb = image.astype(np.float64) + 0.5
    return np.stack([(rgb[..., c] * 0.5 / rgb[..., 2] - 0.2) / 0.6 for c in (0, 1)], -1)


def fake_detect(image: np.ndarray) -> np.ndarray:
    """A 'detector' that reads the image alone: per landmark, the pixel whose decoded texture coordinate is nearest."""
    uv = decode_uv(image)
    uv[np.ptp(image.astype(int), axis=-1) < 3] = 99.0  # the grey background
    distance = np.linalg.norm(uv[None] - fake_uv(TRUTH)[:, None, None], axis=-1).reshape(len(TRUTH), -1)
    rows, cols = np.unravel_index(distance.argmin(1), image.shape[:2])
    return np.stack([cols, rows], 1).astype(np.float64)


def write_obj_scan(folder, name, shift=(0.0, 0.0, 0.0), reverse=False):
    """An .obj + .mtl + .bmp scan of the built-in mean face (mm), as a scanner exports it."""
    folder.mkdir(parents=True, exist_ok=True)
    triangles = MODEL.triangles[:, ::-1] if reverse else MODEL.triangles
    Image.fromarray(fake_texture()).save(folder / f"{name}.bmp")
    (folder / f"{name}.mtl").write_text(f"newmtl skin\nKd 1 1 1\nmap_Kd {name}.bmp\n")
    lines = [f"mtllib {name}.mtl"] + [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in MODEL.mean + shift]
    lines += [f"vt {u:.6f} {v:.6f}" for u, v in fake_uv(MODEL.mean)] + ["usemtl skin"]
    lines += [f"f {a}/{a}/1 {b}/{b}/1 {c}/{c}/1" for a, b, c in triangles + 1]
    (folder / f"{name}.obj").write_text("\n".join(lines) + "\n")
    return folder / f"{name}.obj"


def write_wrl_scan(folder, name, shift=(0.0, 0.0, 0.0)):
    """A VRML 2.0 .wrl + .bmp scan as BU-4DFE ships it (IndexedFaceSet with coord, texCoord and their indices)."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(fake_texture()).save(folder / f"{name}.bmp")
    points = ",\n".join(f"{x:.6f} {y:.6f} {z:.6f}" for x, y, z in MODEL.mean + shift)
    uv = ",\n".join(f"{u:.6f} {v:.6f}" for u, v in fake_uv(MODEL.mean))
    faces = ",\n".join(f"{a}, {b}, {c}, -1" for a, b, c in MODEL.triangles)
    (folder / f"{name}.wrl").write_text(f"""#VRML V2.0 utf8
Transform {{ children [ Shape {{
  appearance Appearance {{ texture ImageTexture {{ url "{name}.bmp" }} }}
  geometry IndexedFaceSet {{
    coord DEF co Coordinate {{ point [
{points}
    ] }}
    coordIndex [
{faces}
    ]
    texCoord TextureCoordinate {{ point [
{uv}
    ] }}
    texCoordIndex [
{faces}
    ]
  }}
}} ] }}
""")
    return folder / f"{name}.wrl"


class FakeDetector(LandmarkDetector):
    """:class:`LandmarkDetector`'s two passes with :func:`fake_detect` in place of the network."""

    def __init__(self, checkpoint=None, crop_size=96):
        self.crop_size = crop_size
        self.images = []

    def detect(self, image):
        self.images.append(image)
        return fake_detect(image)


@pytest.fixture()
def grey_light(monkeypatch):
    """Samples lit like the frontal render (grey light), so the image's texture coordinates can be decoded."""
    monkeypatch.setattr(RenderSettings, "sample", staticmethod(lambda rng: neutral_settings()))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scan")
    return cache.prepare_scan(write_obj_scan(folder, "scan"), "scan", detector=FakeDetector())


# ----------------------------------------------------------------------------- readers


def test_obj_and_wrl_readers_round_trip_with_texture(tmp_path):
    for path in (write_obj_scan(tmp_path / "obj", "a"), write_wrl_scan(tmp_path / "wrl", "000")):
        mesh = read_textured_mesh(path)
        np.testing.assert_allclose(mesh.vertices, MODEL.mean, atol=1e-5)
        np.testing.assert_array_equal(mesh.triangles, MODEL.triangles)
        np.testing.assert_allclose(mesh.uv[mesh.uv_triangles], fake_uv(MODEL.mean)[MODEL.triangles], atol=1e-5)
        assert mesh.texture_path == path.with_suffix(".bmp")
        scan = load_scan(path)
        # Albedo = the texture at each vertex's coordinate: RGB = 0.2 + 0.6 (u, v), 0.5 (to uint8 rounding).
        expected = np.column_stack([0.2 + 0.6 * fake_uv(MODEL.mean), np.full(len(MODEL.mean), 0.5)])
        np.testing.assert_allclose(scan.albedo, expected, atol=3 / 255)


def test_polygons_are_split_into_fans_with_their_texture_corners(tmp_path):
    Image.fromarray(fake_texture()).save(tmp_path / "quad.png")
    (tmp_path / "quad.obj").write_text("v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nvt 0 0\nvt 1 0\nvt 1 1\nvt 0 1\n"
                                       "f 1/4 2/3 3/2 4/1\n")
    mesh = read_textured_mesh(tmp_path / "quad.obj")  # no mtllib: the image of the same stem
    np.testing.assert_array_equal(mesh.triangles, [[0, 1, 2], [0, 2, 3]])
    np.testing.assert_array_equal(mesh.uv_triangles, [[3, 2, 1], [3, 1, 0]])
    assert mesh.texture_path == tmp_path / "quad.png"


def test_either_winding_is_rendered_from_the_front(tmp_path):
    scan = load_scan(write_obj_scan(tmp_path, "reversed", reverse=True))
    np.testing.assert_array_equal(scan.triangles, MODEL.triangles)


@pytest.mark.parametrize("damage, message", [
    (lambda path: path.with_suffix(".bmp").unlink(), "texture image"),
    (lambda path: path.with_suffix(".mtl").unlink(), "material library"),
    (lambda path: path.write_text("v 1 2\nf 1 2 3\n"), "line 1"),
    (lambda path: path.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n"), "texture"),
    (lambda path: path.with_suffix(".bmp").write_bytes(b"not an image"), "cannot be read"),
])
def test_broken_obj_scans_raise_a_scan_error_naming_the_file(tmp_path, damage, message):
    path = write_obj_scan(tmp_path, "broken")
    damage(path)
    with pytest.raises(ScanError, match=message) as error:
        load_scan(path)
    assert "broken" in str(error.value)


def write_wrl_without_uv_index(folder, name, num_uv):
    """A .wrl scan without texCoordIndex (texture coordinates follow coordIndex) and only ``num_uv`` of them."""
    path = write_wrl_scan(folder, name)
    text = path.read_text()
    head, _, rest = text.partition("    texCoordIndex [")
    text = head + rest.partition("]")[2]
    uv_head, _, uv_rest = text.partition("texCoord TextureCoordinate { point [\n")
    uv_block, _, tail = uv_rest.partition("\n    ] }")
    kept_uv = ",\n".join(uv_block.split(",\n")[:num_uv])
    text = uv_head + "texCoord TextureCoordinate { point [\n" + kept_uv + "\n    ] }" + tail
    path.write_text(text)
    return path


def test_wrl_without_uv_index_and_too_few_uv_is_a_scan_error(tmp_path):
    complete = write_wrl_without_uv_index(tmp_path, "complete", len(MODEL.mean))
    assert "texCoordIndex" not in complete.read_text()
    mesh = read_textured_mesh(complete)
    np.testing.assert_array_equal(mesh.uv_triangles, mesh.triangles)  # the VRML rule: they follow coordIndex
    short = write_wrl_without_uv_index(tmp_path, "short", 10)
    with pytest.raises(ScanError, match=rf"no texCoordIndex.* 10 texture coordinates for {len(MODEL.mean)} "
                                              rf"vertices") as error:
        load_scan(short)
    assert "short.wrl" in str(error.value)


def test_conversion_skips_and_reports_a_wrl_with_too_few_uv(tmp_path):
    root, landmarks = tmp_path / "root", tmp_path / "landmarks"
    paths = [write_wrl_scan(root / "F001", "000"), write_wrl_without_uv_index(root / "F002", "000", 10)]
    ids = [scan_id(path, root) for path in paths]
    for name in ids:
        (landmarks / name).parent.mkdir(parents=True, exist_ok=True)
        np.savetxt(landmarks / f"{name}.txt", TRUTH)
    scan_set = ScanSet("test", paths, ids, np.zeros((1, 3)))
    messages = []
    report = conversion.convert(scan_set, tmp_path / "out.h5", GRID, landmark_dir=landmarks, progress=False,
                           log=messages.append)
    assert report["scans_used"] == 1 and list(report["skipped"]) == ["F002/000"]
    assert "F002/000.wrl" in report["skipped"]["F002/000"] and "10 texture coordinates" in report["skipped"]["F002/000"]
    assert any(message.startswith("skipped F002/000") for message in messages)
    assert open_dataset(tmp_path / "out.h5").num_samples == 1


def test_broken_wrl_scans_raise_a_scan_error(tmp_path):
    path = write_wrl_scan(tmp_path, "000")
    path.with_suffix(".bmp").unlink()
    with pytest.raises(ScanError, match="ImageTexture url"):
        load_scan(path)
    path.write_text("solid ascii stl\n")
    with pytest.raises(ScanError, match="not a VRML file"):
        load_scan(path)


# ----------------------------------------------------------------------------- landmarks and face region


def test_detected_landmarks_are_lifted_onto_the_scan(prepared):
    error = np.linalg.norm(prepared.landmarks_3d - TRUTH, axis=1)
    # Eye corners and nose tip (the interocular distance and the face region) within 2.5 mm (a 96 px render of a
    # 180 mm scan: about 1.3 mm per pixel) of the truth.
    assert error[[36, 45, 30]].max() < 2.5
    assert abs(outer_interocular(prepared.landmarks_3d) - outer_interocular(TRUTH)) < 1.5


def test_both_landmark_file_kinds_give_the_same_landmarks(tmp_path):
    path = write_obj_scan(tmp_path / "scans", "s")
    scan = load_scan(path)
    view = frontal_view(scan.vertices, FRONTAL_SIZE)
    np.savetxt(tmp_path / "xyz.txt", TRUTH)
    np.save(tmp_path / "xy.npy", view.to_crop(TRUTH)[:, :2])
    from_3d = read_landmark_file(tmp_path / "xyz.txt", scan)
    from_2d = read_landmark_file(tmp_path / "xy.npy", scan)
    np.testing.assert_allclose(from_3d, TRUTH)
    # Visible landmarks (eyes, nose, mouth) lift back onto themselves; the contour is hidden under the jaw.
    np.testing.assert_allclose(from_2d[27:], TRUTH[27:], atol=1.0)
    (tmp_path / "bad.txt").write_text("1 2\n3 4\n")
    with pytest.raises(ScanError, match="68 finite rows"):
        read_landmark_file(tmp_path / "bad.txt", scan)


def test_face_region_is_the_sphere_about_the_nose_tip(prepared):
    radius = FACE_RADIUS_RATIO * outer_interocular(prepared.landmarks_3d)
    distance = np.linalg.norm(prepared.face_vertices - prepared.landmarks_3d[NOSE_TIP], axis=1)
    assert distance.max() <= radius and 0.3 * len(MODEL.mean) < len(prepared.face_vertices) < len(MODEL.mean)
    assert prepared.face_triangles.max() == len(prepared.face_vertices) - 1
    with pytest.raises(ScanError, match="no face"):
        face_region(prepared.vertices, prepared.triangles, prepared.landmarks_3d + [0, 0, 500], "far.obj")


# ----------------------------------------------------------------------------- renders at the paper's poses


def test_the_paper_pose_sets():
    poses = florence.florence_poses()
    assert poses.shape == (15, 3) and set(poses[:, 0]) == {-15.0, 20.0, 25.0}
    np.testing.assert_allclose(sorted(set(poses[:, 1])), [-80, -40, 0, 40, 80])
    assert (poses[:, 2] == 0).all()
    poses = bu4dfe.bu4dfe_poses()
    assert poses.shape == (21, 3) and set(poses[:, 0]) == {-20.0, 0.0, 20.0} and (poses[:, 1] == 0).all()
    np.testing.assert_allclose(sorted(set(poses[:, 2])), np.linspace(-80, 80, 7))
    assert (bu4dfe.bu4dfe_poses("yaw")[:, 2] == 0).all()


@pytest.mark.parametrize("pose_deg", [(0, 0, 0), (0, 40, 0), (20, 0, 0), (-15, -80, 0), (0, 0, 53.3), (20, 0, -80)])
def test_renders_show_each_landmark_where_the_sample_says(prepared, grey_light, pose_deg):
    sample = conversion.make_scan_sample(prepared, np.radians(pose_deg), GRID, np.random.default_rng(0))
    landmarks = sample["landmarks_2d"]
    # The crop: the 68-landmark box centred with sqrt(w h) = 90/192 of the crop, like the synthetic data.
    box = landmarks.max(0) - landmarks.min(0)
    assert math.isclose(np.sqrt(box.prod()), 45.0, rel_tol=1e-4)
    np.testing.assert_allclose((landmarks.max(0) + landmarks.min(0)) / 2, 47.5, atol=1e-3)
    # Roll: the outer eye corners' line turns by the roll angle (y down: a positive roll turns it clockwise on screen).
    if pose_deg[:2] == (0, 0):
        eye_line = landmarks[45] - landmarks[36]
        assert math.isclose(np.degrees(np.arctan2(eye_line[1], eye_line[0])), pose_deg[2], abs_tol=1.0)
    # Yaw: the nose tip swings towards the side the face turns to.
    if pose_deg[1]:
        nose_offset = landmarks[30, 0] - (landmarks[36, 0] + landmarks[45, 0]) / 2
        assert np.sign(nose_offset) == -np.sign(pose_deg[1])
    # The image under the landmarks shows the scan's texture at those landmarks (all of them up to 40 degrees of
    # yaw; near profile, those on the far side and the silhouette are hidden or fall on the background).
    checked = [27, 30, 33, 36, 39, 42, 45, 48, 51, 54, 57]
    rows, cols = np.round(landmarks[checked, ::-1]).astype(int).T
    uv_error = np.abs(decode_uv(sample["image"])[rows, cols] - fake_uv(prepared.landmarks_3d[checked])).max(1)
    assert (uv_error < 0.05).mean() >= (1.0 if abs(pose_deg[1]) <= 40 else 0.4)  # 0.05: about 2 px
    # The volume covers the face region's landmarks and the ground truth is the posed face region.
    assert sample["vertices"].shape == prepared.face_vertices.shape
    assert sample["triangles"].shape == prepared.face_triangles.shape
    # (a voxel 1 px behind them is solid; near profile the surface there faces sideways: a solid voxel is near).
    for d, y, x in np.round(GRID.crop_to_voxel(sample["landmarks_3d"][[27, 30]])).astype(int):
        if abs(pose_deg[1]) <= 40:
            assert sample["volume"][min(d + 2, GRID.depth - 1), y, x]
        else:
            assert sample["volume"][max(d - 2, 0):d + 3, y - 2:y + 3, x - 2:x + 3].any()


# ----------------------------------------------------------------------------- variable-length storage


def ragged_samples(count=3, seed=0):
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        num_vertices = 20 + 7 * i
        samples.append({
            "image": rng.integers(0, 256, (GRID.height, GRID.width, 3), dtype=np.uint8),
            "volume": rng.random(GRID.shape) < 0.2,
            "landmarks_2d": rng.normal(size=(68, 2)).astype(np.float32),
            "landmarks_3d": rng.normal(size=(68, 3)).astype(np.float32),
            "pose": rng.normal(size=3).astype(np.float32),
            "vertices": rng.normal(size=(num_vertices, 3)).astype(np.float32),
            "triangles": rng.integers(0, num_vertices, (10 + 3 * i, 3)),
        })
    return samples


def test_variable_length_ground_truth_round_trips_and_resumes_after_a_kill(tmp_path):
    path, samples = tmp_path / "scans.h5", ragged_samples()
    writer = DatasetWriter.for_scans(path, GRID, 3, ATTRS, flush_every=1)
    writer.write(0, samples[0])
    writer.close()
    # A kill after sample 1's mesh was appended but before its flag was flushed.
    with h5py.File(writer.partial_path, "r+") as f:
        for name in ("vertices_flat", "triangles_flat"):
            f[name].resize(len(f[name]) + 50, axis=0)
    with DatasetWriter.for_scans(path, GRID, 3, ATTRS) as writer:
        assert writer.pending().tolist() == [1, 2]
        for index in (1, 2):
            writer.write(index, samples[index])
        writer.finish()
    with DatasetWriter.for_scans(tmp_path / "whole.h5", GRID, 3, ATTRS) as writer:
        for index, sample in enumerate(samples):
            writer.write(index, sample)
        writer.finish()
    assert path.read_bytes() == (tmp_path / "whole.h5").read_bytes()  # as if never killed
    dataset = open_dataset(path)
    assert dataset.per_sample_topology and dataset.attrs["schema_version"] == SCHEMA_VERSION == 3
    assert dataset.triangles is None and dataset.face_region is None and dataset.num_vertices is None
    with h5py.File(path) as f:  # the unflagged rows were dropped on resume
        assert len(f["vertices_flat"]) == sum(len(s["vertices"]) for s in samples)
    for index, sample in enumerate(samples):
        read = dataset.read(index, ["vertices", "triangles", "pose"])
        np.testing.assert_array_equal(read["vertices"], sample["vertices"])
        np.testing.assert_array_equal(read["triangles"], sample["triangles"])
        np.testing.assert_array_equal(read["pose"], sample["pose"])
    with pytest.raises(KeyError, match="face_region"):
        open_dataset(path).read(0, ["triangles", "face_region"])


def test_variable_length_writer_and_reader_refuse_bad_meshes(tmp_path):
    samples = ragged_samples(1)
    with pytest.raises(ValueError, match="no shared"):
        DatasetWriter(tmp_path / "a.h5", GRID, 1, 10, None, None, None, ATTRS, per_sample_topology=True)
    with DatasetWriter.for_scans(tmp_path / "b.h5", GRID, 1, ATTRS) as writer:
        with pytest.raises(ValueError, match="outside the sample's 20 vertices") as error:
            writer.write(0, {**samples[0], "triangles": np.array([[0, 1, 20]])})
        assert str(tmp_path / "b.h5") in str(error.value) and "sample 0" in str(error.value)
        with pytest.raises(ValueError, match="vertices: contains NaN") as error:
            writer.write(0, {**samples[0], "vertices": np.full((20, 3), np.nan, dtype=np.float32)})
        assert str(tmp_path / "b.h5") in str(error.value)
        with pytest.raises(ValueError, match="image: shape") as error:
            writer.write(0, {**samples[0], "image": samples[0]["image"][:-1]})
        assert str(tmp_path / "b.h5") in str(error.value)
        with pytest.raises(ValueError, match="keys"):
            writer.write(0, {key: value for key, value in samples[0].items() if key != "triangles"})
        writer.write(0, samples[0])
        writer.finish()
    with h5py.File(tmp_path / "b.h5", "r+") as f:
        f["vertex_ranges"][0] = (5, 10_000)
    with pytest.raises(DatasetError, match="vertex_ranges row 0"):
        open_dataset(tmp_path / "b.h5")


def test_a_scan_file_refuses_augmentation(tmp_path):
    from datamodules.dataset import FaceVolumeDataset

    path, samples = tmp_path / "scans.h5", ragged_samples(2)
    with DatasetWriter.for_scans(path, GRID, 2, ATTRS) as writer:
        for index, sample in enumerate(samples):
            writer.write(index, sample)
        writer.finish()
    with pytest.raises(DatasetError, match=r"per-sample topology .* augmentation cannot transform") as error:
        FaceVolumeDataset(path, augment={"flip_prob": 0.5})
    assert str(path) in str(error.value) and "augment=None" in str(error.value)
    dataset = FaceVolumeDataset(path, augment=None, load_vertices=True)  # unaugmented, as a test set is read
    assert dataset[1]["vertices"].shape == (27, 3)


def test_shared_topology_files_of_version_2_are_still_read(tmp_path):
    from tests.helpers.random_samples import TOPOLOGY, V, make_samples

    path = tmp_path / "v2.h5"
    with DatasetWriter(path, GRID, 2, V, **TOPOLOGY, attrs=ATTRS) as writer:
        for index, sample in enumerate(make_samples(2, GRID)):
            writer.write(index, {k: v for k, v in sample.items() if k in (
                "image", "volume", "landmarks_2d", "landmarks_3d", "pose", "vertices")})
        writer.finish()
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 2
    dataset = open_dataset(path)
    assert not dataset.per_sample_topology and dataset.read(1, ["vertices"])["vertices"].shape == (V, 3)
    with pytest.raises(KeyError, match="shared here"):
        dataset.read(0, ["triangles"])


# ----------------------------------------------------------------------------- the scan NME


SPHERE_GRID = VoxelGrid.centred(80, 64, 64)
SPHERE_CENTRE = np.array([31.5, 31.5, 4.0])  # crop px
SPHERE_RADIUS = 18.0
IOD = 25.0  # px, the normaliser


def sphere_volume(radius: float) -> np.ndarray:
    """Soft occupancy of a ball: a 1 px linear ramp through 0.5 on its surface (an exact iso-surface)."""
    d, y, x = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in SPHERE_GRID.shape], indexing="ij")
    points = np.stack([x, y, SPHERE_GRID.d_to_z(d)], -1)
    return np.clip(radius - np.linalg.norm(points - SPHERE_CENTRE, axis=-1) + 0.5, 0, 1).astype(np.float32)


def sphere_cap(count: int) -> np.ndarray:
    """(count, 3) points of the ball's camera-facing cap (within 60 degrees of -z): a 'scan' with its own size."""
    i = np.arange(count) + 0.5
    z = -np.linspace(0.5, 1.0, count, endpoint=False)
    azimuth = np.pi * (1 + 5**0.5) * i
    ring = np.sqrt(1 - z**2)
    return SPHERE_CENTRE + SPHERE_RADIUS * np.stack([ring * np.cos(azimuth), ring * np.sin(azimuth), z], -1)


def test_scan_nme_of_a_known_offset_matches_an_independent_computation():
    from tests.helpers.ellipsoid import GRID as ELLIPSOID_GRID, ellipsoid_front_points, ellipsoid_volume

    # A rigid offset on a triaxial ellipsoid (no rigid motion maps it onto itself, so ICP's answer is unique):
    # the scan lies 1.5 px in front of the prediction; each scan vertex corresponds to itself moved by the offset.
    shift = np.array([0.0, 0.0, 1.5])
    scan = ellipsoid_front_points(1800) - shift
    metric = NME(ELLIPSOID_GRID)
    metric.update(torch.from_numpy(ellipsoid_volume())[None], [scan], torch.tensor([IOD]), torch.zeros(1),
                  torch.tensor([0]))
    expected = np.linalg.norm(scan - (scan + shift), axis=1).mean() / IOD
    assert math.isclose(metric.per_sample()["nme"][0], expected, abs_tol=0.05 / IOD)

    # A non-rigid offset: the prediction's ball is 1.2 px larger than the scanned one. Two scans of their own
    # sizes in one batch; without ICP each vertex's closest-point error is the growth.
    grown = 1.2
    volumes = torch.from_numpy(np.stack([sphere_volume(SPHERE_RADIUS + grown)] * 2))
    caps = [sphere_cap(1500), sphere_cap(2300)]
    metric = NME(SPHERE_GRID)
    metric.update(volumes, caps, torch.full((2,), IOD), torch.zeros(2), torch.tensor([0, 1]))
    table = metric.per_sample()
    for cap, nme_closest in zip(caps, table["nme_closest"]):
        # Independent: the closest point of a sphere (centre c, radius r) to q is c + r (q - c) / |q - c|.
        offset = cap - SPHERE_CENTRE
        closest = SPHERE_CENTRE + (SPHERE_RADIUS + grown) * offset / np.linalg.norm(offset, axis=1, keepdims=True)
        expected = np.linalg.norm(cap - closest, axis=1).mean() / IOD
        assert math.isclose(expected, grown / IOD, rel_tol=1e-9)
        assert math.isclose(nme_closest, expected, abs_tol=0.05 / IOD)


# ----------------------------------------------------------------------------- command lines


@pytest.fixture(scope="module")
def florence_root(tmp_path_factory):
    """Two fake subjects in the Florence layout with 68x3 landmark files, plus one corrupt scan."""
    root = tmp_path_factory.mktemp("florence")
    landmarks = tmp_path_factory.mktemp("florence-landmarks")
    for i, name in enumerate(("110920150452", "110920151034")):
        path = write_obj_scan(root / f"subject_0{i + 1}/Model/frontal1/obj", name, shift=(3.0 * i, 0, 0))
        target = landmarks / f"{scan_id(path, root)}.txt"
        target.parent.mkdir(parents=True)
        np.savetxt(target, TRUTH + (3.0 * i, 0, 0))
    broken = root / "subject_03/Model/frontal1/obj/110920160000.obj"
    broken.parent.mkdir(parents=True)
    broken.write_text("this is not an obj file\n")
    return root, landmarks


def test_florence_cli_end_to_end_skips_and_reports_a_corrupt_scan(florence_root, tmp_path, capsys):
    root, landmarks = florence_root
    out = tmp_path / "florence.h5"
    args = ["--root", str(root), "--out", str(out), "--landmarks", str(landmarks), "--grid", "100,96,96",
            "--no-progress"]
    assert florence.main(args) == 0
    report = json.loads((tmp_path / "florence.h5.report.json").read_text())
    assert report["samples"] == 30 and report["scans_used"] == 2 and report["scans_found"] == 3
    assert list(report["skipped"]) == ["subject_03/Model/frontal1/obj/110920160000"]
    assert "110920160000.obj" in report["skipped"]["subject_03/Model/frontal1/obj/110920160000"]
    assert "skipped subject_03" in capsys.readouterr().err
    dataset = open_dataset(out, expected_grid=GRID)
    assert len(dataset) == 30 and dataset.per_sample_topology and dataset.attrs["source"] == "florence"
    poses = np.degrees([dataset.read(i, ["pose"])["pose"] for i in range(15)])
    np.testing.assert_allclose(poses, florence.florence_poses(), atol=1e-4)
    # A rerun with the same arguments leaves the finished file as it is (the rule of every producer); one with
    # other arguments is refused.
    mtime = out.stat().st_mtime_ns
    assert florence.main(args) == 0
    assert out.stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match="seed.*--restart"):
        florence.main(args + ["--seed", "1"])


def test_florence_conversion_resumes_after_a_crash(florence_root, tmp_path, monkeypatch):
    root, landmarks = florence_root
    out = tmp_path / "florence.h5"
    made = []
    real = conversion.make_scan_sample

    def crash_at_20(scan, pose, grid, rng, with_frontal=False):
        if len(made) == 20:
            raise RuntimeError("killed")
        made.append(pose)
        return real(scan, pose, grid, rng, with_frontal)

    monkeypatch.setattr(conversion, "make_scan_sample", crash_at_20)
    args = ["--root", str(root), "--out", str(out), "--landmarks", str(landmarks), "--grid", "100,96,96",
            "--no-progress"]
    with pytest.raises(RuntimeError, match="killed"):
        florence.main(args)
    assert not out.exists() and (tmp_path / "florence.h5.partial").exists()
    with h5py.File(tmp_path / "florence.h5.partial") as f:
        written = int(f["written"][()].sum())
    assert 0 < written <= 20
    made.clear()
    monkeypatch.setattr(conversion, "make_scan_sample", lambda *a, **k: made.append(1) or real(*a, **k))
    prepare_calls = []
    monkeypatch.setattr(cache, "_prepare_one", lambda job: prepare_calls.append(job) or (job[1], "not cached"))
    assert florence.main(args) == 0
    assert open_dataset(out).num_samples == 30
    # The written samples are not made again; only the corrupt scan (never cached) is tried again.
    assert len(made) == 30 - written
    assert [job[1] for job in prepare_calls] == ["subject_03/Model/frontal1/obj/110920160000"]


def _one_scan_with_landmark_file(tmp_path):
    """A Florence-layout root with one scan, its 68x3 landmark file, and the florence arguments writing OUT."""
    root, landmarks = tmp_path / "root", tmp_path / "landmarks"
    path = write_obj_scan(root / "subject_01/Model/frontal1/obj", "scan")
    target = landmarks / f"{scan_id(path, root)}.txt"
    target.parent.mkdir(parents=True)
    np.savetxt(target, TRUTH)
    out = tmp_path / "florence.h5"
    args = ["--root", str(root), "--out", str(out), "--landmarks", str(landmarks), "--grid", "100,96,96",
            "--no-progress"]
    return root, landmarks, target, out, args


def test_prepared_scans_follow_their_landmark_file(tmp_path):
    _, _, landmark_file, out, args = _one_scan_with_landmark_file(tmp_path)
    assert florence.main(args) == 0
    cached = out.with_name(out.name + ".scans") / "subject_01/Model/frontal1/obj/scan.npz"
    np.testing.assert_allclose(cache.PreparedScan.load(cached).landmarks_3d, TRUTH)
    before = open_dataset(out).read(3, ["landmarks_3d", "vertices"])

    # Another annotation: the jaw's first landmark moves 4 mm out (a new crop box and face radius).
    edited = TRUTH.copy()
    edited[0, 0] -= 4.0
    np.savetxt(landmark_file, edited)
    with pytest.raises(FileExistsError, match="scans_sha256.*--restart"):
        florence.main(args)  # the finished file was made from the old landmarks
    np.testing.assert_allclose(cache.PreparedScan.load(cached).landmarks_3d, edited)  # prepared again
    out.unlink()
    assert florence.main(args) == 0
    after = open_dataset(out).read(3, ["landmarks_3d", "vertices"])
    assert not np.allclose(after["landmarks_3d"], before["landmarks_3d"])
    # The same as a conversion from scratch with the edited file.
    fresh = tmp_path / "fresh.h5"
    assert florence.main([*args[:2], "--out", str(fresh), *args[4:]]) == 0
    expected = open_dataset(fresh).read(3, ["landmarks_3d", "vertices"])
    for key in ("landmarks_3d", "vertices"):
        np.testing.assert_array_equal(after[key], expected[key])


def test_cache_key_names_what_a_prepared_scan_depends_on(tmp_path, monkeypatch):
    root, landmarks, landmark_file, _, _ = _one_scan_with_landmark_file(tmp_path)
    scan = next(root.rglob("*.obj"))
    name = scan_id(scan, root)
    key = cache.cache_key(scan, name, landmarks, None)
    assert key == cache.cache_key(scan, name, landmarks, None)
    assert str(landmark_file) in key
    checkpoint = tmp_path / "a.ckpt"
    checkpoint.write_bytes(b"weights a")
    with_detector = cache.cache_key(scan, name, None, file_sha256(checkpoint))
    checkpoint.write_bytes(b"weights b")
    assert cache.cache_key(scan, name, None, file_sha256(checkpoint)) != with_detector != key
    monkeypatch.setattr(cache, "FACE_RADIUS_RATIO", 1.2)
    assert cache.cache_key(scan, name, landmarks, None) != key
    monkeypatch.undo()
    scan.write_text(scan.read_text() + "# touched\n")
    assert cache.cache_key(scan, name, landmarks, None) != key


def test_restart_empties_the_scan_cache(tmp_path):
    _, _, _, out, args = _one_scan_with_landmark_file(tmp_path)
    assert florence.main(args) == 0
    cache_dir = out.with_name(out.name + ".scans")
    stale = cache_dir / "removed_scan.npz"
    stale.write_bytes(b"a scan that is no longer there")
    assert florence.main(args + ["--restart"]) == 0
    assert not stale.exists() and len(list(cache_dir.rglob("*.npz"))) == 1
    assert open_dataset(out).num_samples == 15


def test_bu4dfe_cli_with_a_landmark_detector_end_to_end(tmp_path, monkeypatch):
    root = tmp_path / "BU4DFE"
    for subject in ("F001", "M002"):
        for sequence in ("Happy", "Surprise"):
            for frame in ("000", "001", "002"):
                write_wrl_scan(root / subject / sequence, frame)
        write_wrl_scan(root / subject / "Angry", "000")  # another sequence: not used
    (root / "M002/Surprise/001.bmp").unlink()  # a frame without its texture
    checkpoint = tmp_path / "landmarks.ckpt"
    checkpoint.write_bytes(b"stand-in: the detector is replaced below")
    detectors = []
    monkeypatch.setattr(cache, "LandmarkDetector", lambda path: detectors.append(FakeDetector(path)) or detectors[-1])
    out = tmp_path / "bu4dfe.h5"
    assert bu4dfe.main(["--root", str(root), "--out", str(out), "--landmarks-model", str(checkpoint),
                        "--grid", "100,96,96", "--no-progress", "--frames", "1"]) == 0
    report = json.loads((tmp_path / "bu4dfe.h5.report.json").read_text())
    # Middle frames (001) of 4 sequences; M002/Surprise/001 has no texture: 3 scans x 21 poses.
    assert report["scans_found"] == 4 and report["samples"] == 63
    assert list(report["skipped"]) == ["M002/Surprise/001"] and "texture" in report["skipped"]["M002/Surprise/001"]
    assert all(image.shape == (96, 96, 3) for image in detectors[0].images)
    dataset = open_dataset(out)
    assert dataset.expression_names == bu4dfe.EXPRESSION_NAMES
    labels = [int(dataset.read(i, ["expression_label"])["expression_label"]) for i in (0, 21, 42)]
    assert labels == [1, 2, 1]  # F001 Happy, F001 Surprise, M002 Happy
    np.testing.assert_allclose(np.degrees(dataset.read(20, ["pose"])["pose"]), [20, 0, 80], atol=1e-4)


def test_cli_errors_name_the_input_and_the_fix(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="--pattern"):
        florence.main(["--root", str(tmp_path), "--out", str(tmp_path / "x.h5"), "--landmarks", str(tmp_path)])
    with pytest.raises(SystemExit):
        florence.main(["--root", str(tmp_path), "--out", str(tmp_path / "x.h5")])  # no landmark source
    assert "one of the arguments --landmarks-model --landmarks --save-frontal is required" in capsys.readouterr().err
    write_obj_scan(tmp_path / "s/frontal1", "a")
    with pytest.raises(SystemExit):
        florence.main(["--root", str(tmp_path), "--out", str(tmp_path / "x.h5"),
                       "--landmarks-model", str(tmp_path / "missing.ckpt")])
    assert "does not exist" in capsys.readouterr().err


def test_save_frontal_writes_the_render_that_68x2_files_refer_to(tmp_path):
    write_obj_scan(tmp_path / "root/subject_01/Model/frontal1/obj", "a")
    assert florence.main(["--root", str(tmp_path / "root"), "--save-frontal", str(tmp_path / "frontal"),
                          "--no-progress"]) == 0
    image = np.asarray(Image.open(tmp_path / "frontal/subject_01/Model/frontal1/obj/a.png"))
    assert image.shape == (FRONTAL_SIZE, FRONTAL_SIZE, 3)
    np.testing.assert_allclose(fake_detect(image)[[36, 45, 30]],
                               frontal_view(MODEL.mean, FRONTAL_SIZE).to_crop(TRUTH)[[36, 45, 30], :2],
                               atol=1.5)


def test_landmark_checkpoint_detector_and_its_refusal_of_a_volume_model(tmp_path):
    from lightning_vrn.models import VRN, LandmarkHourglass

    for cls, name in ((LandmarkHourglass, "landmarks.ckpt"), (VRN, "vrn.ckpt")):
        model = cls(grid=GRID, net={"features": 16, "stacks": 1, "hourglass_depth": 2})
        torch.save({"lightning_vrn": model.record(), "hyper_parameters": dict(model.hparams),
                    "state_dict": model.state_dict()}, tmp_path / name)
    detector = LandmarkDetector(tmp_path / "landmarks.ckpt")
    landmarks = detector.detect(np.zeros((96, 96, 3), dtype=np.uint8))
    assert detector.crop_size == 96 and landmarks.shape == (68, 2) and np.isfinite(landmarks).all()
    with pytest.raises(ValueError, match="landmark_hourglass"):
        LandmarkDetector(tmp_path / "vrn.ckpt")


# ----------------------------------------------------------------------------- evaluation on a scan file


def test_the_nme_callback_scores_a_scan_file_with_each_samples_own_mesh(florence_root, tmp_path):
    root, landmarks = florence_root
    out = tmp_path / "florence.h5"
    florence.main(["--root", str(root), "--out", str(out), "--landmarks", str(landmarks), "--grid", "100,96,96",
                   "--no-progress"])
    datamodule = FaceVolumeDataModule(test_path=out, grid=GRID, batch_size=4, num_workers=0, pin_memory=False,
                                      persistent_workers=False)
    callback = NMECallback(out_dir=tmp_path / "eval")
    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[callback], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.test(TargetVolumeModel(GRID, "aligned"), datamodule=datamodule, verbose=False)  # the file's volumes
    table = callback.tables["test"]
    assert len(table["index"]) == 30 and not table["failed"].any()
    # The floor of a scan against its own voxelisation at the quickstart grid (measured 0.004-0.02 here).
    assert np.nanmax(table["nme"]) < 0.03
    assert (tmp_path / "eval/test.csv").exists()
