"""A training process's place among others: the end of its ``torch.distributed`` process group
(:func:`destroy_process_group_at_exit`) and its share of the cores (:func:`limit_threads_to_slurm_task`).

The process group is destroyed when the process exits, while Python is whole.

Lightning destroys the group at exit for NCCL only. A gloo process (DDP on CPU) that exits with its group
alive can abort with "terminate called without an active exception": during interpreter finalisation a
gloo worker thread frees a finished collective whose tensors must drop their Python objects; taking the GIL
then ends the thread with ``pthread_exit``, whose unwinding through a ``noexcept`` destructor makes C++ call
``std::terminate`` (docs/failures.md has the native stack). ``atexit`` handlers run before finalisation.
This module imports little beyond torch, so a process that needs only this stays light.
"""

from __future__ import annotations

import atexit

import torch

from lightning_vrn.metrics.pool import slurm_task_cores


def destroy_process_group_at_exit() -> None:
    """If this process has a process group, destroy it when the process exits (registered once per process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        atexit.unregister(destroy_process_group)
        atexit.register(destroy_process_group)


def destroy_process_group() -> None:
    """Destroy the default ``torch.distributed`` process group, if this process has one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def limit_threads_to_slurm_task(local_ranks: int = 1) -> int:
    """Cap torch's intra-op threads at this process's share of its SLURM task's cores (:func:`slurm_task_cores`:
    the task's cores, or their ``local_ranks``-th part where Lightning starts a node's ranks inside one task), if
    fewer; returns the thread count. Torch starts one thread per core of the node, and a task running more
    threads than its cores slows to a crawl (a training on 2 cores shared with two other processes ran 15 times
    slower)."""
    cores = slurm_task_cores(local_ranks)
    if cores is not None and cores < torch.get_num_threads():
        torch.set_num_threads(cores)
    return torch.get_num_threads()
