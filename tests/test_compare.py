"""The comparison command end to end on tiny runs: every table and figure, and a rerun that reuses everything;
``--runs``: finished training runs (and a sweep's folder) collected into the same table and figures, and what it
refuses: runs still training, runs tested on different test files (by content), damaged run files."""

import csv
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from experiments import compare, evaluate, sweep, train
from experiments.compare import methods, pipeline
from experiments.compare.finished_runs import collect_run_dirs, read_run
from experiments.compare.settings import RealPhotos
from experiments.compare.stats import contrast_rows, seed_mean_table, table_rows
from experiments.config import CONFIG_DIR, ConfigError, load_config
from experiments.evaluation import slug
from experiments.runs import RunLock
from lightning_vrn.atomic import file_sha256
from lightning_vrn.cli import run_command
from lightning_vrn.dataset_file import open_dataset
from lightning_vrn.geometry import VoxelGrid
from lightning_vrn.metrics.report import read_per_sample_csv
from tests.helpers.fake_bfm import fake_bfm_content, write_mean_only
from tests.helpers.fake_mat_faces import write_fake_sample

METHODS = ["VRN", "VRN-Multitask", "VRN-Guided (ground-truth landmarks)", "VRN (no alignment)",
           "VRN-Guided (sigma 2) (ground-truth landmarks)", "VRN-Guided (detected landmarks)",
           "VRN-Guided (sigma 2) (detected landmarks)", "3DMM fit to detected landmarks", "mean training volume",
           "mean shape at GT pose (oracle)"]


REAL_PHOTOS = 4


@pytest.fixture(scope="module")
def tiny_comparison(tmp_path_factory):
    """Every method trained twice (two seeds) for one epoch on 8 synthetic faces and scored on 5 of them and on 4
    fake AFLW2000-3D photos of a fake BFM without bases (converted as mean faces, like ../shared/data/bfm_meta)."""
    out = tmp_path_factory.mktemp("compare")
    content, rng = fake_bfm_content(seed=1), np.random.default_rng(3)
    write_mean_only(out / "bfm", content)
    for i in range(REAL_PHOTOS):
        write_fake_sample(out / "photos", f"image{i:05d}", content, rng)
    config = out / "compare_tiny.yaml"
    config.write_text(f"""
name: compare-tiny
out: {out}
data: {{dir: {out / 'data'}, grid: "100,96,96", train: 8, val: 2, test: 5, seed: 0, workers: 1}}
train_config: quickstart.yaml
overrides: [trainer.max_epochs=1, nme.every_n_epochs=0, data.num_workers=0, data.batch_size=2,
            model.net.features=16, model.net.hourglass_depth=2]
detectors:
  detector: landmark_hourglass model.net.stacks=1
  detector sigma 2: landmark_hourglass model.net.stacks=1 model.sigma_px=2.0
methods:
  VRN: vrn model.net.stacks=1
  VRN-Multitask: vrn_multitask
  VRN-Guided: vrn_guided model.net.stacks=1
  VRN (no alignment): vrn_no_alignment model.net.stacks=1
  VRN-Guided (sigma 2): vrn_guided_sigma2 model.net.stacks=1
guidance: {{VRN-Guided: detector, VRN-Guided (sigma 2): detector sigma 2}}
fit_detector: detector
reference: VRN
batch_size: 5
bootstrap_resamples: 200
seeds: 2
real_photos: {{root: {out / 'photos'}, bfm: {out / 'bfm'}}}
contrasts: {{VRN minus the fit: [VRN, 3DMM fit to detected landmarks]}}
""")
    settings = compare.load_compare_settings(config)
    rows = compare.run_compare(settings)
    return out, settings, rows


@pytest.mark.slow
def test_compare_writes_every_table_and_figure(tiny_comparison):
    out, settings, rows = tiny_comparison
    assert list(rows) == METHODS
    with open(out / "table.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [row["method"] for row in table] == METHODS
    for row in table:
        assert float(row["nme_low"]) <= float(row["nme_mean"]) <= float(row["nme_high"])
        assert int(row["num_samples"]) == 5
    assert table[0]["difference"] == ""  # the reference
    assert all(row["difference"] != "" for row in table[1:])
    assert float(next(r for r in table if r["method"] == "VRN-Multitask")["landmark_nme_balanced"]) > 0
    for row in table:  # every method on the real photos too
        assert int(row["real_num_samples"]) == REAL_PHOTOS
        for name in ("real_nme", "real_nme_aligned"):
            assert float(row[f"{name}_low"]) <= float(row[name]) <= float(row[f"{name}_high"])
    landmark_rows = {row["method"] for row in table if row["real_landmark_nme_balanced"]}
    assert landmark_rows == {"VRN-Multitask", "VRN-Guided (detected landmarks)",
                             "VRN-Guided (sigma 2) (detected landmarks)", "3DMM fit to detected landmarks"}
    assert table[0]["real_difference"] == "" and all(row["real_difference"] != "" for row in table[1:])
    markdown = (out / "table.md").read_text()
    assert all(f"| {name} |" in markdown for name in METHODS) and "[95% CI]" in markdown
    assert "2 trainings per method (seeds)" in markdown and all(f"| {name} | 2: " in markdown for name in METHODS)
    seeds = [OmegaConf.load(out / "runs" / f"VRN{suffix}" / "config.yaml").seed for suffix in ("", "-seed1")]
    assert seeds == [0, 1] and all(row["runs"][0] != row["runs"][1] for row in rows.values()
                                   if row is rows["VRN"] or row is rows["VRN-Multitask"])
    assert f"(5 faces, grid 100,96,96) and on {REAL_PHOTOS} real photos" in markdown.splitlines()[0]
    assert f"Real photos: {REAL_PHOTOS} AFLW2000-3D photos of {out / 'photos'}; ground truth: mean face of bfm-mean " \
           f"at the fitted pose (Shape_Para and Exp_Para ignored)." in markdown
    assert "| real: NME mean [95% CI] | real: aligned NME [95% CI] | real: landmark NME (balanced) [95% CI] | " \
           "real: difference from VRN [95% CI] | real: failed |" in markdown
    for figure in ("ced.png", "nme_vs_yaw.png", "nme_per_expression.png"):
        with Image.open(out / figure) as image:
            assert image.size[0] > 300 and image.size[1] > 200

    # The contrast is the fit's difference from VRN turned round, on both files.
    with open(out / "contrasts.csv", newline="") as handle:
        (contrast,) = list(csv.DictReader(handle))
    fit = rows["3DMM fit to detected landmarks"]
    assert (contrast["contrast"], contrast["first"], contrast["second"]) == (
        "VRN minus the fit", "VRN", "3DMM fit to detected landmarks")
    assert float(contrast["difference"]) == pytest.approx(-fit["difference"].estimate)
    assert float(contrast["real_difference"]) == pytest.approx(-fit["real"]["difference"].estimate)
    assert int(contrast["paired"]) == 5 and int(contrast["real_paired"]) == REAL_PHOTOS
    assert "| VRN minus the fit | VRN minus 3DMM fit to detected landmarks | " in markdown


def _checkpoint(out, name):
    """The checkpoint the comparison scored as ``name``: its training's best."""
    return json.loads((out / "runs" / slug(name) / "metrics.json").read_text())["best_checkpoint"]


@pytest.mark.slow
def test_the_real_columns_equal_a_direct_evaluate_of_the_same_checkpoint_on_the_same_file(tiny_comparison, tmp_path):
    out, settings, rows = tiny_comparison
    real = out / "data" / "real.h5"

    def evaluated(name, *extra):
        """``experiments.evaluate`` of ``name``'s checkpoint with the real file: its "real" part."""
        folder = tmp_path / slug(name)
        assert evaluate.main(["--checkpoint", _checkpoint(out, name), "--data", str(out / "data" / "test.h5"),
                              "--real-data", str(real), "--out", str(folder), "--batch-size", "5", "--no-log-wandb",
                              *extra]) == 0
        return json.loads((folder / "metrics.json").read_text())["real"]

    for label, name, extra in (("VRN", "VRN", ()), ("VRN-Multitask", "VRN-Multitask", ()),
                               ("VRN-Guided (detected landmarks)", "VRN-Guided",
                                ("--landmarks-model", _checkpoint(out, "detector")))):
        direct, row = evaluated(name, *extra), rows[label]["real"]
        assert (out / "eval-real" / slug(label) / "test.csv").read_bytes() == \
            (tmp_path / slug(name) / "real" / "model" / "test.csv").read_bytes(), label   # the first training's
        trainings = [read_per_sample_csv(out / folder / slug(label) / "test.csv")
                     for folder in ("eval-real", "eval-real-seed1")]
        assert np.mean(trainings[0]["nme"][~trainings[0]["failed"]]) == direct["model"]["nme_mean"], label
        every = np.concatenate([t["nme"][~t["failed"]] for t in trainings])
        assert row["nme"].estimate == pytest.approx(every.mean(), rel=1e-12), label   # the mean over both trainings
        assert row["runs"] == pytest.approx([t["nme"][~t["failed"]].mean() for t in trainings], rel=1e-12), label
        assert (row["num_samples"], row["nme"].low <= row["nme"].estimate <= row["nme"].high) == (REAL_PHOTOS, True)
    detector = [json.loads((out / folder / "detector" / "landmarks.json").read_text())["landmark_nme_balanced"]
                for folder in ("eval-real", "eval-real-seed1")]
    assert detector[0] == evaluated("detector")["landmarks"]["model"]["landmark_nme_balanced"]  # scored alone
    landmark = rows["VRN-Guided (detected landmarks)"]["real"]["landmark"]   # the detector's, over both trainings
    assert landmark.estimate == pytest.approx(np.mean(detector), rel=1e-9) and landmark.low <= landmark.high


@pytest.mark.slow
def test_an_absent_real_photo_folder_is_said_in_one_line_and_the_table_still_made(tiny_comparison, tmp_path, capsys):
    out, settings, rows = tiny_comparison
    absent = tmp_path / "absent"
    again = compare.run_compare(dataclasses.replace(settings, real_photos=RealPhotos(root=str(absent))))
    line = f"Real photos skipped: real_photos.root {absent} does not exist (relative to {os.getcwd()}), so the " \
           f"table has no real-photo columns"
    assert capsys.readouterr().err.count(line) == 1
    markdown = (out / "table.md").read_text()
    assert line in markdown and "real:" not in markdown and "real photos" not in markdown.splitlines()[0]
    assert {name: row["nme"].estimate for name, row in again.items()} == \
        {name: row["nme"].estimate for name, row in rows.items()} and all("real" not in row for row in again.values())
    compare.run_compare(settings)  # the fixture's report as it was, for the other tests


@pytest.mark.slow
def test_the_real_photos_convert_once_into_the_data_folder(tiny_comparison, capsys):
    out, settings, _ = tiny_comparison
    real = out / "data" / "real.h5"
    written = real.stat().st_mtime_ns
    assert pipeline.real_photos_file(settings)[0] == real and real.stat().st_mtime_ns == written  # reused
    assert f"{real} is already complete" in capsys.readouterr().err
    assert open_dataset(real).attrs["mean_only"]  # the fake BFM has no bases


def test_real_aflw2000_photos_convert_at_the_datas_grid_as_mean_faces_of_bfm_meta(shared_data, tmp_path):
    quickstart = compare.load_compare_settings(CONFIG_DIR / "compare_quickstart.yaml")
    settings = dataclasses.replace(quickstart, data=dataclasses.replace(quickstart.data, dir=str(tmp_path)),
                                   real_photos=RealPhotos(str(shared_data / "aflw2000_samples"),
                                                          str(shared_data / "bfm_meta")))
    path, note = pipeline.real_photos_file(settings)
    assert path == tmp_path / "real.h5" and open_dataset(path).grid == VoxelGrid.parse(quickstart.data.grid)
    assert note == (f"Real photos: 16 AFLW2000-3D photos of {shared_data / 'aflw2000_samples'}; ground truth: mean "
                    f"face of bfm-mean at the fitted pose (Shape_Para and Exp_Para ignored)")


@pytest.mark.slow
def test_a_rerun_reuses_every_run_and_report(tiny_comparison, capsys):
    out, settings, rows = tiny_comparison
    before = {path: path.stat().st_mtime_ns for path in (out / "runs").rglob("*.ckpt")}
    again = compare.run_compare(settings)
    assert {path: path.stat().st_mtime_ns for path in (out / "runs").rglob("*.ckpt")} == before
    assert {name: row["nme"].estimate for name, row in again.items()} == \
        {name: row["nme"].estimate for name, row in rows.items()}
    assert "trained VRN" in capsys.readouterr().err  # the progress lines
    reports = {path: path.stat().st_mtime_ns for path in (out / "eval").rglob("test.csv")}
    assert len(reports) == len(METHODS) and compare.run_compare(settings) and \
        {path: path.stat().st_mtime_ns for path in (out / "eval").rglob("test.csv")} == reports  # scores reused


@pytest.mark.slow
def test_a_report_is_scored_again_when_what_it_scored_changed_and_a_changed_training_is_refused(tiny_comparison):
    """A report scored from other checkpoints (a retrained detector, an older version's mislabelled row) or with no
    record of what it scored is scored again; a finished training whose settings changed is refused, not reused."""
    out, settings, rows = tiny_comparison
    detected = out / "eval" / "VRN-Guided_(sigma_2)_(detected_landmarks)"
    record = json.loads((detected / "scored.json").read_text())
    assert set(record["checkpoints"]) == {"VRN-Guided (sigma 2)", "detector sigma 2"}  # the sigma-2 model, guided
    (detected / "scored.json").write_text(json.dumps({**record, "checkpoints": {"VRN-Guided": "0" * 64}}))
    (out / "eval" / "VRN" / "scored.json").unlink()  # a report from before the records
    before = {path: path.stat().st_mtime_ns for path in (out / "eval").rglob("test.csv")}
    again = compare.run_compare(settings)
    changed = {path.parent.name for path in before if path.stat().st_mtime_ns != before[path]}
    assert changed == {"VRN", detected.name}
    assert json.loads((detected / "scored.json").read_text()) == record
    assert {name: row["nme"].estimate for name, row in again.items()} == \
        {name: row["nme"].estimate for name, row in rows.items()}  # the same checkpoints: the same scores
    retrained = dataclasses.replace(settings, methods={**settings.methods, "VRN": "vrn model.net.stacks=1 model.optim.lr=0.5"})
    with pytest.raises(ConfigError, match=r"model\.optim\.lr: run 0\.001, now 0\.5"):
        compare.run_compare(retrained)


TINY_RUN = ["data.num_workers=0", "data.batch_size=2", "model.net.features=16", "model.net.hourglass_depth=2",
            "trainer.max_epochs=1", "nme.every_n_epochs=1", "nme.max_val_samples=2", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def finished_runs(tiny_synthetic, tmp_path_factory):
    """A sweep of two VRN seeds (runs/sweeps/tiny-seeds) and a VRN-Multitask run, each trained for real on
    the same tiny test file; returns (sweep folder, the multitask run's directory)."""
    root = tmp_path_factory.mktemp("runs")
    grid = root / "seeds.yaml"
    grid.write_text(f"""
name: tiny-seeds
method: grid
parameters:
  model.name: {{values: [vrn]}}
  seed: {{values: [0, 1]}}
command: [python, -m, experiments.train, --config, {CONFIG_DIR / 'quickstart.yaml'}, "${{args_no_hyphens}}"]
""")
    extra = [f"data.dir={tiny_synthetic}", "model.net.stacks=1", *TINY_RUN]
    sweep.run_sweep(grid, parallel=2, extra=extra, root=root / "sweeps")
    multitask = root / "multitask"
    train.train(load_config(CONFIG_DIR / "quickstart.yaml", [f"data.dir={tiny_synthetic}", f"run_dir={multitask}",
                                                             "model.name=vrn_multitask", *TINY_RUN]))
    return root / "sweeps" / "tiny-seeds", multitask


def _test_nme(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())["test/nme"]


@pytest.mark.slow
def test_finished_runs_make_the_same_table_with_seeds_averaged(finished_runs, tmp_path):
    seeds, multitask = finished_runs
    seed_dirs = sorted(path.parent for path in seeds.glob("*/metrics.json"))
    assert len(seed_dirs) == 2
    rows = compare.compare_runs([seeds, multitask], tmp_path, resamples=200)
    assert list(rows) == ["vrn", "vrn_multitask"]
    with open(tmp_path / "runs.csv", newline="") as handle:
        listed = {row["run_dir"]: row for row in csv.DictReader(handle)}
    for run_dir in [*seed_dirs, multitask]:  # each run's NME exactly as its metrics.json has it
        assert float(listed[str(run_dir)]["nme_mean"]) == _test_nme(run_dir)
    assert rows["vrn_multitask"]["nme"].estimate == _test_nme(multitask)
    assert rows["vrn"]["runs"] == [_test_nme(d) for d in seed_dirs] and rows["vrn"]["num_failed"] == 0
    assert rows["vrn"]["nme"].estimate == pytest.approx(np.mean([_test_nme(d) for d in seed_dirs]), rel=1e-12)
    # the paired difference: per face, multitask minus the seeds' mean, on the faces both were tested on
    vrn = [read_per_sample_csv(d / "nme" / "test.csv") for d in seed_dirs]
    mine = read_per_sample_csv(multitask / "nme" / "test.csv")
    assert all(np.array_equal(t["index"], mine["index"]) for t in vrn)
    expected = np.mean(mine["nme"] - (vrn[0]["nme"] + vrn[1]["nme"]) / 2)
    difference = rows["vrn_multitask"]["difference"]
    assert difference.estimate == pytest.approx(expected, rel=1e-12) and rows["vrn_multitask"]["paired"] == 4
    assert difference.low <= difference.estimate <= difference.high
    with open(tmp_path / "table.csv", newline="") as handle:
        table = {row["method"]: row for row in csv.DictReader(handle)}
    assert table["vrn"]["num_runs"] == "2" and table["vrn_multitask"]["num_runs"] == "1"
    landmarks = json.loads((multitask / "metrics.json").read_text())["test/landmark_nme_balanced"]
    assert float(table["vrn_multitask"]["landmark_nme_balanced"]) == landmarks and table["vrn"]["landmark_nme_balanced"] == ""
    markdown = (tmp_path / "table.md").read_text()
    assert "| vrn | 2: " in markdown and "| vrn_multitask | 1: " in markdown and "[95% CI]" in markdown
    for figure in ("ced.png", "nme_vs_yaw.png", "nme_per_expression.png"):
        with Image.open(tmp_path / figure) as image:
            assert image.size[0] > 300 and image.size[1] > 200


def _copy_run(run_dir, to, test_file=None, **metrics):
    """A copy of a finished run, tested on ``test_file`` (its config's data.test) when given, with ``metrics``
    set in its metrics.json (None: removed, as in a run made before they were recorded)."""
    shutil.copytree(run_dir, to)
    if test_file is not None:
        for config_file in (to / "config.yaml", to / "attempts" / "001" / "config.yaml"):
            config = OmegaConf.load(config_file)
            config.data.test = str(test_file)
            OmegaConf.save(config, config_file)
    recorded = {**json.loads((to / "metrics.json").read_text()), **metrics}
    (to / "metrics.json").write_text(json.dumps({k: v for k, v in recorded.items() if v is not None}))
    return to


@pytest.mark.slow
def test_a_test_file_regenerated_between_two_runs_is_refused_naming_both(finished_runs, tiny_synthetic, tmp_path,
                                                                         capsys):
    seeds, multitask = finished_runs
    test_file = tmp_path / "data" / "test.h5"
    test_file.parent.mkdir()
    shutil.copy(tiny_synthetic / "test.h5", test_file)
    before = _copy_run(multitask, tmp_path / "before", test_file, test_file_sha256=file_sha256(test_file))
    shutil.copy(tiny_synthetic / "val.h5", test_file)  # regenerated: other faces, the same path and indices
    after = _copy_run(multitask, tmp_path / "after", test_file, test_file_sha256=file_sha256(test_file))
    code = run_command(compare.main, ["--runs", str(before), str(after), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0 and f"runs {before} and {after} were tested on different files ({test_file}, sha256 " \
        f"{file_sha256(tiny_synthetic / 'test.h5')[:12]}, and {test_file}, sha256 {file_sha256(test_file)[:12]}) " \
        "(the file at that path changed between their tests)" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_runs_are_paired_by_test_file_content_and_an_unrecorded_one_is_assumed_the_file_now_there(
        finished_runs, tiny_synthetic, tmp_path, capsys):
    seeds, multitask = finished_runs
    recorded = {json.loads(path.read_text())["test_file_sha256"]  # each training's test recorded its file's digest
                for path in [*seeds.glob("*/metrics.json"), multitask / "metrics.json"]}
    assert recorded == {file_sha256(tiny_synthetic / "test.h5")}
    copied = tmp_path / "copy" / "test.h5"  # the same bytes at another path: the same faces
    copied.parent.mkdir()
    shutil.copy(tiny_synthetic / "test.h5", copied)
    moved = _copy_run(multitask, tmp_path / "moved", copied)
    old = _copy_run(multitask, tmp_path / "old", test_file_sha256=None)  # tested before the digest was recorded
    rows = compare.compare_runs([seeds, moved, old], tmp_path / "out", resamples=200)
    assert list(rows) == ["vrn", "vrn_multitask"] and len(rows["vrn_multitask"]["runs"]) == 2
    digest = file_sha256(tiny_synthetic / "test.h5")[:12]
    note = (f"The test file's identity was not recorded by {old} (tested before test_file_sha256 was recorded): it "
            f"is assumed to be the file now at {tiny_synthetic / 'test.h5'} (sha256 {digest}).")
    assert f"[compare] {note}" in capsys.readouterr().err
    markdown = (tmp_path / "out" / "table.md").read_text()
    assert f"# runs: NME on {tiny_synthetic / 'test.h5'} (sha256 {digest})" in markdown and note in markdown
    paths = ", ".join(sorted([str(copied), str(tiny_synthetic / "test.h5")]))
    assert f"test files at {paths} are the same file (sha256 {digest})" in markdown
    # without a recorded digest and without the file, the run's faces cannot be identified
    gone = _copy_run(multitask, tmp_path / "gone", tmp_path / "deleted.h5", test_file_sha256=None)
    with pytest.raises(ConfigError, match=f"run {gone} did not record which test file .* and {tmp_path / 'deleted.h5'} "
                                          "no longer exists"):
        compare.compare_runs([seeds, gone], tmp_path / "out-gone")


@pytest.mark.slow
def test_a_run_still_training_is_refused_when_named_and_left_out_of_a_folder(finished_runs, tmp_path, capsys):
    seeds, multitask = finished_runs
    running = _copy_run(multitask, tmp_path / "running")  # resumed: its metrics.json is the last attempt's
    with RunLock(running, "python -m experiments.train ..."):
        started = json.loads((running / "run.lock").read_text())["started"]
        code = run_command(compare.main, ["--runs", str(seeds), str(running), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code != 0 and f"run {running} is still training: run.lock is held by process {os.getpid()} on host " \
            f"{socket.gethostname()} since {started}; wait for it to finish, or leave it out of --runs" in err
        assert not (tmp_path / "out").exists()
        folder = tmp_path / "sweep"
        shutil.copytree(seeds, folder)
        shutil.copytree(running, folder / "trial-running")
        found = collect_run_dirs([folder])
        assert len(found) == 2 and folder / "trial-running" not in found
        assert f"{folder / 'trial-running'}: still training: run.lock is held by process {os.getpid()}" in \
            capsys.readouterr().err
        lock = json.loads((running / "run.lock").read_text())
    elsewhere = {**lock, "host": "another-host"}  # cannot be checked from here: held
    (running / "run.lock").write_text(json.dumps(elsewhere))
    with pytest.raises(ConfigError, match=f"on host another-host since {started} \\(another host's: if it is gone, "
                                          f"delete {running / 'run.lock'}\\)"):
        collect_run_dirs([running])
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (running / "run.lock").write_text(json.dumps({**lock, "pid": int(ended.stdout)}))  # its process is gone: stale
    assert collect_run_dirs([running]) == [running]


@pytest.mark.slow
def test_a_run_whose_last_attempt_was_killed_is_refused_not_read_with_an_older_attempts_results(finished_runs,
                                                                                               tmp_path):
    _, multitask = finished_runs
    run = tmp_path / "multitask"
    shutil.copytree(multitask, run)
    attempts = sorted((run / "attempts").iterdir())
    killed = attempts[-1].with_name(f"{int(attempts[-1].name) + 1:03d}")  # started, killed before its test
    killed.mkdir()
    shutil.copy(attempts[-1] / "config.yaml", killed / "config.yaml")
    read_run(multitask)  # the original is fine
    with pytest.raises(ConfigError, match="its last attempt did not finish, so metrics.json holds an earlier"):
        read_run(run)


@pytest.mark.slow
def test_a_damaged_run_file_is_refused_naming_it_and_the_fix(finished_runs, tmp_path, capsys):
    seeds, multitask = finished_runs
    run = _copy_run(multitask, tmp_path / "run")
    first = run / "attempts" / "001" / "config.yaml"
    retest = (f"delete {run / 'metrics.json'} and test the run again with `python -m experiments.train --config "
              f"{first} resume={run}`")
    named = {"config.yaml": f"run {run}: {run / 'config.yaml'} and {first} differ, though training writes them "
                            f"alike: one is damaged (truncated, say); restore it from the other",
             "metrics.json": f"run {run}: metrics.json is damaged", "nme/test.csv": f"run {run}: nme/test.csv is damaged"}
    for name, expected in named.items():
        intact = (run / name).read_bytes()
        for size in (0, len(intact) // 3, len(intact) // 2, len(intact) - 3):  # truncated
            (run / name).write_bytes(intact[:size])
            assert run_command(compare.main, ["--runs", str(run), "--out", str(tmp_path / "out")]) != 0
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and expected in err, (name, size, err)
            assert name == "config.yaml" or retest in err, err
        (run / name).write_bytes(intact)
    shutil.rmtree(run / "attempts")  # a run from before attempts were recorded
    (run / "config.yaml").write_text("name: vrn-quickstart\nseed: 0\n")
    with pytest.raises(ConfigError, match=f"run {run}: {run / 'config.yaml'} is damaged \\(no data.test or "
                                          f"data.dir\\); restore it, or leave the run out"):
        read_run(run)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_an_unfinished_run_is_named_and_a_sweeps_unfinished_trial_left_out(finished_runs, tmp_path):
    seeds, multitask = finished_runs
    unfinished = tmp_path / "unfinished"
    shutil.copytree(multitask, unfinished)
    (unfinished / "metrics.json").unlink()
    with pytest.raises(ConfigError, match=f"run {unfinished} has no metrics.json: it has not finished"):
        compare.compare_runs([unfinished], tmp_path / "out")
    folder = tmp_path / "sweep"
    shutil.copytree(seeds, folder)
    shutil.copytree(unfinished, folder / "trial-still-running")
    assert len(collect_run_dirs([folder])) == 2


def test_paired_differences_use_the_faces_both_methods_were_tested_on():
    def table(indices, nme):
        count = len(indices)
        return {"index": np.array(indices), "yaw_deg": np.zeros(count), "expression": np.full(count, -1),
                "nme": np.array(nme, dtype=float), "nme_aligned": np.array(nme, dtype=float),
                "nme_closest": np.array(nme, dtype=float), "failed": np.zeros(count, dtype=bool)}

    tables = {"A": [table([0, 1, 2, 3], [0.1, 0.2, 0.3, 0.4])], "B": [table([3, 1, 5], [0.5, 0.1, 9.0])]}
    rows = table_rows(tables, {}, "A", resamples=100)
    assert rows["B"]["paired"] == 2  # faces 3 and 1
    assert rows["B"]["difference"].estimate == pytest.approx(((0.5 - 0.4) + (0.1 - 0.2)) / 2)
    with pytest.raises(ValueError, match="C and A share no test sample"):
        table_rows({**tables, "C": [table([7], [0.1])]}, {}, "A", resamples=100)
    mean = seed_mean_table([tables["A"][0], table([3, 2, 1, 0], [0.2, 0.1, 0.0, 0.3])])
    assert mean["index"].tolist() == [0, 1, 2, 3] and mean["nme"] == pytest.approx([0.2, 0.1, 0.2, 0.3])
    # Two trainings each, in other face orders: cells are their means, the difference paired by training and face.
    two = {"A": [tables["A"][0], table([3, 2, 1, 0], [0.2, 0.1, 0.0, 0.3])],
           "B": [table([0, 1, 2, 3], [0.2, 0.3, 0.4, 0.5]), table([0, 1, 2, 3], [0.4, 0.1, 0.2, 0.3])]}
    rows = table_rows(two, {}, "A", resamples=100)
    assert rows["A"]["runs"] == pytest.approx([0.25, 0.15]) and rows["A"]["nme"].estimate == pytest.approx(0.2)
    assert rows["B"]["difference"].estimate == pytest.approx(0.1) and rows["B"]["paired"] == 4
    # A contrast is a paired difference between any two rows, either way round, over the faces both hold.
    contrasts = contrast_rows({**two, "C": [table([3, 1, 5], [0.5, 0.1, 9.0])] * 2},
                              {"A minus B": ["A", "B"], "C minus B": ["C", "B"]}, resamples=100)
    assert contrasts["A minus B"]["difference"].estimate == pytest.approx(-0.1)
    assert contrasts["A minus B"]["paired"] == 4 and contrasts["A minus B"]["first"] == "A"
    assert contrasts["C minus B"]["paired"] == 2  # faces 3 and 1: B's means 0.4 and 0.2
    assert contrasts["C minus B"]["difference"].estimate == pytest.approx(((0.5 - 0.4) + (0.1 - 0.2)) / 2)
    with pytest.raises(ValueError, match="C and A share no test sample"):
        contrast_rows({**two, "C": [table([7], [0.1])]}, {"C minus A": ["C", "A"]}, resamples=100)


@pytest.mark.parametrize("pair", [["VRN"], ["VRN", "VRN"], ["VRN", "VRN-Guided"], "VRN"])
def test_a_contrast_that_is_not_two_rows_of_the_table_is_refused_naming_the_rows(pair):
    with pytest.raises(ConfigError, match=r"contrasts\.bad is .*give two different rows of the table.*"
                                          r"'VRN-Guided \(detected landmarks\)'"):
        compare.load_compare_settings(CONFIG_DIR / "compare_quickstart.yaml", [f"contrasts={{bad: {pair}}}"])


def test_each_method_is_its_trained_variant_and_landmarks_with_todays_label():
    settings = compare.CompareSettings(methods={"VRN": "vrn", "VRN-Guided": "vrn_guided",
                                                "VRN-Guided (sigma 2)": "vrn_guided_sigma2"},
                                       detectors={"detector": "landmark_hourglass",
                                                  "detector sigma 2": "landmark_hourglass model.sigma_px=2.0"},
                                       guidance={"VRN-Guided": "detector", "VRN-Guided (sigma 2)": "detector sigma 2"})
    rows = methods.compared_methods(settings)
    assert [method.label for method in rows] == [
        "VRN", "VRN-Guided (ground-truth landmarks)", "VRN-Guided (sigma 2) (ground-truth landmarks)",
        "VRN-Guided (detected landmarks)", "VRN-Guided (sigma 2) (detected landmarks)",
        "3DMM fit to detected landmarks", "mean training volume", "mean shape at GT pose (oracle)"]
    # a method whose name has parentheses keeps its name: the detected row is the sigma-2 model, not VRN-Guided
    assert methods.detected_methods(settings)[1] == methods.Method("VRN-Guided (sigma 2)", methods.DETECTED)
    assert [method.name for method in methods.trained_methods(settings)] == list(settings.methods)
    assert methods.Method("VRN").label == "VRN" and methods.Method("VRN") != methods.Method("VRN", methods.DETECTED)
    assert len({methods.Method("VRN"), methods.Method("VRN"), methods.Method("VRN", methods.DETECTED)}) == 2
