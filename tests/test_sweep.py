"""The local sweep runner: sweep files expand to the expected command lines, and a 2x2 grid runs, skips and sorts."""

import sys
from pathlib import Path

import pytest

from experiments import sweep
from experiments.config import CONFIG_DIR, ConfigError, load_config

SWEEPS = Path(__file__).resolve().parents[1] / "experiments" / "sweeps"


def test_the_ablation_grid_expands_to_every_variant_and_seed():
    trials = sweep.expand(sweep.load_sweep(SWEEPS / "ablations.yaml"))
    assert len(trials) == 5 * 3 and len({t.id for t in trials}) == 15
    assert trials[0].overrides == ("model.name=vrn", "seed=0")
    command = sweep.trial_command(sweep.load_sweep(SWEEPS / "ablations.yaml"), trials[4], Path("runs/x"), [])
    assert command == [sys.executable, "-m", "experiments.train", "--config", "experiments/configs/quickstart.yaml",
                       "model.name=vrn_multitask", "seed=1", "run_dir=runs/x"]
    for trial in trials:  # every trial is a valid experiment config
        load_config(CONFIG_DIR / "quickstart.yaml", list(trial.overrides))


def test_random_draws_are_seeded_and_within_their_ranges():
    spec = sweep.load_sweep(SWEEPS / "lr.yaml")
    first, again = sweep.expand(spec, 6, seed=3), sweep.expand(spec, 6, seed=3)
    assert first == again and first != sweep.expand(spec, 6, seed=4)
    for trial in first:
        values = dict(item.split("=") for item in trial.overrides)
        assert 1e-4 <= float(values["model.optim.lr"]) <= 3e-3
        assert values["data.batch_size"] in ("4", "8", "16") and values["data.augment.enabled"] in ("true", "false")
        load_config(CONFIG_DIR / "quickstart.yaml", list(trial.overrides))


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
