"""Experiment configs: YAML files composed as small diffs over a base, plus ``key=value`` overrides.

A config file may name the file it extends with ``extends: other.yaml`` (relative to itself);
the chain is merged base-first, then the command-line dotlist overrides (what W&B's
``${args_no_hyphens}`` produces) are merged on top. Every key must already exist in the base:
a misspelt key is an error that suggests the nearest valid one.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from lightning_vrn.atomic import write_text

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which and how to fix it."""


def _load_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[DictConfig]:
    """The YAML at ``path`` preceded by every file it (transitively) extends."""
    path = path.resolve()
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"config file {path} does not exist; configs shipped: {available}")
    if path in seen:
        raise ConfigError(f"config {path} extends itself through {[str(p) for p in seen]}")
    node = OmegaConf.load(path)
    parent = node.pop("extends", None)
    chain = _load_chain(path.parent / parent, seen + (path,)) if parent else []
    return chain + [node]


def _all_keys(tree: dict, prefix: str = "") -> list[str]:
    """Every dotted key of a nested dict, e.g. ``["data", "data.batch_size", ...]``."""
    keys = []
    for key, value in tree.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, dict):
            keys += _all_keys(value, f"{prefix}{key}.")
    return keys


def _merge_strict(base: DictConfig, update: DictConfig, source: str) -> DictConfig:
    """Merge ``update`` into ``base``; keys absent from ``base`` raise a ConfigError naming ``source``."""
    OmegaConf.set_struct(base, True)
    try:
        return OmegaConf.merge(base, update)
    except (ConfigAttributeError, ConfigKeyError) as error:
        key = getattr(error, "full_key", None) or str(error)
        close = difflib.get_close_matches(str(key), _all_keys(OmegaConf.to_container(base)), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see experiments/configs/base.yaml for valid keys"
        raise ConfigError(f"unknown config key '{key}' in {source}{hint}") from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose the config at ``path`` (with its ``extends`` chain) and apply ``a.b=c`` overrides."""
    chain = _load_chain(Path(path))
    cfg = chain[0]
    for node in chain[1:]:
        cfg = _merge_strict(cfg, node, str(path))
    bad = [item for item in overrides if "=" not in item]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad}")
    cfg = _merge_strict(cfg, OmegaConf.from_dotlist(list(overrides)), "command-line overrides")
    OmegaConf.set_struct(cfg, True)
    try:
        OmegaConf.resolve(cfg)
    except Exception as error:  # interpolation errors name the key already
        raise ConfigError(f"cannot resolve config {path}: {error}") from None
    return cfg


def save_config(cfg: DictConfig, path: Path) -> None:
    """Write the resolved config as YAML atomically."""
    write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
