"""Running a command as its command line does: in this process (exit code and stderr lines), or in another
process that kills itself part-way through writing a dataset file."""

import contextlib
import io
import signal
import subprocess
import sys

from tests.helpers.paths import REPO


def run_cli(main, argv) -> tuple[int, list[str]]:
    """``main(argv)`` as its command line runs it (:func:`run_command`): the exit code and the stderr lines."""
    from lightning_vrn.cli import run_command

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run_command(main, argv)
    return code, err.getvalue().splitlines()


KILLED_AT = """
import importlib, os, signal, sys
from lightning_vrn.dataset_file import DatasetWriter
init, write = DatasetWriter.__init__, DatasetWriter.write_encoded
def flushing_every(self, *args, **kwargs):
    init(self, *args, **kwargs, flush_every=int(sys.argv[3]))
def killed_at(self, index, *args):
    if index == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
    return write(self, index, *args)
DatasetWriter.__init__, DatasetWriter.write_encoded = flushing_every, killed_at
importlib.import_module(sys.argv[1]).main(sys.argv[4:])
"""


def run_killed(module: str, argv, index: int, flush_every: int = 4) -> None:
    """``python -m module argv`` in a process that SIGKILLs itself as it is about to write sample ``index``: the
    samples before it are written, those since the last flush not flagged. It flushes every ``flush_every`` samples
    (not 32) so that a small file has flagged samples when killed."""
    result = subprocess.run([sys.executable, "-c", KILLED_AT, module, str(index), str(flush_every), *map(str, argv)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr
