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
from lightning_vrn.faces.reconstruction import PhotoReconstructor, detector_box_crop
from lightning_vrn.geometry.crop import CropTransform, front_z, resample_crop
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


@pytest.fixture(scope="module")
def synthetic_photo(tiny_synthetic):
    """A 240x240 photo showing a synthetic test sample at twice its crop's size, the sample, and the detector box
    whose crop is exactly the sample's crop."""
    file = open_dataset(tiny_synthetic / "test.h5")
    sample = file.read(0, ["images", "volumes", "landmarks_3d"])
    box = (60.0, 40.0, 160.0, 140.0)
    crop = detector_box_crop(FaceBox(box, 1.0, np.zeros((5, 2))), file.grid.crop_size)
    photo = resample_crop(sample["images"], CropTransform(1 / crop.scale, tuple(-t / crop.scale for t in crop.translation)), 240)
    return photo, sample, file.grid, box, crop


def test_a_mesh_mapped_back_to_the_photo_lands_on_the_face(synthetic_photo):
    photo, sample, grid, box, crop = synthetic_photo
    model = OracleVolumeModel(grid, unpack_volume(sample["volumes"], grid.width))
    [[face]] = PhotoReconstructor(model, detector=FixedBoxes(box)).reconstruct([photo])
    assert face.status == "ok" and face.landmark_source == "detector box"
    assert face.crop == crop
    # The model saw the sample's crop again (resampled there and back).
    seen = model.seen_images[0][0].permute(1, 2, 0).numpy()
    assert np.abs(seen - sample["images"] / 255.0).mean() < 0.05
    # Its landmark vertices, in photo pixels (2 per crop pixel here), lie on the mesh.
    true_landmarks = crop.invert(sample["landmarks_3d"], z_shift=front_z(grid))
    distance = np.linalg.norm(face.vertices[None] - true_landmarks[:, None], axis=2).min(axis=1)
    assert np.median(distance) < 1.5 and distance.max() < 4.0
    assert face.vertices[:, :2].min() >= 0 and face.vertices[:, :2].max() < 240
    # Each vertex has the colour the sample's own crop has there.
    in_crop = vertex_colours_from_image(crop.apply(face.vertices[:, :2]), sample["images"])
    assert np.abs(face.colours - in_crop).mean() < 0.03


def test_a_small_face_is_reported_and_an_unsure_hourglass_falls_back_to_the_box(synthetic_photo):
    photo, sample, grid, box, crop = synthetic_photo
    model = OracleVolumeModel(grid, unpack_volume(sample["volumes"], grid.width))
    torch.manual_seed(0)
    untrained = build_model("landmark_hourglass", grid=grid, net=TINY)
    tiny_box = (10.0, 10.0, 22.0, 22.0)
    [[face, small]] = PhotoReconstructor(model, untrained, FixedBoxes(box, tiny_box)).reconstruct([photo])
    assert small.status.startswith("face too small to crop (12 px")
    assert not len(small.vertices)
    assert face.landmark_source.startswith("detector box (hourglass unsure: peak 0.")
    assert face.crop == crop and face.landmarks.shape == (68, 2)


def test_a_guided_model_is_guided_by_the_faces_landmarks_in_its_crop(synthetic_photo):
    photo, sample, grid, box, crop = synthetic_photo
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
