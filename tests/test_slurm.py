"""SLURM job scripts: rendered from the config, refused when the settings cannot run, printed by --dry-run."""

import pytest

from experiments.config import CONFIG_DIR, ConfigError, load_config
from experiments.slurm import submit
from lightning_vrn.cli import run_command

PAPER = str(CONFIG_DIR / "paper.yaml")


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
    assert "trainer.devices=4" in command and ("source " in script or "conda activate" in script)


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
