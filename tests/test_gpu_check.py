"""benchmarks.gpu_check: the --tiny run on the CPU with Open3D, OmegaConf and W&B unimportable (as on the
GPU machine) reports every phase with finite numbers, ends with the table of every result, and saves a
checkpoint that load_model reads; the time box and the phase deadlines."""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_check import DEFAULT_PHASES, PAPER, Context, PhaseTimeout, hard_limit
from lightning_vrn.geometry.grid import VoxelGrid
from lightning_vrn.models import load_model

REPO = Path(__file__).resolve().parents[1]
ABSENT_ON_GPU_MACHINE = ("open3d", "omegaconf", "wandb")
# A None entry in sys.modules makes `import name` raise ImportError.
RUN_WITHOUT = ("import runpy, sys\n"
               "for name in {names!r}:\n"
               "    sys.modules[name] = None\n"
               "runpy.run_module('benchmarks.gpu_check', run_name='__main__', alter_sys=True)\n")
# Unsupported on this torch (RMSprop has no fused kernel) or not run at the tiny size.
ALLOWED_SKIPS = ("RMSprop fused", "max-autotune")
POSITIVE_UNITS = ("samples/s", "TFLOP/s", "GB/s", "s", "ms", "GFLOP", "GiB", "samples", "steps", "MiB", "BCE")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """``(out folder, gpu_check.json, stdout)`` of one ``--tiny`` run."""
    out = tmp_path_factory.mktemp("gpu_check")
    command = [sys.executable, "-c", RUN_WITHOUT.format(names=ABSENT_ON_GPU_MACHINE), "--tiny", "--out", str(out),
               "--data-dir", str(out / "data")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return out, json.loads((out / "gpu_check.json").read_text()), done.stdout


def numbers(value):
    """Every number inside a JSON value."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [n for item in value for n in numbers(item)] if isinstance(value, list) else []


@pytest.mark.slow
def test_every_phase_reports_finite_numbers(tiny_run):
    _, result, _ = tiny_run
    assert result["meta"]["finished"]
    assert set(result["phases"]) == set(DEFAULT_PHASES)  # compile runs only when asked for
    for phase in DEFAULT_PHASES:
        assert result["phases"][phase]["status"] == "ok", result["phases"][phase]
        assert len([row for row in result["rows"] if row["phase"] == phase]) >= 3, phase
    for row in result["rows"]:
        assert math.isfinite(row["value"]) and row["value"] >= 0, row
        if row["unit"] in POSITIVE_UNITS:
            assert row["value"] > 0, row
        assert all(math.isfinite(n) for n in numbers(row["extra"])), row
    names = " / ".join(row["name"] for row in result["rows"])
    for expected in ("bf16 matmul", "device-to-device copy", "step fp32 b4", "step bf16+CL, compiled tail b4",
                     "chunked checkpointed tail b4", "compiled net+loss b4", "tail check", "largest batch",
                     "generate train split", "train loader", "device vs CPU decode", "optimiser steps",
                     "train loss", "test BCE", "checkpoint size", "reloaded bf16 checkpoint"):
        assert expected in names
    for skipped in result["skipped"]:
        assert any(allowed in skipped["name"] for allowed in ALLOWED_SKIPS), skipped


@pytest.mark.slow
def test_stdout_ends_with_the_table_of_every_result(tiny_run):
    _, result, stdout = tiny_run
    rows = result["rows"]
    lines = stdout.strip().splitlines()[-(len(rows) + 2):]
    assert lines[0].startswith("| phase | measurement | value |")
    for row, line in zip(rows, lines[2:], strict=True):
        assert line.startswith(f"| {row['phase']} | {row['name']} | ")


@pytest.mark.slow
def test_checkpoint_is_bf16_under_16_mib_and_loads(tiny_run):
    out, _, _ = tiny_run
    path = out / "paper_run.ckpt"
    assert path.stat().st_size < 16 * 2**20
    payload = torch.load(path, map_location="cpu", weights_only=False)
    floats = [value for value in payload["state_dict"].values() if value.is_floating_point()]
    assert floats and all(value.dtype == torch.bfloat16 for value in floats)
    grid = VoxelGrid.from_dict(payload["hyper_parameters"]["grid"])
    model = load_model(path)
    with torch.no_grad():
        volume = model.predict_step({"image": torch.rand(2, 3, grid.height, grid.width)})
    assert volume.shape == (2, *grid.shape) and torch.isfinite(volume).all()


def test_hard_limit_interrupts_and_disarms():
    start = time.perf_counter()
    with pytest.raises(PhaseTimeout), hard_limit(1.0):
        time.sleep(5)
    assert time.perf_counter() - start < 3
    with hard_limit(1.0):
        pass
    time.sleep(1.2)  # no alarm left behind


@pytest.mark.parametrize("phases", [DEFAULT_PHASES, ("device", "compile")])
def test_phase_deadlines_keep_the_later_selected_phases_reserves(phases):
    reserves = {phase: seconds for phase, seconds in PAPER.reserves if phase in phases}  # as main() selects them
    end = sum(reserves.values()) + PAPER.margin_s + 10.0
    ctx = Context(args=None, sizes=PAPER, device=torch.device("cpu"), grid=VoxelGrid.parse(PAPER.grid), rec=None,
                  reserves=reserves, end=end)
    deadlines = [ctx.deadline(phase) for phase in phases]
    assert deadlines == sorted(deadlines) and deadlines[-1] == end - PAPER.margin_s
    for earlier, later, phase in zip(deadlines, deadlines[1:], phases[1:]):
        assert later - earlier == reserves[phase]
    assert deadlines[0] - reserves["device"] >= 5  # Python and torch start-up fit before the first phase


@pytest.mark.slow
def test_compile_phase_measures_the_compiled_network(tmp_path):
    command = [sys.executable, "-c", RUN_WITHOUT.format(names=ABSENT_ON_GPU_MACHINE), "--tiny", "--out", str(tmp_path),
               "--phases", "device,compile"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["phases"]["compile"]["status"] == "ok" and set(result["phases"]) == {"device", "compile"}
    rates = {row["name"]: row for row in result["rows"] if row["unit"] == "samples/s"}
    assert sorted(rates) == ["step bf16, compiled net+loss b2", "step bf16, compiled net+loss b4"]
    for row in rates.values():  # a real step: positive rate, a finite BCE of random targets near log(2)
        assert row["value"] > 0 and 0.5 < row["extra"]["loss"] < 1.0
    assert [s["reason"] for s in result["skipped"]] == ["mode reduce-overhead needs inductor"]  # CUDA graphs: GPU only
