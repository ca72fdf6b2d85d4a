"""Evaluation protocols: ``experiments.evaluate --landmarks-model`` (VRN-Guided on detected landmarks, a
volume-only model's landmarks from the detector, the detector scored as a method), ``--real-data`` (a second test
file scored by the same path), AFLW2000-3D's
re-annotated landmarks as a second ground truth (dataset field, batches, the 3DDFA NME), and the converter's
``--reannotated`` mapping through the crop."""

import json

import numpy as np
import pytest
from torch.utils.data import default_collate

from datamodules.dataset import FaceVolumeDataset
from experiments import evaluate
from lightning_vrn.dataset_file import DatasetError, DatasetWriter, open_dataset, unpack_volume
from lightning_vrn.models import build_model, load_model
from tests.helpers.training import TINY, save, trained

BUCKETS = ((0, 30), (30, 60), (60, 90))
LANDMARK_KEYS = ["landmark_nme", *(f"landmark_nme_yaw_{lo}_{hi}" for lo, hi in BUCKETS), "landmark_nme_balanced"]


@pytest.fixture(scope="module")
def checkpoints(tiny_synthetic, tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    detector = build_model("landmark_hourglass", grid=open_dataset(tiny_synthetic / "train.h5").grid, net=TINY)
    return {"guided": save(trained("vrn_guided", tiny_synthetic), folder / "guided.ckpt"),
            "vrn": save(trained("vrn", tiny_synthetic), folder / "vrn.ckpt"),
            "detector": save(detector, folder / "detector.ckpt")}


def with_reannotated(source, path, shift):
    """``source``'s samples re-written with ``landmarks_2d_reannotated``: ``landmarks_2d`` moved by ``shift`` (68, 2)
    crop pixels."""
    file = open_dataset(source)
    with DatasetWriter(path, file.grid, len(file), file.num_vertices, file.triangles, file.face_region,
                       file.landmark_vertices, {key: file.attrs[key] for key in ("face_model", "source", "created_by")},
                       with_frontal=True, with_reannotated=True) as writer:
        for i in range(len(file)):
            data = file.read(i, ["images", "volumes", "volumes_frontal", "landmarks_2d", "landmarks_3d", "pose",
                                 "vertices"])
            writer.write(i, {"image": data["images"], "volume": unpack_volume(data["volumes"], file.grid.width),
                             "volume_frontal": unpack_volume(data["volumes_frontal"], file.grid.width),
                             "landmarks_2d": data["landmarks_2d"], "landmarks_3d": data["landmarks_3d"],
                             "pose": data["pose"], "vertices": data["vertices"],
                             "landmarks_2d_reannotated": data["landmarks_2d"] + shift})
        writer.finish()
    return path


def nme_3ddfa(pred, gt, yaw_deg):
    """3DDFA's ``calc_nme`` and ``ana`` in numpy (crop pixels, (N, 68, 2)): per image the mean point distance over
    sqrt(w h) of the ground truth's box; bucket means by |yaw| (3DDFA's own bounds); the mean of the non-empty ones."""
    box = np.sqrt((gt[:, :, 0].max(1) - gt[:, :, 0].min(1)) * (gt[:, :, 1].max(1) - gt[:, :, 1].min(1)))
    nme = np.sqrt(((pred - gt) ** 2).sum(-1)).mean(-1) / box
    yaw = np.abs(yaw_deg)
    buckets = {"0_30": yaw <= 30, "30_60": (yaw > 30) & (yaw <= 60), "60_90": yaw > 60}
    values = {"": nme.mean(),
              **{f"_yaw_{name}": nme[inside].mean() for name, inside in buckets.items() if inside.any()}}
    values["_balanced"] = np.mean([nme[inside].mean() for inside in buckets.values() if inside.any()])
    return values


def run_evaluate(checkpoint, data, out, *extra):
    assert evaluate.main(["--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out), "--batch-size", "4",
                          "--no-log-wandb", *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


# ----- experiments.evaluate --landmarks-model -----


def test_a_guided_model_is_guided_by_the_detector_and_the_detector_is_scored(checkpoints, tiny_synthetic, tmp_path):
    data = tiny_synthetic / "test.h5"
    truth = run_evaluate(checkpoints["guided"], data, tmp_path / "truth")
    detected = run_evaluate(checkpoints["guided"], data, tmp_path / "detected",
                            "--landmarks-model", str(checkpoints["detector"]))
    assert truth["model"]["num_failed"] < 4 and detected["model"]["num_failed"] < 4  # both predict surfaces
    assert detected["model"]["nme_mean"] != truth["model"]["nme_mean"]
    assert truth["landmarks"] == {"model": {"landmark_source": None}} and truth["landmarks_model"] is None
    source = f"detector {checkpoints['detector']}"
    assert detected["landmarks_model"] == str(checkpoints["detector"])
    assert detected["landmarks"]["landmark detector"]["landmark_source"] == "model"
    assert detected["landmarks"]["model"] == {**detected["landmarks"]["landmark detector"], "landmark_source": source}
    assert set(LANDMARK_KEYS) <= set(detected["landmarks"]["model"])
    assert "landmark detector" not in detected  # no volume, no NME summary

    # The detector's NME is its landmarks' on the test images, by the 3DDFA formula.
    detector = load_model(checkpoints["detector"])
    dataset = FaceVolumeDataset(data)
    batch = default_collate([dataset[i] for i in range(len(dataset))])
    expected = nme_3ddfa(detector.landmarks(batch).double().numpy(), batch["landmarks_2d"].double().numpy(),
                         np.degrees(batch["pose"][:, 1].double().numpy()))
    for suffix, value in expected.items():
        assert detected["landmarks"]["model"][f"landmark_nme{suffix}"] == pytest.approx(value, rel=1e-5), suffix
    empty = {f"_yaw_{lo}_{hi}" for lo, hi in BUCKETS} - set(expected)
    assert all(detected["landmarks"]["model"][f"landmark_nme{suffix}"] is None for suffix in empty)



def test_a_landmark_detector_checkpoint_is_scored_by_its_landmarks(checkpoints, tiny_synthetic, tmp_path, capsys):
    data = tiny_synthetic / "test.h5"
    alone = run_evaluate(checkpoints["detector"], data, tmp_path / "alone")
    beside = run_evaluate(checkpoints["guided"], data, tmp_path / "beside", "--landmarks-model",
                          str(checkpoints["detector"]))
    assert alone["landmarks"] == {"model": beside["landmarks"]["landmark detector"]}  # the same scores either way
    assert set(LANDMARK_KEYS) <= set(alone["landmarks"]["model"]) and "model" not in alone  # no NME summary
    assert sorted(p.name for p in (tmp_path / "alone").iterdir()) == ["metrics.json"]  # no volume: no mesh, no curve
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(checkpoints["detector"]), "--data", str(data), "--out", str(tmp_path / "x"),
                       "--train-data", str(tiny_synthetic / "train.h5")])
    assert "predicts landmarks, not a volume" in capsys.readouterr().err


def test_a_volume_only_model_reports_the_detectors_landmark_nme_and_both_ground_truths(checkpoints, tiny_synthetic,
                                                                                        tmp_path):
    rng = np.random.default_rng(0)
    shift = rng.normal(0.0, 1.5, (68, 2)).astype(np.float32)
    data = with_reannotated(tiny_synthetic / "test.h5", tmp_path / "reannotated.h5", shift)
    metrics = run_evaluate(checkpoints["vrn"], data, tmp_path / "eval", "--landmarks-model",
                           str(checkpoints["detector"]))
    model, detector = metrics["landmarks"]["model"], metrics["landmarks"]["landmark detector"]
    assert model["landmark_source"] == f"detector {checkpoints['detector']}" and detector["landmark_source"] == "model"
    reannotated_keys = [key.replace("landmark_nme", "landmark_nme_reannotated") for key in LANDMARK_KEYS]
    assert set(LANDMARK_KEYS) | set(reannotated_keys) <= set(model)
    assert model == {**detector, "landmark_source": model["landmark_source"]}
    assert model["landmark_nme_reannotated"] != model["landmark_nme"]

    detector_model = load_model(checkpoints["detector"])
    dataset = FaceVolumeDataset(data)
    batch = default_collate([dataset[i] for i in range(len(dataset))])
    np.testing.assert_array_equal(batch["landmarks_2d_reannotated"].numpy(), batch["landmarks_2d"].numpy() + shift)
    expected = nme_3ddfa(detector_model.landmarks(batch).double().numpy(),
                         batch["landmarks_2d_reannotated"].double().numpy(),
                         np.degrees(batch["pose"][:, 1].double().numpy()))
    for suffix, value in expected.items():
        assert model[f"landmark_nme_reannotated{suffix}"] == pytest.approx(value, rel=1e-5), suffix

    # Without a detector a volume-only model has no landmarks.
    plain = run_evaluate(checkpoints["vrn"], data, tmp_path / "plain")
    assert plain["landmarks"] == {"model": {"landmark_source": None}}


def test_a_landmarks_model_of_another_kind_is_refused(checkpoints, tiny_synthetic, tmp_path):
    with pytest.raises(ValueError, match="holds a 'vrn' checkpoint.*landmark_hourglass"):
        evaluate.main(["--checkpoint", str(checkpoints["guided"]), "--data", str(tiny_synthetic / "test.h5"),
                       "--out", str(tmp_path / "eval"), "--landmarks-model", str(checkpoints["vrn"])])
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(checkpoints["guided"]), "--data", str(tiny_synthetic / "test.h5"),
                       "--out", str(tmp_path / "eval"), "--landmarks-model", str(tmp_path / "missing.ckpt")])


# ----- experiments.evaluate --real-data -----


def test_real_data_is_scored_number_for_number_as_that_file_given_as_data(checkpoints, tiny_synthetic, tmp_path,
                                                                          capsys):
    """Every method's scores on --real-data (model, baselines, detector) are those of the same file as --data."""
    real = tiny_synthetic / "val.h5"  # any dataset file stands in for converted photos
    common = ["--landmarks-model", str(checkpoints["detector"]), "--train-data", str(tiny_synthetic / "train.h5")]
    both = run_evaluate(checkpoints["guided"], tiny_synthetic / "test.h5", tmp_path / "both", "--real-data", str(real),
                        *common)
    alone = run_evaluate(checkpoints["guided"], real, tmp_path / "alone", *common)
    assert both["real"] == {key: value for key, value in alone.items()
                            if key not in ("checkpoint", "grid", "landmarks_model")}
    assert set(both["real"]) == {"model", "mean training volume", "mean shape at GT pose", "landmarks", "data",
                                 "ground_truth"}
    assert both["real"]["ground_truth"] == both["ground_truth"] == \
        "the synthetic file's own meshes (face model builtin)"
    assert both["real"]["model"] != both["model"]  # two files
    for method in ("model", "mean_training_volume", "mean_shape_at_GT_pose"):
        assert (tmp_path / "both" / "real" / method / "test.csv").read_bytes() == \
            (tmp_path / "alone" / method / "test.csv").read_bytes()
    assert {path.name for path in (tmp_path / "both" / "real").iterdir()} >= {"ced.png", "reconstruction.png"}
    assert f"test file:      {real} (ground truth: the synthetic file's own meshes" in capsys.readouterr().out

    detector = run_evaluate(checkpoints["detector"], tiny_synthetic / "test.h5", tmp_path / "detector",
                            "--real-data", str(real))  # a landmark detector alone: its landmark NMEs on both
    assert detector["real"]["landmarks"] == {"model": alone["landmarks"]["landmark detector"]}


def test_a_real_data_file_that_cannot_be_read_is_refused_before_anything_is_scored(checkpoints, tiny_synthetic,
                                                                                   tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'missing.h5'} not found"):
        run_evaluate(checkpoints["vrn"], tiny_synthetic / "test.h5", tmp_path / "eval", "--real-data",
                     str(tmp_path / "missing.h5"))
    assert not (tmp_path / "eval" / "model").exists()


# ----- the dataset field -----


def test_the_reannotated_field_is_optional_and_passes_through_unaugmented_batches(tiny_synthetic, tmp_path):
    plain = open_dataset(tiny_synthetic / "test.h5")
    assert "landmarks_2d_reannotated" not in plain.fields
    with pytest.raises(DatasetError, match="no landmarks_2d_reannotated.*--reannotated"):
        plain.read(0, ["landmarks_2d_reannotated"])
    assert "landmarks_2d_reannotated" not in FaceVolumeDataset(tiny_synthetic / "test.h5")[0]

    shift = np.full((68, 2), 0.25, np.float32)
    path = with_reannotated(tiny_synthetic / "test.h5", tmp_path / "re.h5", shift)
    file = open_dataset(path)
    assert "landmarks_2d_reannotated" in file.fields
    read = file.read(1, ["landmarks_2d", "landmarks_2d_reannotated"])
    assert read["landmarks_2d_reannotated"].dtype == np.float32
    np.testing.assert_array_equal(read["landmarks_2d_reannotated"], read["landmarks_2d"] + shift)
    for on_device in (False, True):
        sample = FaceVolumeDataset(path, on_device=on_device)[1]
        np.testing.assert_array_equal(sample["landmarks_2d_reannotated"].numpy(), read["landmarks_2d_reannotated"])
    augmented = FaceVolumeDataset(path, augment={"enabled": True})[1]  # augmentation would not move it: left out
    assert "landmarks_2d_reannotated" not in augmented


def test_the_wandb_eval_run_logs_every_methods_landmark_nme_and_source(checkpoints, tiny_synthetic, tmp_path,
                                                                       monkeypatch):
    from tests.helpers.offline_wandb import offline_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "eval"
    evaluate.main(["--checkpoint", str(checkpoints["vrn"]), "--data", str(tiny_synthetic / "test.h5"), "--out",
                   str(out), "--batch-size", "4", "--log-wandb", "--landmarks-model", str(checkpoints["detector"])])
    metrics = json.loads((out / "metrics.json").read_text())
    _, logged = offline_run(out)
    assert logged["summary"]["eval/nme_mean"] == metrics["model"]["nme_mean"]
    for key in LANDMARK_KEYS:
        assert logged["summary"][f"eval/{key}"] == metrics["landmarks"]["model"][key]
        assert logged["summary"][f"eval/landmark_detector/{key}"] == metrics["landmarks"]["landmark detector"][key]
    assert logged["config"]["landmark_sources"] == {"model": f"detector {checkpoints['detector']}",
                                                    "landmark detector": "model"}


# ----- the converter's --reannotated -----


def test_the_converter_maps_the_reannotated_landmarks_through_each_samples_crop(tmp_path):
    import scipy.io

    from data_prep import aflw2000
    from tests.helpers.fake_bfm import fake_bfm_content, write_3ddfa
    from tests.helpers.fake_mat_faces import write_fake_sample

    content, rng = fake_bfm_content(seed=1), np.random.default_rng(3)
    write_3ddfa(tmp_path / "bfm", content)
    root = tmp_path / "aflw"
    for i in range(3):
        write_fake_sample(root, f"image{i:05d}", content, rng)
    (root / "image00001.jpg").unlink()  # skipped: the other samples must still take their own rows
    pt3d = np.stack([scipy.io.loadmat(root / f"image{i:05d}.mat")["pt3d_68"] for i in range(3)])  # (3, 3, 68)
    # 3DDFA's layout (N, 3, 68), 1-based photo pixels like pt3d_68: landmark i at pt3d_68's point 67 - i.
    np.save(tmp_path / "re.npy", pt3d[:, :, ::-1].astype(np.float32))
    np.save(tmp_path / "re_points.npy", pt3d[:, :2, ::-1].transpose(0, 2, 1))  # (N, 68, 2)
    for name in ("re.npy", "re_points.npy"):
        out = tmp_path / f"{name}.h5"
        assert aflw2000.main(["--root", str(root), "--bfm", str(tmp_path / "bfm"), "--out", str(out), "--grid",
                              "100,96,96", "--reannotated", str(tmp_path / name)]) == 0
        file = open_dataset(out)
        assert len(file) == 2 and "landmarks_2d_reannotated" in file.fields
        for index in range(2):
            got = file.read(index, ["landmarks_2d", "landmarks_2d_reannotated"])
            np.testing.assert_allclose(got["landmarks_2d_reannotated"], got["landmarks_2d"][::-1], atol=1e-4)

    np.save(tmp_path / "short.npy", pt3d[:2])
    with pytest.raises(ValueError, match="2 rows.*3 .mat files"):
        aflw2000.main(["--root", str(root), "--bfm", str(tmp_path / "bfm"), "--out", str(tmp_path / "short.h5"),
                       "--grid", "100,96,96", "--reannotated", str(tmp_path / "short.npy")])
    np.save(tmp_path / "bad.npy", pt3d[:, :, :5])
    with pytest.raises(ValueError, match=r"shape \(3, 3, 5\)"):
        aflw2000.main(["--root", str(root), "--bfm", str(tmp_path / "bfm"), "--out", str(tmp_path / "bad.h5"),
                       "--grid", "100,96,96", "--reannotated", str(tmp_path / "bad.npy")])
