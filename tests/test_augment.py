"""Joint augmentation: volumes stay the voxelisation of the augmented mesh on both paths; landmarks,
vertices, pose and image move consistently (heatmaps: tests/test_landmark_hourglass.py); flips re-index landmarks."""

import math

import numpy as np
import pytest
import torch

from datamodules.augment import (
    AugmentSettings,
    augment_batch,
    augment_landmarks,
    augment_mesh,
    augment_rotation,
    identity_params,
    sample_params,
    transform_points,
)
from datamodules.dataset import FaceVolumeDataset, decode_batch, unpack_bits, unpack_bits_torch
from lightning_vrn.dataset_file import DatasetWriter, pack_volume
from lightning_vrn.geometry.grid import PAPER_GRID, VoxelGrid
from lightning_vrn.geometry.pose import (
    crop_rotation,
    euler_to_matrix,
    euler_to_matrix_torch,
    matrix_to_euler,
    matrix_to_euler_torch,
    mirror_pose,
)
from lightning_vrn.geometry.voxelise import voxelise, voxelise_frontal
from lightning_vrn.heatmaps import gaussian_heatmaps
from lightning_vrn.landmark_scheme import FLIP
from tests.helpers.toy_face import posed_face, toy_sample

SMALL = VoxelGrid.centred(50, 48, 48)


def one(angle_deg=0.0, scale=1.0, tx=0.0, ty=0.0, flip=False, colour=(1.0, 1.0, 1.0)):
    """One sample's parameters."""
    return {"angle": torch.tensor(math.radians(angle_deg), dtype=torch.float64),
            "scale": torch.tensor(scale, dtype=torch.float64), "tx": torch.tensor(tx, dtype=torch.float64),
            "ty": torch.tensor(ty, dtype=torch.float64), "flip": torch.tensor(flip),
            "colour": torch.tensor(colour, dtype=torch.float64)}


def stack(params_list):
    return {key: torch.stack([p[key] for p in params_list]) for key in params_list[0]}


def random_batch(grid, batch_size=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(batch_size, 3, grid.height, grid.width, generator=gen),
        "volume": torch.rand(batch_size, *grid.shape, generator=gen) < 0.3,
        "landmarks_2d": torch.rand(batch_size, 68, 2, generator=gen) * grid.width,
        "landmarks_3d": torch.rand(batch_size, 68, 3, generator=gen) * grid.width,
        "vertices": torch.rand(batch_size, 100, 3, generator=gen) * grid.width,
        "pose": (torch.rand(batch_size, 3, generator=gen) - 0.5) * 1.2,
        "index": torch.arange(batch_size),
    }


def overlap(volume, reference):
    """(IoU, fraction of voxels agreeing inside the union's bounding box)."""
    union = volume | reference
    lo, hi = np.argwhere(union).min(axis=0), np.argwhere(union).max(axis=0) + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    return (volume & reference).sum() / union.sum(), (volume[box] == reference[box]).mean()


# Three samples, each with its own pose and augmentation: flip + 40 deg + scale 0.85, -40 deg +
# scale 1.15, flip only. On the paper grid (nearest-neighbour resampling loses less at full size).
POSES = [(0.2, 0.5, 0.1), (-0.1, -0.4, 0.2), (0.15, 0.3, -0.1)]
CASES = [one(40, 0.85, 3.0, -2.0, True, (0.7, 1.0, 1.3)), one(-40, 1.15, -5.0, 4.0, False, (1.2, 0.8, 1.0)),
         one(0, 1.0, 0.0, 0.0, True)]


@pytest.fixture(scope="module")
def paper_file(tmp_path_factory):
    """A paper-grid file with the three posed toy faces (and frontal volumes); returns (path, samples)."""
    path = tmp_path_factory.mktemp("augment") / "toy.h5"
    rng = np.random.default_rng(1)
    samples = [toy_sample(PAPER_GRID, pose, (2.0 * i, -1.0 * i), rng, frontal=True) for i, pose in enumerate(POSES)]
    first = samples[0]
    writer = DatasetWriter(path, PAPER_GRID, len(samples), len(first["vertices"]), first["triangles"],
                           np.arange(len(first["vertices"])), first["landmark_vertices"],
                           {"face_model": "toy", "source": "test", "created_by": "tests"}, with_frontal=True)
    keys = ("image", "volume", "volume_frontal", "landmarks_2d", "landmarks_3d", "pose", "vertices")
    for index, sample in enumerate(samples):
        writer.write(index, {key: sample[key] for key in keys})
    writer.finish()
    return path, samples


def augmented_through(path, on_device, target_volume="aligned"):
    """The file's samples augmented with CASES on one path: CPU (per sample in __getitem__) or device (one batch)."""
    dataset = FaceVolumeDataset(path, PAPER_GRID, augment={"on_device": on_device}, target_volume=target_volume,
                                load_vertices=True)
    dataset.augment_params = lambda index, epoch: CASES[index]  # force the cases instead of seeded draws
    items = [dataset[i] for i in range(len(dataset))]
    batch = torch.utils.data.default_collate(items)
    return decode_batch(batch, PAPER_GRID) if on_device else batch  # volumes stay uint8 (unfinished) here


@pytest.mark.parametrize("on_device", [False, True], ids=["cpu_path", "device_path"])
@pytest.mark.parametrize("target_volume", ["aligned", "frontal"])
def test_augmented_volume_is_voxelised_augmented_mesh(paper_file, on_device, target_volume):
    path, samples = paper_file
    batch = augmented_through(path, on_device, target_volume)
    voxeliser = voxelise if target_volume == "aligned" else voxelise_frontal
    for i, (sample, params) in enumerate(zip(samples, CASES)):
        vertices = augment_mesh(sample["vertices"].astype(np.float64), params, PAPER_GRID)
        reference = voxeliser(vertices, sample["triangles"], augment_rotation(sample["rotation"], params), PAPER_GRID)
        volume = batch["volume"][i].numpy() > 0.5
        iou, agreement = overlap(volume, reference)
        print(f"{target_volume} {'device' if on_device else 'cpu'} case {i}: IoU {iou:.4f}, agreement {agreement:.4f}")
        assert iou >= 0.95 and agreement >= 0.99
        # The mesh in the batch is the augmented mesh.
        np.testing.assert_allclose(batch["vertices"][i].numpy(), vertices, atol=1e-3)


def test_reduced_grid_volume_agreement():
    """The same check on a 100x96x96 grid, where nearest-neighbour boundary losses weigh twice as much."""
    grid = VoxelGrid.centred(100, 96, 96)
    sample = toy_sample(grid, POSES[0])
    for params in CASES[:2]:
        batch = augment_batch({"volume": torch.from_numpy(sample["volume"])[None]}, stack([params]), grid)
        vertices = augment_mesh(sample["vertices"].astype(np.float64), params, grid)
        reference = voxelise(vertices, sample["triangles"], augment_rotation(sample["rotation"], params), grid)
        iou, agreement = overlap(batch["volume"][0].numpy(), reference)
        print(f"100x96x96: IoU {iou:.4f}, agreement {agreement:.4f}")
        assert iou >= 0.93 and agreement >= 0.98


def test_identity_params_leave_batch_unchanged():
    batch = random_batch(SMALL)
    out = augment_batch(batch, identity_params(3), SMALL)
    for key in ("volume", "landmarks_2d", "landmarks_3d", "vertices", "index"):
        assert torch.equal(out[key], batch[key]), key
    torch.testing.assert_close(out["image"], batch["image"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["pose"], batch["pose"], atol=1e-6, rtol=0)


def test_batch_of_one_equals_whole_batch():
    """The CPU path (batch of one) and the device path (whole batch) compute the same numbers."""
    batch = random_batch(SMALL, 4)
    params = sample_params(torch.Generator().manual_seed(3), 4, SMALL.crop_size)
    params["flip"][:2] = torch.tensor([True, False])
    whole = augment_batch(batch, params, SMALL)
    for i in range(4):
        one_sample = {k: v[i : i + 1] for k, v in batch.items()}
        single = augment_batch(one_sample, {k: v[i : i + 1] for k, v in params.items()}, SMALL)
        for key in ("volume", "landmarks_2d", "landmarks_3d", "vertices", "pose"):
            assert torch.equal(single[key][0], whole[key][i]), key
        torch.testing.assert_close(single["image"][0], whole["image"][i], atol=1e-6, rtol=0)


def test_flip_mirrors_landmarks_of_a_symmetric_face():
    """A frontal, centred, symmetric face flipped is the same face: landmark i lands on landmark i."""
    grid = VoxelGrid.centred(100, 96, 96)
    vertices, _, landmark_vertices, _ = posed_face(grid, (0.0, 0.0, 0.0))
    landmarks = vertices[landmark_vertices]
    flipped = augment_landmarks(landmarks, one(flip=True), grid)
    np.testing.assert_allclose(flipped, landmarks, atol=1e-9)
    # Posed and shifted: landmark 36 (right outer eye corner) sits at the mirror image of 45.
    vertices, _, landmark_vertices, _ = posed_face(grid, (0.1, 0.4, 0.2), offset_px=(5.0, -3.0))
    landmarks = vertices[landmark_vertices]
    flipped = augment_landmarks(landmarks, one(flip=True), grid)
    np.testing.assert_allclose(flipped[36], [grid.width - 1 - landmarks[45, 0], landmarks[45, 1], landmarks[45, 2]])
    assert flipped[36, 0] < flipped[45, 0]  # still the image-left eye, as iBUG's right eye must be


def test_landmarks_move_like_their_vertices():
    grid = VoxelGrid.centred(100, 96, 96)
    vertices, _, landmark_vertices, _ = posed_face(grid, (0.2, -0.3, 0.1), offset_px=(3.0, 2.0))
    for params in (one(30, 1.1, 4.0, -6.0, False), one(-25, 0.9, -2.0, 5.0, True)):
        moved = augment_mesh(vertices, params, grid)
        landmarks = augment_landmarks(vertices[landmark_vertices], params, grid)
        order = FLIP if bool(params["flip"]) else np.arange(68)
        np.testing.assert_allclose(landmarks, moved[landmark_vertices[order]], atol=1e-9)
        landmarks_2d = augment_landmarks(vertices[landmark_vertices, :2], params, grid)
        np.testing.assert_allclose(landmarks_2d, landmarks[:, :2], atol=1e-9)
        # A similarity: distances scale by s in x, y and z alike.
        ratio = np.linalg.norm(moved[10] - moved[500]) / np.linalg.norm(vertices[10] - vertices[500])
        assert ratio == pytest.approx(float(params["scale"]))


def test_pose_and_rotation_follow_the_mesh():
    """The augmented pose is the composed rotation, which maps the frontal mesh onto the augmented one."""
    grid = VoxelGrid.centred(100, 96, 96)
    pose = np.array([0.2, -0.5, 0.15])
    vertices, _, _, rotation = posed_face(grid, pose)
    frontal = (vertices - vertices.mean(0)) @ rotation  # R^T (v - c), rows
    for params in (one(35, 1.1, 2.0, 1.0, False), one(-20, 0.9, 0.0, 0.0, True)):
        moved = augment_mesh(vertices, params, grid)
        composed = augment_rotation(rotation, params)
        assert np.linalg.det(composed) == pytest.approx(1.0)
        mirror = np.diag([-1.0, 1.0, 1.0]) if bool(params["flip"]) else np.eye(3)
        expected = float(params["scale"]) * (frontal @ mirror) @ composed.T
        np.testing.assert_allclose(moved - moved.mean(0), expected, atol=1e-9)
        new_pose = augment_batch({"pose": torch.tensor(pose)[None]}, stack([params]), grid)["pose"][0].numpy()
        np.testing.assert_allclose(crop_rotation(new_pose), composed, atol=1e-9)


def test_mirror_pose_is_the_rotation_conjugated_by_the_x_mirror():
    """``mirror_pose`` = (pitch, -yaw, -roll) is exactly ``M R M`` (M = diag(-1, 1, 1)) in model and crop frames,
    for numpy and torch, and is what a flip with no other change does to the pose."""
    mirror = np.diag([-1.0, 1.0, 1.0])
    rng = np.random.default_rng(3)
    poses = rng.uniform([-np.pi, -np.pi / 2, -np.pi], [np.pi, np.pi / 2, np.pi], size=(50, 3))
    for pose in poses:
        mirrored = mirror_pose(pose)
        np.testing.assert_array_equal(mirrored, pose * [1, -1, -1])
        np.testing.assert_allclose(euler_to_matrix(*mirrored), mirror @ euler_to_matrix(*pose) @ mirror, atol=1e-12)
        np.testing.assert_allclose(crop_rotation(mirrored), mirror @ crop_rotation(pose) @ mirror, atol=1e-12)
    pose32 = poses[:4].astype(np.float32)
    assert mirror_pose(pose32).dtype == np.float32 and np.array_equal(pose32, poses[:4].astype(np.float32))
    tensor = torch.tensor(poses)
    np.testing.assert_array_equal(mirror_pose(tensor).numpy(), mirror_pose(poses))
    assert torch.equal(tensor, torch.tensor(poses))  # a new tensor: the input is not changed
    flipped = augment_batch({"pose": tensor}, stack([one(0, 1.0, 0.0, 0.0, True)] * len(poses)),
                            VoxelGrid.centred(100, 96, 96))["pose"]
    np.testing.assert_allclose(flipped.numpy(), mirror_pose(poses), atol=1e-9)


def test_torch_euler_helpers_match_pose_module():
    """The batched torch ``euler_to_matrix_torch`` / ``matrix_to_euler_torch`` agree with the numpy ones."""
    rng = np.random.default_rng(7)
    random = rng.uniform([-np.pi, -np.pi / 2, -np.pi], [np.pi, np.pi / 2, np.pi], size=(200, 3))
    poses = torch.tensor(np.vstack([[[0.3, -1.2, 2.5], [-0.7, 0.4, -3.0]], random]), dtype=torch.float64)
    matrices = euler_to_matrix_torch(poses)
    angles = matrix_to_euler_torch(matrices)
    for pose, matrix, angle in zip(poses.numpy(), matrices.numpy(), angles.numpy()):
        np.testing.assert_allclose(matrix, euler_to_matrix(*pose), atol=1e-12)
        np.testing.assert_allclose(angle, matrix_to_euler(matrix), atol=1e-12)
    # Inside yaw's range the angles come back (an independent check of both implementations).
    np.testing.assert_allclose(angles[2:].numpy(), random, atol=1e-9)


def test_image_moves_with_its_landmark():
    """A bright blob at a point ends up at the point's augmented position (rotation sense, flip, shift)."""
    grid = VoxelGrid.centred(100, 96, 96)
    point = torch.tensor([[[30.0, 60.0]]], dtype=torch.float64)
    image = gaussian_heatmaps(point.float(), grid.height, grid.width, 2.0).expand(1, 3, -1, -1).contiguous()
    for params in (one(40, 1.15, 6.0, -4.0, True), one(-35, 0.85, -7.0, 3.0, False)):
        out = augment_batch({"image": image}, stack([params]), grid)
        peak = torch.nonzero(out["image"][0, 0] == out["image"][0, 0].max())[0].flip(0).double()  # (x, y)
        expected = transform_points(point, stack([params]), grid)[0, 0]
        assert torch.linalg.norm(peak - expected) <= 0.75


def test_colour_scaling_per_channel_and_clipped():
    image = torch.full((1, 3, 48, 48), 0.5)
    out = augment_batch({"image": image}, stack([one(colour=(0.6, 1.0, 1.4))]), SMALL)["image"]
    torch.testing.assert_close(out[0, :, 24, 24], torch.tensor([0.3, 0.5, 0.7]))
    out = augment_batch({"image": image + 0.4}, stack([one(colour=(0.6, 1.0, 1.4))]), SMALL)["image"]
    torch.testing.assert_close(out[0, :, 24, 24], torch.tensor([0.54, 0.9, 1.0]))


def test_sample_params_ranges_seeds_and_flip_rate():
    config = AugmentSettings()
    params = sample_params(torch.Generator().manual_seed(0), 4000, 96, config)
    assert params["angle"].abs().max() <= math.radians(45) and params["angle"].abs().max() > math.radians(44)
    assert 0.85 <= params["scale"].min() and params["scale"].max() <= 1.15
    shift = torch.cat([params["tx"], params["ty"]]).abs()
    assert shift.max() <= 7.5 and shift.max() > 7.4  # 15 px at 192 -> 7.5 px at a 96 px crop
    assert 0.6 <= params["colour"].min() and params["colour"].max() <= 1.4 and params["colour"].shape == (4000, 3)
    assert 0.18 < params["flip"].double().mean() < 0.22
    again = sample_params(torch.Generator().manual_seed(0), 4000, 96, config)
    assert all(torch.equal(params[k], again[k]) for k in params)
    other = sample_params(torch.Generator().manual_seed(1), 4000, 96, config)
    assert not torch.equal(params["angle"], other["angle"])


def test_unpack_bits_matches_numpy():
    volume = np.random.default_rng(0).random((5, 6, 48)) < 0.4
    packed = torch.from_numpy(pack_volume(volume))
    for unpack in (unpack_bits, unpack_bits_torch):  # the CPU branch and the accelerator's bit operations
        unpacked = unpack(packed)
        assert unpacked.dtype == torch.uint8 and np.array_equal(unpacked.numpy(), volume.astype(np.uint8))


@pytest.mark.parametrize("bad", [{"scale": 1.1}, {"colour": [0.6, 1.0, 1.4]}, {"scale": [1.2, 0.9]}, {"flip_prob": 2}])
def test_bad_augment_settings_name_the_key(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=f"augment.{key}"):
        AugmentSettings.from_any(bad)


def test_unknown_augment_key_lists_the_valid_ones():
    with pytest.raises(KeyError, match="rotation_deg"):
        AugmentSettings.from_any({"rotation": 30})
