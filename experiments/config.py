"""Experiment configs: a variant's preset, YAML files composed as small diffs over a base, and ``key=value`` overrides.

Three layers, each over the one before (OmegaConf loads and merges them):

1. the preset of the variant that ``model.name`` names, ``experiments/configs/variants/NAME.yaml``: what this
   suite trains under that name (its sigma, foreground weight, target frame, how its best checkpoint is
   chosen), so that ``train``, the sweeps and ``compare`` train the same model under one name;
2. the config file and the files it extends (``extends: other.yaml``, relative to itself), base first: the
   size and schedule of an experiment (quickstart, paper);
3. the command-line dotlist overrides (what W&B's ``${args_no_hyphens}`` produces).

The result is checked against the settings dataclasses of the components, the one source of every
default, and returned as the typed :class:`ExperimentSettings`:

- top level (``name``, ``seed``, ``run_dir``, ``resume``, ``grid``): :class:`ExperimentSettings`;
- ``data``: :class:`datamodules.datamodule.DataSettings` (with ``augment``: :class:`datamodules.AugmentSettings`);
- ``model``: the ``Settings`` of the model registered under ``model.name``, so a variant's config
  carries the variant's own keys (and only those);
- ``nme``: :class:`lightning_vrn.callbacks.NMESettings`; ``checkpoint``: :class:`CheckpointSettings`;
  ``logger``: :class:`LoggerSettings`;
- ``trainer``: any argument of ``pytorch_lightning.Trainer`` (its own signature is the schema).

The check is :func:`lightning_vrn.settings.parse_settings`, not OmegaConf's structured configs, because it
names the nearest valid key for a misspelt one, takes ``Literal`` and ``Union`` fields, and runs where
OmegaConf is not installed (the GPU machine) on checkpoints' settings. A value of the wrong type names the
key and the type. The returned config is complete: every default is filled in, so the ``config.yaml``
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
from pytorch_lightning.utilities.parsing import AttributeDict

from datamodules.datamodule import DataSettings
from lightning_vrn.atomic import write_text
from lightning_vrn.callbacks import CheckpointSettings, NMESettings
from lightning_vrn.cli import run_command
from lightning_vrn.geometry.grid import PAPER_GRID
from lightning_vrn.models import DEFAULT_MODEL, MODELS, ModelSettings, VolumeRegressionModule
from lightning_vrn.settings import SettingsError, check_value, parse_settings, settings_dict, unknown_key_error

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PRESET_DIR = CONFIG_DIR / "variants"
PRESET_KEYS = ("model", "checkpoint")
"""What a variant's preset may set: the model's settings and how its best checkpoint is chosen."""


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
    true, false (start over), or a run directory or checkpoint to continue. ``grid``: ``D,H,W``. ``model``: the
    settings dataclass of the variant ``model.name`` names. ``nme``: for a model that predicts no volume (a
    landmark detector) ``nme.every_n_epochs`` is 0 whatever the files say, as nothing could be scored."""

    name: str = DEFAULT_MODEL
    seed: int = 0
    run_dir: Optional[str] = None
    resume: Union[bool, str] = True
    grid: str = PAPER_GRID.spec
    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=lambda: MODELS[DEFAULT_MODEL].Settings(name=DEFAULT_MODEL))
    trainer: AttributeDict = field(default_factory=AttributeDict)
    nme: NMESettings = field(default_factory=NMESettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    logger: LoggerSettings = field(default_factory=LoggerSettings)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain nested values (what ``config.yaml`` holds)."""
        return settings_dict(self)

    def to_yaml(self) -> str:
        """The config as YAML, keys in field order (``config.yaml``; its hash names run folders and trials)."""
        return OmegaConf.to_yaml(OmegaConf.create(self.to_dict()))


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


def validate(container: Mapping[str, Any], where: str) -> ExperimentSettings:
    """The complete, checked config from a composed one (plain values); raises :class:`SettingsError`."""
    container = dict(container)
    model = dict(container.pop("model", None) or {})
    trainer = dict(container.pop("trainer", None) or {})
    settings = parse_settings(ExperimentSettings, container, where=where)
    name = _model_name(model.get("name"), where)
    settings.model = parse_settings(MODELS[name].Settings, {**model, "name": name}, prefix="model.", where=where)
    settings.trainer = AttributeDict(_check_trainer(trainer, where))
    if not issubclass(MODELS[name], VolumeRegressionModule):  # no volume to score: config.yaml says no NME ran
        settings.nme.every_n_epochs = 0
    return settings


def _model_name(name: Any, where: str) -> str:
    """``model.name`` checked against the registry (null: the default model)."""
    name = DEFAULT_MODEL if name is None else name
    if name not in MODELS:
        raise SettingsError(f"config key 'model.name' in {where} is {name!r}, not a registered model; "
                            f"valid models: {', '.join(sorted(MODELS))}", key="model.name")
    return name


def preset_path(name: str) -> Path:
    """Where the preset of the variant registered as ``name`` lives."""
    return PRESET_DIR / f"{name}.yaml"


def _preset(sources: list[tuple[str, DictConfig]]) -> list[tuple[str, DictConfig]]:
    """The preset of the variant the composed ``sources`` name (none when the variant has no preset file)."""
    merged = OmegaConf.merge(*(node for _, node in sources))
    name = OmegaConf.select(merged, "model.name", default=None) or DEFAULT_MODEL
    path = preset_path(name) if isinstance(name, str) and name in MODELS else None
    if path is None or not path.is_file():
        return []
    node = _read_yaml(path)
    extra = sorted(set(node) - set(PRESET_KEYS))
    if extra or OmegaConf.select(node, "model.name", default=name) != name:
        raise ConfigError(f"preset {path} may set only {', '.join(PRESET_KEYS)}, and model.name only to {name!r} "
                          f"(it sets {extra or 'model.name=' + str(OmegaConf.select(node, 'model.name'))}): "
                          f"put experiment sizes in a config file (docs/variants.md)")
    return [(str(path), node)]


def _source_of(key: str, sources: list[tuple[str, DictConfig]]) -> str:
    """The last of the sources that sets the dotted ``key`` (for messages)."""
    for name, node in reversed(sources):
        if OmegaConf.select(node, key, default="__absent__") != "__absent__":
            return name
    return " or ".join(name for name, _ in sources)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentSettings:
    """Compose the variant's preset, the config at ``path`` (with its ``extends`` chain) and ``a.b=c`` overrides;
    check and complete the result."""
    return load_settings(ExperimentSettings, path, overrides, build=validate, with_preset=True)


def load_settings(schema: type, path: str | Path, overrides: Sequence[str] = (), build=None,
                  with_preset: bool = False):
    """An instance of the settings dataclass ``schema`` from the YAML file at ``path`` (with its ``extends`` chain,
    and under the variant's preset when ``with_preset``) and ``a.b=c`` overrides. ``build(values, where)``
    makes it (default: :func:`parse_settings`); an error names the file or the overrides that set the key."""
    sources = _load_chain(Path(path))
    bad = [item for item in overrides if "=" not in item]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad}")
    if overrides:
        sources.append(("command-line overrides", OmegaConf.from_dotlist(list(overrides))))
    if with_preset:
        sources = _preset(sources) + sources
    merged = OmegaConf.merge(*(node for _, node in sources))
    try:
        container = OmegaConf.to_container(merged, resolve=True)
    except Exception as error:  # interpolation errors name the key already
        raise ConfigError(f"cannot resolve config {path}: {error}") from None
    try:
        if build is None:
            return parse_settings(schema, container, where="the config")
        return build(container, "the config")
    except SettingsError as error:
        raise ConfigError(str(error).replace("in the config", f"in {_source_of(error.key, sources)}", 1)) from None


def flat_keys(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flat_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def save_config(cfg: ExperimentSettings, path: Path) -> None:
    """Write the resolved config as YAML atomically."""
    write_text(path, cfg.to_yaml())


def main(argv: list[str] | None = None) -> int:
    """Print the complete config that ``experiments.train`` would run with."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        raise ConfigError("usage: python -m experiments.config CONFIG.yaml [key=value ...]")
    print(load_config(argv[0], argv[1:]).to_yaml(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
