"""Data-parallel helpers: process-group setup from torchrun's environment and samplers whose
results do not depend on how many processes share the work."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["setup", "teardown", "rank", "world_size", "is_main", "all_reduce_sum", "any_process", "gather_objects",
           "broadcast_", "barrier", "ShardedBatchSampler", "ShardSampler"]


def setup(device: torch.device | str | None = None) -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); gloo on CPU, nccl on CUDA.

    Returns whether this run is distributed. Safe to call when already initialised.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return True


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process: one all-reduce, so every process takes the same branch."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj) -> list:
    """``obj`` of every process, in rank order (pickled: for rare, small values such as error messages)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_(tensors, src: int = 0) -> None:
    """Overwrite ``tensors`` on every process with process ``src``'s values (same shapes everywhere)."""
    if not dist.is_initialized():
        return
    device = _collective_device()
    for t in tensors:
        buffer = t.detach().to(device)
        dist.broadcast(buffer, src)
        with torch.no_grad():
            t.copy_(buffer)


def _collective_device() -> torch.device:
    # nccl moves CUDA tensors only; gloo CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _order(n: int, shuffle: bool, seed: int, epoch: int) -> list[int]:
    if not shuffle:
        return list(range(n))
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


class ShardedBatchSampler(Sampler[list[int]]):
    """Global batches of ``batch_size * world`` indices, each split into contiguous per-rank parts.

    The global batches follow one permutation keyed on ``seed`` and the epoch, whatever the
    number of processes, so averaged gradients match those of one process on the same global
    batches. The exception is a short last batch: it cannot be split evenly, so several
    processes drop it while one process keeps it; with ``drop_last=True`` it is dropped
    everywhere and one process sees exactly the global batches that ``world`` processes see
    together. Call :meth:`set_epoch` at each epoch.

    Args:
        shard: ``(rank, world)``; default this process's place in the process group. ``(0, 1)``
            gives every process the whole of every batch.
    """

    def __init__(self, length: int, batch_size: int, *, shuffle: bool, seed: int = 0, drop_last: bool = False,
                 shard: tuple[int, int] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.length, self.batch_size, self.shuffle, self.seed, self.drop_last = length, batch_size, shuffle, seed, drop_last
        self.rank, self.world = (rank(), world_size()) if shard is None else shard
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_batches(self) -> list[list[int]]:
        order = _order(self.length, self.shuffle, self.seed, self.epoch)
        size = self.batch_size * self.world
        batches = [order[i : i + size] for i in range(0, len(order), size)]
        if batches and len(batches[-1]) < size and (self.drop_last or self.world > 1):
            batches.pop()
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._global_batches():
            part = len(batch) // self.world
            yield batch[self.rank * part : (self.rank + 1) * part]

    def __len__(self) -> int:
        return len(self._global_batches())


class ShardSampler(Sampler[int]):
    """Every index exactly once across ranks (``rank::world``), no padding: for exact evaluation."""

    def __init__(self, length: int, shard: tuple[int, int] | None = None):
        self.length = length
        self.rank, self.world = (rank(), world_size()) if shard is None else shard

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world))
