"""W&B logging without a network: media of the NME epochs, checkpoint artifacts, linked eval runs (offline runs)."""

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments import compare, evaluate, train
from experiments.config import load_config
from lightning_vrn.metrics.report import YAW_BUCKETS_DEG, read_per_sample_csv
from lightning_vrn.wandb_media import GROUND_TRUTH_RGB, PREDICTION_RGB, WandbMedia, ced_points
from tests.test_experiments import TINY_NET, _config

BLOCK = 32768  # a W&B run log (.wandb) is a LevelDB log: 32 KiB blocks of records with 7-byte headers


def _records(data: bytes):
    """The protobuf records of a .wandb file's bytes (a record still being written is left out)."""
    from wandb.proto import wandb_internal_pb2

    assert data[:4] == b":W&B", data[:7]
    pos, pending = 7, b""  # after the file header (":W&B", magic, version)
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 or pos + 7 + length > len(data):
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def offline_run(parent: Path) -> tuple[Path, dict]:
    """The one offline W&B run under ``parent/wandb``: its folder, and its run record, config and summary
    once W&B's service has written the run's exit (it writes after the run is closed)."""
    (folder,) = (parent / "wandb").glob("offline-run-*")
    (log,) = folder.glob("run-*.wandb")
    deadline = time.time() + 60
    while True:
        records = list(_records(log.read_bytes()))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.time() > deadline:
            break
        time.sleep(0.5)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    summary = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.summary.update})
    return folder, {"run": run, "config": config, "summary": summary}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


@pytest.fixture(scope="module")
def wandb_run(tiny_synthetic, tmp_path_factory):
    """A tiny training logged to an offline W&B run: 1 epoch, validation NME on 2 samples, media of 2."""
    run_dir = tmp_path_factory.mktemp("wandb-run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.delenv("WANDB_API_KEY", raising=False)
        train.train(_config("quickstart", tiny_synthetic, run_dir, *TINY_NET, "trainer.max_epochs=1",
                            "nme.every_n_epochs=1", "nme.max_val_samples=2", "logger.wandb=true",
                            "logger.media_samples=2"))
    return run_dir


def test_an_offline_training_run_holds_the_error_curve_and_media(wandb_run):
    folder, logged = offline_run(wandb_run)
    media = folder / "files" / "media"
    cfg = load_config(wandb_run / "config.yaml")
    assert logged["run"].run_id == train.wandb_run_id(cfg, wandb_run)
    assert logged["config"]["logger"]["media_samples"] == 2
    for stage, report in (("val", "val_epoch0000"), ("test", "test")):
        (curve,) = (media / "table" / stage).glob("ced_table_*.table.json")  # the data of the W&B line plot
        table = json.loads(curve.read_text())
        assert table["columns"] == ["method", "nme", "fraction"]
        expected = ced_points(read_per_sample_csv(wandb_run / "nme" / f"{report}.csv"))
        assert [row[1:] for row in table["data"]] == [list(point) for point in expected] and expected[-1][1] == 1
        clouds = sorted((media / "object3D" / stage).glob("reconstructions_*.pts.json"))
        assert len(clouds) == 2  # logger.media_samples
        for cloud in clouds:
            points = np.array(json.loads(cloud.read_text()))
            assert points.shape[1] == 6 and len(points) > 100
            colours = {tuple(c) for c in points[:, 3:].astype(int)}
            assert colours <= {PREDICTION_RGB, GROUND_TRUTH_RGB} and GROUND_TRUTH_RGB in colours
            truth = points[(points[:, 3:] == GROUND_TRUTH_RGB).all(axis=1), :3]
            assert truth[:, :2].min() >= 0 and truth[:, :2].max() <= 96  # crop pixels of the 96-pixel crop
        slices = sorted((media / "images" / stage).glob("volume_slices_*.png"))
        assert len(slices) == 2
        with Image.open(slices[0]) as image:  # 2 rows of tiles max(D, H) = 100 high, 4 tiles 96 wide, 2-px lines
            assert image.size == (4 * 96 + 6, 2 * 100 + 2)
    assert any(PREDICTION_RGB in {tuple(c) for c in np.array(json.loads(p.read_text()))[:, 3:].astype(int)}
               for p in (media / "object3D").rglob("*.pts.json"))  # the trained model predicts surfaces


def test_evaluate_logs_into_a_linked_eval_run(wandb_run, tiny_synthetic, tmp_path):
    out = tmp_path / "eval"
    evaluate.main(["--checkpoint", str(wandb_run / "checkpoints" / "best.ckpt"), "--data",
                   str(tiny_synthetic / "test.h5"), "--batch-size", "2", "--out", str(out)])  # no --wandb: as trained
    metrics = json.loads((out / "metrics.json").read_text())["model"]
    _, training = offline_run(wandb_run)
    folder, logged = offline_run(out)
    assert logged["run"].job_type == "eval" and logged["run"].run_group == training["run"].run_group == "vrn"
    assert logged["config"]["training_run_id"] == training["run"].run_id
    assert logged["summary"]["eval/nme_mean"] == metrics["nme_mean"]  # exactly metrics.json's numbers
    for lo, hi in YAW_BUCKETS_DEG:
        assert logged["summary"][f"eval/nme_yaw_{lo}_{hi}"] == metrics[f"nme_yaw_{lo}_{hi}"]
    (per_sample,) = (folder / "files" / "media" / "table" / "eval").glob("per_sample_*.table.json")
    rows = json.loads(per_sample.read_text())
    assert len(rows["data"]) == 4 and rows["columns"][:4] == ["index", "yaw_deg", "expression", "nme"]
    assert list((folder / "files" / "media" / "table").glob("ced_table_*.table.json"))


def test_evaluate_follows_the_training_config_unless_told(wandb_run, tmp_path):
    from experiments.config import save_config

    without = tmp_path / "run"
    save_config(load_config(wandb_run / "config.yaml", ["logger.wandb=false"]), without / "config.yaml")
    assert evaluate.wandb_wanted(None, wandb_run) and not evaluate.wandb_wanted(None, without)
    assert not evaluate.wandb_wanted(False, wandb_run)
    assert not evaluate.wandb_wanted(None, None) and evaluate.wandb_wanted(True, None)


def test_compare_links_each_methods_eval_run_to_its_training_run(wandb_run, tmp_path):
    settings = compare.CompareSettings(name="cmp", out=str(tmp_path / "cmp"), methods={"VRN": []})
    (tmp_path / "cmp" / "runs").mkdir(parents=True)
    (tmp_path / "cmp" / "runs" / "VRN").symlink_to(wandb_run)  # the same run directory, the same training run id
    table = read_per_sample_csv(wandb_run / "nme" / "test.csv")
    oracle = "mean shape at GT pose (oracle)"
    compare.log_wandb_runs(settings, {"VRN": table, oracle: table}, {}, None)
    _, training = offline_run(wandb_run)
    _, method = offline_run(tmp_path / "cmp" / "eval" / "VRN")
    _, baseline = offline_run(tmp_path / "cmp" / "eval" / evaluate.slug(oracle))
    assert method["config"]["training_run_id"] == training["run"].run_id and method["config"]["method"] == "VRN"
    assert method["summary"]["eval/nme_mean"] == json.loads((wandb_run / "nme" / "test_summary.json").read_text())[
        "nme_mean"]
    assert baseline["config"]["training_run_id"] is None and baseline["run"].run_group == evaluate.slug(oracle)


def test_the_media_callback_is_a_no_op_without_a_wandb_logger(tiny_synthetic, tmp_path, monkeypatch):
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    from lightning_vrn.callbacks import NMECallback, NMESettings

    monkeypatch.setitem(sys.modules, "wandb", None)  # any import of wandb fails
    cfg = _config("quickstart", tiny_synthetic, tmp_path / "run", *TINY_NET)
    model = train.build_model_from_config(cfg)
    nme = NMECallback(NMESettings(every_n_epochs=1, max_val_samples=2), out_dir=tmp_path / "nme")
    media = WandbMedia(nme, samples=2)
    trainer = pl.Trainer(logger=CSVLogger(tmp_path), callbacks=[nme, media], limit_val_batches=1,
                         enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)
    trainer.validate(model, datamodule=train.build_datamodule(cfg, model), verbose=False)
    assert "val" in nme.summaries and media.captured == []


def test_the_media_module_imports_without_wandb():
    code = "import sys; sys.modules['wandb'] = None; import lightning_vrn.wandb_media, experiments.train"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("environment, overrides, uploads", [
    ({"WANDB_API_KEY": "0" * 40}, [], True),  # online: checkpoints become artifacts
    ({}, [], False),  # no API key: offline, where artifacts would only copy the checkpoints
    ({"WANDB_API_KEY": "0" * 40, "WANDB_MODE": "offline"}, [], False),
    ({"WANDB_API_KEY": "0" * 40}, ["logger.log_checkpoints=false"], False),
])
def test_checkpoints_are_artifacts_only_online(environment, overrides, uploads, tiny_synthetic, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    cfg = _config("quickstart", tiny_synthetic, tmp_path / "run", "logger.wandb=true", *overrides)
    logger = train.wandb_logger(cfg, tmp_path / "run")  # the W&B run starts only when first used: no network here
    assert logger._log_model is uploads
