"""Run directories: where a run goes, the lock that keeps it to one training, and the record of each attempt.

- :func:`resolve_run`: a new ``runs/{name}/{time}-{hash}`` directory unless the config names one
  (``run_dir=PATH``) or a run to continue (``resume=PATH``); docs/configs.md has the table.
- :class:`RunLock`: ``run_dir/run.lock`` holds the process id, host and command of the training that
  owns the directory. A second training into it stops at once naming the holder; a lock whose
  process is gone (same host) is taken over with a note. :func:`lock_holder` says who holds a run
  directory, if anyone (``compare --runs`` leaves out a run still training).
- :func:`record_attempt`: each attempt's resolved config and command line go to
  ``attempts/NNN/``; the run's ``config.yaml`` and ``command.txt`` are the first attempt's and are
  never overwritten. Written only after the config, the data and any checkpoint to resume from
  have been checked, so a failed attempt leaves nothing out of step.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

from omegaconf import OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from experiments.config import ConfigError, ExperimentSettings, flat_keys, save_config
from lightning_vrn.atomic import open_mode, write_text

RUN_DIR_ENV = "LIGHTNING_VRN_RUN_DIR"
"""Set by the first process to the run directory it chose, so that DDP processes it launches use the same one."""
LOCK_NAME = "run.lock"


class RunLockedError(RuntimeError):
    """Another live training holds the run directory."""


def config_hash(cfg: ExperimentSettings) -> str:
    """Six hex digits identifying a resolved config."""
    return hashlib.sha1(cfg.to_yaml().encode()).hexdigest()[:6]


def new_run_dir(cfg: ExperimentSettings, root: Path = Path("runs")) -> Path:
    """A fresh ``root/{name}/{YYYYmmdd-HHMMSS}-{hash}`` directory (``-2``, ``-3``... if taken), created."""
    stem = root / cfg.name / f"{datetime.now():%Y%m%d-%H%M%S}-{config_hash(cfg)}"
    for attempt in range(1, 1000):
        path = stem if attempt == 1 else stem.with_name(f"{stem.name}-{attempt}")
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new run directory beside {stem}")


def resolve_run(cfg: ExperimentSettings) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint to resume from (None: start fresh), as the config asks.

    ``resume=PATH`` (a run directory or a checkpoint file) continues that run; an explicit ``run_dir``
    is used as it is (resumed from its ``last.ckpt`` when ``resume`` is true and one exists); neither
    gives a new directory.
    """
    if isinstance(cfg.resume, str):
        target = Path(cfg.resume)
        checkpoint = target / "checkpoints" / "last.ckpt" if target.is_dir() else target
        if not checkpoint.is_file():
            raise ConfigError(f"resume={cfg.resume}: no checkpoint at {checkpoint}; name a run directory holding "
                              f"checkpoints/last.ckpt or a .ckpt file")
        owner = run_dir_of(checkpoint)
        if owner is None:  # a checkpoint from elsewhere (a download): continue it in a run directory of our own
            return (Path(cfg.run_dir) if cfg.run_dir else _new_run_dir_once(cfg)), checkpoint
        if cfg.run_dir and Path(cfg.run_dir).resolve() != owner.resolve():
            raise ConfigError(f"resume={cfg.resume} belongs to run directory {owner}, but run_dir={cfg.run_dir}; "
                              f"set only one of them")
        return owner, checkpoint
    if cfg.run_dir:
        run_dir = Path(cfg.run_dir)
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"run_dir={run_dir} is an existing file, not a directory; choose another run_dir")
        last = run_dir / "checkpoints" / "last.ckpt"
        return run_dir, last if cfg.resume and last.is_file() else None
    return _new_run_dir_once(cfg), None


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint belongs to (``RUN/checkpoints/NAME.ckpt`` with ``RUN/config.yaml``), else None."""
    folder = checkpoint.resolve().parent
    if folder.name == "checkpoints" and (folder.parent / "config.yaml").is_file():
        return folder.parent
    return None


def _new_run_dir_once(cfg: ExperimentSettings) -> Path:
    """A new run directory, made by the first process; DDP processes it launches get the same one."""
    if rank_zero_only.rank > 0:
        if not os.environ.get(RUN_DIR_ENV):
            raise ConfigError("processes started outside Lightning (torchrun, srun) cannot agree on a new run "
                              "directory: set run_dir=PATH explicitly")
        return Path(os.environ[RUN_DIR_ENV])
    run_dir = new_run_dir(cfg)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    return run_dir


class OutputDirError(OSError):
    """An output folder that cannot be written (an existing file, no permission, a read-only disk)."""


def check_writable(directory: Path, what: str = "run_dir") -> None:
    """Create ``directory`` and write and delete a probe file in it; an :class:`OutputDirError` names it and ``what`` to change."""
    for parent in (directory, *directory.parents):
        if parent.exists() and not parent.is_dir():
            raise OutputDirError(f"output folder {directory} cannot be created: {parent} is an existing file; "
                                 f"choose another {what}")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-probe-"):
            pass
    except OSError as error:
        raise OutputDirError(f"cannot write into {directory} ({error.strerror or error}); choose a writable "
                             f"{what} or fix the folder's permissions") from None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RunLock:
    """Exclusive ownership of a folder by one process: a run directory by its training (rank 0), held from
    validation to the end, or a sweep folder by its runner (``name="sweep.lock"``, ``fix``: what else to do).

    ``acquire()`` creates the lock file with its record (process id, host, start, command) whole, atomically.
    If it exists and its process is alive, or lives on another host (which cannot be checked from here),
    :class:`RunLockedError` names the holder; a dead process's lock on this host, or an unreadable one, is
    stale and taken over, with a note in :attr:`notes`.
    """

    def __init__(self, run_dir: Path, command: str = "", name: str = LOCK_NAME,
                 fix: str = "train into another run_dir"):
        self.path = Path(run_dir) / name
        self.command = command
        self.fix = fix
        self.notes: list[str] = []
        self._held = False

    def _holder(self) -> dict[str, Any]:
        """The lock's record; ``{}`` when there is none or it is empty or damaged. A lock this user may not read
        (another user's) raises PermissionError: it is held, not stale."""
        try:
            holder = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def acquire(self) -> "RunLock":
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": self.command}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                self._create(record)
            except FileExistsError:
                holder = self._holder()
                pid, host = holder.get("pid"), holder.get("host")
                if self.stale(holder):
                    if self._remove_stale(pid):
                        self.notes.append(f"took over the stale lock of process {pid} on {host} (it is no longer "
                                          f"running), started {holder.get('started')}" if pid is not None else
                                          f"took over the unreadable lock {self.path} (left by a write that failed, "
                                          f"e.g. on a full disk)")
                    continue
                raise RunLockedError(
                    f"{self.path.parent} is in use by process {pid} on host {host} (since {holder.get('started')}: "
                    f"{holder.get('command') or 'no command recorded'}); wait for it, stop it, or {self.fix}. If "
                    f"that process is gone, delete {self.path}"
                ) from None
            self._held = True
            return self
        raise RunLockedError(f"could not take the lock {self.path}: another process took it at the same time")

    def _create(self, record: dict[str, Any]) -> None:
        """Create the lock file holding ``record``, whole or not at all: the record is written to a temporary file
        that is then hard-linked to the lock's name (FileExistsError when taken). A write that fails (a full
        disk) leaves no lock behind and names the folder."""
        try:
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, prefix=f".{self.path.name}.") as handle:
                json.dump(record, handle)
                handle.flush()
                os.fchmod(handle.fileno(), open_mode())  # readable by others' trainings and compare
                os.link(handle.name, self.path)
        except FileExistsError:
            raise
        except OSError as error:
            raise OutputDirError(f"cannot write the lock {self.path} ({error.strerror or error}); free disk space or "
                                 f"fix the folder's permissions, then rerun") from None

    @staticmethod
    def stale(holder: dict[str, Any]) -> bool:
        """Whether a lock record holds nothing: unreadable (a write that failed), or its process is gone from this
        host. A process on another host cannot be checked and is taken as alive."""
        pid = holder.get("pid")
        if not isinstance(pid, int):
            return True
        return holder.get("host") == socket.gethostname() and not _process_alive(pid)

    def _remove_stale(self, stale_pid: int) -> bool:
        """Move the stale lock of ``stale_pid`` aside, atomically: of two processes taking it over at once,
        one moves it and the other finds it gone. A lock that turns out to be another's (taken over
        between our read and the move) is put back. True when this process removed the stale lock."""
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False  # another process moved it first
        try:
            moved_pid = json.loads(aside.read_text()).get("pid")
        except (OSError, ValueError):
            moved_pid = None
        if moved_pid != stale_pid:
            try:
                os.link(aside, self.path)  # put the live lock back, unless yet another one appeared
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)
        return moved_pid == stale_pid

    def release(self) -> None:
        if self._held and self._holder().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self._held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_holder(run_dir: Path) -> dict[str, Any] | None:
    """The ``run.lock`` record (pid, host, started, command) of the training that holds ``run_dir``, None when
    none does: no lock, or a stale one (:meth:`RunLock.stale`). A holder on another host counts as holding it."""
    holder = RunLock(run_dir)._holder()  # {} when there is no lock, which is stale
    return None if RunLock.stale(holder) else holder


@rank_zero_only
def record_attempt(cfg: ExperimentSettings, run_dir: Path, command: str) -> Path:
    """Write this attempt's config and command to ``run_dir/attempts/NNN/``; the first attempt's also to the run's top.

    Returns the attempt's folder. Nothing already written is replaced.
    """
    attempts = run_dir / "attempts"
    attempts.mkdir(parents=True, exist_ok=True)
    number = 1 + max((int(p.name) for p in attempts.iterdir() if p.name.isdigit()), default=0)
    folder = attempts / f"{number:03d}"
    folder.mkdir()
    save_config(cfg, folder / "config.yaml")
    write_text(folder / "command.txt", command + "\n")
    if not (run_dir / "config.yaml").exists():
        save_config(cfg, run_dir / "config.yaml")
        write_text(run_dir / "command.txt", command + "\n")
    return folder


def incompatible_settings(checkpoint_hparams: Mapping[str, Any], cfg_model: Mapping[str, Any], grid: Mapping[str, Any],
                          variant: str, checkpoint_variant: str) -> list[str]:
    """What in the config would not load the checkpoint's weights: the variant, the grid, the network shape."""
    differences = []
    if variant != checkpoint_variant:
        differences.append(f"model.name: checkpoint {checkpoint_variant!r}, config {variant!r}")
    if dict(checkpoint_hparams.get("grid", {})) != dict(grid):
        differences.append(f"grid: checkpoint {dict(checkpoint_hparams.get('grid', {}))}, config {dict(grid)}")
    for key in ("net", "target_frame"):
        if key in checkpoint_hparams and checkpoint_hparams[key] != cfg_model.get(key):
            differences.append(f"model.{key}: checkpoint {checkpoint_hparams[key]}, config {cfg_model.get(key)}")
    return differences


LEARNING_SETTINGS = ("seed", "grid", "data.batch_size", "data.augment.", "model.", "trainer.precision",
                     "trainer.accumulate_grad_batches", "trainer.gradient_clip_val", "trainer.gradient_clip_algorithm")
"""Config keys (``.``-ending: every key below) that decide what a run learns. A resumed run cannot take a new
value: the optimiser, its learning rate and schedule, the data order and the weights come from the checkpoint."""
RUNTIME_SETTINGS = ("data.augment.on_device", "model.channels_last", "model.compile", "model.fused_loss")
"""Keys under :data:`LEARNING_SETTINGS` that only say where or how fast it runs, so a resumed run may change them."""


def newest_attempt(run_dir: Path) -> Path | None:
    """The run's newest ``attempts/NNN`` folder (the last attempt that got past its checks), None before any."""
    attempts = [p for p in (run_dir / "attempts").glob("[0-9]*") if p.name.isdigit()]
    return max(attempts, key=lambda p: int(p.name)) if attempts else None


def config_path(run_dir: Path) -> Path:
    """The config the run in ``run_dir`` was last trained with, and its latest results come from: its newest
    attempt's ``config.yaml`` (a run may restart with resume=false), else (a run from before attempts were
    recorded) its ``config.yaml``."""
    attempt = newest_attempt(run_dir)
    return attempt / "config.yaml" if attempt is not None else run_dir / "config.yaml"


def trained_config(run_dir: Path) -> dict | None:
    """:func:`config_path`'s config as plain values, or None when the run has none."""
    path = config_path(run_dir)
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True) if path.is_file() else None


def finished_metrics(run_dir: Path) -> dict | None:
    """The run's ``metrics.json`` when its last attempt finished (its ``attempts/NNN/metrics.json`` exists; for a run
    recorded before attempts kept their metrics, the run's own), None when it did not or the file is damaged: an
    attempt killed in its test left an earlier attempt's results there."""
    attempt = newest_attempt(run_dir)
    has_own = attempt is not None and any((run_dir / "attempts").glob("*/metrics.json"))
    if has_own and not (attempt / "metrics.json").is_file():
        return None
    try:
        return json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None


def changed_learning_settings(trained: Mapping[str, Any], now: ExperimentSettings) -> list[str]:
    """``key: run V, now W`` for each learning setting (:data:`LEARNING_SETTINGS`) that ``trained`` (the config the
    run was trained with, as saved, or the part of it a checkpoint records) sets and the config ``now`` sets
    otherwise."""
    before, after = flat_keys(trained), flat_keys(now.to_dict())
    keys = set(before) | (set(after) if "trainer" in trained else set())  # a whole config: a key set on one side
    return [f"{key}: run {before.get(key)!r}, now {after.get(key)!r}" for key in sorted(keys)
            if key.startswith(LEARNING_SETTINGS) and not key.startswith(RUNTIME_SETTINGS)
            and before.get(key) != after.get(key)]


def training_finished(checkpoint_payload: Mapping[str, Any], trainer: Mapping[str, Any]) -> bool:
    """True when the checkpoint's training already reached a limit of ``trainer`` (a config's ``trainer``), as
    Lightning stops at the first: ``max_steps`` optimiser steps, or ``max_epochs`` whole epochs (Lightning's loop
    record; 1000 when neither is set, none when only ``max_steps`` is)."""
    max_steps = trainer.get("max_steps") or -1
    if 0 < max_steps <= checkpoint_payload.get("global_step", 0):
        return True
    max_epochs = trainer.get("max_epochs")
    max_epochs = (1000 if max_steps == -1 else -1) if max_epochs is None else max_epochs
    progress = checkpoint_payload.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    return 0 <= max_epochs <= progress.get("processed", 0)
