"""Stage 2's data: each real image paired with one knockoff of it, drawn up front
(:func:`pair_dataset`) or on the fly (:class:`PairedDataset`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["Sampler", "pair_dataset", "PairedDataset"]

Sampler = Callable[..., Tensor]  # (x, generator=...) -> x~ with x's shape


@torch.no_grad()
def pair_dataset(dataset: Dataset, sample: Sampler, *, seed: int = 0, batch_size: int = 256) -> TensorDataset:
    """Draw one knockoff per image, once: a ``TensorDataset`` of (x, x~, y).

    Model-X knockoffs are one draw per sample, paired with it; drawing them once also makes
    stage 2 independent of batch order and of how many processes share the work.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    gen = torch.Generator().manual_seed(seed)
    xs, ks, ys = [], [], []
    for x, y in loader:
        xs.append(x)
        ks.append(sample(x, generator=gen).to(x.dtype))
        ys.append(y)
    return TensorDataset(torch.cat(xs), torch.cat(ks), torch.cat(ys))


class PairedDataset(Dataset):
    """(x, x~, y) drawn on the fly, for datasets too large to pair up front.

    The knockoff of item i comes from a generator keyed on (seed, i), so it is the same every
    epoch and in every worker or process.
    """

    def __init__(self, dataset: Dataset, sample: Sampler, seed: int = 0):
        self.dataset, self.sample, self.seed = dataset, sample, seed

    def __len__(self) -> int:
        return len(self.dataset)

    @torch.no_grad()
    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return x, self.sample(x[None], generator=gen)[0].to(x.dtype), y
