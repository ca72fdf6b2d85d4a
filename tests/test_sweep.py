"""The local sweep runner: sweep files expand to the expected command lines, and a 2x2 grid runs, skips and sorts."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import sweep
from experiments.config import CONFIG_DIR, ConfigError, load_config
from experiments.runs import _process_alive
from lightning_vrn.cli import run_command
from tests.helpers.paths import REPO

SWEEPS = REPO / "experiments" / "sweeps"


def test_the_ablation_grid_expands_to_every_variant_and_seed():
    spec = sweep.load_sweep(SWEEPS / "ablations.yaml")
    trials = sweep.resolve_trials(spec, SWEEPS / "ablations.yaml")  # every trial is a valid experiment config
    assert len(trials) == 5 * 3 and len({t.id for t in trials}) == 15
    assert trials[0].overrides == sweep.expand(spec)[0] == ("model.name=vrn", "seed=0")
    command = sweep.trial_command(spec, trials[4], Path("runs/x"), [])
    assert command == [sys.executable, "-m", "experiments.train", "--config", "experiments/configs/quickstart.yaml",
                       "model.name=vrn_multitask", "seed=1", "run_dir=runs/x"]


def test_random_draws_are_seeded_and_within_their_ranges():
    spec = sweep.load_sweep(SWEEPS / "lr.yaml")
    first, again = sweep.expand(spec, 6, seed=3), sweep.expand(spec, 6, seed=3)
    assert first == again and first != sweep.expand(spec, 6, seed=4)
    for overrides in first:
        values = dict(item.split("=") for item in overrides)
        assert 1e-4 <= float(values["model.optim.lr"]) <= 3e-3
        assert values["data.batch_size"] in ("4", "8", "16") and values["data.augment.enabled"] in ("true", "false")
        load_config(CONFIG_DIR / "quickstart.yaml", list(overrides))


def test_a_bad_sweep_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: grid\nparameters: {seed: {values: [0]}}\ncommand: [python, -m, experiments.train]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: the command must end in \$\{args_no_hyphens\}"):
        sweep.load_sweep(bad)


@pytest.mark.slow
def test_the_local_runner_runs_a_grid_skips_finished_trials_and_sorts_them(tiny_synthetic, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"""
name: tiny-grid
method: grid
metric: {{name: val/loss, goal: minimize}}
parameters:
  model.optim.lr: {{values: [0.001, 0.003]}}
  seed: {{values: [0, 1]}}
command: [python, -m, experiments.train, --config, {CONFIG_DIR / 'quickstart.yaml'}, "${{args_no_hyphens}}"]
""")
    extra = [f"data.dir={tiny_synthetic}", "data.num_workers=0", "data.batch_size=2", "model.net.features=16",
             "model.net.hourglass_depth=2", "model.net.stacks=1", "trainer.max_epochs=1", "nme.every_n_epochs=0",
             "trainer.enable_progress_bar=false"]
    rows = sweep.run_sweep(grid, parallel=2, extra=extra, root=tmp_path / "sweeps")
    assert len(rows) == 4 and all(row["val/loss"] is not None for row in rows)
    assert [row["val/loss"] for row in rows] == sorted(row["val/loss"] for row in rows)
    checkpoints = {p: p.stat().st_mtime_ns for p in (tmp_path / "sweeps").rglob("last.ckpt")}
    assert len(checkpoints) == 4
    again = sweep.run_sweep(grid, parallel=2, extra=extra, root=tmp_path / "sweeps")  # nothing left to run
    assert again == rows and {p: p.stat().st_mtime_ns for p in checkpoints} == checkpoints
    assert "| 1 |" in (tmp_path / "sweeps" / "tiny-grid" / "summary.md").read_text()


def test_the_trained_config_and_trial_folder_are_read_from_the_sweep_file(tmp_path):
    spec = sweep.load_sweep(SWEEPS / "ablations.yaml")
    assert sweep.train_config(spec, "ablations.yaml") == "experiments/configs/quickstart.yaml"
    assert sweep.sweep_folder(spec, "x.yaml", Path("runs/sweeps")) == Path("runs/sweeps/ablations")
    assert sweep.sweep_folder({**spec, "name": None}, "sweeps/mine.yaml", tmp_path) == tmp_path / "mine"
    with pytest.raises(ConfigError, match=r"x.yaml: the command has no '--config CONFIG'"):
        sweep.train_config({**spec, "command": ["python", "-m", "experiments.train", "${args_no_hyphens}"]}, "x.yaml")


def test_parallel_trials_share_the_cores(monkeypatch):
    monkeypatch.setattr(sweep.os, "cpu_count", lambda: 8)
    for name in sweep.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert sweep.trial_environment(2)["OMP_NUM_THREADS"] == "4"
    assert sweep.trial_environment(16)["MKL_NUM_THREADS"] == "1"  # never 0
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own setting wins
    assert sweep.trial_environment(2)["OMP_NUM_THREADS"] == "3"


def test_overrides_may_come_before_and_after_options(capsys):
    path = str(CONFIG_DIR.parent / "sweeps" / "lr.yaml")
    assert sweep.main([path, "data.dir=somewhere", "--max-trials", "2", "seed=3", "--dry-run"]) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if "experiments.train" in line]
    assert len(commands) == 2 and all("data.dir=somewhere" in c and "seed=3" in c for c in commands)


QUICKSTART = CONFIG_DIR / "quickstart.yaml"
TINY = ["data.num_workers=0", "data.batch_size=2", "model.net.features=16", "model.net.hourglass_depth=2",
        "model.net.stacks=1", "nme.every_n_epochs=0", "trainer.enable_progress_bar=false"]
FAKE_TRAINING = """
import json, os, pathlib, subprocess, sys
run_dir = pathlib.Path(sys.argv[-1].split("=", 1)[1])
print("fake training", *sys.argv[1:], flush=True)
if os.environ.get("SECOND_RUNNER"):
    second = subprocess.run(json.loads(os.environ["SECOND_RUNNER"]), capture_output=True, text=True)
    pathlib.Path(os.environ["SECOND_RESULT"]).write_text(json.dumps([second.returncode, second.stderr]))
if os.environ.get("FAKE_FAIL"):
    sys.exit(1)
loss = len(sys.argv[-1]) / 100
(run_dir / "metrics.json").write_text(json.dumps({"val/loss": loss, "val/loss_best": loss, "test/nme": 0.1,
                                                  "run_dir": str(run_dir)}))
"""


def _sweep_file(folder: Path, body: str, config: Path = QUICKSTART) -> Path:
    """``folder/tiny.yaml``, a sweep named tiny over ``config``: ``body`` holds its method, parameters, metric."""
    path = folder / "tiny.yaml"
    path.write_text(f"name: tiny\n{body}\ncommand: [python, -m, experiments.train, --config, {config}, "
                    f"\"${{args_no_hyphens}}\"]\n")
    return path


@pytest.fixture
def fake_training(monkeypatch, tmp_path):
    """Trials run FAKE_TRAINING (writes metrics.json into the run_dir its last word names) instead of the training;
    returns the training commands the runner built, in launch order."""
    built, script = [], tmp_path / "fake_training.py"
    script.write_text(FAKE_TRAINING)
    real = sweep.trial_command

    def command(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return [sys.executable, str(script), *built[-1][1:]]
    monkeypatch.setattr(sweep, "trial_command", command)
    return built


def test_a_rerun_with_other_settings_runs_new_trials_and_keeps_the_old(fake_training, tmp_path, capsys):
    config = tmp_path / "mine.yaml"
    config.write_text(f"extends: {QUICKSTART}\n")
    path = _sweep_file(tmp_path, "method: grid\nparameters:\n  seed: {values: [0, 1]}", config)
    folder, base = tmp_path / "sweeps" / "tiny", [str(path), "--root", str(tmp_path / "sweeps")]
    assert run_command(sweep.main, [*base, "data.dir=a", "trainer.max_epochs=1"]) == 0
    assert len(fake_training) == 2 and "2 trials, 0 finished before, 2 to run" in capsys.readouterr().err
    assert run_command(sweep.main, [*base, "trainer.max_epochs=1", "data.dir=a"]) == 0  # the same settings
    assert len(fake_training) == 2 and "2 trials, 2 finished before, 0 to run" in capsys.readouterr().err

    def two_new_trials(overrides):
        before = {p.parent.name: p.read_text() for p in folder.glob("*/metrics.json")}
        assert run_command(sweep.main, [*base, *overrides]) == 0
        err = capsys.readouterr().err
        assert "2 trials, 0 finished before, 2 to run" in err
        assert f"{len(before)} finished trial(s) in {folder} made with other settings" in err and "not reused" in err
        kept = {p.parent.name: p.read_text() for p in folder.glob("*/metrics.json") if p.parent.name in before}
        assert kept == before
    for overrides in (["data.dir=b", "trainer.max_epochs=1"], ["data.dir=a", "trainer.max_epochs=2"],
                      ["data.dir=a", "trainer.max_epochs=1", "model.net.features=16"]):
        two_new_trials(overrides)
    config.write_text(f"extends: {QUICKSTART}\ntrainer: {{gradient_clip_val: 1.0}}\n")  # the trained config, edited
    two_new_trials(["data.dir=a", "trainer.max_epochs=1"])
    assert len(fake_training) == 10 and len(list(folder.glob("*/metrics.json"))) == 10


def test_an_empty_grid_is_refused_naming_the_key(fake_training, tmp_path, capsys):
    path = _sweep_file(tmp_path, "method: grid\nparameters:\n  seed: {values: []}\n  model.name: {values: [vrn]}")
    assert run_command(sweep.main, [str(path), "--root", str(tmp_path / "sweeps")]) == 2
    assert f"sweep file {path}: parameters.seed.values must be a non-empty list" in capsys.readouterr().err
    assert not (tmp_path / "sweeps").exists() and not fake_training


def test_a_misspelt_metric_is_refused_and_the_summary_is_kept(fake_training, tmp_path, capsys):
    grid = "method: grid\nmetric: {{name: {}, goal: minimize}}\nparameters:\n  seed: {{values: [{}]}}"
    path = _sweep_file(tmp_path, grid.format("val/loss_best", "0"))
    summary, base = tmp_path / "sweeps" / "tiny" / "summary.md", [str(path), "--root", str(tmp_path / "sweeps")]
    assert run_command(sweep.main, base) == 0
    good = summary.read_text()
    assert "| 1 |" in good and "| - |" not in good
    path.write_text(path.read_text().replace(grid.format("val/loss_best", "0"), grid.format("val/los_best", "0, 1")))
    assert run_command(sweep.main, base) == 2  # checked against the finished trial before launching the new one
    err = capsys.readouterr().err
    assert f"sweep file {path}: metric.name 'val/los_best' is not a metric of the finished trial" in err
    assert "which has test/nme, val/loss, val/loss_best; fix metric.name" in err
    assert summary.read_text() == good and len(fake_training) == 1
    fresh = tmp_path / "fresh"  # no finished trial to check first: the first to finish stops the launching
    assert run_command(sweep.main, [str(path), "--root", str(fresh)]) == 2
    err = capsys.readouterr().err
    assert "metric.name 'val/los_best'" in err and "; 1 trial(s) not started" in err and len(fake_training) == 2
    assert not (fresh / "tiny" / "summary.md").exists() and len(list(fresh.glob("tiny/*/metrics.json"))) == 1


def test_a_second_runner_on_the_same_sweep_stops_and_logs_are_appended(fake_training, tmp_path, monkeypatch, capsys):
    path = _sweep_file(tmp_path, "method: grid\nparameters:\n  seed: {values: [0]}")
    base, result = [str(path), "--root", str(tmp_path / "sweeps")], tmp_path / "second.json"
    monkeypatch.setenv("SECOND_RUNNER", json.dumps([sys.executable, "-m", "experiments.sweep", *base]))
    monkeypatch.setenv("SECOND_RESULT", str(result))
    assert run_command(sweep.main, base) == 0  # its trial starts a second runner on the same sweep, and waits
    code, err = json.loads(result.read_text())
    folder = tmp_path / "sweeps" / "tiny"
    assert code == 3 and f"{folder} is in use by process {os.getpid()}" in err and "-m experiments.sweep" in err
    assert f"delete {folder / 'sweep.lock'}" in err and not (folder / "sweep.lock").exists()
    assert len(fake_training) == 1
    monkeypatch.delenv("SECOND_RUNNER")
    path.write_text(path.read_text().replace("[0]", "[0, 1]"))
    monkeypatch.setenv("FAKE_FAIL", "1")
    assert run_command(sweep.main, base) == 1 and "1 trial(s) failed" in capsys.readouterr().err
    monkeypatch.delenv("FAKE_FAIL")
    assert run_command(sweep.main, base) == 0
    log = (folder / Path(fake_training[-1][-1].split("=", 1)[1]).name / "sweep.log").read_text().splitlines()
    assert [line.startswith("--- ") for line in log] == [True, False, True, False]  # both attempts, each with its line
    assert "fake_training.py -m experiments.train" in log[0] and log[1].startswith("fake training")


@pytest.mark.parametrize("name", ["../outside", "{tmp}/outside", ".."])
def test_a_sweep_name_outside_the_root_is_refused(name, fake_training, tmp_path, capsys):
    name = name.format(tmp=tmp_path)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "summary.md").write_text("a good summary\n")
    path = _sweep_file(tmp_path, "method: grid\nparameters:\n  seed: {values: [0]}")
    path.write_text(path.read_text().replace("name: tiny", f"name: {name}"))
    assert run_command(sweep.main, [str(path), "--root", str(tmp_path / "root")]) == 2
    assert f"sweep file {path}: name {name!r} must be a plain folder name" in capsys.readouterr().err
    assert (tmp_path / "outside" / "summary.md").read_text() == "a good summary\n"
    assert not fake_training and sorted(p.name for p in tmp_path.rglob("*")) == ["fake_training.py", "outside",
                                                                                  "summary.md", "tiny.yaml"]


@pytest.mark.parametrize("command, refused", [
    ("[bash, -c, 'touch {marker}', '${{args_no_hyphens}}']", "'bash'"),
    ("[python, -c, 'open(\"{marker}\", \"w\")', '${{args_no_hyphens}}']", "'-c'"),
    ("[python, -m, experiments.evaluate, --config, {config}, '${{args_no_hyphens}}']", "'experiments.evaluate'"),
    ("[python, -m, experiments.train, --config, {config}, --trust-checkpoint, '${{args_no_hyphens}}']",
     "'--trust-checkpoint'"),
    ("['${{env}}', python, -m, experiments.train, --config, {config}, '${{env}}', '${{args_no_hyphens}}']",
     "'${env}'"),
])
def test_a_command_other_than_the_training_is_refused_naming_it(command, refused, fake_training, tmp_path, capsys):
    marker = tmp_path / "touched"
    path = tmp_path / "hostile.yaml"
    path.write_text(f"method: grid\nparameters:\n  seed: {{values: [0]}}\n"
                    f"command: {command.format(marker=marker, config=QUICKSTART)}\n")
    assert run_command(sweep.main, [str(path), "--root", str(tmp_path / "sweeps")]) == 2
    err = capsys.readouterr().err
    assert f"sweep file {path}: the command's {refused} is refused: the local runner runs only" in err
    assert not marker.exists() and not (tmp_path / "sweeps").exists()


def test_the_training_command_may_carry_its_own_overrides(capsys, tmp_path):
    for start in ("'${env}', python3", "'${interpreter}'"):
        path = tmp_path / "own.yaml"
        path.write_text(f"method: grid\nparameters:\n  seed: {{values: [0]}}\ncommand: [{start}, -m, "
                        f"experiments.train, --config, {QUICKSTART}, trainer.max_epochs=3, '${{args_no_hyphens}}']\n")
        assert sweep.main([str(path), "--dry-run"]) == 0
        command = capsys.readouterr().out.split()
        assert command[:2] == [sys.executable, "-m"] and command[-3:-1] == ["trainer.max_epochs=3", "seed=0"]
        trial = sweep.resolve_trials(sweep.load_sweep(path), path)[0]
        assert trial.cfg.trainer.max_epochs == 3  # the command's overrides are part of the trial's config and id


def test_a_parameter_that_is_not_a_config_key_is_refused_before_any_trial_runs(fake_training, tmp_path, capsys):
    path = _sweep_file(tmp_path, "method: grid\nparameters:\n  seed: {values: [0, 1]}\n"
                                 "  model.no_such_key: {values: [1]}")
    assert run_command(sweep.main, [str(path), "--root", str(tmp_path / "sweeps")]) == 2
    err = capsys.readouterr().err
    assert f"sweep {path}, trial 0 (model.no_such_key=1 seed=0): " in err and "no_such_key" in err.split("seed=0)")[1]
    assert not fake_training and not (tmp_path / "sweeps").exists()


@pytest.mark.parametrize("method, spec, expected", [
    ("random", "{distribution: uniform, max: 0.1}", r"parameters.model.optim.lr: distribution uniform needs 'min', "
                                                    r"a number, got None"),
    ("random", "{distribution: log_uniform_values, min: 1e-4, max: 0.1}",
     r"needs 'min', a number, got '1e-4' \(YAML reads 1e-4 as text: write 1.0e-4\)"),
    ("random", "{distribution: int_uniform, min: 0.5, max: 3}", r"int_uniform needs 'min', an integer, got 0.5"),
    ("random", "{distribution: uniform, min: 0.2, max: 0.1}", r"lr: min 0.2 is above max 0.1; swap them"),
    ("random", "{distribution: log_uniform_values, min: 0, max: 0.1}", r"log_uniform_values needs min > 0, got 0"),
    ("random", "{distribution: normal, mu: 0, sigma: 1}",
     r"lr.distribution 'normal' is not supported here: use one of uniform, log_uniform_values, int_uniform"),
    ("bayes", "{values: []}", r"parameters.model.optim.lr.values must be a non-empty list, got \[\]"),
    ("random", "{values: 0.1}", r"lr.values must be a non-empty list, got 0.1"),
    ("grid", "{distribution: uniform, min: 0, max: 1}", r"lr: a grid sweep needs 'values' \(or 'value'\)"),
    ("random", "0.001", r"parameters.model.optim.lr must be \{value: X\}"),
])
def test_a_parameter_spec_that_cannot_be_drawn_from_is_refused_naming_it(method, spec, expected, tmp_path):
    path = _sweep_file(tmp_path, f"method: {method}\nparameters:\n  model.optim.lr: {spec}")
    with pytest.raises(ConfigError, match=rf"sweep file {re.escape(str(path))}: .*{expected}"):
        sweep.main([str(path), "--dry-run"])


@pytest.mark.slow
def test_sigterm_stops_the_running_trial_at_its_checkpoint_and_names_the_rerun(tiny_synthetic, tmp_path):
    path = _sweep_file(tmp_path, "method: grid\nparameters:\n  seed: {values: [0, 1]}")
    folder = tmp_path / "sweeps" / "tiny"
    runner = subprocess.Popen([sys.executable, "-m", "experiments.sweep", str(path), "--root", str(tmp_path / "sweeps"),
                               f"data.dir={tiny_synthetic}", "trainer.max_epochs=1000", *TINY],
                              stderr=subprocess.PIPE, text=True)
    pids = []
    try:
        started = time.monotonic()
        while not list(folder.glob("*/checkpoints/last.ckpt")):  # the first trial is training: it saved an epoch
            assert runner.poll() is None, runner.communicate()[1]
            assert time.monotonic() - started < 180, "no trial saved a checkpoint within 180 s"
            time.sleep(0.2)
        trial = next(folder.glob("*/checkpoints/last.ckpt")).parent.parent
        pids.append(json.loads((trial / "run.lock").read_text())["pid"])
        runner.send_signal(signal.SIGTERM)
        err = runner.communicate(timeout=180)[1]
        assert runner.returncode == 143 and not _process_alive(pids[0])  # the trial was waited for: no orphan
    finally:
        for pid in [runner.pid, *pids]:
            if _process_alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert f"stopped by SIGTERM; interrupted trials: {trial.name} ({trial / 'checkpoints' / 'last.ckpt'} saved); " \
           f"1 not started; rerun {sys.executable} -m experiments.sweep {path}" in err
    assert "trainer.max_epochs=1000" in err.split("rerun")[-1] and not (folder / "sweep.lock").exists()
    assert f"trial {trial.name} exit 143" in err and "error: stopped by SIGTERM" in (trial / "sweep.log").read_text()
