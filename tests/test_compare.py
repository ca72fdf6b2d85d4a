"""The comparison command end to end on tiny runs: every table and figure, and a rerun that reuses everything."""

import csv

import pytest
from PIL import Image

from experiments import compare

METHODS = ["VRN", "VRN-Multitask", "VRN-Guided (ground-truth landmarks)", "VRN (no alignment)",
           "VRN-Guided (sigma 2) (ground-truth landmarks)", "VRN-Guided (detected landmarks)",
           "VRN-Guided (sigma 2) (detected landmarks)", "3DMM fit to detected landmarks", "mean training volume",
           "mean shape at GT pose (oracle)"]


@pytest.fixture(scope="module")
def tiny_comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    config = out / "compare_tiny.yaml"
    config.write_text(f"""
name: compare-tiny
out: {out}
data: {{dir: {out / 'data'}, grid: "100,96,96", train: 8, val: 2, test: 5, seed: 0, workers: 1}}
train_config: quickstart.yaml
overrides: [trainer.max_epochs=1, nme.every_n_epochs=0, data.num_workers=0, data.batch_size=2,
            model.net.features=16, model.net.hourglass_depth=2]
detectors:
  detector: [model.name=landmark_hourglass, model.net.stacks=1]
  detector sigma 2: [model.name=landmark_hourglass, model.net.stacks=1, model.sigma=2.0]
methods:
  VRN: [model.name=vrn, model.net.stacks=1]
  VRN-Multitask: [model.name=vrn_multitask]
  VRN-Guided: [model.name=vrn_guided, model.net.stacks=1]
  VRN (no alignment): [model.name=vrn_no_alignment, model.net.stacks=1]
  VRN-Guided (sigma 2): [model.name=vrn_guided_sigma2, model.net.stacks=1]
guidance: {{VRN-Guided: detector, VRN-Guided (sigma 2): detector sigma 2}}
fit_detector: detector
reference: VRN
batch_size: 5
bootstrap_resamples: 200
""")
    settings = compare.load_compare_settings(config)
    rows = compare.run_compare(settings)
    return out, settings, rows


@pytest.mark.slow
def test_compare_writes_every_table_and_figure(tiny_comparison):
    out, settings, rows = tiny_comparison
    assert list(rows) == METHODS
    with open(out / "table.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [row["method"] for row in table] == METHODS
    for row in table:
        assert float(row["nme_low"]) <= float(row["nme_mean"]) <= float(row["nme_high"])
        assert int(row["num_samples"]) == 5
    assert table[0]["difference"] == ""  # the reference
    assert all(row["difference"] != "" for row in table[1:])
    assert float(next(r for r in table if r["method"] == "VRN-Multitask")["landmark_nme_balanced"]) > 0
    markdown = (out / "table.md").read_text()
    assert all(f"| {name} |" in markdown for name in METHODS) and "[95% CI]" in markdown
    for figure in ("ced.png", "nme_vs_yaw.png", "nme_per_expression.png"):
        with Image.open(out / figure) as image:
            assert image.size[0] > 300 and image.size[1] > 200


@pytest.mark.slow
def test_a_rerun_reuses_every_run_and_report(tiny_comparison, capsys):
    out, settings, rows = tiny_comparison
    before = {path: path.stat().st_mtime_ns for path in (out / "runs").rglob("*.ckpt")}
    again = compare.run_compare(settings)
    assert {path: path.stat().st_mtime_ns for path in (out / "runs").rglob("*.ckpt")} == before
    assert {name: row["nme"].estimate for name, row in again.items()} == \
        {name: row["nme"].estimate for name, row in rows.items()}
    assert "trained VRN" in capsys.readouterr().err  # the progress lines
