"""Entry points end to end on tiny synthetic data: train (fast_dev_run per config, resume), evaluate."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from experiments import evaluate, train
from experiments.config import CONFIG_DIR, load_config
from lightning_vrn.dataset_file import DatasetError
from lightning_vrn.geometry.mesh_io import read_obj

TINY_NET = ["model.net.features=16", "model.net.hourglass_depth=2", "model.net.stacks=1"]


def _config(name, data_dir, run_dir, *overrides):
    return load_config(
        CONFIG_DIR / f"{name}.yaml",
        [f"data.dir={data_dir}", f"run_dir={run_dir}", "data.num_workers=0", "data.batch_size=2", *overrides],
    )


@pytest.fixture(scope="module")
def paper_grid_data(tmp_path_factory):
    from data_prep.synthetic import generate_split
    from lightning_vrn.geometry import VoxelGrid

    out = tmp_path_factory.mktemp("synthetic-192")
    for split in ("train", "val", "test"):
        generate_split(out / f"{split}.h5", "builtin", VoxelGrid.parse("200,192,192"), 2, 0, split, progress=False)
    return out


def test_quickstart_fast_dev_run_writes_the_run_directory(tiny_synthetic, tmp_path):
    cfg = _config("quickstart", tiny_synthetic, tmp_path / "run", "trainer.fast_dev_run=true")
    metrics = train.train(cfg, command="python -m experiments.train --config quickstart.yaml")
    assert np.isfinite(metrics["train/loss"]) and metrics["train/loss"] > 0
    assert load_config(tmp_path / "run" / "config.yaml") == cfg
    assert (tmp_path / "run" / "command.txt").read_text().startswith("python -m experiments.train")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["train/loss"] == metrics["train/loss"]


@pytest.mark.slow
def test_paper_config_fast_dev_run_at_the_full_grid(paper_grid_data, tmp_path):
    cfg = _config("paper", paper_grid_data, tmp_path / "run", "trainer.fast_dev_run=true", "data.batch_size=1")
    metrics = train.train(cfg)
    assert np.isfinite(metrics["train/loss"])


def test_paper_config_rejects_data_of_another_grid(tiny_synthetic, tmp_path):
    cfg = _config("paper", tiny_synthetic, tmp_path / "run", "trainer.fast_dev_run=true")
    with pytest.raises(DatasetError, match="100x96x96.*200x192x192|200x192x192.*100x96x96"):
        train.train(cfg)


def test_unknown_config_key_on_the_command_line_exits_with_its_name(capsys):
    with pytest.raises(SystemExit) as error:
        train.main(["--config", str(CONFIG_DIR / "quickstart.yaml"), "trainer.max_epoch=3"])
    assert error.value.code == 2
    assert "trainer.max_epoch" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_run(tiny_synthetic, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    overrides = [*TINY_NET, "trainer.max_epochs=1", "trainer.log_every_n_steps=1", "nme.every_n_epochs=1",
                 "nme.max_val_samples=2"]
    train.train(_config("quickstart", tiny_synthetic, run_dir, *overrides))
    return run_dir


def test_training_writes_checkpoints_metrics_and_nme_tables(trained_run):
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    assert (trained_run / "checkpoints" / "best.ckpt").is_file()
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert {"val/loss", "val/nme", "test/loss"} <= set(metrics)
    with open(trained_run / "csv" / "version_0" / "metrics.csv") as handle:
        assert "train/loss" in next(csv.reader(handle))
    rows = list(csv.DictReader(open(trained_run / "nme" / "test.csv")))
    assert len(rows) == 4 and all(np.isfinite(float(r["nme"])) for r in rows)


def test_rerunning_resumes_from_the_last_checkpoint(trained_run, tiny_synthetic):
    cfg = _config("quickstart", tiny_synthetic, trained_run, *TINY_NET, "trainer.max_epochs=2", "nme.every_n_epochs=0")
    train.train(cfg)
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["epoch"] == 1  # epochs 0 (first run) and 1 (resumed run)
    assert checkpoint["variant"] == "vrn"


def test_evaluate_writes_every_output(trained_run, tiny_synthetic, tmp_path):
    out = tmp_path / "eval"
    code = evaluate.main(
        ["--checkpoint", str(trained_run / "checkpoints" / "last.ckpt"), "--data", str(tiny_synthetic / "test.h5"),
         "--train-data", str(tiny_synthetic / "train.h5"), "--out", str(out)]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("model", "mean training volume", "mean shape at GT pose"):
        entry = metrics[name]
        assert entry["num_samples"] == 4
        assert entry["num_samples"] - entry["num_failed"] == sum(entry[f"count_yaw_{a}_{b}"] for a, b in evaluate.YAW_BUCKETS_DEG)
    # The mean shape placed at the true pose is a strong baseline: far better than chance.
    assert metrics["mean shape at GT pose"]["nme_mean"] < 0.1
    rows = list(csv.DictReader(open(out / "per_sample.csv")))
    assert len(rows) == 4
    assert metrics["model"]["num_failed"] < metrics["model"]["num_samples"]  # the model predicts surfaces
    vertices, triangles, colours = read_obj(out / "reconstruction.obj")
    assert len(vertices) > 0 and len(triangles) > 0
    assert colours is not None and colours.shape == vertices.shape
    assert colours.min() >= 0 and colours.max() <= 1
    for picture in ("ced.png", "reconstruction.png"):
        with Image.open(out / picture) as image:
            assert image.size[0] > 200 and image.size[1] > 200


def test_evaluate_with_a_missing_checkpoint_names_it(tmp_path, tiny_synthetic, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(tmp_path / "nope.ckpt"), "--data", str(tiny_synthetic / "test.h5")])
    assert "nope.ckpt does not exist" in capsys.readouterr().err


def test_load_model_matches_lightnings_own_loader(trained_run):
    from lightning_vrn.models import VRN, load_model

    path = trained_run / "checkpoints" / "last.ckpt"
    ours, reference = load_model(path), VRN.load_from_checkpoint(path, map_location="cpu").eval()
    image = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours.predict_step({"image": image}), reference.predict_step({"image": image}))
    assert ours.grid == reference.grid and not ours.training


def test_load_model_rejects_a_file_that_is_not_a_checkpoint(tmp_path):
    from lightning_vrn.models import load_model

    bogus = tmp_path / "model.ckpt"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="model.ckpt is not a lightning-vrn checkpoint"):
        load_model(bogus)
