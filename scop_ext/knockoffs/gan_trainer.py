"""Training a :class:`~scop_ext.knockoffs.gan.KnockoffGAN`: the generator's loss terms (the
``gan`` module docstring gives the objective), the stream of training batches, and progress
checkpoints that resume exactly.

``fit`` streams the loader, pass after pass, cutting its images (resized to the working
resolution on the training device) into training batches, so memory holds a loader batch and a
training batch, not the data set (ImageNet at 64 x 64 in float32 would be ~63 GB). Noise and swap
masks come from a seeded ``torch.Generator`` of its own, so a run depends only on the data, its
order and the config. Resuming a checkpoint replays the images consumed before it (read and
checksummed, not trained on) to check they are the same and to reach the same place in the
stream; the result is bit-identical on the CPU (on CUDA as far as cuDNN is deterministic). The
loader must therefore give the same order every time it is built: no shuffling, or shuffling
from a ``torch.Generator`` seeded the same way.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..train import checkpoint
from ..train.metrics import EpochLog
from .swap import hidden_bce, swap_blocks

if TYPE_CHECKING:
    from .gan import KnockoffGAN

__all__ = ["CHECKPOINT_KIND", "GANTrainer", "training_batches"]

CHECKPOINT_KIND = "knockoff-gan-progress"

# keys of config() a checkpoint may differ in and still be resumed
_RESUMABLE_CHANGES = {"iterations", "checkpoint_every"}


def _batch_corr2(x: Tensor, xk: Tensor) -> Tensor:
    """mean_j corr(x_j, x~_j)^2 over a batch; x, xk: (B, d). Constant coordinates count as 0."""
    xc, kc = x - x.mean(0), xk - xk.mean(0)
    cov = (xc * kc).mean(0)
    return (cov * cov / ((xc * xc).mean(0) * (kc * kc).mean(0) + 1e-8)).mean()


def _group_view(flat: Tensor, layout: tuple[int, int, int, int]) -> Tensor:
    """(B, C*H*W) -> (B, G, C*b*b): each b x b block group's coordinates together.
    ``layout`` is (C, H, W, b)."""
    c, h, w, b = layout
    x = flat.reshape(-1, c, h // b, b, w // b, b)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(flat.shape[0], (h // b) * (w // b), c * b * b)


def _second_order_loss(x: Tensor, xk: Tensor, layout: tuple[int, int, int, int]) -> Tensor:
    """The Deep Knockoffs moment loss (module docstring) through B x B Gram matrices, so the
    cost is O(B^2 d) rather than O(B d^2). x, xk: (B, d) flattened (C, H, W) images; ``layout``
    (C, H, W, b) gives the block groups whose within-group cross-covariance is left free."""
    d = x.shape[1]
    mean_term = (xk.mean(0) - x.mean(0)).pow(2).sum() / d
    xc, kc = x - x.mean(0), xk - xk.mean(0)
    gram_x, gram_k, cross = xc @ xc.T, kc @ kc.T, kc @ xc.T
    norm_x = gram_x.pow(2).sum()
    cov_term = gram_k.pow(2).sum() + norm_x - 2 * cross.pow(2).sum()  # |G_kk - G_xx|_F^2, times B^2
    diff = xc - kc
    full = (gram_x * (diff @ diff.T)).sum()  # |xc^T (xc - kc)|_F^2 = |G_xx - G_xk|_F^2, times B^2
    within = torch.einsum("bga,bgc->gac", _group_view(xc, layout), _group_view(diff, layout)).pow(2).sum()
    return mean_term + (cov_term + full - within) / norm_x.clamp_min(1e-12)



def training_batches(images: Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    """Batches of exactly ``batch_size`` images cut from a stream of image batches of any size
    (one may end one pass over the loader and begin the next)."""
    held: list[Tensor] = []
    count = 0
    for x in images:
        held.append(x)
        count += x.shape[0]
        while count >= batch_size:
            joined = torch.cat(held)
            yield joined[:batch_size]
            held, count = [joined[batch_size:]], count - batch_size


def _fingerprint(x: Tensor, first: int) -> float:
    """Order-sensitive checksum of a batch whose images sit at stream positions ``first``,
    ``first + 1``, ...; summed over batches it identifies the images a run has consumed."""
    weights = torch.arange(first + 1, first + x.shape[0] + 1, dtype=torch.float64, device=x.device)
    return float((x.flatten(1).to(torch.float64).sum(1) * weights).sum())


class GANTrainer:
    """Alternating Adam steps of a built KnockoffGAN's D and G over ``batches``, with progress
    checkpoints (module docstring).

    Args:
        gan: its networks built and on the training device.
        batches: (batch_size, C, h, w) training batches at the working resolution, from
            :func:`training_batches`, on that device.
    """

    def __init__(self, gan: KnockoffGAN, batches: Iterator[Tensor]) -> None:
        s = gan.settings
        self.gan, self.batches = gan, batches
        self.opt_g = torch.optim.Adam(gan.G.parameters(), lr=s.lr, betas=s.betas)
        self.opt_d = torch.optim.Adam(gan.D.parameters(), lr=s.lr, betas=s.betas)
        self.rng = torch.Generator().manual_seed(s.seed + 1)
        self.start, self.fingerprint = 0, 0.0

    def resume(self, path: str | os.PathLike) -> None:
        """Continue from the checkpoint at ``path``: replay (read and checksum, not train on) the
        batches consumed before it, then load the networks, optimisers and noise generator.

        Raises:
            ValueError: for a checkpoint that is unreadable, of another format or version, of
                another config or other training data.
        """
        start, saved_fingerprint, states = self._read(path)
        for it, x in zip(range(start), self.batches):
            self.fingerprint += _fingerprint(x, it * self.gan.settings.batch_size)
        if not math.isclose(saved_fingerprint, self.fingerprint, rel_tol=1e-9, abs_tol=1e-9):
            raise ValueError(
                f"{path}: checkpoint was trained on other data or another order "
                "(resume with the same dataset and a loader that does not shuffle, or shuffles from the same seed)"
            )
        try:
            self.gan.load_state_dict(states["model"])
            self.opt_g.load_state_dict(states["opt_g"])
            self.opt_d.load_state_dict(states["opt_d"])
            self.rng.set_state(states["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: checkpoint state does not fit this KnockoffGAN ({exc})") from None
        self.start = start

    def run(
        self,
        checkpoint: str | os.PathLike | None = None,
        progress: bool = True,
        callback: Callable[[int, dict[str, float]], None] | None = None,
    ) -> None:
        """Train up to ``iterations``, checkpointing to ``checkpoint`` every ``checkpoint_every``
        iterations and at the end; ``callback(iteration, losses)`` after every iteration."""
        s = self.gan.settings
        # a tenth of the run is the GAN's "epoch": one log line each, as the other stages log theirs
        log = EpochLog("knockoffs", 10, unit="KnockoffGAN tenth")
        log.start(self.start * 10 // s.iterations)
        tenth = max(1, s.iterations // 10)
        with tqdm(total=s.iterations, initial=self.start, disable=not progress, desc="KnockoffGAN", leave=False) as bar:
            for it, x in zip(range(self.start, s.iterations), self.batches):
                self.fingerprint += _fingerprint(x, it * s.batch_size)
                losses = self.step(x)
                done = it + 1
                if done % tenth == 0 and done // tenth <= 10:
                    log.epoch(done // tenth - 1, {"iteration": done, **losses})
                if checkpoint is not None and (done % s.checkpoint_every == 0 or done == s.iterations):
                    self._save(checkpoint, done)
                bar.update(1)
                if done % 50 == 0:
                    bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()})
                if callback is not None:
                    callback(done, losses)

    def step(self, x: Tensor) -> dict[str, float]:
        """One D step, then one G step, on the (B, C, h, w) batch ``x``; returns the losses."""
        gan, s = self.gan, self.gan.settings
        dev, batch = x.device, x.shape[0]
        grid = (gan.work_hw[0] // s.block, gan.work_hw[1] // s.block)
        z = torch.randn((batch, s.noise_channels, *gan.work_hw), generator=self.rng).to(dev)
        masks = (torch.rand((2, batch, 1, *grid), generator=self.rng) < 0.5).float().to(dev)
        revealed = (torch.rand((2, batch, 1, *grid), generator=self.rng) < s.hint_rate).float().to(dev)
        hints = revealed * (2 * masks - 1)
        xk = gan.G(x, z)

        gan.D.requires_grad_(True)
        logits = gan.D(torch.cat(swap_blocks(x, xk.detach(), masks[0]), 1), hints[0])
        loss_d = hidden_bce(logits, masks[0], revealed[0])
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()

        gan.D.requires_grad_(False)  # the generator step must not accumulate D gradients
        logits = gan.D(torch.cat(swap_blocks(x, xk, masks[1]), 1), hints[1])
        swap = hidden_bce(logits, torch.full_like(logits, 0.5), revealed[1]) - math.log(2)
        flat_x, flat_k = x.reshape(batch, -1), xk.reshape(batch, -1)
        decor = _batch_corr2(flat_x, flat_k)
        moments = _second_order_loss(flat_x, flat_k, gan.layout)
        loss_g = swap + s.decorrelation_weight * decor + s.moment_weight * moments
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        gan.D.requires_grad_(True)
        return {"d": loss_d.item(), "swap": swap.item(), "decor": decor.item(), "moments": moments.item()}

    def _save(self, path: str | os.PathLike, iteration: int) -> None:
        checkpoint.save(
            path,
            CHECKPOINT_KIND,
            {
                "config": json.dumps(self.gan.config()),
                "iteration": iteration,
                "fingerprint": self.fingerprint,
                "model": {k: v.detach().cpu() for k, v in self.gan.state_dict().items()},
                "opt_g": self.opt_g.state_dict(),
                "opt_d": self.opt_d.state_dict(),
                "rng": self.rng.get_state(),
            },
        )

    def _read(self, path: str | os.PathLike) -> tuple[int, float, dict]:
        """(iteration, fingerprint, states) of a progress checkpoint written with this config."""
        obj = checkpoint.load(path, CHECKPOINT_KIND)
        try:
            saved = json.loads(obj["config"])
            iteration = int(obj["iteration"])
            fingerprint = float(obj["fingerprint"])
            states = {key: obj[key] for key in ("model", "opt_g", "opt_d", "rng")}
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: incomplete KnockoffGAN checkpoint ({exc})") from None
        ours = self.gan.config()
        differ = checkpoint.differing_keys(saved, ours, ignore=_RESUMABLE_CHANGES)
        if differ:
            detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs {ours.get(k)!r}" for k in differ)
            raise ValueError(f"{path}: checkpoint was written with another config ({detail})")
        if not 0 <= iteration <= self.gan.settings.iterations:
            raise ValueError(f"{path}: checkpoint iteration {iteration} is outside [0, {self.gan.settings.iterations}]")
        return iteration, fingerprint, states
