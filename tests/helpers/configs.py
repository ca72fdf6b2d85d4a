"""Experiment configs for small test runs: a preset on a data folder with no loader workers and batches of 2,
and the overrides that make its network tiny."""

from experiments.config import CONFIG_DIR, load_config

TINY_NET = ["model.net.features=16", "model.net.hourglass_depth=2", "model.net.stacks=1"]


def preset_config(name, data_dir, run_dir, *overrides):
    """``experiments/configs/<name>.yaml`` on ``data_dir``, writing to ``run_dir``, then ``overrides``."""
    return load_config(
        CONFIG_DIR / f"{name}.yaml",
        [f"data.dir={data_dir}", f"run_dir={run_dir}", "data.num_workers=0", "data.batch_size=2", *overrides],
    )
