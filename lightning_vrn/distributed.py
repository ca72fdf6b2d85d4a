"""The end of a ``torch.distributed`` process group: destroyed when the process exits, while Python is whole.

Lightning destroys the group at exit for NCCL only. A gloo process (DDP on CPU) that exits with its group
alive can abort with "terminate called without an active exception": during interpreter finalisation a
gloo worker thread frees a finished collective whose tensors must drop their Python objects; taking the GIL
then ends the thread with ``pthread_exit``, whose unwinding through a ``noexcept`` destructor makes C++ call
``std::terminate`` (docs/failures.md has the native stack). ``atexit`` handlers run before finalisation.
This module imports nothing but torch, so a process that needs only this stays light.
"""

from __future__ import annotations

import atexit

import torch


def destroy_process_group_at_exit() -> None:
    """If this process has a process group, destroy it when the process exits (registered once per process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        atexit.unregister(destroy_process_group)
        atexit.register(destroy_process_group)


def destroy_process_group() -> None:
    """Destroy the default ``torch.distributed`` process group, if this process has one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
