"""SLURM job scripts: rendered from the config or a sweep (one array task per trial), refused when the settings
cannot run, printed by --dry-run."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

from experiments import sweep
from experiments.config import CONFIG_DIR, ConfigError, load_config
from experiments.slurm import submit
from lightning_vrn.cli import run_command
from lightning_vrn.distributed import limit_threads_to_slurm_task
from tests.helpers.paths import REPO

PAPER = str(CONFIG_DIR / "paper.yaml")
SWEEPS = REPO / "experiments" / "sweeps"


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
    trials = sweep.resolve_trials(spec, path, extra)
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
    ("  model.no_such_key: {values: [1]}", [], r"trial 0 \(model.no_such_key=1\): .*no_such_key"),
])
def test_a_trial_that_cannot_run_in_the_array_is_refused_naming_it(parameters, extra, expected, tmp_path):
    with pytest.raises(ConfigError, match=expected):
        submit.render_array(_grid_sweep(tmp_path, parameters), extra, tmp_path / "sweeps", "1:00:00")
    assert not (tmp_path / "sweeps").exists()


def test_an_empty_sweep_grid_is_refused_naming_the_key(tmp_path):
    path = _grid_sweep(tmp_path, "  seed: {values: []}")
    with pytest.raises(ConfigError, match=rf"sweep file {path}: parameters.seed.values must be a non-empty list"):
        submit.main(["--sweep", str(path), "--dry-run"])


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
    trials = sweep.resolve_trials(spec, path, ["data.num_workers=0"])
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


def _sbatch_words(line: str) -> list[str]:
    """The arguments sbatch reads from an ``#SBATCH`` line: ``_get_argument`` of SLURM's src/sbatch/opt.c in
    Python (whitespace splits; ``"`` or ``'`` group; ``\\`` escapes the next character; ``#`` starts a comment)."""
    rest, at, words = line.removeprefix("#SBATCH"), 0, []
    while True:
        while at < len(rest) and rest[at].isspace():
            at += 1
        word, quote, escaped = "", None, False
        while at < len(rest) and (quote or not rest[at].isspace()):
            char, at = rest[at], at + 1
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
                continue
            elif quote:
                if char == quote:
                    quote = None
                    continue
            elif char in "\"'":
                quote = char
                continue
            elif char == "#":
                return words + [word] if word else words
            word += char
        assert quote is None, f"sbatch stops at the unmatched {quote} in {line}"
        if not word:
            return words
        words.append(word)


def test_sbatch_and_bash_read_back_exactly_the_values_given(tmp_path, capsys):
    marker = tmp_path / "touched"
    nasty = f'"q" $(touch {marker}) `touch {marker}` it\'s x#1 50%'
    name, run_dir = f"we {nasty} a\\b", tmp_path / f"run {nasty}"
    overrides = [f"name={name}", "data.num_workers=0", f"run_dir={run_dir}"]
    assert run_command(submit.main, ["--config", PAPER, *overrides, "--dry-run"]) == 0
    script = capsys.readouterr().out
    options = dict(word.split("=", 1) for line in script.splitlines() if line.startswith("#SBATCH")
                   for word in _sbatch_words(line) if "=" in word)
    assert options["--job-name"] == name
    assert options["--output"] == f"{str(run_dir).replace('%', '%%')}/slurm-%j.out"  # SLURM reads %% as %
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    ran = subprocess.run(["bash", "-c", 'srun() { printf "%s\\n" "$@"; }; source "$0"', str(path)],
                         capture_output=True, text=True, check=True)
    assert ran.stdout.splitlines() == ["python", "-m", "experiments.train", "--config", PAPER, *overrides]
    assert not marker.exists()
    for value in ("vrn", "tiny sweep's run", 'say "hi" #1', "a\\b"):
        assert _sbatch_words(f"#SBATCH --job-name={submit.directive('name', value)}") == [f"--job-name={value}"]
    assert submit.directive("name", "vrn") == "vrn"


@pytest.mark.parametrize("extra, expected", [
    (["trainer.num_nodes=0"], "trainer.num_nodes=0: a SLURM job needs at least 1 node"),
    (["trainer.num_nodes=-1"], "trainer.num_nodes=-1: a SLURM job needs at least 1 node"),
    (["--gpus-per-node", "0"], "--gpus-per-node=0: a job needs at least 1 GPU per node"),
    (["--time", "1h"], "--time='1h' is not a SLURM time limit; use minutes, minutes:seconds, hours:minutes:seconds"),
    (["--time", "1:00:00:00"], "--time='1:00:00:00' is not a SLURM time limit"),
    (["--time", "1:00:00; touch x"], "--time='1:00:00; touch x' is not a SLURM time limit"),
    (["--time", "\uff11:00"], "is not a SLURM time limit"),  # a full-width digit
    (["--partition", "gpu long"], "--partition='gpu long' is not a SLURM name: use letters, digits"),
    (["--partition", "gpu,"], "--partition='gpu,' is not a SLURM name"),
    (["--partition", "$(id)"], "--partition='$(id)' is not a SLURM name"),
    (["--account", "lab,other"], "--account='lab,other' is not a SLURM name"),
    (["--account", 'lab"'], "--account='lab\"' is not a SLURM name"),
    (["name=my-HetJob"], "name 'my-HetJob' holds 'hetjob' or 'packjob', which sbatch reads as a job separator"),
    (["--partition", "packjobs"], "--partition 'packjobs' holds 'hetjob' or 'packjob'"),
    (["run_dir=runs/a\\b"], "run_dir (or --root for --sweep) 'runs/a\\\\b' has a backslash"),
])
def test_values_slurm_cannot_take_are_refused_naming_them(extra, expected, capsys):
    assert run_command(submit.main, ["--config", PAPER, *extra, "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and expected in captured.err


def test_slurm_times_and_names_are_rendered_as_given(tmp_path):
    cfg = load_config(PAPER, ["trainer.num_nodes=null"])
    for time in ("30", "30:00", "12:00:00", "2-0", "2-12:30", "2-12:30:00", "UNLIMITED", "infinite"):
        script = submit.render(cfg, PAPER, [], tmp_path, time, partition="gpu,gpu-long.q_2", account="lab-1.x")
        assert {f"#SBATCH --time={time}", "#SBATCH --nodes=1", "#SBATCH --partition=gpu,gpu-long.q_2",
                "#SBATCH --account=lab-1.x"} <= set(script.splitlines())


@pytest.mark.parametrize("argv, named", [
    (["--time", "1:00:00\ntouch {tmp}/x"], "--time '1:00:00\\ntouch"),
    (["--partition", "gpu\ntouch {tmp}/x"], "--partition 'gpu\\ntouch"),
    (["--account", "lab\rx"], "--account 'lab\\rx'"),
    (["data.num_workers=0\ntouch {tmp}/x"], "override 'data.num_workers=0\\ntouch"),
    (["name=vrn\tx"], "override 'name=vrn\\tx'"),
    (["name=vrn\x7f"], "override 'name=vrn\\x7f'"),
])
def test_a_control_character_in_any_value_is_refused_before_anything_is_written(argv, named, tmp_path, monkeypatch,
                                                                                 capsys):
    monkeypatch.setattr(submit.subprocess, "run", lambda *args, **kwargs: pytest.fail("sbatch was run"))
    argv = [item.replace("{tmp}", str(tmp_path)) for item in argv]
    code = run_command(submit.main, ["--config", PAPER, f"run_dir={tmp_path / 'run'}", *argv])
    err = capsys.readouterr().err
    assert code == 2 and named in err and "has a control character" in err and "remove it" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "x").exists()
    sweep = ["--sweep", str(_grid_sweep(tmp_path, "  seed: {values: [0]}")), "--root", str(tmp_path / "sweeps")]
    assert run_command(submit.main, [*sweep, *argv, "--dry-run"]) == 2 and named in capsys.readouterr().err


def test_an_array_job_carries_the_account_and_refuses_a_control_character_in_the_sweep_file(tmp_path, capsys):
    root = ["--root", str(tmp_path / "sweeps"), "--dry-run"]
    sweep = _grid_sweep(tmp_path, "  seed: {values: [0, 1]}")
    assert run_command(submit.main, ["--sweep", str(sweep), "--account", "lab-1", *root]) == 0
    assert "#SBATCH --account=lab-1" in capsys.readouterr().out.splitlines()
    (tmp_path / "bad").mkdir()
    bad = _grid_sweep(tmp_path / "bad", '  name: {values: ["vrn\\ntouch x"]}')  # a YAML string holding a newline
    assert run_command(submit.main, ["--sweep", str(bad), *root]) == 2
    err = capsys.readouterr().err
    assert "command 'name=vrn\\ntouch x' has a control character" in err, err


@pytest.mark.parametrize("override, named", [('name="vrn\\nx"', "name 'vrn\\nx'"),
                                             ('run_dir="runs/a\\rb"', "run_dir (or --root for --sweep) 'runs/a\\rb'")])
def test_a_control_character_from_a_config_file_is_refused(override, named, tmp_path):
    cfg = load_config(PAPER, [override])  # a YAML string in a config file (or a quoted override) can hold one
    with pytest.raises(ConfigError) as refusal:
        submit.render(cfg, PAPER, [], Path(cfg.run_dir or tmp_path), "1:00:00")
    assert named in str(refusal.value) and "has a control character" in str(refusal.value)


def test_without_sbatch_the_error_names_the_written_script_and_the_fix(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    run_dir = tmp_path / "run"
    script = run_dir / "job.sbatch"
    assert run_command(submit.main, ["--config", PAPER, f"run_dir={run_dir}"]) == 1
    err = capfd.readouterr().err
    assert len(err.splitlines()) == 1 and script.is_file()
    assert f"sbatch is not on PATH, so {script} was written but not submitted" in err
    assert "cluster's login node" in err and "--dry-run" in err
    (tmp_path / "bin").mkdir()
    sbatch = tmp_path / "bin" / "sbatch"
    sbatch.write_text('#!/bin/sh\necho "sbatch: error: invalid partition specified: gpu" >&2\nexit 1\n')
    sbatch.chmod(0o755)
    assert run_command(submit.main, ["--config", PAPER, f"run_dir={run_dir}", "--partition", "gpu"]) == 1
    err = capfd.readouterr().err
    assert f"sbatch {script} failed (exit 1): sbatch: error: invalid partition specified: gpu" in err
    sbatch.write_text('#!/bin/sh\necho "Submitted batch job 42"\n')
    assert run_command(submit.main, ["--config", PAPER, f"run_dir={run_dir}"]) == 0
    assert capfd.readouterr().out == "Submitted batch job 42\n"


def test_a_slurm_task_trains_on_no_more_threads_than_its_cores(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
        assert limit_threads_to_slurm_task() == 1 and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")   # more cores than threads: left as it is
        assert limit_threads_to_slurm_task() == 2
        monkeypatch.setenv("SLURM_NTASKS", "1")
        monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # 4 ranks started by Lightning in one 8-core task
        torch.set_num_threads(8)
        assert limit_threads_to_slurm_task(local_ranks=4) == 2 and torch.get_num_threads() == 2
        monkeypatch.setenv("SLURM_JOB_NAME", "train")  # under srun each rank is a task with its own 8 cores
        torch.set_num_threads(8)
        assert limit_threads_to_slurm_task(local_ranks=4) == 8
        torch.set_num_threads(2)
        monkeypatch.delenv("SLURM_CPUS_PER_TASK")
        assert limit_threads_to_slurm_task() == 2
    finally:
        torch.set_num_threads(before)
