"""Data parallelism under torchrun: which images are this process's, and how the shares meet.

``torchrun --nproc_per_node K -m aphq_cli <command> ...`` starts K processes
with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set. Each takes every K-th image
(rank r: images r, r+K, ...: mmdetection's unshuffled DistributedSampler
order) and the shares meet either in memory (evaluation results, gathered
with ``all_gather_object``) or on disk: per-image cache files in the run
folder, which therefore must be on a file system every rank sees (one
machine, or a shared mount), as mmdetection's CPU result collection assumes.

Collectives only move Python objects and synchronize, so the backend is
``gloo`` on CPU and ``nccl`` with CUDA devices. Without torchrun every helper
here is a no-op for one process, so stage code calls them unconditionally.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

# Rank 0 alone reconstructs a block while the others wait at a barrier: at the
# paper's 20000 iterations that takes far longer than torch's 30-minute default.
TIMEOUT = datetime.timedelta(hours=24)


def _joined() -> bool:
    """Whether this process is in an initialized process group."""
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """``(rank, world size)``: from an initialized process group, else torchrun's environment, else (0, 1)."""
    if _joined():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank_world()[0] == 0


def launched() -> bool:
    """Whether torchrun started more than one process."""
    return int(os.environ.get("WORLD_SIZE", 1)) > 1


def init(device: str = "cpu") -> str:
    """Join the process group (once) when launched by torchrun; returns this rank's device.

    With ``cuda`` every process takes ``cuda:LOCAL_RANK``.
    """
    if not launched():
        return device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=TIMEOUT)
    return device


def close() -> None:
    """Leave the process group after a command that succeeded on every rank.

    Without it gloo's worker threads outlive the interpreter: at exit a rank
    can abort with "terminate called without an active exception" (SIGABRT),
    and torchrun then fails a command whose results were already written. The
    barrier keeps a rank from tearing its connections down while another still
    sends. Callers skip this after an error: a rank that failed never reaches
    the barrier, and torchrun stops the others anyway.
    """
    if _joined():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if _joined():
        dist.barrier()


def my_indices(count: int) -> range:
    """This rank's share of ``count`` items: every world-th, starting at its rank."""
    rank, world = rank_world()
    return range(rank, count, world)


def gather_in_order(mine: list, count: int) -> list:
    """Every rank's items (rank r holds items r, r+K, ...) in item order, on every rank.

    ``count`` drops the padding mmdetection's sampler adds to even out the shares.
    """
    if not _joined():
        return list(mine)[:count]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(mine))
    return interleave(parts, count)


def interleave(parts: list[list], count: int) -> list:
    """Undo the round-robin split: ``parts[r]`` holds items r, r+K, ...; padding beyond ``count`` dropped."""
    ordered = [item for group in zip(*parts) for item in group]
    return ordered[:count]


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not _joined():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
