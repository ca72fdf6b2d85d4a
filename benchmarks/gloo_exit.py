"""How often a gloo (CPU DDP) process that exits with its process group alive aborts, with and without the
exit handler of :mod:`lightning_vrn.distributed`: ``python -m benchmarks.gloo_exit [--pairs N] [--out FILE]``.

A trial spawns two processes (:func:`exit_after_collectives`) that join a gloo group, start 50 all-reduces
and return without waiting, so each exits with the group alive and its worker threads busy: the case in
which a worker thread frees a collective while Python finalises and the process aborts ("terminate called
without an active exception"). The module imports only torch and lightning_vrn.distributed at the top, as
the spawned processes import it: a heavier process reaches finalisation later and aborts rarely, which would
hide the difference. tests/test_ddp_exit.py runs the fixed case; this script also measures the control.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from lightning_vrn.distributed import destroy_process_group_at_exit


def exit_after_collectives(rank: int, port: int, destroy_at_exit: bool) -> None:
    """Join a 2-process gloo group, start 50 all-reduces and return without waiting for them, so that the process
    exits with the group alive and its worker threads busy; ``destroy_at_exit``: register the exit handler first."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    if destroy_at_exit:
        destroy_process_group_at_exit()
    for _ in range(50):
        dist.all_reduce(torch.ones(1000), async_op=True)


def spawn_pair(destroy_at_exit: bool) -> None:
    """One trial: two :func:`exit_after_collectives` processes; raises ``ProcessExitedException`` if one aborts."""
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(exit_after_collectives, args=(port, destroy_at_exit), nprocs=2, join=True)


def main(argv: list[str] | None = None) -> None:
    import argparse
    from pathlib import Path

    from torch.multiprocessing import ProcessExitedException

    from benchmarks.common import report

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=20, help="trials per case (default 20)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = []
    for destroy_at_exit, case in ((False, "without the exit handler"), (True, "with the exit handler")):
        aborted = 0
        for _ in range(args.pairs):
            try:
                spawn_pair(destroy_at_exit)
            except ProcessExitedException:
                aborted += 1
        rows.append((f"pairs that aborted, {case}", f"{aborted} of {args.pairs}"))
    report(rows, args.out)


if __name__ == "__main__":
    main()
