"""How every command of the suite ends: a one-line error and an exit code, a traceback only when asked.

``sys.exit(run_command(main))`` runs ``main(argv)``. An exception becomes ``error: <message>`` on
stderr and an exit code from :func:`exit_code` (an exception may carry its own ``exit_code``);
``--debug`` on the command line or ``LIGHTNING_VRN_DEBUG=1`` shows the traceback instead.

Exit codes: 0 done; 1 an error (a damaged file, a failed write, ...); 2 bad usage or config (the
message names the key, file or flag); 3 the run directory is in use by another training; 130
interrupted with Ctrl-C; 143 stopped by SIGTERM after saving a checkpoint (rerun to resume).
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

DEBUG_ENV = "LIGHTNING_VRN_DEBUG"
EXIT_ERROR, EXIT_USAGE, EXIT_LOCKED, EXIT_INTERRUPTED, EXIT_SIGTERM = 1, 2, 3, 130, 143


def _lightnings_sigterm(error: SystemExit) -> bool:
    """Whether ``error`` is Lightning's SIGTERMException, found without importing Lightning (a command that never
    imported it, such as the data generators and their worker processes, cannot have raised it)."""
    exceptions = sys.modules.get("pytorch_lightning.utilities.exceptions")
    return exceptions is not None and isinstance(error, exceptions.SIGTERMException)


def exit_code(error: BaseException) -> int:
    """The exit code for an exception: its ``exit_code`` attribute, else by kind."""
    if hasattr(error, "exit_code"):
        return int(error.exit_code)
    names = {cls.__name__ for cls in type(error).__mro__}
    if {"ConfigError", "SettingsError"} & names:
        return EXIT_USAGE
    if "RunLockedError" in names:
        return EXIT_LOCKED
    return EXIT_ERROR


def one_line(error: BaseException) -> str:
    """The exception's message on one line (a KeyError's quotes removed)."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(text.split()) or type(error).__name__


def run_command(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)`` and turn an exception into a one-line error and an exit code (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [argument for argument in argv if argument != "--debug"]
    try:
        return main(argv)
    except SystemExit as error:  # Lightning's SIGTERMException is one whose code is 0: a scheduler must see it
        if debug or not _lightnings_sigterm(error):
            raise
        print("error: stopped by SIGTERM; rerun the same command to resume", file=sys.stderr)
        return EXIT_SIGTERM
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # every failure: one line, unless debugging
        if debug:
            raise
        print(f"error: {one_line(error)} [--debug or {DEBUG_ENV}=1 shows the traceback]", file=sys.stderr)
        return exit_code(error)
