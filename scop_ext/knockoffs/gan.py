"""KnockoffGAN (Jordon et al. 2019) for images, as seed §S2 describes it.

A generator ``G(x, z) -> x~`` and a swap discriminator ``D`` are trained alternately with Adam.
``D`` sees ``[x, x~]_swap(S)`` (``S``: each pixel block swapped with probability 1/2) and, as in
KnockoffGAN, a hint revealing the swap state of a random ``hint_rate`` share of the blocks; it
predicts, for the other blocks, whether they were swapped. ``G`` minimises

    swap      cross-entropy of D's per-block predictions against the target 1/2, minus log 2
              (a confusion loss, 0 exactly when D says 1/2 on every hidden block; unlike the
              minimax "maximise D's loss" it does not reward making D confidently wrong, and
              unlike the non-saturating loss it does not aim at D's opposite label)
    + decorrelation_weight * mean_j corr(x_j, x~_j)^2
              (power: KnockoffGAN penalises the mutual information of x_j and x~_j with a MINE
              estimator; for Gaussians that information is about corr^2 / 2, so we use corr^2)
    + moment_weight * second-order knockoff loss
              (Deep Knockoffs, Romano et al. 2019: ``|mean(x~) - mean(x)|^2 / d`` plus
              ``(|G_x~x~ - G_xx|_F^2 + |off-group(G_xx - G_xx~)|_F^2) / |G_xx|_F^2`` with batch
              covariances ``G``, i.e. the covariance form ``[[Sigma, Sigma - S], [Sigma - S, Sigma]]``)

The networks work at a working resolution (seed: ImageNet at 64 x 64, then upsampled): stacked
convolutions / transposed convolutions up to 32 pixels, ResNet-like blocks above. The swap
discriminator and its loss are in :mod:`~scop_ext.knockoffs.swap`; the loss terms, the streaming
of the loader and resuming are in :mod:`~scop_ext.knockoffs.gan_trainer`.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..ops.checks import check_counts
from .base import KnockoffGenerator, draw_normal, images_of, resize, working_layout
from .gan_trainer import GANTrainer, training_batches
from .swap import ResBlock, SwapDiscriminator

__all__ = ["GANSettings", "KnockoffGAN"]

MAX_PARAMETERS = 10**9  # 4 GB of float32 weights, several times the largest GAN a knockoff needs


def _downsamplings(hw: tuple[int, int], floor: int = 4) -> int:
    """How many times (h, w) can be halved exactly while staying above ``floor``."""
    h, w = hw
    n = 0
    while h % 2 == 0 and w % 2 == 0 and min(h, w) > floor:
        h, w, n = h // 2, w // 2, n + 1
    return n


class _Generator(nn.Module):
    """``G(x, z)``: encoder to at most 4 x 4, decoder back, then an output conv that sees the
    decoded features beside ``x`` and ``z`` again (a U-Net-style skip, so G need not squeeze what
    it keeps of x through the bottleneck). ``resnet=True`` adds a residual block at each scale.

    Shape:
        - Input: x (N, C, H, W), z (N, Z, H, W).
        - Output: (N, C, H, W).
    """

    def __init__(self, channels: int, noise_channels: int, hw: tuple[int, int], width: int, resnet: bool) -> None:
        super().__init__()
        act = nn.LeakyReLU(0.2)
        downs = _downsamplings(hw)
        widths = [min(width * 2**i, 256) for i in range(downs + 1)]
        enc: list[nn.Module] = [nn.Conv2d(channels + noise_channels, widths[0], 3, padding=1), act]
        for i in range(downs):
            enc += [nn.Conv2d(widths[i], widths[i + 1], 4, stride=2, padding=1), act]
            enc += [ResBlock(widths[i + 1])] if resnet else []
        dec: list[nn.Module] = [ResBlock(widths[-1])] if resnet else [nn.Conv2d(widths[-1], widths[-1], 3, padding=1), act]
        for i in reversed(range(downs)):
            dec += [nn.ConvTranspose2d(widths[i + 1], widths[i], 4, stride=2, padding=1), act]
            dec += [ResBlock(widths[i])] if resnet else []
        self.encode = nn.Sequential(*enc)
        self.decode = nn.Sequential(*dec)
        self.out = nn.Sequential(
            nn.Conv2d(widths[0] + channels + noise_channels, widths[0], 3, padding=1),
            act,
            nn.Conv2d(widths[0], channels, 3, padding=1),
        )

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        xz = torch.cat([x, z], 1)
        return self.out(torch.cat([self.decode(self.encode(xz)), xz], 1))


@dataclass
class GANSettings:
    """What a :class:`KnockoffGAN` is built and trained with; ``None`` fields take the seed's
    default for the working size when the input shape is known (:meth:`for_size`).

    Args:
        block: swap-block edge in pixels at the working resolution (default 2 up to 32 pixels,
            ``size // 16`` above; see :func:`~scop_ext.knockoffs.base.working_layout`).
        working_size: about the longer edge the networks work at, each edge a multiple of the
            block (seed: 64 for ImageNet); None: input size.
        iterations, batch_size: default from the seed by working size: up to 16 pixels (the
            bundled 8 x 8 digits) 1500 and 128; up to 32 (CIFAR-10) 20000 and 128; above, 30000
            and 512. Batches are cut from the stream of passes over the loader, so one may end
            one pass and begin the next.
        lr, betas: Adam's, for both networks (seed: lr 0.001).
        noise_channels: channels of the noise image z.
        width: base channel width; default 32 up to 16 pixels, else 64.
        arch: ``"conv"`` or ``"resnet"``; default conv up to 32 pixels, resnet above (seed §S2).
        decorrelation_weight, moment_weight: weights of the generator's extra terms.
        hint_rate: share of blocks whose swap state D is told (see
            :class:`~scop_ext.knockoffs.swap.SwapDiscriminator`); both networks are scored on the
            other blocks only.
        checkpoint_every: iterations between checkpoints when ``fit`` is given a path.
        seed: seeds network initialisation and the training generator.
        max_images: train on at most the first this many images of each pass over the loader.

    Raises:
        ValueError: naming the first setting out of range.
    """

    block: int | None = None
    working_size: int | None = 64
    iterations: int | None = None
    batch_size: int | None = None
    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    noise_channels: int = 4
    width: int | None = None
    arch: str | None = None
    decorrelation_weight: float = 1.0
    moment_weight: float = 1.0
    hint_rate: float = 0.5
    checkpoint_every: int = 1000
    seed: int = 0
    max_images: int | None = None

    def __post_init__(self) -> None:
        check_counts(block=self.block, working_size=self.working_size, iterations=self.iterations,
                     batch_size=self.batch_size, width=self.width, max_images=self.max_images)
        check_counts(False, noise_channels=self.noise_channels, checkpoint_every=self.checkpoint_every)
        if self.arch not in (None, "conv", "resnet"):
            raise ValueError(f"arch must be 'conv', 'resnet' or None, got {self.arch!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        for name in ("decorrelation_weight", "moment_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.hint_rate < 1:
            raise ValueError(f"hint_rate must be in [0, 1), got {self.hint_rate}")
        # numbers as floats, so that config() and the files it goes into do not depend on how they were given
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        for name in ("lr", "decorrelation_weight", "moment_weight", "hint_rate"):
            setattr(self, name, float(getattr(self, name)))

    def for_size(self, block: int, size: int) -> GANSettings:
        """These settings with ``block`` and the defaults for a working image of longer edge
        ``size`` in place of every None."""
        iters, batch = (1500, 128) if size <= 16 else (20000, 128) if size <= 32 else (30000, 512)
        defaults = {"arch": "conv" if size <= 32 else "resnet", "width": 32 if size <= 16 else 64,
                    "iterations": iters, "batch_size": batch}
        filled = {name: value for name, value in defaults.items() if getattr(self, name) is None}
        return dataclasses.replace(self, block=block, **filled)

    def config(self) -> dict[str, Any]:
        """The settings as JSON values, in field order."""
        return {**dataclasses.asdict(self), "betas": list(self.betas)}


class KnockoffGAN(KnockoffGenerator):
    r"""KnockoffGAN with pixel-block swaps (module docstring).

    Args:
        shape: input ``(C, H, W)``; set by :meth:`fit`.
        settings: the fields of :class:`GANSettings` (``block=``, ``iterations=``, ...), kept,
            their defaults filled in once the shape is known, as ``self.settings``.

    Shape:
        - Input: :math:`(N, C, H, W)`.
        - Output: :math:`(N, C, H, W)`, same dtype and device.
    """

    kind = "gan"

    def __init__(self, shape: tuple[int, ...] | list[int] | None = None, **settings: Any) -> None:
        super().__init__()
        self.settings = GANSettings(**settings)
        self.shape: tuple[int, ...] | None = None
        if shape is not None:
            self._build(tuple(shape))

    # ------------------------------------------------------------------ structure

    def _build(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 3:
            raise ValueError(f"KnockoffGAN needs image inputs (C, H, W), got shape {shape}")
        c, h, w = shape
        self.work_hw, block = working_layout((h, w), self.settings.working_size, self.settings.block)
        s = self.settings = self.settings.for_size(block, max(self.work_hw))
        self.shape = shape
        self.layout = (c, *self.work_hw, s.block)
        resnet = s.arch == "resnet"
        with torch.device("meta"):  # sizes may come from a file: count before anything is allocated
            count = sum(p.numel() for net in (_Generator(c, s.noise_channels, self.work_hw, s.width, resnet),
                                              SwapDiscriminator(c, s.block, s.width, resnet))
                        for p in net.parameters())
        if count > MAX_PARAMETERS:
            raise ValueError(f"KnockoffGAN with width={s.width}, noise_channels={s.noise_channels} on {c} channels "
                             f"would hold {count:.3g} parameters; at most {MAX_PARAMETERS:.0e}")
        with torch.random.fork_rng(devices=[]):  # initialise from our seed, leave the global RNG alone
            torch.manual_seed(s.seed)
            self.G = _Generator(c, s.noise_channels, self.work_hw, s.width, resnet)
            self.D = SwapDiscriminator(c, s.block, s.width, resnet)

    def swap_grid(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The block grid at the working resolution; ``shape`` must be the fitted input shape."""
        self._check_shape(shape, self.shape)
        return self.work_hw[0] // self.settings.block, self.work_hw[1] // self.settings.block

    def config(self) -> dict:
        return {"shape": list(self.shape) if self.shape is not None else None, **self.settings.config()}

    # ------------------------------------------------------------------ training

    def working_images(self, loader: Iterable, device: torch.device) -> Iterator[Tensor]:
        """The loader's images at the working resolution on ``device``, pass after pass (the
        first ``max_images`` of each); builds the networks from the first batch if needed."""
        while True:
            count = 0
            for batch in loader:
                x = images_of(batch)
                if self.shape is None:
                    self._build(tuple(x.shape[1:]))
                self._check_input(x, self.shape)
                limit = self.settings.max_images
                if limit is not None:
                    x = x[: limit - count]
                count += x.shape[0]
                yield resize(x.to(device, torch.float32), self.work_hw)
                if limit is not None and count >= limit:
                    break
            if count < 2:
                raise ValueError(f"loader must yield at least 2 images a pass, got {count}")

    def fit(
        self,
        loader: Iterable,
        *,
        device: str | torch.device | None = None,
        checkpoint: str | os.PathLike | None = None,
        resume: bool = False,
        progress: bool = True,
        callback: Callable[[int, dict[str, float]], None] | None = None,
    ) -> KnockoffGAN:
        """Train on ``x`` or ``(x, y)`` batches streamed from ``loader``
        (:mod:`~scop_ext.knockoffs.gan_trainer`).

        Args:
            device: where to train; default where the networks are (CPU before the first fit).
            checkpoint: path written atomically every ``checkpoint_every`` iterations and at the end.
            resume: continue from ``checkpoint`` when it exists (same data, order and config but
                ``iterations`` / ``checkpoint_every``); the images consumed before it are read
                again to check them, and the result equals an uninterrupted run.
            progress: show a tqdm bar.
            callback: called as ``callback(iteration, losses)`` after every iteration.

        Raises:
            ValueError: for a checkpoint that is unreadable, of another format or version, of
                another config or other training data.
        """
        if device is None:
            device = next(self.parameters()).device if self.shape is not None else torch.device("cpu")
        device = torch.device(device)
        images = self.working_images(loader, device)
        first = next(images)  # builds the networks when the shape is not known yet
        self.to(device)
        trainer = GANTrainer(self, training_batches(itertools.chain([first], images), self.settings.batch_size))
        if resume and checkpoint is not None and os.path.exists(checkpoint):
            trainer.resume(checkpoint)
        self.train()
        trainer.run(checkpoint, progress, callback)
        return self.eval()

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``G(x, z)`` at the working resolution, resized back to x's; z from ``generator``."""
        self._check_input(x, self.shape)
        device = next(self.G.parameters()).device
        xw = resize(x.to(device, torch.float32), self.work_hw)
        z = draw_normal((x.shape[0], self.settings.noise_channels, *self.work_hw), generator, device)
        xk = self.G(xw, z)
        return resize(xk, tuple(self.shape[1:])).to(x.device, x.dtype)

    def extra_repr(self) -> str:
        s = self.settings
        return f"shape={self.shape}, block={s.block}, arch={s.arch}, iterations={s.iterations}"
