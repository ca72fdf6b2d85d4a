"""SLURM job scripts: rendered from the config or a sweep (one array task per trial), refused when the settings
cannot run, printed by --dry-run."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from experiments import sweep
from experiments.config import CONFIG_DIR, ConfigError, load_config
from experiments.slurm import submit
from lightning_vrn.cli import run_command

PAPER = str(CONFIG_DIR / "paper.yaml")
SWEEPS = Path(__file__).resolve().parents[1] / "experiments" / "sweeps"


def test_the_script_asks_for_what_the_config_trains_on(tmp_path):
    overrides = ["trainer.devices=4", "trainer.num_nodes=2", "data.batch_size=32", "trainer.strategy=ddp"]
    cfg = load_config(PAPER, overrides)
    script = submit.render(cfg, PAPER, overrides, tmp_path / "run", "12:00:00", partition="gpu")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gres=gpu:4",
                 "#SBATCH --cpus-per-task=9", "#SBATCH --signal=SIGUSR1@90", "#SBATCH --time=12:00:00",
                 "#SBATCH --partition=gpu", "#SBATCH --requeue"):
        assert line in script.splitlines()
    command = script.splitlines()[-1]
    assert command.startswith("srun python -m experiments.train --config") and f"run_dir={tmp_path / 'run'}" in command
    assert "trainer.devices=4" in command and submit.activation() in script.splitlines()


@pytest.mark.parametrize("overrides, gpus, expected", [
    (["trainer.devices=4", "data.batch_size=6"], None, r"data.batch_size=6 .* does not divide by .* 1 x 4"),
    (["trainer.devices=auto"], None, r"trainer.devices='auto': a SLURM job needs a number"),
    (["trainer.devices=4", "data.batch_size=8"], 2, r"trainer.devices=4 is more than the 2 GPUs per node"),
])
def test_settings_that_cannot_run_are_refused_naming_both(overrides, gpus, expected, tmp_path):
    with pytest.raises(ConfigError, match=expected):
        submit.render(load_config(PAPER, overrides), PAPER, overrides, tmp_path, "1:00:00", gpus_per_node=gpus)


def test_dry_run_prints_the_script_and_submits_nothing(capsys, tmp_path):
    code = run_command(submit.main, ["--config", PAPER, "trainer.devices=2", f"run_dir={tmp_path / 'run'}", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("#!/bin/bash") and "#SBATCH --gres=gpu:2" in out
    assert not (tmp_path / "run").exists()


def _grid_sweep(folder, parameters: str):
    """A grid sweep file over quickstart.yaml with the given ``parameters:`` YAML block."""
    path = folder / "grid.yaml"
    path.write_text(f"name: tiny grid\nmethod: grid\nparameters:\n{parameters}\ncommand: [python, -m, "
                    f"experiments.train, --config, {CONFIG_DIR / 'quickstart.yaml'}, \"${{args_no_hyphens}}\"]\n")
    return path


def _task_commands(script: str) -> list[list[str]]:
    """The argv of each array task's srun line, in task order."""
    return [shlex.split(line.strip().removesuffix(" ;;")) for line in script.splitlines()
            if line.strip().startswith("srun ")]


def test_a_sweep_renders_one_array_task_per_trial_as_the_local_runner_runs_it(tmp_path):
    path = _grid_sweep(tmp_path, "  model.optim.lr: {values: [0.001, 0.003]}\n  seed: {values: [0, 1]}")
    extra, root = ["data.num_workers=0", "name=tiny sweep's run"], tmp_path / "my sweeps"
    script = submit.render_array(path, extra, root, "2:00:00", parallel=2)
    lines = script.splitlines()
    assert "#SBATCH --array=0-3%2" in lines and "#SBATCH --cpus-per-task=1" in lines
    log = root / "tiny grid" / "slurm-%A_%a.out"
    assert f'#SBATCH --output="{log}"' in lines  # quoted: the path has spaces
    spec = sweep.load_sweep(path)
    trials = sweep.expand(spec)
    local = [sweep.trial_command(spec, t, root / "tiny grid" / t.id, extra) for t in trials]
    assert _task_commands(script) == [["srun", "python", *command[1:]] for command in local]
    assert [line.split("# trial ")[1] for line in lines if "# trial " in line] == [t.id for t in trials]
    shipped = submit.render_array(SWEEPS / "ablations.yaml", [], Path("runs/sweeps"), "1:00:00")
    assert "#SBATCH --array=0-14" in shipped.splitlines() and len(_task_commands(shipped)) == 15


@pytest.mark.parametrize("parameters, extra, expected", [
    ("  data.batch_size: {values: [8, 6]}", ["trainer.devices=4"],
     r"trial 1 \(6-\w+: data.batch_size=6\): data.batch_size=6 .* does not divide by .* 1 x 4"),
    ("  data.num_workers: {values: [0, 2]}", [],
     r"trial 1 \(2-\w+: data.num_workers=2\) needs .* 3 CPUs per task .* but trial 0 \(0-\w+\) needs .* 1 CPUs"),
    ("  model.no_such_key: {values: [1]}", [], r"trial 0 \(1-\w+: model.no_such_key=1\): .*no_such_key"),
])
def test_a_trial_that_cannot_run_in_the_array_is_refused_naming_it(parameters, extra, expected, tmp_path):
    with pytest.raises(ConfigError, match=expected):
        submit.render_array(_grid_sweep(tmp_path, parameters), extra, tmp_path / "sweeps", "1:00:00")
    assert not (tmp_path / "sweeps").exists()


def test_an_array_task_runs_exactly_its_own_trial(tmp_path):
    path = _grid_sweep(tmp_path, "  seed: {values: [0, 1, 2]}")
    root = tmp_path / "my sweeps"
    code = run_command(submit.main, ["--sweep", str(path), "--root", str(root), "data.num_workers=0", "--dry-run"])
    assert code == 0 and not root.exists()
    script = tmp_path / "array.sbatch"
    fake = tmp_path / "bin"
    fake.mkdir()
    for program in ("srun", "python"):  # record argv, one word a line, and run nothing
        (fake / program).write_text(f'#!/bin/sh\nprintf "%s\\n" "$(basename "$0")" "$@" > "$RECORD"\n')
        (fake / program).chmod(0o755)
    script.write_text(submit.render_array(path, ["data.num_workers=0"], root, "1:00:00"))
    spec = sweep.load_sweep(path)
    trials = sweep.expand(spec)
    for task in (2, 0):
        record = tmp_path / f"task{task}.argv"
        env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": str(task),
               "RECORD": str(record)}
        subprocess.run(["bash", str(script)], env=env, check=True)
        local = sweep.trial_command(spec, trials[task], root / "tiny grid" / trials[task].id, ["data.num_workers=0"])
        assert record.read_text().splitlines() == ["srun", "python", *local[1:]]
    outside = subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": "3"}, capture_output=True,
                             text=True)
    assert outside.returncode == 2 and "this sweep has tasks 0-2" in outside.stderr
    unset = subprocess.run(["bash", str(script)], env={k: v for k, v in env.items() if k != "SLURM_ARRAY_TASK_ID"},
                           capture_output=True, text=True)
    assert unset.returncode != 0 and "run this script with sbatch" in unset.stderr


def test_the_script_activates_the_environment_it_was_rendered_from(tmp_path, monkeypatch):
    venv, conda_env, conda_base = tmp_path / "venv", tmp_path / "envs" / "vrn", tmp_path / "miniconda"
    (conda_env / "conda-meta").mkdir(parents=True)
    (conda_base / "etc" / "profile.d").mkdir(parents=True)
    (conda_base / "etc" / "profile.d" / "conda.sh").write_text("")
    monkeypatch.setenv("CONDA_EXE", str(conda_base / "bin" / "conda"))
    monkeypatch.setenv("CONDA_DEFAULT_ENV", "base")  # conda's base active in the shell does not matter
    monkeypatch.setattr(submit.sys, "prefix", str(venv))
    assert submit.activation() == f"source {venv}/bin/activate"
    monkeypatch.setattr(submit.sys, "prefix", str(conda_env))
    assert submit.activation() == (f"set +u; source {conda_base}/etc/profile.d/conda.sh; conda activate {conda_env}; "
                                   f"set -u")
    monkeypatch.delenv("CONDA_EXE")
    assert submit.activation().startswith(f"export PATH={conda_env}/bin:")


def test_sbatch_values_with_spaces_are_quoted():
    assert submit.directive("vrn") == "vrn"
    assert submit.directive("tiny sweep's run") == '"tiny sweep\'s run"'
