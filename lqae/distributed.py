"""torchrun's environment: one process per device, gloo on CPU and NCCL on CUDA (training and encoding)."""

from __future__ import annotations

import contextlib
import gc
import os

import torch
import torch.distributed as dist


def setup_distributed(device: str) -> tuple[int, int, str]:
    """(rank, world size, this process's device) from torchrun's environment; the process group is
    started when there are several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def any_rank(flag: bool, device: str) -> bool:
    """True on every rank when `flag` is true on any."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value)
    return bool(value.item() > 0)


def teardown_distributed(world: int) -> None:
    if world > 1 and dist.is_initialized():
        gc.collect()
        dist.barrier()  # nobody tears down while another rank still talks
        dist.destroy_process_group()


@contextlib.contextmanager
def closing_process_group(world: int):
    """Tear the process group down after the block: with a barrier when it succeeded, at once when it
    raised (the other ranks then fail in their next collective instead of waiting for this one)."""
    try:
        yield
    except BaseException:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
        raise
    teardown_distributed(world)


def rank_share(count: int, rank: int, world: int) -> range:
    """The contiguous block of `count` rows rank `rank` of `world` takes: the blocks in rank order
    are the rows in order."""
    return range(count * rank // world, count * (rank + 1) // world)
