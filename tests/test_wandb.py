"""W&B logging without a network: media of the NME epochs, checkpoint artifacts, linked eval runs (offline runs)."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments import compare, dashboard, evaluate, train, wandb_project
from experiments.compare import pipeline
from experiments.evaluation import Evaluation, log_eval_run, slug, wandb_wanted
from experiments.config import ConfigError, load_config
from lightning_vrn.metrics.report import YAW_BUCKETS_DEG, read_per_sample_csv, summarise
from lightning_vrn.wandb_media import GROUND_TRUTH_RGB, PREDICTION_RGB, WandbMedia, ced_points
from tests.helpers.configs import TINY_NET, preset_config
from tests.helpers.offline_wandb import OfflineApi, OfflineFile, offline_run
from tests.helpers.paths import REPO

@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def _offline_training(data_dir: Path, run_dir: Path, *overrides: str) -> Path:
    """Train 1 epoch of the quickstart config into ``run_dir``, logged to an offline W&B run, with the validation
    NME on 2 samples; ``overrides`` after those."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.delenv("WANDB_API_KEY", raising=False)
        train.train(preset_config("quickstart", data_dir, run_dir, "trainer.max_epochs=1", "nme.every_n_epochs=1",
                                  "nme.max_val_samples=2", "logger.wandb=true", *overrides))
    return run_dir


@pytest.fixture(scope="module")
def wandb_run(tiny_synthetic, tmp_path_factory):
    """A tiny VRN training logged to an offline W&B run, with the media of 2 samples."""
    return _offline_training(tiny_synthetic, tmp_path_factory.mktemp("wandb-run"), *TINY_NET, "logger.media_samples=2")


def test_an_offline_training_run_holds_the_error_curve_and_media(wandb_run):
    folder, logged = offline_run(wandb_run)
    media = folder / "files" / "media"
    cfg = load_config(wandb_run / "config.yaml")
    assert logged["run"].run_id == wandb_project.wandb_run_id(cfg, wandb_run)
    assert logged["config"]["logger"]["media_samples"] == 2
    for stage, report in (("val", "val_epoch0000"), ("test", "test")):
        (curve,) = (media / "table" / stage).glob("ced_table_*.table.json")  # the data of the W&B line plot
        table = json.loads(curve.read_text())
        assert table["columns"] == ["method", "nme", "fraction"]
        rows = read_per_sample_csv(wandb_run / "nme" / f"{report}.csv")
        scored = np.sort(rows["nme"][~rows["failed"]])  # the curve, computed here: (NME, fraction with NME <= it)
        expected = [(float(value), (rank + 1) / len(scored)) for rank, value in enumerate(scored)]
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
                   str(tiny_synthetic / "test.h5"), "--batch-size", "2", "--out", str(out)])  # no --log-wandb: as trained
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
    assert wandb_wanted(None, wandb_run) and not wandb_wanted(None, without)
    assert not wandb_wanted(False, wandb_run)
    assert not wandb_wanted(None, None) and wandb_wanted(True, None)


def test_compare_links_each_methods_eval_run_to_its_training_run(wandb_run, tmp_path):
    settings = compare.CompareSettings(name="cmp", out=str(tmp_path / "cmp"), methods={"VRN": []})
    (tmp_path / "cmp" / "runs").mkdir(parents=True)
    (tmp_path / "cmp" / "runs" / "VRN").symlink_to(wandb_run)  # the same run directory, the same training run id
    table = read_per_sample_csv(wandb_run / "nme" / "test.csv")
    oracle = "mean shape at GT pose (oracle)"
    evaluations = {label: Evaluation(summarise(table), table, {}, None) for label in ("VRN", oracle)}
    pipeline.log_wandb_runs(settings, {"eval": evaluations}, None)
    _, training = offline_run(wandb_run)
    _, method = offline_run(tmp_path / "cmp" / "eval" / "VRN")
    _, baseline = offline_run(tmp_path / "cmp" / "eval" / slug(oracle))
    assert method["config"]["training_run_id"] == training["run"].run_id and method["config"]["method"] == "VRN"
    assert method["summary"]["eval/nme_mean"] == json.loads((wandb_run / "nme" / "test_summary.json").read_text())[
        "nme_mean"]
    assert baseline["config"]["training_run_id"] is None and baseline["run"].run_group == slug(oracle)


def test_the_media_callback_is_a_no_op_without_a_wandb_logger(tiny_synthetic, tmp_path, monkeypatch):
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    from lightning_vrn.callbacks import NMECallback, NMESettings

    monkeypatch.setitem(sys.modules, "wandb", None)  # any import of wandb fails
    cfg = preset_config("quickstart", tiny_synthetic, tmp_path / "run", *TINY_NET)
    model = train.build_model_from_config(cfg)
    nme = NMECallback(NMESettings(every_n_epochs=1, max_val_samples=2), out_dir=tmp_path / "nme")
    media = WandbMedia(nme, samples=2)
    trainer = pl.Trainer(logger=CSVLogger(tmp_path), callbacks=[nme, media], limit_val_batches=1,
                         enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)
    trainer.validate(model, datamodule=train.build_datamodule(cfg, model), verbose=False)
    assert "val" in nme.summaries and media.captured == []


def test_the_media_module_imports_without_wandb():
    code = "import sys; sys.modules['wandb'] = None; import lightning_vrn.wandb_media, experiments.train"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.fixture
def wandb_server(monkeypatch):
    """``WANDB_BASE_URL`` pointing at a port on this machine that accepts connections (a stand-in W&B server)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        for name in wandb_project.PROXY_VARIABLES:  # with a proxy the server's reach is not checked
            monkeypatch.delenv(name, raising=False)
        yield


@pytest.mark.parametrize("environment, overrides, uploads", [
    ({"WANDB_API_KEY": "0" * 40}, [], True),  # online: checkpoints become artifacts
    ({}, [], False),  # no API key: offline, where artifacts would only copy the checkpoints
    ({"WANDB_API_KEY": "0" * 40, "WANDB_MODE": "offline"}, [], False),
    ({"WANDB_API_KEY": "0" * 40}, ["logger.log_checkpoints=false"], False),
])
def test_checkpoints_are_artifacts_only_online(environment, overrides, uploads, tiny_synthetic, tmp_path, monkeypatch,
                                               wandb_server):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    cfg = preset_config("quickstart", tiny_synthetic, tmp_path / "run", "logger.wandb=true", *overrides)
    logger = train.wandb_logger(cfg, tmp_path / "run")  # the W&B run starts only when first used: no network here
    assert logger._log_model is uploads


def test_an_api_key_without_a_reachable_server_logs_offline_at_once(tiny_synthetic, tmp_path, monkeypatch):
    # Before, W&B tried to reach its server and the training failed after 1 min 48 s.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: a connection is refused
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed.getsockname()[1]}")
        monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
        monkeypatch.delenv("WANDB_MODE", raising=False)
        for name in wandb_project.PROXY_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        cfg = preset_config("quickstart", tiny_synthetic, tmp_path / "run", "logger.wandb=true")
        with pytest.warns(UserWarning, match=r"cannot be reached \(.*\): logging offline.*WANDB_MODE=offline"):
            logger = train.wandb_logger(cfg, tmp_path / "run")
    assert logger._offline and logger._log_model is False
    # An explicit WANDB_MODE, or a proxy whose reach cannot be told from here, is left to W&B.
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    assert wandb_project.wandb_offline() is False
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setenv("WANDB_MODE", "online")
    assert wandb_project.wandb_offline() is False


# ----- compare --wandb ENTITY/PROJECT: W&B's API stood in for by the offline runs that `wandb sync` would upload -----


@pytest.fixture(scope="module")
def second_wandb_run(tiny_synthetic, tmp_path_factory):
    """Like ``wandb_run``, a VRN-Multitask training with seed 1 and the tag ``second``, without media, logging the
    training loss at every step."""
    return _offline_training(tiny_synthetic, tmp_path_factory.mktemp("wandb-run-multitask"), "model.name=vrn_multitask",
                             *TINY_NET[:2], "trainer.log_every_n_steps=1", "seed=1", "logger.media_samples=0",
                             "logger.tags=[second]")


def test_a_training_run_saves_what_compare_reads_into_its_wandb_run(wandb_run):
    folder, logged = offline_run(wandb_run)
    for name in wandb_project.RUN_FILES:  # saved (so `wandb sync` uploads them) with the run directory's bytes
        assert f"{wandb_project.FOLDER}/{name}" in logged["files"]
        assert (folder / "files" / wandb_project.FOLDER / name).read_bytes() == (wandb_run / name).read_bytes()


def test_compare_wandb_gives_the_report_compare_runs_gives(wandb_run, second_wandb_run, tmp_path, monkeypatch, capsys):
    evaluation = tmp_path / "eval"  # an eval run in the same project: not a training, left out
    log_eval_run(evaluation, wandb_run, {"eval": Evaluation(None, None, {"landmark_nme": 0.1}, None)}, {}, group="vrn")
    api = OfflineApi({"team/vrn": [wandb_run, second_wandb_run, evaluation]})
    monkeypatch.setattr("wandb.Api", lambda: api)
    for group_by in ("model.name", "logger.project"):  # two rows of one run each; one row averaging both runs
        local, remote = tmp_path / f"local-{group_by}", tmp_path / f"wandb-{group_by}"
        common = ["--group-by", group_by, "--resamples", "200"]
        assert compare.main(["--runs", str(wandb_run), str(second_wandb_run), "--out", str(local), *common]) == 0
        assert compare.main(["--wandb", "team/vrn", "--out", str(remote), *common]) == 0
        for name in ("table.csv", "table.md"):
            assert (remote / name).read_text() == (local / name).read_text()
    fetched = sorted((tmp_path / "wandb-model.name" / "wandb-runs").iterdir())
    ids = sorted(offline_run(run)[1]["run"].run_id for run in (wandb_run, second_wandb_run))
    assert [path.name for path in fetched] == ids  # one folder per training run, no partial download left
    assert len((tmp_path / "wandb-model.name" / "table.csv").read_text().splitlines()) == 3  # vrn, vrn_multitask
    assert len((tmp_path / "wandb-logger.project" / "table.csv").read_text().splitlines()) == 2
    # --wandb-tag picks the runs with every tag given
    assert compare.main(["--wandb", "team/vrn", "--wandb-tag", "second", "--out", str(tmp_path / "tagged"),
                         "--resamples", "200"]) == 0
    assert [path.name for path in (tmp_path / "tagged" / "wandb-runs").iterdir()] == \
        [offline_run(second_wandb_run)[1]["run"].run_id]
    assert len((tmp_path / "tagged" / "table.csv").read_text().splitlines()) == 2


def test_compare_wandb_leaves_out_unfinished_runs_and_says_why(wandb_run, tmp_path, capsys):
    from types import SimpleNamespace

    def run(id, state="finished", job_type="train", tags=()):
        return SimpleNamespace(id=id, name=f"name-{id}", state=state, job_type=job_type, tags=list(tags))

    chosen, notes = wandb_project.select_runs(
        [run("a"), run("b", state="running"), run("c", state="crashed"), run("d", job_type="eval"),
         run("e", tags=["x"]), run("f", tags=["x", "y"])], tags=["x"])
    assert [r.id for r in chosen] == ["e", "f"]
    assert notes == []  # b and c lack the tag
    chosen, notes = wandb_project.select_runs([run("a"), run("b", state="running"), run("c", state="crashed"),
                                               run("d", job_type="eval")])
    assert [r.id for r in chosen] == ["a"]
    assert notes == ["b (name-b): running, not finished, left out", "c (name-c): crashed, not finished, left out"]
    # A finished run without the files (trained before runs saved them) is left out, named, on stderr.
    bare = SimpleNamespace(id="old", name="old-run", state="finished", job_type="train", tags=[],
                           files=lambda names=None: [OfflineFile(name, None) for name in names])  # W&B's placeholders
    api = SimpleNamespace(runs=lambda path: [bare, *OfflineApi({"p": [wandb_run]}).runs("p")])
    (folder,) = wandb_project.fetch_runs("team/vrn", tmp_path / "fetched", api=api)
    assert (folder / "nme" / "test.csv").read_bytes() == (wandb_run / "nme" / "test.csv").read_bytes()
    assert "W&B run old (old-run): has no lightning_vrn/config.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("project, api, message", [
    ("vrn", None, "--wandb takes ENTITY/PROJECT"),
    ("team/vrn/extra", None, "--wandb takes ENTITY/PROJECT"),
    ("team/unknown", OfflineApi({}), "cannot list the runs of W&B project team/unknown: Could not find project"),
    ("team/evals-only", OfflineApi({"team/evals-only": []}), "W&B project team/evals-only has no finished training"),
])
def test_compare_wandb_refuses_what_it_cannot_read(project, api, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        wandb_project.fetch_runs(project, tmp_path, api=api)


def test_compare_wandb_without_an_api_key_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "no-login"))  # no stored login either
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(ConfigError, match="WANDB_API_KEY or `wandb login`"):
        wandb_project.fetch_runs("team/vrn", tmp_path)
    with pytest.raises(SystemExit):
        compare.main(["--runs", str(tmp_path), "--wandb-tag", "x"])  # a tag is for --wandb only


def test_the_dashboard_report_groups_finished_trainings_and_plots_what_training_logs(wandb_run, second_wandb_run,
                                                                                  tmp_path):
    out = tmp_path / "report.json"
    assert dashboard.main(["team/vrn", "--wandb-tag", "ablations", "--out", str(out)]) == 0  # no network needed
    spec = json.loads(out.read_text())
    assert spec["project"] == {"name": "vrn", "entityName": "team"}
    grids = [block["metadata"] for block in spec["spec"]["blocks"] if block["type"] == "panel-grid"]
    assert len(grids) == 3
    for grid in grids:
        (runs,) = grid["runSets"]
        assert runs["grouping"] == [{"section": "config", "name": "model.value.name"}]  # W&B's key of model.name
        assert [(f["key"]["name"], f["op"], f["value"]) for f in runs["filters"]["filters"]] == [
            ("jobType", "!=", "eval"), ("state", "=", "finished"), ("tags", "IN", ["ablations"])]
    panels = [panel for grid in grids for panel in grid["panelBankSectionConfig"]["panels"]]
    plotted = {metric for panel in panels for metric in panel["config"].get("metrics", [])}
    assert plotted == dashboard.report_metrics()
    logged = set()
    for run in (wandb_run, second_wandb_run):  # a plain VRN and a VRN-Multitask (landmarks) training
        _, record = offline_run(run)
        logged |= set(record["summary"])
    assert plotted <= logged  # every panel shows a metric that training logs under that very name
    bars = [panel["config"] for panel in panels if panel["viewType"] == "Bar Chart"]
    assert all((bar["groupAgg"], bar["groupArea"]) == ("mean", "stderr") for bar in bars)
    assert "compare --wandb team/vrn" in json.dumps(spec)  # the note pointing to the per-face intervals


def test_a_moved_run_directory_keeps_its_wandb_run(wandb_run, tmp_path):
    import shutil

    cfg = load_config(wandb_run / "config.yaml")
    original = offline_run(wandb_run)[1]["run"].run_id
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(wandb_run, moved, symlinks=True)
    assert wandb_project.wandb_run_id(cfg, moved) == original  # read from its wandb folder, not from its new path
    # W&B names a second folder of the same run and second ...-{id}-1: the id is still the log's
    clash = moved / "wandb" / f"offline-run-20991231_235959-{original}-1"
    clash.mkdir()
    (clash / f"run-{original}.wandb").touch()
    assert wandb_project.wandb_run_id(cfg, moved) == original
    log_eval_run(tmp_path / "eval", moved, {"eval": Evaluation(None, None, {"landmark_nme": 0.1}, None)}, {},
                 group="vrn")
    assert offline_run(tmp_path / "eval")[1]["config"]["training_run_id"] == original
    # A run directory that has not logged to W&B yet gets an id from its path: one per directory.
    fresh = [wandb_project.wandb_run_id(cfg, tmp_path / name) for name in ("a", "b", "a")]
    assert fresh[0] == fresh[2] != fresh[1] and fresh[0].startswith(f"{cfg.name}-")


def test_the_error_curve_leaves_failed_samples_out_and_rises_to_one():
    table = {"nme": np.array([0.3, np.nan, 0.1]), "failed": np.array([False, True, False])}
    assert ced_points(table) == [(0.1, 0.5), (0.3, 1.0)]
