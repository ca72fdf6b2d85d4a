"""docs/variants.md's worked example, done for real: its model module and preset, and nothing else, added to a
copy of the repository; the new variant then trains for one step through `train`, a sweep and `compare --runs`."""

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.paths import REPO

PACKAGES = ("lightning_vrn", "datamodules", "experiments", "data_prep")
NAME = "vrn_two_layer_head"
TINY = ["data.num_workers=0", "data.batch_size=2", "model.net.features=16", "model.net.hourglass_depth=2",
        "trainer.max_steps=1", "trainer.max_epochs=1", "trainer.enable_progress_bar=false"]


def example_files() -> dict[str, str]:
    """The fenced blocks of docs/variants.md whose first line is a comment naming a file: path -> text."""
    text = (REPO / "docs" / "variants.md").read_text()
    files = {}
    for block in re.findall(r"```(?:python|yaml)\n(.*?)```", text, flags=re.S):
        first, _, rest = block.partition("\n")
        if first.startswith("# ") and first[2:].endswith((".py", ".yaml")):
            files[first[2:]] = rest
    return files


def run(copy: Path, *arguments: str) -> None:
    result = subprocess.run([sys.executable, "-m", *arguments], cwd=copy, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{arguments[0]} failed:\n{result.stderr[-3000:]}"


def test_the_worked_example_touches_two_files_and_trains_through_train_a_sweep_and_compare(tiny_synthetic, tmp_path):
    files = example_files()
    assert set(files) == {f"lightning_vrn/models/{NAME}.py", f"experiments/configs/variants/{NAME}.yaml"}
    copy = tmp_path / "repo"
    for package in PACKAGES:
        shutil.copytree(REPO / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    for path, text in files.items():
        assert not (copy / path).exists()
        (copy / path).write_text(text)

    data = f"data.dir={tiny_synthetic}"
    run(copy, "experiments.train", "--config", "experiments/configs/quickstart.yaml", f"model.name={NAME}", data,
        "run_dir=runs/single", *TINY)
    sweep = {"name": "heads", "method": "grid", "metric": {"name": "test/nme", "goal": "minimize"},
             "parameters": {"model.name": {"values": [NAME]}, "seed": {"values": [0, 1]}},
             "command": ["${env}", "python", "-m", "experiments.train", "--config",
                         "experiments/configs/quickstart.yaml", "${args_no_hyphens}"]}
    (copy / "heads.yaml").write_text(yaml.safe_dump(sweep))
    run(copy, "experiments.sweep", "heads.yaml", data, *TINY)
    run(copy, "experiments.compare", "--runs", "runs/single", "runs/sweeps/heads", "--out", "report")

    config = yaml.safe_load((copy / "runs/single/config.yaml").read_text())
    assert config["model"]["name"] == NAME and config["model"]["head_features"] == 64  # the preset's value
    checkpoint = __import__("torch").load(copy / "runs/single/checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 1 and checkpoint["lightning_vrn"]["variant"] == NAME
    assert checkpoint["state_dict"]["net.head.layers.0.weight"].shape == (64, 16, 3, 3)  # its own head
    trials = sorted((copy / "runs/sweeps/heads").glob(f"{NAME}-*/metrics.json"))
    assert len(trials) == 2 and all(json.loads(t.read_text())["test/nme"] > 0 for t in trials)
    rows = list(csv.DictReader((copy / "report" / "table.csv").open()))
    assert [(row["method"], row["num_runs"]) for row in rows] == [(NAME, "3")]  # its three runs: 1 + 2 seeds
    assert float(rows[0]["nme_mean"]) > 0 and int(rows[0]["num_samples"]) == 4
