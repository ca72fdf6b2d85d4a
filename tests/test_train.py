"""experiments.train end to end on tiny synthetic data (fast_dev_run per config, run folders, resume, the best and
last checkpoints), and experiments.evaluate and load_model on the checkpoint it writes."""

import csv
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from experiments import evaluate, evaluation, runs, train
from experiments.config import CONFIG_DIR, ConfigError, load_config
from lightning_vrn.cli import run_command
from lightning_vrn.dataset_file import DatasetError
from lightning_vrn.geometry.mesh_io import read_obj
from lightning_vrn.metrics.report import YAW_BUCKETS_DEG
from tests.helpers.configs import TINY_NET, preset_config
from tests.helpers.training import losses_on_one_batch


@pytest.fixture(scope="module")
def paper_grid_data(tmp_path_factory):
    from data_prep.synthetic import generate_split
    from lightning_vrn.geometry import VoxelGrid

    out = tmp_path_factory.mktemp("synthetic-192")
    for split in ("train", "val", "test"):
        generate_split(out / f"{split}.h5", "builtin", VoxelGrid.parse("200,192,192"), 2, 0, split, progress=False)
    return out


def test_quickstart_fast_dev_run_writes_the_run_directory(tiny_synthetic, tmp_path):
    cfg = preset_config("quickstart", tiny_synthetic, tmp_path / "run", "trainer.fast_dev_run=true")
    metrics = train.train(cfg, command="python -m experiments.train --config quickstart.yaml")
    assert np.isfinite(metrics["train/loss"]) and metrics["train/loss"] > 0
    assert load_config(tmp_path / "run" / "config.yaml") == cfg
    assert (tmp_path / "run" / "command.txt").read_text().startswith("python -m experiments.train")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["train/loss"] == metrics["train/loss"]


@pytest.mark.slow
def test_paper_config_fast_dev_run_at_the_full_grid(paper_grid_data, tmp_path):
    cfg = preset_config("paper", paper_grid_data, tmp_path / "run", "trainer.fast_dev_run=true", "data.batch_size=1")
    metrics = train.train(cfg)
    assert np.isfinite(metrics["train/loss"])
    # The paper network at the full grid learns: three RMSprop steps on one batch lower its loss.
    model = train.build_model_from_config(cfg)
    datamodule = train.build_datamodule(cfg, model)
    datamodule.setup("fit")
    batch = datamodule.on_after_batch_transfer(next(iter(datamodule.train_dataloader())), 0)
    losses = losses_on_one_batch(model, batch, steps=4)
    assert losses[-1] < 0.9 * losses[0], losses


def test_paper_config_rejects_data_of_another_grid(tiny_synthetic, tmp_path):
    cfg = preset_config("paper", tiny_synthetic, tmp_path / "run", "trainer.fast_dev_run=true")
    with pytest.raises(DatasetError, match="100x96x96.*200x192x192|200x192x192.*100x96x96"):
        train.train(cfg)


def test_unknown_config_key_on_the_command_line_exits_with_its_name(capsys):
    code = run_command(train.main, ["--config", str(CONFIG_DIR / "quickstart.yaml"), "trainer.max_epoch=3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "trainer.max_epoch" in err and len(err.strip().splitlines()) == 1  # one line, no traceback


@pytest.fixture(scope="module")
def trained_run(tiny_synthetic, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    overrides = [*TINY_NET, "trainer.max_epochs=1", "trainer.log_every_n_steps=1", "nme.every_n_epochs=1",
                 "nme.max_val_samples=2"]
    train.train(preset_config("quickstart", tiny_synthetic, run_dir, *overrides))
    return run_dir


def test_training_writes_checkpoints_metrics_and_nme_tables(trained_run):
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    assert (trained_run / "checkpoints" / "best.ckpt").is_file()
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert {"val/loss", "val/nme", "test/loss", "val/loss_best"} <= set(metrics)
    with open(trained_run / "csv" / "version_0" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert "train/loss" in rows[0]
    # The loss of the 4 training steps falls: the pipeline trains, not only runs.
    step_losses = [float(r["train/loss"]) for r in rows if r["train/loss"]]
    assert len(step_losses) == 4 and step_losses[-1] < step_losses[0], step_losses
    best = [float(r["val/loss_best"]) for r in rows if r.get("val/loss_best")]
    assert best == [pytest.approx(metrics["val/loss"])]  # one validation: the best so far is its loss
    rows = list(csv.DictReader(open(trained_run / "nme" / "test.csv")))
    assert len(rows) == 4 and all(np.isfinite(float(r["nme"])) for r in rows)
    summary = json.loads((trained_run / "nme" / "test_summary.json").read_text())
    assert metrics["test/nme"] == summary["nme_mean"]  # exact, not the logged float32


def test_rerunning_resumes_from_the_last_checkpoint(trained_run, tiny_synthetic, tmp_path):
    run_dir = shutil.copytree(trained_run, tmp_path / "run")  # other tests read the fixture's run as it is
    cfg = preset_config("quickstart", tiny_synthetic, run_dir, *TINY_NET, "trainer.max_epochs=2",
                        "nme.every_n_epochs=0")
    train.train(cfg)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["epoch"] == 1  # epochs 0 (first run) and 1 (resumed run)
    assert checkpoint["lightning_vrn"]["variant"] == "vrn"


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
        assert entry["num_samples"] - entry["num_failed"] == sum(entry[f"count_yaw_{a}_{b}"] for a, b in YAW_BUCKETS_DEG)
        rows = list(csv.DictReader(open(out / evaluation.slug(name) / "test.csv")))
        assert [int(r["index"]) for r in rows] == [0, 1, 2, 3]
        assert list(rows[0]) == ["index", "yaw_deg", "expression", "nme", "nme_aligned", "nme_closest", "failed"]
    # The mean shape placed at the true pose is a strong baseline: far better than chance.
    assert metrics["mean shape at GT pose"]["nme_mean"] < 0.1
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
    with pytest.raises(ValueError, match=r"model.ckpt is not a checkpoint \(a text file, 16 bytes"):
        load_model(bogus)


def test_training_test_nme_equals_evaluate_on_the_same_checkpoint_and_file(trained_run, tiny_synthetic, tmp_path):
    """One evaluation path: training's test stage and experiments.evaluate give the same numbers, exactly."""
    from lightning_vrn.metrics.report import read_per_sample_csv

    trained = json.loads((trained_run / "metrics.json").read_text())
    out = tmp_path / "eval"
    evaluate.main(["--checkpoint", trained["best_checkpoint"], "--data", str(tiny_synthetic / "test.h5"),
                   "--batch-size", "2", "--out", str(out)])  # training's data.batch_size
    evaluated = json.loads((out / "metrics.json").read_text())["model"]
    assert evaluated["nme_mean"] == trained["test/nme"]
    assert evaluated == json.loads((trained_run / "nme" / "test_summary.json").read_text())
    ours, theirs = read_per_sample_csv(out / "model" / "test.csv"), read_per_sample_csv(trained_run / "nme" / "test.csv")
    for column in ours:
        np.testing.assert_array_equal(ours[column], theirs[column])


def test_runs_with_the_same_name_get_their_own_directories(tiny_synthetic, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(runs.RUN_DIR_ENV, raising=False)
    cfg = load_config(CONFIG_DIR / "quickstart.yaml", [f"data.dir={tiny_synthetic}", "data.num_workers=0",
                                                       "data.batch_size=2", "trainer.fast_dev_run=true", *TINY_NET])
    assert cfg.run_dir is None
    first, second = (Path(train.train(cfg)["run_dir"]) for _ in range(2))
    assert first != second and first.parent == second.parent == Path("runs") / "vrn-quickstart"
    pattern = rf"\d{{8}}-\d{{6}}-{runs.config_hash(cfg)}(-\d+)?"  # time, config hash, a counter if taken
    assert re.fullmatch(pattern, first.name) and re.fullmatch(pattern, second.name)
    same_second = [runs.new_run_dir(cfg, tmp_path / "many") for _ in range(3)]
    assert len(set(same_second)) == 3 and all(re.fullmatch(pattern, path.name) for path in same_second)
    assert load_config(first / "config.yaml") == load_config(second / "config.yaml") == cfg


def test_resume_names_the_run_to_continue_and_run_dir_means_that_directory(tiny_synthetic, tmp_path):
    run_dir = tmp_path / "run"
    base = [*TINY_NET, "nme.every_n_epochs=0", "trainer.limit_val_batches=1"]
    train.train(preset_config("quickstart", tiny_synthetic, run_dir, *base, "trainer.max_epochs=1"))
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    cfg = load_config(CONFIG_DIR / "quickstart.yaml", [f"data.dir={tiny_synthetic}", "data.num_workers=0",
                                                       "data.batch_size=2", *base, "trainer.max_epochs=2",
                                                       f"resume={checkpoint}"])
    metrics = train.train(cfg)
    assert Path(metrics["run_dir"]) == run_dir
    assert torch.load(checkpoint, weights_only=False)["epoch"] == 1
    with pytest.raises(ConfigError, match="no checkpoint at"):
        runs.resolve_run(load_config(CONFIG_DIR / "quickstart.yaml", [f"resume={tmp_path / 'nothing'}"]))
    fresh = preset_config("quickstart", tiny_synthetic, run_dir, *base, "resume=false")
    assert runs.resolve_run(fresh) == (run_dir, None)


def test_last_checkpoint_follows_every_epoch_even_when_the_monitor_does_not_improve(tiny_synthetic, tmp_path):
    # mode=max on a falling validation loss: only epoch 0 is "best"; last.ckpt must still be epoch 2.
    run_dir = tmp_path / "run"
    overrides = [*TINY_NET, "nme.every_n_epochs=0", "trainer.max_epochs=3", "checkpoint.mode=max"]
    metrics = train.train(preset_config("quickstart", tiny_synthetic, run_dir, *overrides))
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 2
    best_epoch = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=False)["epoch"]
    with open(run_dir / "csv" / "version_0" / "metrics.csv") as handle:
        val_losses = [float(r["val/loss"]) for r in csv.DictReader(handle) if r["val/loss"]]
    assert best_epoch == int(np.argmax(val_losses)) and metrics["val/loss_best"] == pytest.approx(max(val_losses))


def test_every_epoch_competes_for_the_best_checkpoint_whatever_the_step_interval(tiny_synthetic, tmp_path):
    # 8 training faces at batch 2: every epoch ends on step 4, 8, 12, each a last.ckpt step of every_n_train_steps=4.
    # Before, an epoch ending on such a step never competed for best.ckpt: here none would have, and no best.ckpt.
    run_dir = tmp_path / "run"
    overrides = [*TINY_NET, "nme.every_n_epochs=0", "trainer.max_epochs=3", "checkpoint.every_n_train_steps=4"]
    metrics = train.train(preset_config("quickstart", tiny_synthetic, run_dir, *overrides))
    with open(run_dir / "csv" / "version_0" / "metrics.csv") as handle:
        val_losses = [float(r["val/loss"]) for r in csv.DictReader(handle) if r["val/loss"]]
    assert len(val_losses) == 3
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=False)
    assert best["epoch"] == int(np.argmin(val_losses))
    assert metrics["val/loss_best"] == pytest.approx(min(val_losses))
    assert Path(metrics["best_checkpoint"]) == run_dir / "checkpoints" / "best.ckpt"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 2


def test_the_checkpoint_can_monitor_the_validation_nme(tiny_synthetic, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*TINY_NET, "nme.every_n_epochs=2", "nme.max_val_samples=2", "trainer.max_epochs=2",
                 "checkpoint.monitor=val/nme"]
    metrics = train.train(preset_config("quickstart", tiny_synthetic, run_dir, *overrides))
    assert torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=False)["epoch"] == 1  # the NME epoch
    assert metrics["val/nme_best"] == pytest.approx(metrics["val/nme"])


@pytest.mark.slow
def test_an_offline_wandb_run_holds_the_config_and_metrics(tiny_synthetic, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "run"
    cfg = preset_config("quickstart", tiny_synthetic, run_dir, *TINY_NET, "trainer.max_epochs=1",
                        "nme.every_n_epochs=0", "logger.wandb=true", "logger.tags=[ablation]")
    train.train(cfg)
    (offline,) = list((run_dir / "wandb").glob("offline-run-*"))  # offline: no API key, no network
    (log,) = list(offline.glob("run-*.wandb"))  # what `wandb sync` uploads: config, metrics, tags
    deadline = time.time() + 60  # W&B's service process writes the log after the run is closed
    while b"val/loss" not in log.read_bytes() and time.time() < deadline:
        time.sleep(0.5)
    data = log.read_bytes()  # protobuf records keep strings as they are
    for text in (b"vrn-quickstart", b"hourglass_depth", b"train/loss",
                 b"val/loss", b"ablation"):
        assert text in data, text
    assert train.wandb_logger(cfg, run_dir).version == train.wandb_logger(cfg, run_dir).version  # one id per run
