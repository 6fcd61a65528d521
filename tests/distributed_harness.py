"""Runs a function on 2 CPU ranks (torch.distributed, gloo) and collects what each rank returns."""

from __future__ import annotations

import gc
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unlearn_fast import distributed

WORLD_SIZE = 2
TIMEOUT_S = 300


def _worker(rank: int, fn: Callable[[str], dict], init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        assert distributed.rank_and_world_size() == (rank, WORLD_SIZE)
        torch.save(fn(out_dir), Path(out_dir) / f"rank{rank}.pt")
    finally:
        gc.collect()  # FSDP modules (reference cycles) free their collectives' work while the group lives
        dist.destroy_process_group()


def run_on_ranks(fn: Callable[[str], dict], tmp_path: Path) -> list[dict]:
    """``fn(out_dir)`` on every rank (a module-level function: the ranks are spawned processes)."""
    context = mp.start_processes(
        _worker, args=(fn, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            raise AssertionError(f"the {WORLD_SIZE} ranks did not finish in {TIMEOUT_S} s (a collective mismatch?)")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
