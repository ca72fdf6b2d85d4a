"""Experiment configs: composition over the base, overrides, and errors for keys that do not exist."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from experiments.config import CONFIG_DIR, ConfigError, load_config, save_config

SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_config_composes_with_all_base_keys(path):
    cfg = load_config(path)
    assert cfg.data.train == f"{cfg.data.dir}/train.h5"  # interpolations resolved
    assert "extends" not in cfg


def test_quickstart_is_a_diff_over_base():
    cfg = load_config(CONFIG_DIR / "quickstart.yaml")
    assert cfg.grid == "100,96,96"
    assert cfg.model.net.features == 64
    assert cfg.model.net.stacks == load_config(CONFIG_DIR / "base.yaml").model.net.stacks  # inherited


def test_override_changes_the_resolved_config():
    cfg = load_config(CONFIG_DIR / "quickstart.yaml", ["trainer.max_epochs=3", "data.dir=/tmp/x", "model.optim.lr=0.5"])
    assert cfg.trainer.max_epochs == 3
    assert cfg.data.val == "/tmp/x/val.h5"
    assert cfg.model.optim.lr == 0.5


def test_unknown_override_key_names_it_and_suggests_the_nearest():
    with pytest.raises(ConfigError, match=r"model\.net\.featurs.*did you mean model\.net\.features"):
        load_config(CONFIG_DIR / "quickstart.yaml", ["model.net.featurs=3"])


def test_unknown_key_in_a_config_file_is_an_error(tmp_path):
    (tmp_path / "base.yaml").write_text((CONFIG_DIR / "base.yaml").read_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: base.yaml\ntrainer:\n  max_epoch: 3\n")
    with pytest.raises(ConfigError, match="trainer.max_epoch"):
        load_config(bad)


def test_missing_config_file_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="quickstart"):
        load_config(Path("experiments/configs/nope.yaml"))


def test_malformed_override_is_an_error():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(CONFIG_DIR / "base.yaml", ["trainer.max_epochs"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(CONFIG_DIR / "quickstart.yaml", ["seed=7"])
    save_config(cfg, tmp_path / "config.yaml")
    assert OmegaConf.load(tmp_path / "config.yaml") == cfg
