"""Render (and submit) a SLURM job for a training: ``python -m experiments.slurm.submit --config CFG [key=value ...] [--dry-run]``.

The sbatch script asks for ``trainer.num_nodes`` nodes with ``trainer.devices`` tasks and GPUs each,
``data.num_workers + 1`` CPUs per task, and ``--signal=SIGUSR1@90`` (Lightning's SLURM environment
requeues the job on it); it activates the Python environment it was rendered from and runs
``srun python -m experiments.train`` with an explicit ``run_dir`` (processes that srun starts cannot
agree on a new one), so a requeued job resumes from that directory's ``last.ckpt``. Settings that
cannot run are refused before anything is written, naming both sides: a global batch that does not
divide by nodes x devices, a device count that is not a number, more devices than GPUs requested.
``--dry-run`` prints the script; otherwise it is written to ``RUN_DIR/job.sbatch`` and given to ``sbatch``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

from experiments.config import ConfigError, load_config
from experiments.runs import config_hash
from lightning_vrn.atomic import write_text
from lightning_vrn.cli import run_command


def activation() -> str:
    """The shell line that activates this Python environment (conda or a virtualenv)."""
    if os.environ.get("CONDA_DEFAULT_ENV"):
        return f"conda activate {shlex.quote(os.environ['CONDA_DEFAULT_ENV'])}"
    return f"source {shlex.quote(str(Path(sys.prefix) / 'bin' / 'activate'))}"


def job_shape(cfg: DictConfig, gpus_per_node: int | None) -> tuple[int, int, int]:
    """``(nodes, devices per node, GPUs per node)`` of a config, or a ConfigError naming the mismatch."""
    nodes = int(cfg.trainer.get("num_nodes") or 1)
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


def render(cfg: DictConfig, config_path: str, overrides: list[str], run_dir: Path, time_limit: str,
           gpus_per_node: int | None = None, partition: str | None = None) -> str:
    """The sbatch script of one training."""
    nodes, devices, gpus = job_shape(cfg, gpus_per_node)
    train = ["srun", "python", "-m", "experiments.train", "--config", config_path, *overrides, f"run_dir={run_dir}"]
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={cfg.name}",
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={devices}",
        f"#SBATCH --gres=gpu:{gpus}",
        f"#SBATCH --cpus-per-task={cfg.data.num_workers + 1}",
        f"#SBATCH --time={time_limit}",
        "#SBATCH --signal=SIGUSR1@90",
        "#SBATCH --requeue",
        f"#SBATCH --output={run_dir}/slurm-%j.out",
        *([f"#SBATCH --partition={partition}"] if partition else []),
        "set -euo pipefail",
        activation(),
        f"cd {shlex.quote(str(Path.cwd()))}",
        " ".join(shlex.quote(word) for word in train),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the training config")
    parser.add_argument("--time", default="24:00:00", help="the job's time limit (default 24:00:00)")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="default: trainer.devices")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(cfg.run_dir or f"runs/{cfg.name}/slurm-{config_hash(cfg)}")
    script = render(cfg, args.config, [o for o in args.overrides if not o.startswith("run_dir=")], run_dir,
                    args.time, args.gpus_per_node, args.partition)
    if args.dry_run:
        print(script, end="")
        return 0
    write_text(run_dir / "job.sbatch", script)
    subprocess.run(["sbatch", str(run_dir / "job.sbatch")], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
