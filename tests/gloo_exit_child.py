"""A spawned gloo process for tests/test_ddp_exit.py. It imports only torch and :mod:`lightning_vrn.distributed`:
a heavier process (Lightning's imports register more exit work) reaches finalisation later and aborts rarely,
so the failure it guards against would hardly show."""

import os

import torch
import torch.distributed as dist

from lightning_vrn.distributed import destroy_process_group_at_exit


def exit_after_collectives(rank: int, port: int, destroy_at_exit: bool) -> None:
    """Join a 2-process gloo group, start 50 all-reduces and return without waiting for them, so that the process
    exits with the group alive and its worker threads busy; ``destroy_at_exit``: register the fix first."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    if destroy_at_exit:
        destroy_process_group_at_exit()
    for _ in range(50):
        dist.all_reduce(torch.ones(1000), async_op=True)
