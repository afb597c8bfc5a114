"""Data-parallel helpers: process-group setup from torchrun's environment and samplers whose
results do not depend on how many processes share the work."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["setup", "teardown", "rank", "world_size", "is_main", "all_reduce_sum", "barrier", "ShardedBatchSampler", "ShardSampler"]


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


def _order(n: int, shuffle: bool, seed: int, epoch: int) -> list[int]:
    if not shuffle:
        return list(range(n))
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


class ShardedBatchSampler(Sampler[list[int]]):
    """Global batches of ``batch_size * world`` indices, each split into contiguous per-rank parts.

    One process sees exactly the global batches that ``world`` processes see together, in the
    same order (a permutation keyed on ``seed`` and the epoch), so averaged gradients match.
    Call :meth:`set_epoch` at each epoch.
    """

    def __init__(self, length: int, batch_size: int, *, shuffle: bool, seed: int = 0, drop_last: bool = False,
                 rank: int | None = None, world: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.length, self.batch_size, self.shuffle, self.seed, self.drop_last = length, batch_size, shuffle, seed, drop_last
        self.rank = globals()["rank"]() if rank is None else rank
        self.world = world_size() if world is None else world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_batches(self) -> list[list[int]]:
        order = _order(self.length, self.shuffle, self.seed, self.epoch)
        size = self.batch_size * self.world
        batches = [order[i : i + size] for i in range(0, len(order), size)]
        # A short last batch cannot be split evenly, so it is dropped under several processes.
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

    def __init__(self, length: int, rank: int | None = None, world: int | None = None):
        self.length = length
        self.rank = globals()["rank"]() if rank is None else rank
        self.world = world_size() if world is None else world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world))
