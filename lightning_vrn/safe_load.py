"""Loading files from others without running their code: checkpoints and pickles.

A PyTorch checkpoint is a pickle, and unpickling can call any Python function the file names: a
shared checkpoint crafted to run a shell command runs it on load. Every checkpoint the suite did
not just write itself therefore goes through :func:`load_checkpoint`, PyTorch's safe loader
(``weights_only=True``), which allows only tensors and plain types (what the suite's own
checkpoints hold: dicts, lists, numbers, strings, ``OrderedDict``, ``Counter``). Anything else is
refused with :class:`UnsafeFileError`, naming the file and the opt-in for a user who knows its
source (``trust=True``, ``--trust-checkpoint`` on the commands). :func:`load_pickle` applies the
same rule to plain pickle files (numpy arrays and plain types only): every reader of a ``.pkl`` file
(the Basel Face Model layouts of 3DDFA) must open it through it.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

TRUST_HINT = "--trust-checkpoint"


class UnsafeFileError(ValueError):
    """A file would need to run code (unpickle arbitrary objects) to load; it was not loaded."""


def load_checkpoint(path: str | Path, trust: bool = False, map_location: str = "cpu") -> dict[str, Any]:
    """The checkpoint dict at ``path``, loaded with PyTorch's safe loader unless ``trust``.

    Raises FileNotFoundError for a missing file, :class:`UnsafeFileError` for a file holding other
    Python objects, and ValueError for a file that is not a (complete) checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with open(path, "rb") as handle:
        start = handle.read(4)
    if not start.startswith((b"PK\x03\x04", b"\x80")):  # PyTorch's zip format, or its legacy pickle
        text = start and all(32 <= c < 127 or c in b"\t\r\n" for c in start)
        kind = "empty" if not start else "a text file" if text else "not a zip or pickle"
        raise ValueError(f"{path} is not a checkpoint ({kind}, {path.stat().st_size} bytes, starting {start!r}); "
                         f"name a .ckpt file that training wrote (RUN/checkpoints/last.ckpt or best.ckpt)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=not trust)
    except pickle.UnpicklingError as error:
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(error))
        if unsafe and not trust:
            raise UnsafeFileError(
                f"checkpoint {path} asks to run {unsafe.group(1)} while loading, beyond the tensors and plain "
                f"values a checkpoint holds; it was not loaded, because loading it could run code. If you trust "
                f"its source, pass {TRUST_HINT}"
            ) from None
        raise ValueError(f"checkpoint {path} is damaged, truncated or not a checkpoint (unreadable pickle); "
                         f"delete it or train again") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as error:
        raise ValueError(f"checkpoint {path} is damaged, truncated or not a checkpoint ({first_line(error)}); "
                         f"delete it or train again") from None
    if not isinstance(payload, dict):
        raise ValueError(f"checkpoint {path} holds a {type(payload).__name__}, not a checkpoint dict")
    return payload


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


_NUMPY_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict"),
}
_NUMPY_DTYPE_MODULES = ("numpy", "numpy.dtypes")


class _PlainUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and plain containers and refuses every other global."""

    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY_GLOBALS or (module in _NUMPY_DTYPE_MODULES and name.endswith("DType")):
            return super().find_class(module, name)
        raise _RefusedGlobal(f"global '{module}.{name}' is not allowed")


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global :class:`_PlainUnpickler` does not build (unlike a damaged pickle)."""


def load_pickle(path: str | Path, trust: bool = False) -> Any:
    """A pickle file's content, built only from numpy arrays and plain Python values unless ``trust``."""
    path = Path(path)
    with open(path, "rb") as handle:
        if trust:
            return pickle.load(handle)
        try:
            return _PlainUnpickler(handle, encoding="latin1").load()
        except _RefusedGlobal as error:
            raise UnsafeFileError(f"{path} needs {first_line(error)} to load, which could run code; it was not "
                                  f"loaded. If you trust its source, load it with trust=True") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
            raise ValueError(f"{path} is damaged, truncated or not a pickle ({first_line(error)}); write or "
                             f"download it again") from None
