"""benchmarks.gpu_check: the --tiny run on the CPU with Open3D, OmegaConf and W&B unimportable (as on the
GPU machine) reports every phase with finite numbers, ends with the table of every result, and saves a
checkpoint that load_model reads; the time box and the phase deadlines; training steps timed through
benchmarks.train_step with the model's own loss and optimiser (configure_optimizers)."""

import json
import math
import subprocess
import sys
import time

import pytest
import torch

from benchmarks.gpu_check.budget import STARTUP_S, PhaseTimeout, hard_limit, phase_reserves
from benchmarks.gpu_check.context import Context
from benchmarks.gpu_check.sizes import DEFAULT_PHASES, PAPER
from benchmarks.gpu_check.steps import EAGER_VARIANTS, model_optimizer
from benchmarks.train_step import step_function, time_step_function
from lightning_vrn.geometry.grid import VoxelGrid
from lightning_vrn.models import build_model, load_model
from tests.helpers.paths import REPO

ABSENT_ON_GPU_MACHINE = ("open3d", "omegaconf", "wandb")
# A None entry in sys.modules makes `import name` raise ImportError.
RUN_WITHOUT = ("import runpy, sys\n"
               "for name in {names!r}:\n"
               "    sys.modules[name] = None\n"
               "runpy.run_module('benchmarks.gpu_check', run_name='__main__', alter_sys=True)\n")
# Unsupported (the model's optim settings have no fused: PyTorch's RMSprop has none) or not run at the tiny size.
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
    budget = 420.0
    reserves = phase_reserves(PAPER, phases, budget)  # as main() selects and scales them
    assert list(reserves) == list(phases)
    unscaled = {phase: seconds for phase, seconds in PAPER.reserves if phase in phases}
    scale = budget / (sum(unscaled.values()) + PAPER.margin_s + STARTUP_S)
    assert all(reserves[phase] == pytest.approx(unscaled[phase] * scale) for phase in phases)
    if phases == DEFAULT_PHASES:  # the paper reserves are sized for the default phases in 420 s
        assert scale == 1.0
    ctx = Context(args=None, sizes=PAPER, device=torch.device("cpu"), grid=VoxelGrid.parse(PAPER.grid), rec=None,
                  reserves=reserves, end=budget)
    deadlines = [ctx.deadline(phase) for phase in phases]
    assert deadlines == sorted(deadlines) and deadlines[-1] == budget - PAPER.margin_s
    for earlier, later, phase in zip(deadlines, deadlines[1:], phases[1:]):
        assert later - earlier == pytest.approx(reserves[phase])
    assert deadlines[0] - reserves["device"] >= 5  # Python and torch start-up fit before the first phase


def tiny_vrn():
    return build_model("vrn", grid=VoxelGrid.parse("50,48,48").to_dict(),
                       net={"features": 16, "stacks": 1, "hourglass_depth": 2})


def test_step_function_trains_with_the_models_own_loss_and_optimiser():
    torch.manual_seed(0)
    model = tiny_vrn().train()
    batch = {"image": torch.rand(2, 3, 48, 48), "volume": (torch.rand(2, 50, 48, 48) > 0.5).float()}
    with torch.no_grad():
        expected = float(model.losses(model(batch), batch)["loss"])
    before = [p.detach().clone() for p in model.parameters()]
    step = step_function(model, batch)
    assert float(step()) == pytest.approx(expected, rel=1e-5)  # the step's loss is the model's, before the update
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    timing = time_step_function(step, torch.device("cpu"), steps=3, warmup=1)
    assert timing.steps == 3 and timing.seconds > 0 and timing.first_s > 0 and math.isfinite(timing.loss)
    capped = time_step_function(step, torch.device("cpu"), steps=100, warmup=1, max_s=0.0)
    assert capped.steps == 3  # the cap stops after the minimum of three timed steps
    with pytest.raises(ValueError, match="precision"):
        step_function(model, batch, "16-mixed")


def test_setting_optimisers_come_from_configure_optimizers():
    model = tiny_vrn()
    plain = model.configure_optimizers()["optimizer"]
    looped = model_optimizer(model, {"foreach": False})
    assert type(looped) is type(plain) and looped.defaults["foreach"] is False
    assert {k: v for k, v in looped.defaults.items() if k != "foreach"} == \
        {k: v for k, v in plain.defaults.items() if k != "foreach"}
    assert model.settings.optim.foreach is None  # the override is not left behind
    fused = next(v for v in EAGER_VARIANTS if "fused" in v.name)
    with pytest.raises(TypeError, match="fused"):  # recorded as "unsupported" by measure_setting
        model_optimizer(model, dict(fused.optim))


@pytest.mark.slow
def test_fused_and_compile_phases_measure_the_fused_loss_and_the_compiled_network(tmp_path):
    command = [sys.executable, "-c", RUN_WITHOUT.format(names=ABSENT_ON_GPU_MACHINE), "--tiny", "--out", str(tmp_path),
               "--phases", "device,fused,compile"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(result["phases"]) == {"device", "fused", "compile"}
    assert all(result["phases"][phase]["status"] == "ok" for phase in ("fused", "compile"))
    rates = {row["name"]: row for row in result["rows"] if row["unit"] == "samples/s"}
    assert sorted(name for name in rates if rates[name]["phase"] == "fused") == [
        "larger batch bf16, fused loss b16", "step bf16 b4", "step bf16 b8", "step bf16, fused loss b4",
        "step bf16, fused loss b8", "step fp32 b2", "step fp32, fused loss b2"]
    assert sorted(name for name in rates if rates[name]["phase"] == "compile") == [
        "step bf16, compiled net + fused loss b4", "step bf16, compiled net+loss b2", "step bf16, compiled net+loss b4"]
    for row in rates.values():  # a real step: positive rate, a finite BCE of random targets near log(2)
        assert row["value"] > 0 and 0.5 < row["extra"]["loss"] < 1.0
    (check,) = [row for row in result["rows"] if row["name"].startswith("tail check fp32, fused loss")]
    assert check["value"] < 1e-6 and check["extra"]["grad_error"] < 1e-5
    assert [s["reason"] for s in result["skipped"]] == ["mode reduce-overhead needs inductor"]  # CUDA graphs: GPU only
