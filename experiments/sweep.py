"""Run a W&B sweep file locally, without a W&B server: ``python -m experiments.sweep SWEEP.yaml [--max-trials N] [--parallel K]``.

The sweep files in ``experiments/sweeps/`` are written for ``wandb sweep`` / ``wandb agent``: their
``command`` ends in ``${args_no_hyphens}``, so every trial is ``python -m experiments.train --config
CONFIG a.b=c ...``. This runner reads the same files for offline clusters and tests:

- ``method: grid`` expands every combination of the parameters' ``values``; ``random`` (and
  ``bayes``, which needs the W&B server's model: run here as random) draws ``--max-trials`` trials
  from ``values`` or ``distribution`` (``uniform``, ``log_uniform_values``, ``int_uniform`` with
  ``min``/``max``), seeded by ``--seed``;
- each trial runs in its own run directory, ``runs/sweeps/{sweep}/{trial}``, as ``python -m
  experiments.train`` (``sys.executable``); ``--parallel K`` runs K trials at a time. The trial id is
  its first values and a hash of the config it trains, as loaded from the config file, the command's
  and the command line's ``key=value`` and its own overrides, so another config, override or network
  gives another folder;
- the end is a summary table sorted by the sweep's ``metric`` (``summary.md`` in the sweep folder).

Reused: a trial whose ``metrics.json`` exists is finished and skipped when the sweep is run again;
finished trials made with other settings stay in the sweep folder and are said to be not reused; an
interrupted trial resumes from its ``last.ckpt``. Locked: the sweep folder, by ``sweep.lock``, so a
second runner on the same sweep stops at once (exit 3) naming the first; each trial's output is
appended to its ``sweep.log`` after a line per attempt. Refused before any trial runs (one line naming
the key, exit 2): a ``command`` other than the suite's training (a sweep file is code, like a script),
a parameter spec that cannot be drawn from (empty ``values``, a distribution without ``min``/``max``),
a ``name`` that would leave ``--root``, a trial that is not a valid config, and a ``metric.name`` that a
finished trial's ``metrics.json`` lacks (checked again as each trial finishes: no further trial starts,
and ``summary.md`` is left as it was). SIGTERM or Ctrl-C is passed on to the running trials; once they
have saved their checkpoints and stopped, the runner names them and the command that resumes them, and
exits 143 (130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import yaml

from experiments.config import ConfigError, ExperimentSettings, load_config
from experiments.runs import RunLock, config_hash
from lightning_vrn.atomic import write_text
from lightning_vrn.cli import run_command

ARGS_PLACEHOLDER = "${args_no_hyphens}"
INTERPRETERS = ("python", "python3", "${interpreter}")
TRAIN_COMMAND = f"[${{env}},] python -m experiments.train --config CONFIG [key=value ...] {ARGS_PLACEHOLDER}"
OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=")
DISTRIBUTIONS = ("uniform", "log_uniform_values", "int_uniform")
SWEEP_LOCK = "sweep.lock"


@dataclass(frozen=True)
class Trial:
    """One trial: its ``key=value`` overrides and the config it trains, as loaded (``run_dir`` unset)."""

    overrides: tuple[str, ...]
    cfg: ExperimentSettings = field(compare=False, repr=False)

    @cached_property
    def id(self) -> str:
        """``{first values joined}-{hash of the config}``: stable across runs of the same sweep, another for
        another config file, command, override or parameter."""
        values = "-".join(item.split("=", 1)[1] for item in self.overrides)[:40]
        short = re.sub(r"[^A-Za-z0-9._+-]", "_", values)  # a folder name: no separators, quotes or control characters
        return f"{short}-{config_hash(self.cfg)}" if short else config_hash(self.cfg)


class SweepStopped(RuntimeError):
    """The sweep was stopped by a signal once its running trials had stopped; ``exit_code`` is 128 + the signal."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_code = 128 + signal_number


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
    if not isinstance(sweep["parameters"], dict):
        raise ConfigError(f"sweep file {path}: parameters must map config keys to {{values: [...]}}, {{value: ...}} "
                          f"or a distribution")
    for name, spec in sweep["parameters"].items():
        _check_parameter(spec, f"sweep file {path}: parameters.{name}", sweep["method"] == "grid")
    metric = sweep.get("metric", {})
    if not isinstance(metric, dict) or not isinstance(metric.get("name", ""), str) or \
            metric.get("goal", "minimize") not in ("minimize", "maximize"):
        raise ConfigError(f"sweep file {path}: metric must be {{name: METRIC, goal: minimize or maximize}}, "
                          f"got {metric!r}")
    _check_command(sweep, path)
    return sweep


def _check_parameter(spec, where: str, grid: bool) -> None:
    """A ConfigError naming the parameter unless ``spec`` is a ``value``, non-empty ``values`` or (not in a
    grid) a supported distribution with numbers ``min`` <= ``max`` (> 0 for a log distribution)."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be {{value: X}}, {{values: [X, ...]}} or {{distribution: NAME, min: A, "
                          f"max: B}}, got {spec!r}")
    if "value" in spec:
        return
    if "values" in spec:
        if not isinstance(spec["values"], list) or not spec["values"]:
            raise ConfigError(f"{where}.values must be a non-empty list, got {spec['values']!r}: list the values "
                              f"to try, or give one as value: X")
        return
    if grid:
        raise ConfigError(f"{where}: a grid sweep needs 'values' (or 'value'), not a distribution")
    kind = spec.get("distribution", "uniform")
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{where}.distribution {kind!r} is not supported here: use one of "
                          f"{', '.join(DISTRIBUTIONS)}, or values")
    number = int if kind == "int_uniform" else (int, float)
    for bound in ("min", "max"):
        value = spec.get(bound)
        if not isinstance(value, number) or isinstance(value, bool):
            hint = " (YAML reads 1e-4 as text: write 1.0e-4)" if isinstance(value, str) else ""
            raise ConfigError(f"{where}: distribution {kind} needs '{bound}', "
                              f"{'an integer' if number is int else 'a number'}, got {value!r}{hint}")
    if spec["min"] > spec["max"]:
        raise ConfigError(f"{where}: min {spec['min']} is above max {spec['max']}; swap them")
    if kind == "log_uniform_values" and spec["min"] <= 0:
        raise ConfigError(f"{where}: log_uniform_values needs min > 0, got {spec['min']}")


def _check_command(sweep: dict, path: str | Path) -> None:
    """A ConfigError naming the first word of the sweep's ``command`` that is not the suite's training,
    :data:`TRAIN_COMMAND`: this runner runs nothing else."""
    words = sweep["command"]
    if not isinstance(words, list) or not words or words[-1] != ARGS_PLACEHOLDER:
        raise ConfigError(f"sweep file {path}: the command must end in {ARGS_PLACEHOLDER} (the trial's key=value)")
    body = words[1:] if words[0] == "${env}" else words  # then CONFIG at body[4], key=value up to the last
    shape = (INTERPRETERS, ("-m",), ("experiments.train",), ("--config",))
    refused = [word for word, allowed in zip(body[:-1], shape) if word not in allowed]
    refused += [word for word in body[5:-1] if not (isinstance(word, str) and OVERRIDE.match(word))]
    if refused:
        raise ConfigError(f"sweep file {path}: the command's {refused[0]!r} is refused: the local runner runs only "
                          f"the suite's training, {TRAIN_COMMAND} (a sweep file is code, like a script)")
    train_config(sweep, path)


def base_command(sweep: dict, interpreter: str = sys.executable) -> list[str]:
    """The command before the trial's arguments, with ``${env}`` dropped and ``python`` as ``interpreter``."""
    words = [w for w in sweep["command"] if w not in ("${env}", ARGS_PLACEHOLDER)]
    return [interpreter if w in INTERPRETERS else w for w in words]


def train_config(sweep: dict, path: str | Path) -> str:
    """The experiment config the sweep's command trains (the word after ``--config``)."""
    words = list(sweep["command"])
    if "--config" not in words[:-2]:
        raise ConfigError(f"sweep file {path}: the command has no '--config CONFIG' (python -m experiments.train "
                          f"--config experiments/configs/NAME.yaml {ARGS_PLACEHOLDER})")
    return words[words.index("--config") + 1]


def sweep_folder(sweep: dict, path: str | Path, root: Path) -> Path:
    """``root/{name}``: the folder of the sweep's trials (``name`` from the file, else its stem), which must be
    one plain folder name, so that nothing is written outside ``root``."""
    name = str(sweep.get("name") or Path(path).stem)
    if name in (".", "..") or any(character in name for character in "/\\\0"):
        raise ConfigError(f"sweep file {path}: name {name!r} must be a plain folder name (no '/', '..' or absolute "
                          f"path): the trials go to {root}/NAME; choose another name or --root")
    return Path(root) / name


def _draw(spec: dict, rng: np.random.Generator):
    """One value of a checked parameter spec: ``value``, ``values`` or a distribution."""
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
    return float(rng.uniform(low, high))


def expand(sweep: dict, max_trials: int | None = None, seed: int = 0) -> list[tuple[str, ...]]:
    """The ``key=value`` overrides of each trial: every combination for ``grid``, ``max_trials`` draws for
    ``random``/``bayes``."""
    names = sorted(sweep["parameters"])
    specs = [sweep["parameters"][name] for name in names]
    if sweep["method"] == "grid":
        choices = [[spec["value"]] if "value" in spec else list(spec["values"]) for spec in specs]
        trials = [tuple(f"{n}={_text(v)}" for n, v in zip(names, combo)) for combo in itertools.product(*choices)]
        return trials[:max_trials] if max_trials else trials
    count = max_trials or int(sweep.get("run_cap", 10))
    rng = np.random.default_rng(seed)
    return [tuple(f"{n}={_text(_draw(s, rng))}" for n, s in zip(names, specs)) for _ in range(count)]


def resolve_trials(sweep: dict, path: str | Path, extra: list[str] = (), max_trials: int | None = None,
                   seed: int = 0) -> list[Trial]:
    """The sweep's trials, each with the config it trains (the config file, the command's ``key=value``,
    ``extra``, its overrides), once each. A trial that is not a valid config is a ConfigError naming it
    and the key, before any trial runs."""
    config, fixed = train_config(sweep, path), base_command(sweep)[5:]
    trials: dict[str, Trial] = {}
    for index, overrides in enumerate(expand(sweep, max_trials, seed)):
        try:
            cfg = load_config(config, [*fixed, *extra, *overrides, "run_dir=null"])
        except ConfigError as error:
            raise ConfigError(f"sweep {path}, trial {index} ({' '.join(overrides)}): {error}") from None
        trial = Trial(overrides, cfg)
        trials.setdefault(trial.id, trial)  # random draws may repeat a trial
    return list(trials.values())


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


def launch_trial(command: list[str], run_dir: Path, parallel: int) -> subprocess.Popen:
    """Start one trial's ``command``, its output appended to ``run_dir/sweep.log`` after a line for the attempt."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "sweep.log", "a") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} sweep runner {os.getpid()}: {shlex.join(command)}\n")
        log.flush()
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=trial_environment(parallel))


def run_sweep(path: str | Path, max_trials: int | None = None, parallel: int = 1, extra: list[str] = (),
              root: Path = Path("runs/sweeps"), seed: int = 0) -> list[dict]:
    """Run (or finish) the sweep's trials, holding the sweep folder's lock; returns one summary row per trial,
    sorted by the metric."""
    sweep = load_sweep(path)
    folder = sweep_folder(sweep, path, root)
    name = folder.name
    trials = resolve_trials(sweep, path, list(extra), max_trials, seed)
    rerun = shlex.join([sys.executable, "-m", "experiments.sweep", str(path), *extra, "--root", str(root),
                        "--parallel", str(parallel), "--seed", str(seed),
                        *(["--max-trials", str(max_trials)] if max_trials else [])])
    with RunLock(folder, rerun, name=SWEEP_LOCK, fix="run this sweep into another --root") as lock:
        for note in lock.notes:
            print(f"[sweep {name}] {note}", file=sys.stderr, flush=True)
        finished = [t for t in trials if (folder / t.id / "metrics.json").is_file()]
        check_metric(sweep, path, finished, folder)
        ids = {t.id for t in trials}
        others = [p for p in folder.glob("*/metrics.json") if p.parent.name not in ids]
        if others:
            print(f"[sweep {name}] {len(others)} finished trial(s) in {folder} made with other settings (or beyond "
                  f"--max-trials) are kept and not reused", file=sys.stderr, flush=True)
        pending = [t for t in trials if t not in finished]
        print(f"[sweep {name}] {len(trials)} trials, {len(finished)} finished before, {len(pending)} to run, "
              f"{parallel} at a time", file=sys.stderr, flush=True)
        failed = _run_trials(sweep, path, pending, folder, list(extra), parallel, rerun)
        rows = summary_rows(sweep, trials, folder)
        write_text(folder / "summary.md", summary_table(sweep, rows) + "\n")
    print(summary_table(sweep, rows))
    if failed:
        raise RuntimeError(f"{len(failed)} trial(s) failed: {failed}; their logs are in {folder}/TRIAL/sweep.log")
    return rows


def _run_trials(sweep: dict, path: str | Path, pending: list[Trial], folder: Path, extra: list[str], parallel: int,
                rerun: str) -> list[str]:
    """Run ``pending``, ``parallel`` at a time; the ids of the trials that failed. SIGTERM or SIGINT is passed
    on to the running trials and stops the launching; once they have stopped, :class:`SweepStopped` names
    them and ``rerun``, the command that resumes them. The first finished trial without the sweep's metric
    stops the launching too; once the running trials end, :func:`check_metric`'s error is raised. Any other
    error stops the running trials before it is raised: none is left training as an orphan."""
    received: list[int] = []
    previous = {number: signal.signal(number, lambda signum, frame: received.append(signum))
                for number in (signal.SIGTERM, signal.SIGINT)}
    queue, running, stopped, failed, wrong_metric = list(pending), [], [], [], None
    try:
        while running or (queue and not received and wrong_metric is None):
            for trial, process in running:
                if received and trial not in stopped:
                    print(f"[sweep {folder.name}] {signal.Signals(received[0]).name}: stopping trial {trial.id}, "
                          f"waiting for its checkpoint", file=sys.stderr, flush=True)
                    process.send_signal(received[0])
                    stopped.append(trial)
            for item in [item for item in running if item[1].poll() is not None]:
                running.remove(item)
                if item[1].returncode:
                    failed.append(item[0].id)
                elif wrong_metric is None:
                    try:
                        check_metric(sweep, path, [item[0]], folder)
                    except ConfigError as error:
                        wrong_metric = error
                print(f"[sweep {folder.name}] trial {item[0].id} exit {item[1].returncode}", file=sys.stderr,
                      flush=True)
            if queue and not received and wrong_metric is None and len(running) < parallel:
                trial = queue.pop(0)
                command = trial_command(sweep, trial, folder / trial.id, extra)
                running.append((trial, launch_trial(command, folder / trial.id, parallel)))
            else:
                time.sleep(0.2)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for _, process in running:  # only after an error: the loop ends with none running
            process.terminate()
            process.wait()
    if wrong_metric is not None:
        raise ConfigError(f"{wrong_metric}; {len(queue)} trial(s) not started"
                          + (f"; failed trials (logs in {folder}/TRIAL/sweep.log): {failed}" if failed else ""))
    if received:
        interrupted = []
        for trial in stopped:
            last = folder / trial.id / "checkpoints" / "last.ckpt"
            if not (folder / trial.id / "metrics.json").is_file():
                interrupted.append(f"{trial.id} ({last} saved)" if last.is_file() else
                                   f"{trial.id} (no checkpoint written yet)")
        raise SweepStopped(f"sweep {folder.name} stopped by {signal.Signals(received[0]).name}; interrupted trials: "
                           f"{', '.join(interrupted) or 'none'}; {len(queue)} not started; rerun {rerun} to resume "
                           f"them and run the rest", received[0])
    return failed


def _metric(sweep: dict) -> tuple[str, bool]:
    """The sweep's metric name and whether it is maximised."""
    metric = sweep.get("metric", {})
    return metric.get("name", "val/loss"), metric.get("goal", "minimize") == "maximize"


def check_metric(sweep: dict, path: str | Path, finished: list[Trial], folder: Path) -> None:
    """A ConfigError naming ``metric.name`` when a finished trial's ``metrics.json`` lacks it (a misspelt name),
    with the metrics the trial has."""
    metric, _ = _metric(sweep)
    for trial in finished:
        try:
            metrics = json.loads((folder / trial.id / "metrics.json").read_text())
        except ValueError as error:
            raise ConfigError(f"{folder / trial.id / 'metrics.json'} is damaged ({error}): delete it and rerun the "
                              f"sweep to test that trial again") from None
        if metric not in metrics:
            names = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
            raise ConfigError(f"sweep file {path}: metric.name {metric!r} is not a metric of the finished trial "
                              f"{trial.id}, which has {', '.join(names)}; fix metric.name")


def summary_rows(sweep: dict, trials: list[Trial], folder: Path) -> list[dict]:
    """Each trial's overrides and metric, best first (trials without the metric last)."""
    metric, maximise = _metric(sweep)
    rows = []
    for trial in trials:
        path = folder / trial.id / "metrics.json"
        value = json.loads(path.read_text()).get(metric) if path.is_file() else None
        rows.append({"trial": trial.id, "overrides": " ".join(trial.overrides), metric: value})
    known = sorted((r for r in rows if r[metric] is not None), key=lambda r: r[metric], reverse=maximise)
    return known + [r for r in rows if r[metric] is None]


def summary_table(sweep: dict, rows: list[dict]) -> str:
    metric, _ = _metric(sweep)
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
        for trial in resolve_trials(sweep, args.sweep, args.overrides, args.max_trials, args.seed):
            print(" ".join(trial_command(sweep, trial, folder / trial.id, args.overrides)))
        return 0
    run_sweep(args.sweep, args.max_trials, args.parallel, args.overrides, args.root, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
