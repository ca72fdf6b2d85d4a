"""Render (and submit) a SLURM job for a training: ``python -m experiments.slurm.submit --config CFG [key=value ...] [--dry-run]``.

The sbatch script asks for ``trainer.num_nodes`` nodes with ``trainer.devices`` tasks and GPUs each,
``data.num_workers + 1`` CPUs per task, and ``--signal=SIGUSR1@90`` (Lightning's SLURM environment
requeues the job on it); it activates the Python environment it was rendered from and runs
``srun python -m experiments.train`` with an explicit ``run_dir`` (processes that srun starts cannot
agree on a new one), so a requeued job resumes from that directory's ``last.ckpt``. Settings that
cannot run are refused before anything is written, naming both sides: a global batch that does not
divide by nodes x devices, a device count that is not a number, more devices than GPUs requested.
Every value is checked before it reaches the script: ``trainer.num_nodes``, ``trainer.devices`` and
``--gpus-per-node`` at least 1; ``--time`` in one of SLURM's formats (:data:`TIME_FORMATS`);
``--partition`` (a comma-separated list) and ``--account`` names of letters, digits, ``_``, ``-`` and
``.``; no control character (a newline would start a shell command) in any value, override or path.
The job name and log path on the ``#SBATCH`` lines, which sbatch splits itself (no shell), are quoted
for its parser (:func:`directive`); values it cannot carry (``hetjob``/``packjob``, a backslash in the
log path) are refused. The command lines are quoted for bash (``shlex``).
``--dry-run`` prints the script; otherwise it is written to ``RUN_DIR/job.sbatch`` and given to ``sbatch``
(a missing or failing ``sbatch`` is an error naming the written script).

A sweep as one array job: ``python -m experiments.slurm.submit --sweep SWEEP.yaml [--max-trials N]
[--parallel K] [--dry-run] [key=value ...]``. The sweep expands to trials exactly as the local runner
(:mod:`experiments.sweep`) expands it, with the same trial ids and run directories
(``--root``/``{sweep}``/``{trial}``); the script has ``#SBATCH --array=0-(T-1)`` (``%K``: at most K at a
time) and a ``case`` on ``$SLURM_ARRAY_TASK_ID`` that runs that trial's ``srun python -m experiments.train
--config CONFIG key=value... run_dir=TRIAL_DIR``. Every trial is loaded and checked first (a refusal
names the trial), and all must share one job shape (nodes, devices, GPUs and CPUs per task), since an
array job has one set of ``#SBATCH`` lines. A requeued array task keeps its ``SLURM_ARRAY_TASK_ID``, so
it reruns its own trial's command and resumes that run directory. The script is written to
``--root/{sweep}/array.sbatch``; task logs go to ``slurm-{job}_{task}.out`` beside it.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path


from experiments.config import ConfigError, ExperimentSettings, load_config
from experiments.runs import config_hash
from experiments.sweep import load_sweep, resolve_trials, sweep_folder, trial_command
from lightning_vrn.atomic import write_text
from lightning_vrn.cli import run_command


def activation() -> str:
    """The shell line that activates the Python environment this runs in: decided by ``sys.prefix`` (a conda
    environment has ``conda-meta/``), not by which conda environment happens to be active, since a venv
    user's shell may have conda's ``base`` active too. conda needs its shell functions in a batch script
    and its activation scripts read unset variables, hence ``conda.sh`` and ``set +u``."""
    prefix = Path(sys.prefix)
    if not (prefix / "conda-meta").is_dir():
        return f"source {shlex.quote(str(prefix / 'bin' / 'activate'))}"
    conda_exe = os.environ.get("CONDA_EXE")  # BASE/bin/conda, set by conda's shell set-up
    conda_sh = Path(conda_exe).parent.parent / "etc" / "profile.d" / "conda.sh" if conda_exe else None
    if conda_sh is not None and conda_sh.is_file():
        return f"set +u; source {shlex.quote(str(conda_sh))}; conda activate {shlex.quote(str(prefix))}; set -u"
    return f"export PATH={shlex.quote(str(prefix / 'bin'))}:\"$PATH\"  # conda environment {prefix}: conda.sh not found"


TIME_FORMATS = ("minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes, "
                "days-hours:minutes:seconds (digits), UNLIMITED or INFINITE")
_TIME = re.compile(r"[0-9]+(:[0-9]+){0,2}|[0-9]+-[0-9]+(:[0-9]+){0,2}|UNLIMITED|INFINITE", re.IGNORECASE)
_NAMES = {"--partition": re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*"), "--account": re.compile(r"[A-Za-z0-9_.-]+")}


def check_printable(values: list[tuple[str, object]]) -> None:
    """Refuse a value with a control character (ASCII below 32, or 127): a newline would end its line of the
    job script and start a shell command. ``values``: ``(what, value)`` pairs; the ConfigError names the pair."""
    for what, value in values:
        text = str(value)
        bad = [c for c in text if ord(c) < 32 or ord(c) == 127]
        if bad:
            raise ConfigError(f"{what} {text!r} has a control character {bad[0]!r}, which would break the job "
                              f"script (a newline starts a shell command); remove it")


def directive(what: str, value: object) -> str:
    """An ``#SBATCH`` option's value as sbatch's own parser reads it (``_get_argument`` in sbatch's ``opt.c``,
    no shell: words split at spaces, ``"`` or ``'`` group, ``\\`` escapes the next character, ``#`` starts a
    comment): double-quoted, with ``\\``, ``"`` and ``#`` escaped, when it holds any of these. sbatch takes
    ``hetjob``/``packjob`` anywhere on the line for a job separator: a ConfigError names ``what`` to change."""
    text = str(value)
    if re.search("hetjob|packjob", text, re.IGNORECASE):
        raise ConfigError(f"{what} {text!r} holds 'hetjob' or 'packjob', which sbatch reads as a job separator on "
                          f"an #SBATCH line; choose another {what}")
    if not any(c in text for c in ' "\'\\#'):
        return text
    return '"' + re.sub(r'([\\"#])', r"\\\1", text) + '"'


def job_shape(cfg: ExperimentSettings, gpus_per_node: int | None) -> tuple[int, int, int]:
    """``(nodes, devices per node, GPUs per node)`` of a config, or a ConfigError naming the mismatch."""
    nodes = cfg.trainer.get("num_nodes")
    nodes = 1 if nodes is None else nodes
    if not isinstance(nodes, int) or nodes < 1:
        raise ConfigError(f"trainer.num_nodes={nodes!r}: a SLURM job needs at least 1 node, e.g. trainer.num_nodes=2 "
                          f"(null means 1)")
    if gpus_per_node is not None and gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node={gpus_per_node}: a job needs at least 1 GPU per node; leave it out to "
                          f"request trainer.devices")
    devices = cfg.trainer.get("devices", 1)
    if not isinstance(devices, int) or devices < 1:
        raise ConfigError(f"trainer.devices={devices!r}: a SLURM job needs a number of GPUs per node, e.g. "
                          f"trainer.devices=4")
    gpus = devices if gpus_per_node is None else gpus_per_node
    if devices > gpus:
        raise ConfigError(f"trainer.devices={devices} is more than the {gpus} GPUs per node the job requests "
                          f"(--gpus-per-node); ask for at least {devices}")
    if cfg.data.batch_size % (nodes * devices):
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} (global) does not divide by trainer.num_nodes x "
                          f"trainer.devices = {nodes} x {devices}; choose a multiple of {nodes * devices}")
    return nodes, devices, gpus


def header(job_name: str, nodes: int, devices: int, gpus: int, cpus: int, time_limit: str, output: Path,
           partition: str | None, array: str | None = None, account: str | None = None) -> list[str]:
    """The ``#SBATCH`` lines (``devices`` tasks per node, ``gpus`` GPUs and ``cpus`` CPUs per task) and the
    environment set-up every job script starts with, or a ConfigError naming a value that cannot go there.
    A ``%`` in the log's folder is doubled: SLURM expands ``%j``-style patterns in the whole ``--output`` path."""
    folder = "run_dir (or --root for --sweep)"
    check_printable([("name", job_name), ("--time", time_limit), ("--partition", partition or ""),
                     ("--account", account or ""), (folder, output.parent), ("the working directory", Path.cwd()),
                     ("the Python environment", sys.prefix)])
    if not _TIME.fullmatch(time_limit):
        raise ConfigError(f"--time={time_limit!r} is not a SLURM time limit; use {TIME_FORMATS}, e.g. 1-12:00:00")
    for flag, value in (("--partition", partition), ("--account", account)):
        if value is not None and not _NAMES[flag].fullmatch(value):
            raise ConfigError(f"{flag}={value!r} is not a SLURM name: use letters, digits, '_', '-' and '.'"
                              f"{' (several partitions separated by commas)' if flag == '--partition' else ''}")
    if "\\" in str(output.parent):
        raise ConfigError(f"{folder} {str(output.parent)!r} has a backslash, which stops SLURM from expanding %j "
                          f"in the log path; choose one without")
    log = Path(str(output.parent).replace("%", "%%")) / output.name
    return [
        "#!/bin/bash",
        f"#SBATCH --job-name={directive('name', job_name)}",
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={devices}",
        f"#SBATCH --gres=gpu:{gpus}",
        f"#SBATCH --cpus-per-task={cpus}",
        f"#SBATCH --time={time_limit}",
        "#SBATCH --signal=SIGUSR1@90",
        "#SBATCH --requeue",
        f"#SBATCH --output={directive(folder, log)}",
        *([f"#SBATCH --array={array}"] if array else []),
        *([f"#SBATCH --partition={directive('--partition', partition)}"] if partition else []),
        *([f"#SBATCH --account={directive('--account', account)}"] if account else []),
        "set -euo pipefail",
        activation(),
        f"cd {shlex.quote(str(Path.cwd()))}",
    ]


def render(cfg: ExperimentSettings, config_path: str, overrides: list[str], run_dir: Path, time_limit: str,
           gpus_per_node: int | None = None, partition: str | None = None, account: str | None = None) -> str:
    """The sbatch script of one training."""
    nodes, devices, gpus = job_shape(cfg, gpus_per_node)
    train = ["srun", "python", "-m", "experiments.train", "--config", config_path, *overrides, f"run_dir={run_dir}"]
    lines = header(cfg.name, nodes, devices, gpus, cfg.data.num_workers + 1, time_limit, run_dir / "slurm-%j.out",
                   partition, account=account)
    return "\n".join([*lines, shlex.join(train)]) + "\n"


def render_array(sweep_path: str | Path, extra: list[str], root: Path, time_limit: str,
                 gpus_per_node: int | None = None, partition: str | None = None, max_trials: int | None = None,
                 seed: int = 0, parallel: int | None = None, account: str | None = None) -> str:
    """The sbatch array script of a sweep: task i runs trial i of ``experiments.sweep.resolve_trials``, in that
    trial's run directory. Every trial is checked first; a ConfigError names the trial that cannot run
    or whose job shape differs from trial 0's."""
    if any(item.startswith("run_dir=") for item in extra):
        raise ConfigError(f"run_dir= cannot be set for a sweep: each trial runs in --root/{{sweep}}/{{trial}} "
                          f"(here {root}); choose --root instead")
    sweep = load_sweep(sweep_path)
    folder = sweep_folder(sweep, sweep_path, root)
    trials = resolve_trials(sweep, sweep_path, extra, max_trials, seed)
    shapes = []
    for index, trial in enumerate(trials):
        where = f"sweep {sweep_path}, trial {index} ({trial.id}: {' '.join(trial.overrides)})"
        try:
            shapes.append((*job_shape(trial.cfg, gpus_per_node), trial.cfg.data.num_workers + 1))
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None
        if shapes[index] != shapes[0]:
            raise ConfigError(f"{where} needs {_shape_text(shapes[index])} but trial 0 ({trials[0].id}) needs "
                              f"{_shape_text(shapes[0])}: an array job has one shape; fix these settings for "
                              f"every trial (key=value after --sweep) or split the sweep")
    nodes, devices, gpus, cpus = shapes[0]
    array = f"0-{len(trials) - 1}" + (f"%{parallel}" if parallel else "")
    lines = header(folder.name, nodes, devices, gpus, cpus, time_limit, folder / "slurm-%A_%a.out", partition, array,
                   account)
    lines += [': "${SLURM_ARRAY_TASK_ID:?run this script with sbatch: an array job sets SLURM_ARRAY_TASK_ID}"',
              'case "$SLURM_ARRAY_TASK_ID" in']
    for index, trial in enumerate(trials):
        command = ["srun", *trial_command(sweep, trial, folder / trial.id, list(extra), interpreter="python")]
        check_printable([(f"trial {trial.id}'s command", word) for word in command])  # the sweep file's values too
        lines += [f"  {index})  # trial {trial.id}", f"    {shlex.join(command)} ;;"]
    lines += [f'  *) echo "array task $SLURM_ARRAY_TASK_ID: this sweep has tasks {array.split("%")[0]}" >&2; '
              f'exit 2 ;;', "esac"]
    return "\n".join(lines) + "\n"


def _shape_text(shape: tuple[int, int, int, int]) -> str:
    nodes, devices, gpus, cpus = shape
    return (f"trainer.num_nodes={nodes}, trainer.devices={devices}, {gpus} GPUs per node and "
            f"{cpus} CPUs per task (data.num_workers + 1)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    job = parser.add_mutually_exclusive_group(required=True)
    job.add_argument("--config", help="one training, e.g. experiments/configs/paper.yaml")
    job.add_argument("--sweep", help="one array task per trial, e.g. experiments/sweeps/ablations.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the training config (every trial's)")
    parser.add_argument("--time", default="24:00:00", help="the job's time limit (default 24:00:00)")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="default: trainer.devices")
    parser.add_argument("--partition", default=None, help="SLURM partition(s), comma-separated")
    parser.add_argument("--account", default=None, help="SLURM account to charge")
    parser.add_argument("--max-trials", type=int, default=None, help="--sweep: as experiments.sweep")
    parser.add_argument("--seed", type=int, default=0, help="--sweep: seed of the random draws, as experiments.sweep")
    parser.add_argument("--root", type=Path, default=Path("runs/sweeps"), help="--sweep: as experiments.sweep")
    parser.add_argument("--parallel", type=int, default=None, help="--sweep: at most K array tasks at a time")
    parser.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may come before or after --options
    for flag, value in (("--parallel", args.parallel), ("--max-trials", args.max_trials)):
        if value is not None and not args.sweep:
            parser.error(f"{flag} is for --sweep (an array job), not --config")
        if value is not None and value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    check_printable([("--config", args.config or ""), *(("override", item) for item in args.overrides)])
    if args.sweep:
        folder = sweep_folder(load_sweep(args.sweep), args.sweep, args.root)
        path = folder / "array.sbatch"
        script = render_array(args.sweep, args.overrides, args.root, args.time, args.gpus_per_node, args.partition,
                              args.max_trials, args.seed, args.parallel, args.account)
    else:
        cfg = load_config(args.config, args.overrides)
        run_dir = Path(cfg.run_dir or f"runs/{cfg.name}/slurm-{config_hash(cfg)}")
        path = run_dir / "job.sbatch"
        script = render(cfg, args.config, [o for o in args.overrides if not o.startswith("run_dir=")], run_dir,
                        args.time, args.gpus_per_node, args.partition, args.account)
    if args.dry_run:
        print(script, end="")
        return 0
    write_text(path, script)
    try:
        done = subprocess.run(["sbatch", str(path)], stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        raise RuntimeError(f"sbatch is not on PATH, so {path} was written but not submitted; run this on the "
                           f"cluster's login node (or sbatch {path} there), or use --dry-run to print the "
                           f"script") from None
    if done.returncode:
        raise RuntimeError(f"sbatch {path} failed (exit {done.returncode}): {done.stderr.strip() or 'no message'}; "
                           f"fix what it says and rerun, or submit {path} by hand")
    print(done.stderr, end="", file=sys.stderr)  # sbatch's warnings; its 'Submitted batch job N' went to stdout
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
