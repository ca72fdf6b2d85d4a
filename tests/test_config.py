"""Experiment configs: composition over the base, overrides, and errors for keys that do not exist."""

from dataclasses import dataclass
from pathlib import Path

import pytest
import pytorch_lightning as pl
from omegaconf import OmegaConf

from datamodules.datamodule import DataSettings, split_path
from experiments.config import CONFIG_DIR, ConfigError, ExperimentSettings, flat_keys, load_config, save_config
from lightning_vrn.callbacks import NMESettings
from lightning_vrn.models import MODELS, VRN, NetSettings, OptimSettings, VolumeSettings, register

SHIPPED = sorted(p for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith("compare_"))  # experiments


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_config_composes_with_all_base_keys(path):
    cfg = load_config(path)
    assert split_path(cfg.data, "train") == f"{cfg.data.dir}/train.h5"  # a null split follows data.dir
    assert isinstance(cfg, ExperimentSettings) and not hasattr(cfg, "extends")


def test_quickstart_is_a_diff_over_base():
    cfg = load_config(CONFIG_DIR / "quickstart.yaml")
    assert cfg.grid == "100,96,96"
    assert cfg.model.net.features == 64
    assert cfg.model.net.stacks == load_config(CONFIG_DIR / "base.yaml").model.net.stacks  # inherited


def test_override_changes_the_resolved_config():
    cfg = load_config(CONFIG_DIR / "quickstart.yaml", ["trainer.max_epochs=3", "data.dir=/tmp/x", "model.optim.lr=0.5"])
    assert cfg.trainer.max_epochs == 3
    assert split_path(cfg.data, "val") == "/tmp/x/val.h5"
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
    assert OmegaConf.to_container(OmegaConf.load(tmp_path / "config.yaml")) == cfg.to_dict()
    assert load_config(tmp_path / "config.yaml") == cfg


@dataclass
class ToySettings(VolumeSettings):
    heatmap_weight: float = 1.0


@pytest.fixture
def toy_variant():
    """A registered variant with a setting of its own, removed again after the test."""

    @register("toy_multitask")
    class ToyMultitask(VRN):
        Settings = ToySettings

    yield ToyMultitask
    MODELS.pop("toy_multitask")


def test_a_variant_config_carries_its_own_keys(toy_variant, tmp_path):
    (tmp_path / "base.yaml").write_text((CONFIG_DIR / "base.yaml").read_text())
    child = tmp_path / "toy.yaml"
    child.write_text("extends: base.yaml\nmodel:\n  name: toy_multitask\n  heatmap_weight: 0.5\n")
    cfg = load_config(child)
    assert cfg.model.heatmap_weight == 0.5
    assert cfg.model.net.features == 256  # the variant inherits the volume settings' defaults
    with pytest.raises(ConfigError, match=r"model\.heatmap_wieght.*did you mean model\.heatmap_weight"):
        load_config(child, ["model.heatmap_wieght=2"])
    # The base VRN has no such key: the variant's key is its own.
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.heatmap_weight'"):
        load_config(CONFIG_DIR / "base.yaml", ["model.heatmap_weight=2"])


@pytest.mark.parametrize("override", [
    "model.optim.weight_decay=0.01", "trainer.num_nodes=2", "trainer.accumulate_grad_batches=4",
    "trainer.check_val_every_n_epoch=2", "trainer.sync_batchnorm=true", "data.pin_memory=false",
    "nme.icp_distance_ratio=0.2", "trainer.devices=2", "trainer.precision=bf16-mixed", "checkpoint.monitor=val/nme",
])
def test_keys_the_code_accepts_are_accepted(override):
    key, value = override.split("=")
    cfg = load_config(CONFIG_DIR / "quickstart.yaml", [override])
    assert str(flat_keys(cfg.to_dict())[key]).lower() == value
    if key.startswith("trainer."):  # and Lightning takes it
        trainer = pl.Trainer(**cfg.trainer, logger=False, enable_checkpointing=False)
        assert str(getattr(trainer, key.split(".")[1], value)).lower().startswith(value.split("-")[0])


@pytest.mark.parametrize("override, expected", [
    ("data.batch_size=abc", r"'data\.batch_size'.* must be int, got 'abc'"),
    ("data.batch_size=2.5", r"'data\.batch_size'.* must be int, got 2\.5"),
    ("model.optim.lr=abc", r"'model\.optim\.lr'.* must be float, got 'abc'"),
    ("trainer.max_epochs=abc", r"'trainer\.max_epochs'.* must be int or null, got 'abc'"),
    ("trainer.precision=17", r"'trainer\.precision'.* must be"),
    ("model.target_frame=sideways", r"'model\.target_frame'.* must be 'aligned' or 'frontal'"),
    ("model.name=vnr", r"'model\.name'.*'vnr'.*valid models: (\w+, )*vrn\b"),
])
def test_wrong_values_name_the_key_and_the_expected_type(override, expected):
    with pytest.raises(ConfigError, match=expected) as error:
        load_config(CONFIG_DIR / "quickstart.yaml", [override])
    assert "command-line overrides" in str(error.value) or "model.name" in override


def test_every_default_comes_from_the_settings_dataclasses():
    cfg = load_config(CONFIG_DIR / "base.yaml")
    assert cfg.data.batch_size == DataSettings().batch_size
    assert cfg.model.optim.lr == OptimSettings().lr and cfg.model.net.features == NetSettings().features
    assert cfg.nme.every_n_epochs == NMESettings().every_n_epochs
    assert cfg.run_dir is None  # each run gets its own directory


@pytest.mark.parametrize("name", ["compare_quickstart", "compare_paper"])
def test_the_shipped_comparisons_load_and_name_real_models(name):
    from experiments.compare import load_compare_settings
    from experiments.compare.settings import RealPhotos

    settings = load_compare_settings(CONFIG_DIR / f"{name}.yaml")
    for method in [*settings.methods, *settings.detectors]:  # every training config composes
        cfg = load_config(CONFIG_DIR / settings.train_config, settings.training_overrides(method) + settings.overrides)
        assert cfg.model.name == (settings.detectors | settings.methods)[method].split()[0]
    assert settings.reference in settings.methods and set(settings.guidance) <= set(settings.methods)
    assert settings.real_photos == RealPhotos("../shared/data/aflw2000_val", "../shared/data/bfm_meta")


def test_the_paper_comparison_extends_the_quickstarts_methods_and_changes_only_sizes():
    from experiments.compare import load_compare_settings

    quickstart, paper = (load_compare_settings(CONFIG_DIR / f"compare_{n}.yaml") for n in ("quickstart", "paper"))
    assert paper.methods == quickstart.methods and paper.detectors == quickstart.detectors
    assert paper.guidance == quickstart.guidance and paper.reference == quickstart.reference
    assert (paper.data.grid, paper.train_config, paper.overrides) == ("200,192,192", "paper.yaml",
                                                                      ["nme.every_n_epochs=0"])


@pytest.mark.parametrize("section, entry, message", [
    ("methods", "VRN: vrm", r"methods.VRN is 'vrm'; write a registered variant"),
    ("methods", "VRN: vrn model.sigma_px", "key=value"),
    ("methods", "VRN: vrn lr=3", r"the training of 'VRN' would fail: unknown config key 'lr'"),
    ("methods", "VRN: vrn model.sigma_px=2", r"the training of 'VRN' would fail: unknown config key 'model\.sigma_px'"),
    ("detectors", "detector: vrn", r"detectors.detector is 'vrn', which predicts no landmarks"),
    ("methods", "detector: vrn", r"\['detector'\] named both a detector and a method"),
    ("guidance", "VRN: detector", r"guidance names 'VRN' \('vrn'\), which takes no landmark maps"),
    ("methods", "VRN: vrn model.net.stacks=1", None),
])
def test_a_compare_entry_that_cannot_train_is_refused_before_anything_runs(tmp_path, section, entry, message):
    from experiments.compare import load_compare_settings

    (tmp_path / "compare_quickstart.yaml").write_text((CONFIG_DIR / "compare_quickstart.yaml").read_text())
    (tmp_path / "mine.yaml").write_text(f"extends: compare_quickstart.yaml\n{section}:\n  {entry}\n")
    if message is None:  # a well-formed entry loads
        settings = load_compare_settings(tmp_path / "mine.yaml")
        assert settings.training_overrides("VRN") == ["model.name=vrn", "model.net.stacks=1"]
        return
    with pytest.raises(ConfigError, match=message):
        load_compare_settings(tmp_path / "mine.yaml")


def test_a_bad_real_photos_setting_is_refused_naming_the_key(tmp_path):
    from experiments.compare import load_compare_settings

    (tmp_path / "compare_quickstart.yaml").write_text((CONFIG_DIR / "compare_quickstart.yaml").read_text())
    mine = tmp_path / "mine.yaml"
    refusals = {"real_photos:\n  rot: photos\n": r"unknown config key 'real_photos\.rot' in .*mine\.yaml; did you mean "
                                                  r"real_photos\.root",
                "real_photos: photos\n": r"config key 'real_photos' in .*mine\.yaml must be a section of settings",
                "real_photos:\n  root: [a, b]\n": r"config key 'real_photos\.root' in .*mine\.yaml must be str or null",
                f"real_photos:\n  root: {tmp_path}\n  bfm: {tmp_path / 'no-bfm'}\n":
                    f"real_photos.bfm {tmp_path / 'no-bfm'} does not exist"}
    for text, message in refusals.items():
        mine.write_text(f"extends: compare_quickstart.yaml\n{text}")
        with pytest.raises(ConfigError, match=message):
            load_compare_settings(mine)
    mine.write_text("extends: compare_quickstart.yaml\n")
    assert load_compare_settings(mine, ["real_photos.root=null"]).real_photos.root is None  # left out
    assert load_compare_settings(mine, [f"real_photos.root={tmp_path / 'absent'}"]).real_photos.root == \
        str(tmp_path / "absent")  # an absent folder is skipped when the comparison runs, not refused


def test_a_variants_preset_comes_under_the_config_files_and_the_overrides(tmp_path):
    cfg = load_config(CONFIG_DIR / "quickstart.yaml", ["model.name=vrn_multitask"])
    assert (cfg.model.sigma_px, cfg.model.foreground_weight) == (1.0, 100)  # the preset's
    assert cfg.model.net.features == 64  # the quickstart's, over the preset
    assert load_config(CONFIG_DIR / "quickstart.yaml", ["model.name=vrn_multitask", "model.foreground_weight=0"]
                       ).model.foreground_weight == 0  # an override, over both
    (tmp_path / "base.yaml").write_text((CONFIG_DIR / "base.yaml").read_text())
    child = tmp_path / "detector.yaml"
    child.write_text("extends: base.yaml\nmodel:\n  name: landmark_hourglass\n  foreground_weight: 5\n")
    cfg = load_config(child)
    assert cfg.model.foreground_weight == 5 and cfg.checkpoint.monitor == "val/landmark_nme"  # file, then preset
    assert load_config(CONFIG_DIR / "base.yaml").checkpoint.monitor == "val/loss"  # VRN's preset sets none


def test_a_preset_that_sets_more_than_its_variant_or_a_bad_value_is_refused_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr("experiments.config.PRESET_DIR", tmp_path)
    (tmp_path / "vrn.yaml").write_text("model:\n  name: vrn\ngrid: 100,96,96\n")
    with pytest.raises(ConfigError, match=rf"preset {tmp_path / 'vrn.yaml'} may set only model, checkpoint"):
        load_config(CONFIG_DIR / "base.yaml")
    (tmp_path / "vrn.yaml").write_text("model:\n  name: vrn_guided\n")
    with pytest.raises(ConfigError, match="model.name only to 'vrn'"):
        load_config(CONFIG_DIR / "base.yaml")
    (tmp_path / "vrn.yaml").write_text("model:\n  name: vrn\n  optim:\n    lr: fast\n")
    with pytest.raises(ConfigError, match=rf"'model\.optim\.lr' in {tmp_path / 'vrn.yaml'} must be float"):
        load_config(CONFIG_DIR / "base.yaml")


def test_a_model_without_a_preset_trains_with_its_class_defaults(toy_variant):
    cfg = load_config(CONFIG_DIR / "base.yaml", ["model.name=toy_multitask"])
    assert cfg.model == ToySettings(name="toy_multitask")
