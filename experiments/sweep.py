"""Run a W&B sweep file locally, without a W&B server: ``python -m experiments.sweep SWEEP.yaml [--max-trials N] [--parallel K]``.

The sweep files in ``experiments/sweeps/`` are written for ``wandb sweep`` / ``wandb agent``: their
``command`` ends in ``${args_no_hyphens}``, so every trial is ``python -m experiments.train --config
CONFIG a.b=c ...``. This runner reads the same files for offline clusters and tests:

- ``method: grid`` expands every combination of the parameters' ``values``; ``random`` (and
  ``bayes``, which needs the W&B server's model: run here as random) draws ``--max-trials`` trials
  from ``values`` or ``distribution`` (``uniform``, ``log_uniform_values``, ``int_uniform`` with
  ``min``/``max``), seeded by ``--seed``;
- each trial runs in its own run directory, ``runs/sweeps/{sweep}/{trial}`` (the trial id is a hash of
  its overrides), as ``python -m experiments.train``; a trial whose ``metrics.json`` exists is
  finished and skipped when the sweep is run again; ``--parallel K`` runs K trials at a time;
- the end is a summary table sorted by the sweep's ``metric`` (``summary.md`` in the sweep folder).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from experiments.config import ConfigError
from lightning_vrn.atomic import write_text
from lightning_vrn.cli import run_command

ARGS_PLACEHOLDER = "${args_no_hyphens}"


@dataclass(frozen=True)
class Trial:
    """One trial: its ``key=value`` overrides and its stable id."""

    overrides: tuple[str, ...]

    @property
    def id(self) -> str:
        """``{first values joined}-{hash}``: readable and stable across runs of the sweep."""
        short = "-".join(item.split("=", 1)[1] for item in self.overrides)[:40].replace("/", "_")
        digest = hashlib.sha1("\n".join(self.overrides).encode()).hexdigest()[:6]
        return f"{short}-{digest}" if short else digest


def load_sweep(path: str | Path) -> dict:
    """The sweep file at ``path``, checked for what this runner needs."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist; shipped: "
                          f"{', '.join(p.name for p in sorted(Path('experiments/sweeps').glob('*.yaml')))}")
    try:
        sweep = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"sweep file {path} is not valid YAML ({' '.join(str(error).split())})") from None
    for key in ("method", "parameters", "command"):
        if not isinstance(sweep, dict) or key not in sweep:
            raise ConfigError(f"sweep file {path} has no '{key}': write it as for `wandb sweep`")
    if sweep["method"] not in ("grid", "random", "bayes"):
        raise ConfigError(f"sweep file {path}: method must be grid, random or bayes, got {sweep['method']!r}")
    if ARGS_PLACEHOLDER not in sweep["command"]:
        raise ConfigError(f"sweep file {path}: the command must end in {ARGS_PLACEHOLDER} (the trial's key=value)")
    return sweep


def base_command(sweep: dict, interpreter: str = sys.executable) -> list[str]:
    """The command before the trial's arguments, with ``${env}`` dropped and ``python`` as ``interpreter``."""
    words = [w for w in sweep["command"] if w not in ("${env}", ARGS_PLACEHOLDER)]
    return [interpreter if w in ("python", "python3", "${interpreter}") else w for w in words]


def train_config(sweep: dict, path: str | Path) -> str:
    """The experiment config the sweep's command trains (the word after ``--config``)."""
    words = list(sweep["command"])
    if "--config" not in words[:-1]:
        raise ConfigError(f"sweep file {path}: the command has no '--config CONFIG' (python -m experiments.train "
                          f"--config experiments/configs/NAME.yaml {ARGS_PLACEHOLDER})")
    return words[words.index("--config") + 1]


def sweep_folder(sweep: dict, path: str | Path, root: Path) -> Path:
    """``root/{name}``: the folder of the sweep's trials (``name`` from the file, else its stem)."""
    return Path(root) / (sweep.get("name") or Path(path).stem)


def _draw(spec: dict, rng: np.random.Generator):
    """One value of a parameter spec: ``value``, ``values`` or a distribution."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return spec["values"][int(rng.integers(len(spec["values"])))]
    kind = spec.get("distribution", "uniform")
    low, high = spec["min"], spec["max"]
    if kind == "int_uniform":
        return int(rng.integers(low, high + 1))
    if kind == "log_uniform_values":
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    if kind == "uniform":
        return float(rng.uniform(low, high))
    raise ConfigError(f"distribution {kind!r} is not supported here (uniform, log_uniform_values, int_uniform)")


def expand(sweep: dict, max_trials: int | None = None, seed: int = 0) -> list[Trial]:
    """The sweep's trials: every combination for ``grid``, ``max_trials`` draws for ``random``/``bayes``."""
    names = sorted(sweep["parameters"])
    specs = [sweep["parameters"][name] for name in names]
    if sweep["method"] == "grid":
        choices = []
        for name, spec in zip(names, specs):
            if "value" not in spec and "values" not in spec:
                raise ConfigError(f"grid sweep parameter {name} needs 'values' (or 'value'), not a distribution")
            choices.append([spec["value"]] if "value" in spec else list(spec["values"]))
        trials = [Trial(tuple(f"{n}={_text(v)}" for n, v in zip(names, combo))) for combo in itertools.product(*choices)]
        return trials[:max_trials] if max_trials else trials
    count = max_trials or int(sweep.get("run_cap", 10))
    rng = np.random.default_rng(seed)
    return [Trial(tuple(f"{n}={_text(_draw(s, rng))}" for n, s in zip(names, specs))) for _ in range(count)]


def _text(value) -> str:
    """A value as an override writes it (floats to 6 significant digits)."""
    return f"{value:.6g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)


def trial_command(sweep: dict, trial: Trial, run_dir: Path, extra: list[str],
                  interpreter: str = sys.executable) -> list[str]:
    """``python -m experiments.train --config ... extra... overrides... run_dir=...`` for one trial."""
    return [*base_command(sweep, interpreter), *extra, *trial.overrides, f"run_dir={run_dir}"]


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def trial_environment(parallel: int) -> dict[str, str]:
    """This environment with the CPU cores shared among ``parallel`` trials: ``OMP_NUM_THREADS`` (torch's
    intra-op threads) = cores // parallel, at least 1, unless already set. Without it each trial takes
    every core and ``parallel`` trials oversubscribe them."""
    threads = str(max(1, (os.cpu_count() or 1) // parallel))
    return {**{name: threads for name in THREAD_VARIABLES}, **os.environ}


def run_sweep(path: str | Path, max_trials: int | None = None, parallel: int = 1, extra: list[str] = (),
              root: Path = Path("runs/sweeps"), seed: int = 0) -> list[dict]:
    """Run (or finish) the sweep's trials; returns one summary row per trial, sorted by the metric."""
    sweep = load_sweep(path)
    folder = sweep_folder(sweep, path, root)
    name = folder.name
    trials = expand(sweep, max_trials, seed)
    pending = [t for t in trials if not (folder / t.id / "metrics.json").is_file()]
    print(f"[sweep {name}] {len(trials)} trials, {len(trials) - len(pending)} finished before, "
          f"{len(pending)} to run, {parallel} at a time", file=sys.stderr, flush=True)
    running: list[tuple[Trial, subprocess.Popen]] = []
    failed = []
    for trial in pending + [None] * parallel:  # the Nones drain the last running trials
        while len(running) >= parallel or (trial is None and running):
            for item in list(running):
                if item[1].poll() is not None:
                    running.remove(item)
                    if item[1].returncode:
                        failed.append(item[0].id)
                    print(f"[sweep {name}] trial {item[0].id} exit {item[1].returncode}", file=sys.stderr, flush=True)
            if trial is None and not running:
                break
            time.sleep(0.2)
        if trial is not None:
            (folder / trial.id).mkdir(parents=True, exist_ok=True)
            log = open(folder / trial.id / "sweep.log", "w")
            command = trial_command(sweep, trial, folder / trial.id, list(extra))
            running.append((trial, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                    env=trial_environment(parallel))))
    rows = summary_rows(sweep, trials, folder)
    write_text(folder / "summary.md", summary_table(sweep, rows) + "\n")
    print(summary_table(sweep, rows))
    if failed:
        raise RuntimeError(f"{len(failed)} trial(s) failed: {failed}; their logs are in {folder}/TRIAL/sweep.log")
    return rows


def summary_rows(sweep: dict, trials: list[Trial], folder: Path) -> list[dict]:
    """Each trial's overrides and metric, best first (trials without the metric last)."""
    metric = sweep.get("metric", {}).get("name", "val/loss")
    maximise = sweep.get("metric", {}).get("goal", "minimize") == "maximize"
    rows = []
    for trial in trials:
        path = folder / trial.id / "metrics.json"
        value = json.loads(path.read_text()).get(metric) if path.is_file() else None
        rows.append({"trial": trial.id, "overrides": " ".join(trial.overrides), metric: value})
    known = sorted((r for r in rows if r[metric] is not None), key=lambda r: r[metric], reverse=maximise)
    return known + [r for r in rows if r[metric] is None]


def summary_table(sweep: dict, rows: list[dict]) -> str:
    metric = sweep.get("metric", {}).get("name", "val/loss")
    lines = [f"| rank | trial | overrides | {metric} |", "|---|---|---|---|"]
    for rank, row in enumerate(rows, 1):
        value = "-" if row[metric] is None else f"{row[metric]:.6g}"
        lines.append(f"| {rank} | {row['trial']} | {row['overrides']} | {value} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="a sweep file, e.g. experiments/sweeps/ablations.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value for every trial, e.g. data.dir=demo/data")
    parser.add_argument("--max-trials", type=int, default=None)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random draws")
    parser.add_argument("--root", type=Path, default=Path("runs/sweeps"))
    parser.add_argument("--dry-run", action="store_true", help="print the trials' commands and stop")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may come before or after --options
    if args.parallel < 1 or (args.max_trials is not None and args.max_trials < 1):
        raise ConfigError("--parallel and --max-trials must be at least 1")
    if args.dry_run:
        sweep = load_sweep(args.sweep)
        folder = sweep_folder(sweep, args.sweep, args.root)
        for trial in expand(sweep, args.max_trials, args.seed):
            print(" ".join(trial_command(sweep, trial, folder / trial.id, args.overrides)))
        return 0
    run_sweep(args.sweep, args.max_trials, args.parallel, args.overrides, args.root, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
