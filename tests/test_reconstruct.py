"""Photo -> mesh: the face detector, the crop and its inverse through the whole pipeline, and the CLI's outcomes."""

import csv
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from experiments import reconstruct
from lightning_vrn.dataset_file import open_dataset, unpack_volume
from lightning_vrn.faces import FaceBox, FaceDetector
from lightning_vrn.faces.photo import read_photo
from lightning_vrn.faces.reconstruction import PhotoReconstructor, detector_box_crop
from lightning_vrn.geometry.crop import CropTransform, front_z, resample_crop
from lightning_vrn.geometry.isosurface import volume_to_mesh
from lightning_vrn.geometry.mesh_io import read_mesh
from lightning_vrn.heatmaps import decode_heatmaps
from lightning_vrn.models import build_model
from lightning_vrn.visualise import draw_mesh_over, vertex_colours_from_image
from tests.helpers.cli import run_cli
from tests.helpers.stub_models import OracleVolumeModel
from tests.helpers.training import TINY, save, trained


class FixedBoxes:
    """A face detector that finds the given boxes in every photo."""

    def __init__(self, *boxes):
        self.boxes = [FaceBox(box, 0.99, np.zeros((5, 2))) for box in boxes]

    def detect(self, image):
        return list(self.boxes)


def pts_landmarks(path):
    """``(68, 2)`` 0-based pixels of an iBUG ``.pts`` file."""
    return np.loadtxt(path, skiprows=3, comments="}") - 1.0


def inside(point, landmarks):
    return bool((landmarks.min(axis=0) <= point).all() and (point <= landmarks.max(axis=0)).all())


PHOTO_SCALE, PHOTO_OFFSET = 2.0, (37.25, 21.5)
"""The synthetic photo shows crop point ``c`` at photo pixel ``PHOTO_SCALE * c + PHOTO_OFFSET``."""


@pytest.fixture(scope="module")
def synthetic_photo(tiny_synthetic):
    """A 260x260 photo showing a synthetic test sample through a hand-chosen similarity, the sample, its grid, and the
    detector box whose landmark box (``LANDMARK_BOX_SCALE`` of it, ``LANDMARK_BOX_SHIFT`` lower) fills the authors'
    crop exactly as the sample's own crop does."""
    file = open_dataset(tiny_synthetic / "test.h5")
    sample = file.read(0, ["images", "volumes", "landmarks_3d"])
    size = file.grid.crop_size
    # The authors' crop of a crop: a 45 px landmark box (90/192 of 96) centred at 47.5; in the photo, twice as big.
    centre = PHOTO_SCALE * 47.5 + np.array(PHOTO_OFFSET)
    side = PHOTO_SCALE * 45.0 / 0.91
    box_centre = centre - np.array([0.0, 0.155]) * side
    box = (*(box_centre - side / 2), *(box_centre + side / 2))
    photo_to_crop = CropTransform(1 / PHOTO_SCALE, tuple(-np.array(PHOTO_OFFSET) / PHOTO_SCALE))
    photo = resample_crop(sample["images"], CropTransform(PHOTO_SCALE, PHOTO_OFFSET), 260)
    assert size == 96
    return photo, sample, file.grid, box, photo_to_crop


def test_a_mesh_mapped_back_to_the_photo_lands_on_the_face(synthetic_photo):
    photo, sample, grid, box, photo_to_crop = synthetic_photo
    volume = unpack_volume(sample["volumes"], grid.width)
    model = OracleVolumeModel(grid, volume)
    [[face]] = PhotoReconstructor(model, detector=FixedBoxes(box)).reconstruct([photo])
    assert face.status == "ok" and face.landmark_source == "detector box"
    assert face.crop.scale == pytest.approx(photo_to_crop.scale)
    np.testing.assert_allclose(face.crop.translation, photo_to_crop.translation, atol=1e-9)
    # The model saw the sample's crop again (resampled there and back).
    seen = model.seen_images[0][0].permute(1, 2, 0).numpy()
    assert np.abs(seen - sample["images"] / 255.0).mean() < 0.05
    # The mesh is the crop's iso-surface moved by the photo's similarity, written out by hand: x, y and z scaled by 2,
    # x, y shifted by the offset, z 0 at the crop's front plane.
    crop_vertices, _ = volume_to_mesh(model.occupancy(), grid)
    expected = PHOTO_SCALE * crop_vertices.astype(np.float64)
    expected[:, :2] += PHOTO_OFFSET
    expected[:, 2] -= PHOTO_SCALE * front_z(grid)
    np.testing.assert_allclose(face.vertices, expected, atol=1e-4)
    # So the true landmark vertices, in photo pixels, lie on the mesh.
    true_landmarks = PHOTO_SCALE * sample["landmarks_3d"].astype(np.float64)
    true_landmarks[:, :2] += PHOTO_OFFSET
    true_landmarks[:, 2] -= PHOTO_SCALE * front_z(grid)
    distance = np.linalg.norm(face.vertices[None] - true_landmarks[:, None], axis=2).min(axis=1)
    assert np.median(distance) < 1.5 and distance.max() < 4.0
    # Each vertex has the colour the sample's own crop has there.
    in_crop = vertex_colours_from_image(photo_to_crop.apply(face.vertices[:, :2]), sample["images"])
    assert np.abs(face.colours - in_crop).mean() < 0.03


def test_a_small_face_is_reported_and_an_unsure_hourglass_falls_back_to_the_box(synthetic_photo):
    photo, sample, grid, box, photo_to_crop = synthetic_photo
    model = OracleVolumeModel(grid, unpack_volume(sample["volumes"], grid.width))
    torch.manual_seed(0)
    untrained = build_model("landmark_hourglass", grid=grid, net=TINY)
    tiny_box = (10.0, 10.0, 22.0, 22.0)
    [[face, small]] = PhotoReconstructor(model, untrained, FixedBoxes(box, tiny_box)).reconstruct([photo])
    assert small.status.startswith("face too small to crop (12 px")
    assert not len(small.vertices)
    assert face.landmark_source.startswith("detector box (hourglass unsure: peak 0.")
    assert face.crop == detector_box_crop(FaceBox(box, 1.0, np.zeros((5, 2))), grid.crop_size)
    assert face.landmarks.shape == (68, 2)


def test_a_guided_model_is_guided_by_the_faces_landmarks_in_its_crop(synthetic_photo):
    photo, sample, grid, box, _ = synthetic_photo
    torch.manual_seed(0)
    guided = build_model("vrn_guided", grid=grid, net=TINY)
    hourglass = build_model("landmark_hourglass", grid=grid, net=TINY)
    batches = []
    forward = guided.forward
    guided.forward = lambda batch: batches.append(batch) or forward(batch)
    [[face]] = PhotoReconstructor(guided, hourglass, FixedBoxes(box)).reconstruct([photo])
    [batch] = batches
    assert batch["heatmaps"].shape == (1, 68, grid.height, grid.width)
    peaks = decode_heatmaps(batch["heatmaps"])[0].numpy()
    np.testing.assert_allclose(peaks, face.crop.apply(face.landmarks), atol=0.5)


def test_a_volume_model_is_required_and_a_guided_one_needs_landmarks(synthetic_photo):
    grid = synthetic_photo[2]
    with pytest.raises(ValueError, match="predicts no volume.*--landmarks"):
        PhotoReconstructor(build_model("landmark_hourglass", grid=grid, net=TINY), detector=FixedBoxes())
    with pytest.raises(ValueError, match="guided by landmarks: give a landmark hourglass"):
        PhotoReconstructor(build_model("vrn_guided", grid=grid, net=TINY), detector=FixedBoxes())


@pytest.fixture(scope="module")
def detector():
    return FaceDetector()


def test_the_detector_finds_the_face_and_its_five_points(shared_data, detector):
    image = np.asarray(Image.open(shared_data / "real_faces" / "takeo.ppm").convert("RGB"))
    truth = pts_landmarks(shared_data / "real_faces" / "takeo.pts")
    [face] = detector.detect(image)
    x0, y0, x1, y1 = face.box
    assert inside(np.array([(x0 + x1) / 2, (y0 + y1) / 2]), truth) and face.score > 0.9
    size = np.sqrt(np.prod(np.ptp(truth, axis=0)))
    expected = [truth[36:42].mean(axis=0), truth[42:48].mean(axis=0), truth[30], truth[48], truth[54]]
    assert np.linalg.norm(face.points - expected, axis=1).max() < 0.1 * size


def test_two_faces_in_one_photo_are_both_found(shared_data, detector):
    image = np.asarray(Image.open(shared_data / "real_faces" / "takeo.ppm").convert("RGB"))
    pair = np.concatenate([image, image[:, ::-1]], axis=1)
    faces = detector.detect(pair)
    assert len(faces) == 2
    centres = sorted((f.box[0] + f.box[2]) / 2 for f in faces)
    width = image.shape[1]
    assert centres[0] < width < centres[1]
    assert abs(centres[0] + centres[1] - 2 * width) < 0.05 * width  # mirror images: mirrored boxes


def test_a_photo_without_a_face_has_none(detector):
    assert detector.detect(np.full((200, 300, 3), 128, np.uint8)) == []
    with pytest.raises(ValueError, match="must be \\(H, W, 3\\) uint8 RGB"):
        detector.detect(np.zeros((20, 20), np.uint8))


@pytest.fixture(scope="module")
def vrn_checkpoint(tiny_synthetic, tmp_path_factory):
    return save(trained("vrn", tiny_synthetic), tmp_path_factory.mktemp("reconstruct") / "vrn.ckpt")


def read_report(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_command_reports_every_photo_and_face_and_resumes(shared_data, vrn_checkpoint, tmp_path):
    import open3d as o3d

    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    shutil.copy(shared_data / "real_faces" / "takeo.ppm", photos / "takeo.ppm")
    takeo = np.asarray(Image.open(photos / "takeo.ppm"))
    Image.fromarray(np.concatenate([takeo, takeo[:, ::-1]], axis=1)).save(photos / "more" / "pair.png")
    Image.fromarray(np.full((120, 160, 3), 128, np.uint8)).save(photos / "blank.png")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (photos / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    code, lines = run_cli(reconstruct.main, [str(photos / "takeo.ppm"), str(photos / "blank.png"),
                                            "--checkpoint", str(vrn_checkpoint), "--out", str(out)])
    assert code == 0
    first_mesh = (out / "takeo_face0.obj").stat().st_mtime_ns
    # Rerun on the whole folder: the two photos already reported are skipped, the rest added.
    code, lines = run_cli(reconstruct.main, [str(photos), "--checkpoint", str(vrn_checkpoint), "--out", str(out),
                                            "--batch-size", "2"])
    assert code == 0 and any("resuming: 2 of 4 photos" in line for line in lines)
    assert (out / "takeo_face0.obj").stat().st_mtime_ns == first_mesh
    rows = read_report(out / "report.csv")
    by_photo = {}
    for row in rows:
        by_photo.setdefault(row["photo"].split("/")[-1], []).append(row)
    assert sorted(by_photo) == ["blank.png", "broken.jpg", "pair.png", "takeo.ppm"]
    assert [r["status"] for r in by_photo["blank.png"]] == ["no face found"]
    assert by_photo["broken.jpg"][0]["status"].startswith("unreadable image")
    assert any("broken.jpg: unreadable image" in line for line in lines)
    assert [(r["face"], r["status"], r["mesh"]) for r in by_photo["pair.png"]] == [
        ("0", "ok", "pair_face0.obj"), ("1", "ok", "pair_face1.obj")]
    [takeo_row] = by_photo["takeo.ppm"]
    assert takeo_row["landmark_source"] == "detector box" and float(takeo_row["score"]) > 0.9
    assert {p.name for p in out.glob("*.png")} == {"takeo.png", "pair.png"}
    # The mesh lies on the face in the photo, and round-trips through our readers and Open3D.
    vertices, triangles, colours = read_mesh(out / "takeo_face0.obj")
    ply_vertices, ply_triangles, ply_colours = read_mesh(out / "takeo_face0.ply")
    assert inside(vertices[:, :2].mean(axis=0), pts_landmarks(shared_data / "real_faces" / "takeo.pts"))
    np.testing.assert_allclose(ply_vertices, vertices, atol=1e-3)
    np.testing.assert_array_equal(ply_triangles, triangles)
    np.testing.assert_allclose(ply_colours, colours, atol=1 / 255)
    mesh = o3d.io.read_triangle_mesh(str(out / "takeo_face0.ply"))
    np.testing.assert_allclose(np.asarray(mesh.vertices), vertices, atol=1e-3)
    np.testing.assert_allclose(np.asarray(mesh.vertex_colors), colours, atol=1 / 255)


def test_missing_paths_and_bad_checkpoints_are_refused(vrn_checkpoint, tmp_path):
    code, lines = run_cli(reconstruct.main, [str(tmp_path / "nowhere"), "--checkpoint", str(vrn_checkpoint)])
    assert code != 0 and any("nowhere: no such file or folder" in line for line in lines)
    (tmp_path / "empty").mkdir()
    code, lines = run_cli(reconstruct.main, [str(tmp_path / "empty"), "--checkpoint", str(vrn_checkpoint)])
    assert code != 0 and any("no .jpg/.jpeg/.png/.ppm image in" in line for line in lines)


def test_a_mesh_drawn_over_a_photo_covers_its_pixels_and_leaves_the_rest():
    photo = np.full((40, 60, 3), 10, np.uint8)
    square = np.array([[10.0, 5.0, 0.0], [30.0, 5.0, 0.0], [30.0, 25.0, 0.0], [10.0, 25.0, 0.0]])
    drawn = draw_mesh_over(photo, square, np.array([[0, 1, 2], [0, 2, 3]]), opacity=0.5)
    # Facing the camera: the brightest grey (240), half over the photo's 10.
    np.testing.assert_array_equal(drawn[6:25, 11:30], 125)
    np.testing.assert_array_equal(drawn[26:], photo[26:])
    np.testing.assert_array_equal(drawn[:, 31:], photo[:, 31:])


def test_photos_are_read_as_a_viewer_shows_them(tmp_path):
    pixels = np.zeros((20, 30, 3), np.uint8)
    pixels[:, :10] = 200  # the left third bright
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned: a viewer turns it 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    turned = read_photo(tmp_path / "turned.jpg")
    assert turned.shape == (30, 20, 3) and turned[:10].mean() > 150 and turned[20:].mean() < 50
    grey16 = (np.arange(30 * 20, dtype=np.uint16).reshape(20, 30) * 100)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    read16 = read_photo(tmp_path / "grey16.png")
    assert read16.shape == (20, 30, 3) and read16.dtype == np.uint8
    np.testing.assert_array_equal(read16[..., 0], np.rint(grey16 / 257.0).astype(np.uint8))
    rgba = np.dstack([pixels, np.full((20, 30), 128, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_photo(tmp_path / "rgba.png"), pixels)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match="unreadable image"):
        read_photo(tmp_path / "broken.png")


def test_output_names_are_unique_and_never_change_once_given(tmp_path):
    a, b, w = tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.jpg", tmp_path / "w" / "x.jpg"
    first = reconstruct.output_stems([a, b], taken=set())
    assert first[a] == "x" and first[b].startswith("x_") and len(first[b]) == 10
    # A later run adds w/x.jpg before the others: a and b keep their names (read back from the report), w gets its own.
    later = reconstruct.output_stems([w], taken=set(first.values()))
    assert later[w] not in first.values() and later[w].startswith("x_")
    assert reconstruct.output_stems([b], taken={"x"}) == {b: first[b]}


def test_one_photo_that_fails_gets_an_error_row_and_the_others_their_meshes(synthetic_photo, vrn_checkpoint,
                                                                             tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(synthetic_photo[0]).save(photos / "good.png")
    Image.fromarray(synthetic_photo[0][:, :200]).save(photos / "bad.png")
    reconstruct_photos = PhotoReconstructor.reconstruct

    def failing_on_narrow_photos(self, images):
        if any(image.shape[1] == 200 for image in images):
            raise RuntimeError("out of memory (a stand-in)")
        return reconstruct_photos(self, images)

    monkeypatch.setattr(PhotoReconstructor, "reconstruct", failing_on_narrow_photos)
    monkeypatch.setattr(FaceDetector, "detect", lambda self, image: FixedBoxes(synthetic_photo[3]).detect(image))
    out = tmp_path / "out"
    code, lines = run_cli(reconstruct.main, [str(photos), "--checkpoint", str(vrn_checkpoint), "--out", str(out)])
    assert code == 0
    statuses = {row["output"]: row["status"] for row in read_report(out / "report.csv")}
    assert statuses == {"bad": "error: RuntimeError: out of memory (a stand-in)", "good": "ok"}
    assert any("bad.png: error: RuntimeError: out of memory" in line for line in lines)
    assert (out / "good_face0.obj").is_file() and not list(out.glob("bad*"))


def test_a_rerun_with_another_checkpoint_is_refused(synthetic_photo, vrn_checkpoint, tmp_path, monkeypatch):
    photo = tmp_path / "photo.png"
    Image.fromarray(synthetic_photo[0]).save(photo)
    monkeypatch.setattr(FaceDetector, "detect", lambda self, image: [])
    out = tmp_path / "out"
    assert run_cli(reconstruct.main, [str(photo), "--checkpoint", str(vrn_checkpoint), "--out", str(out)])[0] == 0
    other = tmp_path / "other.ckpt"
    other.write_bytes(vrn_checkpoint.read_bytes() + b"\0")  # loads the same, but is another file
    moved = tmp_path / "moved.ckpt"
    shutil.copy(vrn_checkpoint, moved)
    code, lines = run_cli(reconstruct.main, [str(photo), "--checkpoint", str(other), "--out", str(out)])
    assert code != 0 and any("holds meshes of other checkpoints" in line for line in lines)
    assert run_cli(reconstruct.main, [str(photo), "--checkpoint", str(moved), "--out", str(out)])[0] == 0


def test_photos_are_found_in_folders_but_not_in_the_output_or_hidden_files(tmp_path):
    for name in ("a.PNG", ".a.tmp.png", "out/a.png", "sub/b.jpeg", "sub/c.ppm", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = reconstruct.find_photos([tmp_path, tmp_path / "sub" / "c.ppm"], out=tmp_path / "out")
    assert found == [tmp_path / "a.PNG", tmp_path / "sub" / "b.jpeg", tmp_path / "sub" / "c.ppm"]
