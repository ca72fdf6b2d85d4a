"""Experiment configs: YAML files composed as small diffs over a base, plus ``key=value`` overrides.

A config file may name the file it extends with ``extends: other.yaml`` (relative to itself); the
chain is merged base-first, then the command-line dotlist overrides (what W&B's
``${args_no_hyphens}`` produces) are merged on top. The result is checked against the settings
dataclasses of the components, which are the one source of every default:

- top level (``name``, ``seed``, ``run_dir``, ``resume``, ``grid``): :class:`ExperimentSettings`;
- ``data``: :class:`datamodules.DataSettings` (with ``augment``: :class:`datamodules.AugmentSettings`);
- ``model``: the ``Settings`` of the model registered under ``model.name``, so a variant's config
  carries the variant's own keys (and only those);
- ``nme``: :class:`lightning_vrn.callbacks.NMESettings`; ``checkpoint``: :class:`CheckpointSettings`;
  ``logger``: :class:`LoggerSettings`;
- ``trainer``: any argument of ``pytorch_lightning.Trainer`` (its own signature is the schema).

A misspelt key is an error that names the nearest valid one; a value of the wrong type names the key
and the type. The returned config is complete: every default is filled in, so the ``config.yaml``
saved with a run says everything. ``python -m experiments.config CONFIG [key=value ...]`` prints it.
"""

from __future__ import annotations

import inspect
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import pytorch_lightning as pl
import yaml
from omegaconf import DictConfig, OmegaConf

from datamodules.datamodule import DataSettings
from lightning_vrn.atomic import write_text
from lightning_vrn.callbacks import CheckpointSettings, NMESettings
from lightning_vrn.cli import run_command
from lightning_vrn.models import MODELS
from lightning_vrn.settings import SettingsError, check_value, parse_settings, settings_dict, unknown_key_error

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which and how to fix it."""


@dataclass
class LoggerSettings:
    """Weights & Biases logging (CSV metrics are always written). ``group``: null means the model's
    name, so a dashboard puts variants side by side; ``job_type``: train or eval. The run is offline
    (synced later with ``wandb sync``) unless ``WANDB_API_KEY`` is set or ``WANDB_MODE`` says otherwise.
    ``media_samples``: samples whose reconstruction (point cloud) and volume slices are logged on each NME
    epoch (0: only the error curve); ``log_checkpoints``: upload ``best.ckpt`` and ``last.ckpt`` as W&B
    artifacts at the end of training, online only (offline they would only copy the run's files)."""

    wandb: bool = False
    project: str = "lightning-vrn"
    entity: Optional[str] = None
    group: Optional[str] = None
    job_type: str = "train"
    tags: list = field(default_factory=list)
    media_samples: int = 4
    log_checkpoints: bool = True

    def __post_init__(self):
        if self.media_samples < 0:
            raise ValueError(f"logger.media_samples must be >= 0 (0: no reconstructions), got {self.media_samples}")


@dataclass
class ExperimentSettings:
    """A whole experiment. ``run_dir``: null gives every run its own ``runs/{name}/{time}-{hash}``; a path
    means exactly that directory (resumed from its ``last.ckpt`` when ``resume`` is true). ``resume``:
    true, false (start over), or a run directory or checkpoint to continue. ``grid``: ``D,H,W``."""

    name: str = "vrn"
    seed: int = 0
    run_dir: Optional[str] = None
    resume: Union[bool, str] = True
    grid: str = "200,192,192"
    data: DataSettings = field(default_factory=DataSettings)
    model: dict = field(default_factory=lambda: {"name": "vrn"})
    trainer: dict = field(default_factory=dict)
    nme: NMESettings = field(default_factory=NMESettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    logger: LoggerSettings = field(default_factory=LoggerSettings)


def _load_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, DictConfig]]:
    """``(file name, YAML)`` of the file at ``path`` preceded by every file it (transitively) extends."""
    path = path.resolve()
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"config file {path} does not exist; configs shipped: {available}")
    if path in seen:
        raise ConfigError(f"config {path} extends itself through {[str(p) for p in seen]}")
    node = _read_yaml(path)
    parent = node.pop("extends", None)
    chain = _load_chain(path.parent / parent, seen + (path,)) if parent else []
    return chain + [(str(path), node)]


def _read_yaml(path: Path) -> DictConfig:
    """The YAML mapping at ``path``; a syntax error names the line and column, an empty file says so."""
    try:
        node = OmegaConf.load(path)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "an unknown place"
        raise ConfigError(f"config file {path} has a YAML syntax error at {where}: {error.problem}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {path} is not valid YAML ({' '.join(str(error).split())})") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"config file {path} holds a list, not a mapping of config keys")
    if not node:
        raise ConfigError(f"config file {path} is empty; write at least `extends: base.yaml` (see experiments/configs)")
    return node


def _trainer_arguments() -> dict[str, Any]:
    """``pytorch_lightning.Trainer`` argument names and their annotations (``Any`` where unresolvable)."""
    try:
        hints = typing.get_type_hints(pl.Trainer.__init__)
    except Exception:  # an annotation this Python cannot resolve: check names only
        hints = {}
    names = [name for name in inspect.signature(pl.Trainer).parameters if name != "self"]
    return {name: hints.get(name, Any) for name in names}


OWNED_TRAINER_ARGUMENTS = {
    "default_root_dir": "run_dir", "logger": "logger.wandb", "callbacks": "checkpoint.* and nme.*",
    "enable_checkpointing": "checkpoint.*",
}
"""Trainer arguments experiments.train sets itself, and the config keys that control them instead."""


def _check_trainer(values: dict, where: str) -> dict:
    """``values`` if every key is a Trainer argument the config may set and every simple-typed value has its type."""
    arguments = _trainer_arguments()
    for key, value in values.items():
        if key in OWNED_TRAINER_ARGUMENTS:
            raise SettingsError(f"config key 'trainer.{key}' in {where} is set by experiments.train; use "
                                f"{OWNED_TRAINER_ARGUMENTS[key]} instead", key=f"trainer.{key}")
        if key not in arguments:
            raise unknown_key_error(f"trainer.{key}", [f"trainer.{name}" for name in arguments], where)
        if value is not None:
            check_value(value, arguments[key], f"trainer.{key}", where)
    return values


def validate(container: dict, where: str) -> dict:
    """The complete, checked config (plain dicts) from a composed one; raises :class:`SettingsError`."""
    container = dict(container)
    model = dict(container.pop("model", None) or {})
    trainer = dict(container.pop("trainer", None) or {})
    settings = parse_settings(ExperimentSettings, container, where=where)
    name = model.pop("name", "vrn")
    if name not in MODELS:
        raise SettingsError(f"config key 'model.name' in {where} is {name!r}, not a registered model; "
                            f"valid models: {', '.join(sorted(MODELS))}", key="model.name")
    model_settings = parse_settings(MODELS[name].Settings, model, prefix="model.", where=where)
    resolved = settings_dict(settings)
    resolved["model"] = {"name": name, **settings_dict(model_settings)}
    resolved["trainer"] = _check_trainer(trainer, where)
    return resolved


def _source_of(key: str, sources: list[tuple[str, DictConfig]]) -> str:
    """The last of the sources that sets the dotted ``key`` (for messages)."""
    for name, node in reversed(sources):
        if OmegaConf.select(node, key, default="__absent__") != "__absent__":
            return name
    return " or ".join(name for name, _ in sources)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose the config at ``path`` (with its ``extends`` chain), apply ``a.b=c`` overrides, check and complete it."""
    sources = _load_chain(Path(path))
    bad = [item for item in overrides if "=" not in item]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad}")
    if overrides:
        sources.append(("command-line overrides", OmegaConf.from_dotlist(list(overrides))))
    merged = OmegaConf.merge(*(node for _, node in sources))
    try:
        container = OmegaConf.to_container(merged, resolve=True)
    except Exception as error:  # interpolation errors name the key already
        raise ConfigError(f"cannot resolve config {path}: {error}") from None
    try:
        resolved = validate(container, "the config")
    except SettingsError as error:
        raise ConfigError(str(error).replace("in the config", f"in {_source_of(error.key, sources)}", 1)) from None
    cfg = OmegaConf.create(resolved)
    OmegaConf.set_struct(cfg, True)
    return cfg


def flat_keys(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flat_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def save_config(cfg: DictConfig, path: Path) -> None:
    """Write the resolved config as YAML atomically."""
    write_text(path, OmegaConf.to_yaml(cfg, resolve=True))


def main(argv: list[str] | None = None) -> int:
    """Print the complete config that ``experiments.train`` would run with."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        raise ConfigError("usage: python -m experiments.config CONFIG.yaml [key=value ...]")
    print(OmegaConf.to_yaml(load_config(argv[0], argv[1:])), end="")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
