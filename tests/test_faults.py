"""Faults a user meets, reproduced as they would meet them: each loses nothing and ends with a clear message.

Locked run directories, records that a failed attempt leaves alone, checkpoints that cannot be
written, SIGTERM, a training split smaller than a batch, damaged or replaced dataset files, bad
configs and paths, the generator's count after a resume, checkpoints and pickles that would run
code, and secrets kept out of a run's records.
"""

import errno
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from experiments import evaluate, runs, train
from experiments.config import CONFIG_DIR, ConfigError, load_config
from lightning_vrn.atomic import open_mode
from lightning_vrn.callbacks import CheckpointWriteError
from lightning_vrn.cli import EXIT_LOCKED, EXIT_SIGTERM, EXIT_USAGE, run_command
from lightning_vrn.dataset_file import DatasetError, open_dataset
from lightning_vrn.models import load_model
from lightning_vrn.safe_load import UnsafeFileError, load_pickle
from tests.helpers.paths import REPO

TINY = ["model.net.features=16", "model.net.hourglass_depth=2", "model.net.stacks=1", "data.num_workers=0",
        "data.batch_size=2", "nme.every_n_epochs=0"]


def config(data_dir, run_dir, *overrides):
    return load_config(CONFIG_DIR / "quickstart.yaml", [f"data.dir={data_dir}", f"run_dir={run_dir}", *TINY, *overrides])


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def start_training(data_dir, run_dir, *overrides) -> subprocess.Popen:
    """A training in another process, as a user would start it (long enough to be interrupted)."""
    command = [sys.executable, "-m", "experiments.train", "--config", str(CONFIG_DIR / "quickstart.yaml"),
               f"data.dir={data_dir}", f"run_dir={run_dir}", *TINY, "trainer.max_epochs=500",
               "trainer.enable_progress_bar=false", *overrides]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"training exited early ({process.returncode}): {process.stderr.read()}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear within {seconds} s")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def trained(tiny_synthetic, tmp_path_factory):
    """A finished one-epoch run."""
    run_dir = tmp_path_factory.mktemp("faults") / "run"
    train.train(config(tiny_synthetic, run_dir, "trainer.max_epochs=1"), command="first attempt")
    return run_dir


# ----- 1. one training per run directory -----

@pytest.mark.slow
def test_a_second_training_into_a_held_run_directory_stops_naming_the_holder(tiny_synthetic, tmp_path):
    run_dir = tmp_path / "run"
    holder = start_training(tiny_synthetic, run_dir)
    try:
        wait_for(run_dir / runs.LOCK_NAME, holder)
        with pytest.raises(runs.RunLockedError, match=rf"in use by process {holder.pid} on host {socket.gethostname()}"):
            train.train(config(tiny_synthetic, run_dir, "trainer.max_epochs=1"), command="REFUSED-ATTEMPT")
        assert not (run_dir / "attempts" / "002").exists()  # the refused attempt recorded nothing
        assert "REFUSED-ATTEMPT" not in (run_dir / "command.txt").read_text()
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_with_a_note(tiny_synthetic, tmp_path, caplog):
    run_dir = tmp_path / "run"
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process id that no longer runs
    run_dir.mkdir()
    (run_dir / runs.LOCK_NAME).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(),
                                                      "started": "earlier", "command": "killed run"}))
    caplog.set_level("INFO")
    train.train(config(tiny_synthetic, run_dir, "trainer.fast_dev_run=true"))
    assert f"took over the stale lock of process {gone.pid}" in caplog.text
    assert not (run_dir / runs.LOCK_NAME).exists()  # released at the end


def test_a_lock_that_cannot_be_written_leaves_nothing_that_blocks_the_rerun(tiny_synthetic, tmp_path, monkeypatch):
    # Before, a full disk left an empty run.lock behind, and the rerun after freeing space was refused as
    # "in use by process None on host None".
    run_dir = tmp_path / "run"

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(runs.json, "dump", disk_full)
        with pytest.raises(runs.OutputDirError, match=rf"cannot write the lock {run_dir / runs.LOCK_NAME} \(No space"):
            train.train(config(tiny_synthetic, run_dir, "trainer.fast_dev_run=true"))
    assert not (run_dir / runs.LOCK_NAME).exists() and not list(run_dir.glob(f".{runs.LOCK_NAME}*"))
    train.train(config(tiny_synthetic, run_dir, "trainer.fast_dev_run=true"))  # space freed: the rerun runs


def test_an_empty_lock_left_by_an_older_version_is_taken_over(tmp_path):
    (tmp_path / runs.LOCK_NAME).write_text("")
    with runs.RunLock(tmp_path, "rerun") as lock:
        assert json.loads((tmp_path / runs.LOCK_NAME).read_text())["pid"] == os.getpid()
        assert "took over the unreadable lock" in lock.notes[0]
        # Other users' trainings and compare can read who holds it (a temporary file starts at 0o600).
        assert (tmp_path / runs.LOCK_NAME).stat().st_mode & 0o777 == open_mode()
    assert runs.lock_holder(tmp_path) is None


# ----- 2. a failed attempt leaves the run's record alone -----

def test_a_rerun_the_checkpoint_would_not_load_is_refused_before_anything_is_written(trained, tiny_synthetic):
    before = snapshot(trained)
    with pytest.raises(ConfigError, match=r"model\.net: checkpoint \{.*'features': 16.*\}, config \{.*'features': 32"):
        train.train(config(tiny_synthetic, trained, "trainer.max_epochs=2", "model.net.features=32"), command="bad")
    assert snapshot(trained) == before


def test_each_attempt_is_recorded_and_the_first_is_never_overwritten(trained, tiny_synthetic, tmp_path):
    run_dir = tmp_path / "run"
    os.system(f"cp -r {trained} {run_dir}")
    first = (run_dir / "config.yaml").read_text()
    first_metrics = json.loads((run_dir / "metrics.json").read_text())
    train.train(config(tiny_synthetic, run_dir, "trainer.max_epochs=2"), command="second attempt")
    assert (run_dir / "config.yaml").read_text() == first
    assert (run_dir / "command.txt").read_text() == "first attempt\n"
    assert (run_dir / "attempts" / "001" / "command.txt").read_text() == "first attempt\n"
    assert (run_dir / "attempts" / "002" / "command.txt").read_text() == "second attempt\n"
    assert load_config(run_dir / "attempts" / "002" / "config.yaml").trainer.max_epochs == 2
    # The second attempt trained on: metrics.json is its own, complete, and its own copy sits beside its config.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics == json.loads((run_dir / "attempts" / "002" / "metrics.json").read_text())
    assert set(metrics) == set(first_metrics) and metrics["val/loss"] != first_metrics["val/loss"]


def test_rerunning_a_finished_run_reports_it_and_changes_nothing(trained, tiny_synthetic, caplog):
    # Before, the rerun tested again and replaced metrics.json with its 6 test keys (train/val metrics gone).
    before = snapshot(trained)
    caplog.set_level("INFO")
    metrics = train.train(config(tiny_synthetic, trained, "trainer.max_epochs=1"), command="rerun")
    assert f"{trained} has finished" in caplog.text
    assert snapshot(trained) == before  # no new attempt, checkpoint, CSV version or metrics
    assert metrics == json.loads(before["metrics.json"]) and {"train/loss", "val/loss", "test/loss"} <= set(metrics)


def test_a_rerun_after_an_attempt_killed_in_its_test_tests_again(trained, tiny_synthetic, tmp_path, monkeypatch):
    # The second attempt trained epoch 2 and died in its test: metrics.json is still the first attempt's, so the
    # run has not finished although its checkpoint reached trainer.max_epochs.
    run_dir = tmp_path / "run"
    os.system(f"cp -r {trained} {run_dir}")
    first = json.loads((run_dir / "metrics.json").read_text())

    def killed(*args, **kwargs):
        raise RuntimeError("killed in the test")

    with monkeypatch.context() as patch:
        patch.setattr(train, "_test", killed)
        with pytest.raises(RuntimeError, match="killed in the test"):
            train.train(config(tiny_synthetic, run_dir, "trainer.max_epochs=2"), command="second attempt")
    assert json.loads((run_dir / "metrics.json").read_text()) == first
    metrics = train.train(config(tiny_synthetic, run_dir, "trainer.max_epochs=2"), command="third attempt")
    assert metrics["test/loss"] != first["test/loss"]  # the 2-epoch weights were tested
    assert json.loads((run_dir / "attempts" / "003" / "metrics.json").read_text()) == metrics


@pytest.mark.parametrize("trainer, done", [
    ({"max_epochs": 2}, True), ({"max_epochs": 3}, False), ({}, False),  # 1000 epochs without limits
    ({"max_steps": 8}, True), ({"max_steps": 9}, False),  # only max_steps: no epoch limit
    ({"max_steps": 100, "max_epochs": 2}, True), ({"max_steps": 8, "max_epochs": 5}, True),  # the first reached
    ({"max_epochs": -1}, False)])
def test_a_training_has_finished_at_the_first_limit_it_reached(trainer, done):
    payload = {"global_step": 8, "loops": {"fit_loop": {"epoch_progress": {"current": {"processed": 2}}}}}
    assert runs.training_finished(payload, trainer) is done


@pytest.mark.parametrize("override, key", [("model.optim.lr=0.01", "model.optim.lr"), ("seed=3", "seed"),
                                           ("data.batch_size=4", "data.batch_size"),
                                           ("data.augment.enabled=true", "data.augment.enabled"),
                                           ("trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches")])
def test_a_learning_setting_changed_on_resume_is_refused_naming_it(trained, tiny_synthetic, override, key):
    # Before, a new learning rate was recorded in attempts/NNN/config.yaml and the checkpoint but never used: the
    # optimiser and its schedule were restored from the checkpoint.
    before = snapshot(trained)
    with pytest.raises(ConfigError, match=rf"not {key}: run .*, now .*: resume with the run's values"):
        train.train(config(tiny_synthetic, trained, "trainer.max_epochs=2", override), command="changed")
    assert snapshot(trained) == before
    # How it runs may change: more epochs, other workers, no progress bar (checked, not trained, here).
    allowed = load_config(trained / "config.yaml", ["trainer.max_epochs=9", "data.num_workers=3", "model.compile=true",
                                                    "model.fused_loss=true"])
    assert runs.changed_learning_settings(runs.trained_config(trained), allowed) == []


# ----- 3. checkpoints that cannot be written -----

def test_a_checkpoint_that_cannot_be_written_stops_training_at_once(tiny_synthetic, tmp_path, monkeypatch):
    from pytorch_lightning.plugins.io.torch_plugin import TorchCheckpointIO

    original, saves = TorchCheckpointIO.save_checkpoint, []

    def disk_fills_up(self, checkpoint, path, storage_options=None):
        saves.append(path)
        if len(saves) > 1:  # the first save (epoch 0) succeeds, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, checkpoint, path, storage_options)

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", disk_fills_up)
    run_dir = tmp_path / "run"
    with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint .*\.ckpt: No space left on device"):
        train.train(config(tiny_synthetic, run_dir, "trainer.max_epochs=5", "checkpoint.every_n_train_steps=0"))
    written = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    assert written["epoch"] == 0  # what was written before the failure is intact
    epochs = {row.split(",")[0] for row in (run_dir / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[1:]}
    assert epochs <= {"", "0", "1"}  # it stopped at the first failed save, not after five epochs


def test_an_output_folder_that_is_a_file_is_named_before_training(tiny_synthetic, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("keep me")
    with pytest.raises(ConfigError, match="run_dir=.*not-a-folder is an existing file"):
        train.train(config(tiny_synthetic, blocker, "trainer.fast_dev_run=true"))
    with pytest.raises(runs.OutputDirError, match=r"not-a-folder is an existing file; choose another run_dir"):
        runs.check_writable(blocker / "checkpoints")
    assert blocker.read_text() == "keep me"


# ----- 4. SIGTERM -----

@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_143_and_the_rerun_resumes(tiny_synthetic, tmp_path):
    run_dir = tmp_path / "run"
    process = start_training(tiny_synthetic, run_dir, "checkpoint.every_n_train_steps=3")
    wait_for(run_dir / "checkpoints" / "last.ckpt", process)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_SIGTERM, stderr
    assert "SIGTERM" in stderr and "last.ckpt" in stderr
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] > 0
    metrics = train.train(config(tiny_synthetic, run_dir, f"trainer.max_epochs={saved['epoch'] + 2}"))
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] > saved["global_step"] and resumed["epoch"] == saved["epoch"] + 1
    assert (run_dir / "attempts" / "002").is_dir() and "test/loss" in metrics


# ----- 5. a training split smaller than one batch -----

def test_a_training_split_smaller_than_a_batch_is_refused_up_front(tiny_synthetic, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"train.h5 has 8 samples, fewer than one batch of 16"):
        train.train(config(tiny_synthetic, run_dir, "data.batch_size=16", "trainer.max_epochs=1"))
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "config.yaml").exists()


# ----- 6. files checked where they are opened -----

def test_float_images_are_refused_when_the_file_is_opened(tiny_synthetic, tmp_path):
    path = tmp_path / "float.h5"
    os.system(f"cp {tiny_synthetic / 'test.h5'} {path}")
    with h5py.File(path, "r+") as f:
        images = f["images"][()].astype(np.float32) / 255
        del f["images"]
        f.create_dataset("images", data=images, chunks=(1, *images.shape[1:]))
    with pytest.raises(DatasetError, match=r"float.h5: dataset images has dtype float32, the schema's is uint8"):
        open_dataset(path)


def test_a_flipped_byte_in_one_chunk_names_the_file_dataset_and_sample(tiny_synthetic, tmp_path):
    path = tmp_path / "damaged.h5"
    os.system(f"cp {tiny_synthetic / 'test.h5'} {path}")
    with h5py.File(path, "r") as f:
        chunk = f["images"].id.get_chunk_info(2)  # sample 2's image
    with open(path, "r+b") as handle:
        handle.seek(chunk.byte_offset + chunk.size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))
    dataset = open_dataset(path)
    assert dataset.read(1, ["images"])["images"].shape == (96, 96, 3)  # other samples still read
    with pytest.raises(DatasetError, match=r"damaged.h5: dataset images, sample 2 cannot be read"):
        dataset.read(2, ["images"])


def test_a_file_replaced_while_it_is_read_is_detected(tiny_synthetic, tmp_path):
    path = tmp_path / "split.h5"
    os.system(f"cp {tiny_synthetic / 'val.h5'} {path}")
    dataset = open_dataset(path)
    dataset.read(0, ["pose"])
    replacement = tmp_path / "other.h5"
    os.system(f"cp {tiny_synthetic / 'test.h5'} {replacement}")
    os.replace(replacement, path)
    with pytest.raises(DatasetError, match="split.h5 was replaced or modified after this run opened it"):
        dataset.read(0, ["pose"])


# ----- 7. clear messages instead of tracebacks -----

@pytest.mark.parametrize("text, expected", [
    ("name: x\ndata:\n  dir: [unclosed\n", r"YAML syntax error at line 4, column 1"),
    ("", r"is empty"),
])
def test_a_broken_config_file_is_named_with_the_place(tmp_path, text, expected):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"config file .*broken.yaml .*{expected}|broken.yaml {expected}"):
        load_config(path)


def test_a_corrupt_last_checkpoint_names_its_path_and_the_way_out(trained, tiny_synthetic, tmp_path):
    run_dir = tmp_path / "run"
    os.system(f"cp -r {trained} {run_dir}")
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated by a crash
    with pytest.raises(ConfigError, match=r"cannot resume from .*last.ckpt: .* damaged.*resume=false"):
        train.train(config(tiny_synthetic, run_dir, "trainer.max_epochs=2"))


@pytest.mark.parametrize("content, kind", [(b"run_dir: runs/x\n" * 6 + b"epoch", "a text file, 101 bytes"),
                                           (b"", "empty"), (bytes(range(7, 107)), "not a zip or pickle")])
@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_a_file_that_is_no_checkpoint_is_named_with_what_it_is(tiny_synthetic, tmp_path, capsys, content, kind,
                                                                command):
    # Before, a 101-byte text file given as resume= or --checkpoint ended with "error: 101" (a KeyError's message).
    path = tmp_path / "notes.ckpt"
    path.write_bytes(content)
    argv = {"train": ["--config", str(CONFIG_DIR / "quickstart.yaml"), f"data.dir={tiny_synthetic}", *TINY,
                      f"run_dir={tmp_path / 'run'}", f"resume={path}"],
            "evaluate": ["--checkpoint", str(path), "--data", str(tiny_synthetic / "test.h5")]}[command]
    assert run_command({"train": train.main, "evaluate": evaluate.main}[command], argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{path} is not a checkpoint ({kind}" in err, err
    assert not (tmp_path / "run").exists()


def test_evaluating_on_data_of_another_grid_names_the_checkpoint_grid(trained, tmp_path):
    from data_prep.synthetic import generate_split
    from lightning_vrn.geometry import VoxelGrid

    other = generate_split(tmp_path / "test.h5", "builtin", VoxelGrid.parse("40,32,32"), 2, 0, "test", progress=False)
    checkpoint = trained / "checkpoints" / "last.ckpt"
    with pytest.raises(DatasetError, match=rf"differs from the grid of checkpoint {checkpoint}, 100x96x96"):
        evaluate.main(["--checkpoint", str(checkpoint), "--data", str(other), "--out", str(tmp_path / "eval")])


@pytest.mark.parametrize("command, argv, code, expected", [
    ("train", ["--config", "nope.yaml"], EXIT_USAGE, "config file .*nope.yaml does not exist"),
    ("train", ["--config", str(CONFIG_DIR / "quickstart.yaml"), "data.batch_size=abc"], EXIT_USAGE,
     "'data.batch_size' .* must be int, got 'abc'"),
    ("evaluate", ["--checkpoint", "missing.ckpt", "--data", "x.h5"], 2, "missing.ckpt does not exist"),
    ("config", [], EXIT_USAGE, "usage: python -m experiments.config"),
])
def test_every_command_ends_with_one_line_and_a_nonzero_code(capsys, command, argv, code, expected):
    from experiments import config as config_command

    main = {"train": train.main, "evaluate": evaluate.main, "config": config_command.main}[command]
    try:
        result = run_command(main, argv)
    except SystemExit as exit_:  # argparse's own usage errors
        result = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert result == code
    assert len(err) == 1 or err[0].startswith("usage:"), err
    assert any(__import__("re").search(expected, line) for line in err), err


def test_debug_shows_the_traceback():
    with pytest.raises(ConfigError):
        run_command(train.main, ["--config", str(CONFIG_DIR / "quickstart.yaml"), "data.batch_size=abc", "--debug"])


def test_the_synthetic_generator_exits_with_a_clear_error_for_an_unwritable_output(tmp_path, capsys):
    from data_prep import synthetic

    blocker = tmp_path / "file"
    blocker.write_text("")
    code = run_command(synthetic.main, ["--out", str(blocker / "data"), "--split", "test=1", "--grid", "40,32,32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "file" in err[0], err


# ----- 8. the generator's count after a resume -----

def test_the_generator_counts_faces_outside_the_grid_over_the_whole_file(tmp_path, monkeypatch):
    from data_prep import synthetic
    from lightning_vrn.geometry import VoxelGrid

    grid = VoxelGrid.parse("100,96,96")  # 2 of the 8 tiny training faces leave it (conftest's warning)
    with pytest.warns(UserWarning, match=r"(\d+) of 8 faces reach outside") as whole:
        synthetic.generate_split(tmp_path / "whole.h5", "builtin", grid, 8, 0, "train", progress=False)
    real_make = synthetic.make_sample
    calls = []

    def crash_at_the_sixth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("killed")
        return real_make(*args, **kwargs)

    monkeypatch.setattr(synthetic, "make_sample", crash_at_the_sixth)
    with pytest.raises(RuntimeError, match="killed"):
        synthetic.generate_split(tmp_path / "resumed.h5", "builtin", grid, 8, 0, "train", progress=False)
    with pytest.warns(UserWarning, match=r"(\d+) of 8 faces reach outside") as resumed:
        synthetic.generate_split(tmp_path / "resumed.h5", "builtin", grid, 8, 0, "train", progress=False)
    assert str(resumed[0].message).split(":")[1] == str(whole[0].message).split(":")[1]


# ----- 9. files from others run no code; secrets stay out of records -----

class _TouchesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_checkpoint_whose_pickle_would_run_a_command_is_refused_and_runs_nothing(trained, tmp_path, capsys):
    payload = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    payload["hyper_parameters"]["surprise"] = _TouchesAFile(tmp_path / "pwned")
    crafted = tmp_path / "shared.ckpt"
    torch.save(payload, crafted)
    with pytest.raises(UnsafeFileError, match=r"shared.ckpt asks to run .*system.*--trust-checkpoint"):
        load_model(crafted)
    code = run_command(evaluate.main, ["--checkpoint", str(crafted), "--data", "unused.h5"])
    assert code == 1 and "--trust-checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()


def test_a_pickle_file_loads_plain_arrays_and_refuses_code(tmp_path):
    plain, crafted = tmp_path / "model.pkl", tmp_path / "crafted.pkl"
    plain.write_bytes(pickle.dumps({"mean": np.arange(6.0).reshape(2, 3), "name": "bfm"}))
    crafted.write_bytes(pickle.dumps({"mean": _TouchesAFile(tmp_path / "pwned")}))
    loaded = load_pickle(plain)
    assert loaded["name"] == "bfm" and np.array_equal(loaded["mean"], np.arange(6.0).reshape(2, 3))
    with pytest.raises(UnsafeFileError, match="crafted.pkl needs global 'posix.system'"):
        load_pickle(crafted)
    assert not (tmp_path / "pwned").exists()
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(plain.read_bytes()[:-20])  # damaged, not unsafe: said so, not "could run code"
    with pytest.raises(ValueError, match="truncated.pkl is damaged, truncated or not a pickle") as refused:
        load_pickle(truncated)
    assert not isinstance(refused.value, UnsafeFileError)


def test_secrets_never_land_in_a_runs_records(tiny_synthetic, tmp_path, monkeypatch):
    secret = "sekrit-0123456789"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    run_dir = tmp_path / "run"
    argv = ["--config", str(CONFIG_DIR / "quickstart.yaml"), f"data.dir={tiny_synthetic}", f"run_dir={run_dir}",
            *TINY, "trainer.fast_dev_run=true"]
    assert run_command(train.main, argv) == 0  # the command as a user runs it, recording its command line
    assert "trainer.fast_dev_run=true" in (run_dir / "command.txt").read_text()
    assert not any(secret.encode() in content for content in snapshot(run_dir).values())
    assert train.redact(["x", f"WANDB_API_KEY={secret}", "trainer.max_epochs=1"]) == \
        ["x", "WANDB_API_KEY=***", "trainer.max_epochs=1"]


# ----- review fixes: runs that a smoke test, a foreign checkpoint or a moved folder must not damage -----

def test_fast_dev_run_into_a_run_with_checkpoints_is_refused(trained, tiny_synthetic):
    before = snapshot(trained)
    with pytest.raises(ConfigError, match="fast_dev_run is a smoke test: run it in a fresh run_dir"):
        train.train(config(tiny_synthetic, trained, "trainer.fast_dev_run=true"))
    assert snapshot(trained) == before


def test_a_checkpoint_from_elsewhere_resumes_into_a_run_directory_of_its_own(trained, tiny_synthetic, tmp_path,
                                                                            monkeypatch):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    foreign = downloads / "shared.ckpt"
    foreign.write_bytes((trained / "checkpoints" / "last.ckpt").read_bytes())
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(runs.RUN_DIR_ENV, raising=False)
    cfg = load_config(CONFIG_DIR / "quickstart.yaml", [f"data.dir={tiny_synthetic}", *TINY, "trainer.max_epochs=2",
                                                       f"resume={foreign}"])
    metrics = train.train(cfg)
    assert Path(metrics["run_dir"]).parent == Path("runs") / "vrn-quickstart"
    assert sorted(p.name for p in downloads.iterdir()) == ["shared.ckpt"]  # nothing written beside the download


def test_a_copied_run_tests_its_own_best_checkpoint(trained, tiny_synthetic, tmp_path):
    copy = tmp_path / "copy"
    os.system(f"cp -r {trained} {copy}")
    metrics = train.train(config(tiny_synthetic, copy, "trainer.max_epochs=2"))
    assert Path(metrics["best_checkpoint"]).parent == copy / "checkpoints"


def test_a_failed_start_records_nothing_and_leaves_no_empty_folder(tiny_synthetic, tmp_path):
    run_dir = tmp_path / "new-run"
    with pytest.raises(ConfigError, match=r"trainer\.default_root_dir.*is set by experiments\.train; use run_dir"):
        config(tiny_synthetic, run_dir, "trainer.default_root_dir=/x")
    with pytest.raises(Exception, match="accelerator"):
        train.train(config(tiny_synthetic, run_dir, "trainer.accelerator=nonsense"))
    assert not run_dir.exists()
    with pytest.raises(ConfigError, match="needs the validation NME"):
        train.train(config(tiny_synthetic, run_dir, "checkpoint.monitor=val/nme", "nme.every_n_epochs=0"))


def test_validation_can_be_turned_off(tiny_synthetic, tmp_path):
    metrics = train.train(config(tiny_synthetic, tmp_path / "run", "data.val=none", "trainer.max_epochs=1",
                                 "checkpoint.monitor=train/loss"))
    assert "val/loss" not in metrics and "test/loss" in metrics


def test_the_write_probe_names_the_folder_when_the_os_refuses(tmp_path, monkeypatch):
    import tempfile

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refused)
    with pytest.raises(runs.OutputDirError, match=r"cannot write into .*ckpts \(Permission denied\); choose a "
                                                   r"writable run_dir"):
        runs.check_writable(tmp_path / "ckpts")


def test_a_checkpoint_written_before_the_record_still_loads(trained, tmp_path):
    payload = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    payload["variant"] = payload.pop("lightning_vrn")["variant"]  # the layout of earlier versions
    old = tmp_path / "old.ckpt"
    torch.save(payload, old)
    assert load_model(old).variant == "vrn"


def test_taking_over_a_stale_lock_never_removes_a_live_one(tmp_path, monkeypatch):
    # Another process took the stale lock over between our read and our move: ours must put its lock back.
    lock = runs.RunLock(tmp_path)
    tmp_path.joinpath(runs.LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                              "started": "now", "command": "the live holder"}))
    assert lock._remove_stale(stale_pid=999_999_999) is False
    assert json.loads(tmp_path.joinpath(runs.LOCK_NAME).read_text())["command"] == "the live holder"
    assert sorted(p.name for p in tmp_path.iterdir()) == [runs.LOCK_NAME]  # nothing left aside
    with pytest.raises(runs.RunLockedError, match=f"in use by process {os.getpid()}"):
        lock.acquire()


@pytest.mark.slow
def test_slurm_sigusr1_saves_a_checkpoint_requeues_the_job_and_the_next_start_resumes(tiny_synthetic, tmp_path):
    run_dir, calls = tmp_path / "run", tmp_path / "scontrol.calls"
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")  # records the requeue instead of asking SLURM
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "SLURM_JOB_ID": "4321",
           "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "vrn-test", "SLURM_NODELIST": "localhost", "SLURM_PROCID": "0",
           "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    command = [sys.executable, "-m", "experiments.train", "--config", str(CONFIG_DIR / "quickstart.yaml"),
               f"data.dir={tiny_synthetic}", f"run_dir={run_dir}", *TINY, "trainer.max_epochs=500",
               "trainer.enable_progress_bar=false", "checkpoint.every_n_train_steps=3"]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(run_dir / "checkpoints" / "last.ckpt", process)
    first = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    time.sleep(1.0)
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert calls.read_text().split() == ["requeue", "4321"]
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] >= first
    assert not (run_dir / "metrics.json").exists()  # stopped for the requeue, not finished
    rows = (run_dir / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    validated = {int(row.split(",")[header.index("epoch")]) for row in rows[1:]  # none when stopped in epoch 0
                 if "val/loss" in header and row.split(",")[header.index("val/loss")]}
    assert saved["epoch"] not in validated  # stopped at once: no validation pass of the interrupted epoch
    # The requeued job reruns the same command: it resumes from that checkpoint.
    metrics = train.train(config(tiny_synthetic, run_dir, f"trainer.max_epochs={saved['epoch'] + 2}"))
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] > saved["global_step"] and "test/loss" in metrics


WITHOUT_OPEN3D = ("import runpy, sys\n"
                  "sys.modules['open3d'] = None\n"  # a None entry makes `import open3d` raise ImportError
                  "sys.argv[0] = 'train'\n"
                  "runpy.run_module('experiments.train', run_name='__main__', alter_sys=True)\n")


def test_training_without_open3d_is_refused_before_writing_unless_the_nme_is_off(tiny_synthetic, tmp_path):
    """GPU clusters often lack Open3D: the NME's ICP needs it, training does not."""
    def train_without_open3d(run_dir, *overrides):
        command = [sys.executable, "-c", WITHOUT_OPEN3D, "--config", str(CONFIG_DIR / "quickstart.yaml"),
                   f"data.dir={tiny_synthetic}", f"run_dir={run_dir}", *TINY, "trainer.fast_dev_run=true", *overrides]
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)

    refused = train_without_open3d(tmp_path / "refused", "nme.every_n_epochs=1")
    assert refused.returncode == EXIT_USAGE, refused.stderr
    assert "the NME needs Open3D" in refused.stderr and "nme.every_n_epochs=0" in refused.stderr
    assert not (tmp_path / "refused").exists()
    trained = train_without_open3d(tmp_path / "trained")  # TINY has nme.every_n_epochs=0
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert np.isfinite(json.loads((tmp_path / "trained" / "metrics.json").read_text())["train/loss"])
