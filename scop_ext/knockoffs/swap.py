"""Telling swapped pixel blocks apart: ``[x, x~]_swap(S)``, the swap discriminator, its loss, and
the classifier two-sample test built from them.

:class:`~scop_ext.knockoffs.gan.KnockoffGAN` trains its generator against a
:class:`SwapDiscriminator`; :func:`swap_advantage` trains a fresh one to measure knockoffs made
by any generator.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.checks import check_counts

__all__ = ["ResBlock", "SwapDiscriminator", "swap_blocks", "hidden_bce", "swap_advantage"]


def _per_pixel(blocks: Tensor, like: Tensor) -> Tensor:
    """(N, 1, H / b, W / b) one value per b x b block -> (N, 1, H, W), the size of ``like``."""
    b = like.shape[-1] // blocks.shape[-1]
    return blocks.repeat_interleave(b, -2).repeat_interleave(b, -1)


def swap_blocks(x: Tensor, xk: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``[x, x~]_swap(S)``: exchange the pixel blocks where ``mask`` is 1.

    Args:
        x, xk: (N, C, H, W).
        mask: (N, 1, H / b, W / b) of 0/1, one entry per b x b block.
    """
    full = _per_pixel(mask, x).bool()
    return torch.where(full, xk, x), torch.where(full, x, xk)


class ResBlock(nn.Module):
    """conv3-act-conv3 plus identity. Input/Output: (N, width, H, W)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(width, width, 3, padding=1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x + self.body(x), 0.2)


class SwapDiscriminator(nn.Module):
    """Predicts which pixel blocks of ``[x, x~]`` were swapped, given a hint.

    Without a hint the task is blind to some failures: for an ``x~`` independent of ``x`` with
    the same law (a permutation), ``[x, x~]`` and ``[x~, x]`` are equally likely, so D could only
    tell which blocks belong together, never which side is which. As in KnockoffGAN (after GAIN)
    D is therefore told the true swap state of a random part of the blocks and scored on the rest.

    A conv stem, a ``block``-strided patchify conv to the block grid, three 3 x 3 convs (residual
    blocks when ``resnet``) on that grid, then a 1 x 1 head that sees each block's features next
    to their image-wide mean, so a block can be judged against the rest of the image.

    Shape:
        - Input: pair (N, 2C, H, W), ``cat([x_swapped, x~_swapped], 1)``; hint
          (N, 1, H / block, W / block): +1 swapped, -1 not swapped, 0 not revealed.
        - Output: (N, 1, H / block, W / block) logits, > 0 meaning "swapped".
    """

    def __init__(self, channels: int, block: int, width: int, resnet: bool = False) -> None:
        super().__init__()
        act = nn.LeakyReLU(0.2)
        grid: list[nn.Module] = (
            [ResBlock(width) for _ in range(2)] if resnet else [m for _ in range(2) for m in (nn.Conv2d(width, width, 3, padding=1), act)]
        )
        self.features = nn.Sequential(
            nn.Conv2d(2 * channels + 1, width, 3, padding=1),
            act,
            nn.Conv2d(width, width, block, stride=block),
            act,
            *grid,
        )
        self.head = nn.Sequential(nn.Conv2d(2 * width, width, 1), act, nn.Conv2d(width, 1, 1))

    def forward(self, pair: Tensor, hint: Tensor) -> Tensor:
        f = self.features(torch.cat([pair, _per_pixel(hint, pair)], 1))
        context = f.mean((2, 3), keepdim=True).expand_as(f)
        return self.head(torch.cat([f, context], 1))


def hidden_bce(logits: Tensor, target: Tensor, revealed: Tensor) -> Tensor:
    """Mean binary cross-entropy over the blocks whose swap state was not revealed."""
    hidden = 1 - revealed
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (loss * hidden).sum() / hidden.sum().clamp_min(1)


def swap_advantage(
    x: Tensor,
    xk: Tensor,
    block: int,
    steps: int = 500,
    width: int = 32,
    hint_rate: float = 0.5,
    batch_size: int = 128,
    repeats: int = 8,
    seed: int = 0,
) -> dict:
    """A classifier two-sample test of exchangeability beyond second order.

    A fresh :class:`SwapDiscriminator` is trained for ``steps`` Adam
    steps (lr 1e-3) on the first half of the pairs to tell which blocks of ``[x, x~]`` were
    swapped (with ``hint_rate`` of them revealed), then scored on the unrevealed blocks of the
    second half under ``repeats`` fresh swap patterns.

    Its power grows with ``steps``: on the digits a permutation goes undetected after 200 steps
    and is plain after 500, so read a small advantage as "not detected at this budget".

    Returns:
        dict: ``advantage`` = held-out accuracy - 1/2 (0: swaps undetectable), ``stderr``
        (binomial, counting every scored block as independent, so a lower bound), ``scored``.
    """
    if x.dim() != 4 or x.shape != xk.shape:
        raise ValueError(f"x and xk must be (N, C, H, W) of one shape, got {tuple(x.shape)} and {tuple(xk.shape)}")
    check_counts(False, block=block, steps=steps, width=width, batch_size=batch_size, repeats=repeats)
    if not 0 <= hint_rate < 1:
        raise ValueError(f"hint_rate must be in [0, 1), got {hint_rate}")
    if x.shape[-1] % block or x.shape[-2] % block:
        raise ValueError(f"block={block} does not divide the image size {tuple(x.shape[-2:])}")
    if x.shape[0] < 4:
        raise ValueError(f"need at least 4 pairs, got {x.shape[0]}")
    rng = torch.Generator().manual_seed(seed)
    x, xk = x.detach().float().cpu(), xk.detach().float().cpu()
    order = torch.randperm(x.shape[0], generator=rng)
    train, test = order[: x.shape[0] // 2], order[x.shape[0] // 2 :]
    grid = (x.shape[-2] // block, x.shape[-1] // block)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        disc = SwapDiscriminator(x.shape[1], block, width)
    opt = torch.optim.Adam(disc.parameters(), lr=1e-3)

    def scored(idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mask = (torch.rand((len(idx), 1, *grid), generator=rng) < 0.5).float()
        revealed = (torch.rand((len(idx), 1, *grid), generator=rng) < hint_rate).float()
        logits = disc(torch.cat(swap_blocks(x[idx], xk[idx], mask), 1), revealed * (2 * mask - 1))
        return logits, mask, revealed

    for _ in range(steps):
        idx = train[torch.randint(len(train), (min(batch_size, len(train)),), generator=rng)]
        logits, mask, revealed = scored(idx)
        loss = hidden_bce(logits, mask, revealed)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    hits = total = 0.0
    with torch.no_grad():
        for _ in range(repeats):
            logits, mask, revealed = scored(test)
            hits += float((((logits > 0).float() == mask).float() * (1 - revealed)).sum())
            total += float((1 - revealed).sum())
    acc = hits / max(total, 1.0)
    return {"advantage": acc - 0.5, "stderr": math.sqrt(max(acc * (1 - acc), 1e-12) / max(total, 1.0)), "scored": int(total)}
