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
convolutions / transposed convolutions up to 32 pixels, ResNet-like blocks above. ``fit`` streams
the loader, pass after pass, cutting its images (resized to the working resolution on the
training device) into training batches, so memory holds a loader batch and a training batch, not
the data set (ImageNet at 64 x 64 in float32 would be ~63 GB). Noise and swap masks come from a
seeded ``torch.Generator`` of its own, so a run depends only on the data, its order and the
config. Resuming a checkpoint replays the images consumed before it (read and checksummed, not
trained on) to check they are the same and to reach the same place in the stream; the result
is bit-identical on the CPU (on CUDA as far as cuDNN is deterministic). The loader must
therefore give the same order every time it is built: no shuffling, or shuffling from a
``torch.Generator`` seeded the same way.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import checkpoint
from .base import KnockoffGenerator, check_counts, draw_normal, images_of, resize, working_layout
from .swap import ResBlock, SwapDiscriminator, hidden_bce, swap_blocks

__all__ = ["KnockoffGAN", "CHECKPOINT_KIND"]

CHECKPOINT_KIND = "knockoff-gan-progress"
MAX_PARAMETERS = 10**9  # 4 GB of float32 weights, several times the largest GAN a knockoff needs

# keys of config() a checkpoint may differ in and still be resumed
_RESUMABLE_CHANGES = {"iterations", "checkpoint_every"}


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


class KnockoffGAN(KnockoffGenerator):
    r"""KnockoffGAN with pixel-block swaps (module docstring).

    Args:
        shape: input ``(C, H, W)``; set by :meth:`fit`.
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
        hint_rate: share of blocks whose swap state D is told (see :class:`SwapDiscriminator`);
            both networks are scored on the other blocks only.
        checkpoint_every: iterations between checkpoints when ``fit`` is given a path.
        seed: seeds network initialisation and the training generator.
        max_images: train on at most the first this many images of each pass over the loader.

    Shape:
        - Input: :math:`(N, C, H, W)`.
        - Output: :math:`(N, C, H, W)`, same dtype and device.
    """

    kind = "gan"

    def __init__(
        self,
        shape: tuple[int, ...] | list[int] | None = None,
        block: int | None = None,
        working_size: int | None = 64,
        iterations: int | None = None,
        batch_size: int | None = None,
        lr: float = 1e-3,
        betas: tuple[float, float] | list[float] = (0.5, 0.999),
        noise_channels: int = 4,
        width: int | None = None,
        arch: str | None = None,
        decorrelation_weight: float = 1.0,
        moment_weight: float = 1.0,
        hint_rate: float = 0.5,
        checkpoint_every: int = 1000,
        seed: int = 0,
        max_images: int | None = None,
    ) -> None:
        super().__init__()
        check_counts(block=block, working_size=working_size, iterations=iterations, batch_size=batch_size,
                     width=width, max_images=max_images)
        check_counts(False, noise_channels=noise_channels, checkpoint_every=checkpoint_every)
        if arch not in (None, "conv", "resnet"):
            raise ValueError(f"arch must be 'conv', 'resnet' or None, got {arch!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        for name, value in (("decorrelation_weight", decorrelation_weight), ("moment_weight", moment_weight)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        self.block = block
        self.working_size = working_size
        self.iterations = iterations
        self.batch_size = batch_size
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.noise_channels = noise_channels
        self.width = width
        self.arch = arch
        self.decorrelation_weight = float(decorrelation_weight)
        self.moment_weight = float(moment_weight)
        if not 0 <= hint_rate < 1:
            raise ValueError(f"hint_rate must be in [0, 1), got {hint_rate}")
        self.hint_rate = float(hint_rate)
        self.checkpoint_every = checkpoint_every
        self.seed = seed
        self.max_images = max_images
        self.shape: tuple[int, ...] | None = None
        if shape is not None:
            self._build(tuple(shape))

    # ------------------------------------------------------------------ structure

    def _build(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 3:
            raise ValueError(f"KnockoffGAN needs image inputs (C, H, W), got shape {shape}")
        c, h, w = shape
        self.work_hw, self.block = working_layout((h, w), self.working_size, self.block)
        size = max(self.work_hw)
        iters, batch = (1500, 128) if size <= 16 else (20000, 128) if size <= 32 else (30000, 512)
        defaults = {"arch": "conv" if size <= 32 else "resnet", "width": 32 if size <= 16 else 64,
                    "iterations": iters, "batch_size": batch}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.shape = shape
        self.layout = (c, *self.work_hw, self.block)
        resnet = self.arch == "resnet"
        with torch.device("meta"):  # sizes may come from a file: count before anything is allocated
            count = sum(p.numel() for net in (_Generator(c, self.noise_channels, self.work_hw, self.width, resnet),
                                              SwapDiscriminator(c, self.block, self.width, resnet))
                        for p in net.parameters())
        if count > MAX_PARAMETERS:
            raise ValueError(f"KnockoffGAN with width={self.width}, noise_channels={self.noise_channels} on {c} channels "
                             f"would hold {count:.3g} parameters; at most {MAX_PARAMETERS:.0e}")
        with torch.random.fork_rng(devices=[]):  # initialise from our seed, leave the global RNG alone
            torch.manual_seed(self.seed)
            self.G = _Generator(c, self.noise_channels, self.work_hw, self.width, resnet)
            self.D = SwapDiscriminator(c, self.block, self.width, resnet)

    def swap_grid(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The block grid at the working resolution; ``shape`` must be the fitted input shape."""
        self._check_shape(shape, self.shape)
        return self.work_hw[0] // self.block, self.work_hw[1] // self.block

    def config(self) -> dict:
        return {
            "shape": list(self.shape) if self.shape is not None else None,
            "block": self.block,
            "working_size": self.working_size,
            "iterations": self.iterations,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "betas": list(self.betas),
            "noise_channels": self.noise_channels,
            "width": self.width,
            "arch": self.arch,
            "decorrelation_weight": self.decorrelation_weight,
            "moment_weight": self.moment_weight,
            "hint_rate": self.hint_rate,
            "checkpoint_every": self.checkpoint_every,
            "seed": self.seed,
            "max_images": self.max_images,
        }

    # ------------------------------------------------------------------ training

    def _passes(self, loader: Iterable, device: torch.device) -> Iterator[Tensor]:
        """The loader's images at the working resolution on ``device``, pass after pass (the
        first ``max_images`` of each); builds the networks from the first batch if needed."""
        while True:
            count = 0
            for batch in loader:
                x = images_of(batch)
                if self.shape is None:
                    self._build(tuple(x.shape[1:]))
                self._check_input(x, self.shape)
                if self.max_images is not None:
                    x = x[: self.max_images - count]
                count += x.shape[0]
                yield resize(x.to(device, torch.float32), self.work_hw)
                if self.max_images is not None and count >= self.max_images:
                    break
            if count < 2:
                raise ValueError(f"loader must yield at least 2 images a pass, got {count}")

    def _batches(self, loader: Iterable, device: torch.device) -> Iterator[Tensor]:
        """Training batches of exactly ``batch_size`` images cut from :meth:`_passes`."""
        held: list[Tensor] = []
        count = 0
        for x in self._passes(loader, device):
            held.append(x)
            count += x.shape[0]
            while count >= self.batch_size:
                joined = torch.cat(held)
                yield joined[: self.batch_size]
                held, count = [joined[self.batch_size :]], count - self.batch_size

    @staticmethod
    def _fingerprint(x: Tensor, first: int) -> float:
        """Order-sensitive checksum of a batch whose images sit at stream positions ``first``,
        ``first + 1``, ...; summed over batches it identifies the images a run has consumed."""
        weights = torch.arange(first + 1, first + x.shape[0] + 1, dtype=torch.float64, device=x.device)
        return float((x.flatten(1).to(torch.float64).sum(1) * weights).sum())

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
        """Train on ``x`` or ``(x, y)`` batches streamed from ``loader`` (module docstring).

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
        stream = self._batches(loader, device)
        first = next(stream)  # builds the networks when the shape is not known yet
        batches = itertools.chain([first], stream)
        self.to(device)
        opt_g = torch.optim.Adam(self.G.parameters(), lr=self.lr, betas=self.betas)
        opt_d = torch.optim.Adam(self.D.parameters(), lr=self.lr, betas=self.betas)
        rng = torch.Generator().manual_seed(self.seed + 1)
        start, fingerprint = 0, 0.0
        if resume and checkpoint is not None and os.path.exists(checkpoint):
            start, saved_fingerprint, states = self._read_checkpoint(checkpoint)
            for it, x in zip(range(start), batches):
                fingerprint += self._fingerprint(x, it * self.batch_size)
            if not math.isclose(saved_fingerprint, fingerprint, rel_tol=1e-9, abs_tol=1e-9):
                raise ValueError(
                    f"{checkpoint}: checkpoint was trained on other data or another order "
                    "(resume with the same dataset and a loader that does not shuffle, or shuffles from the same seed)"
                )
            self._load_progress(checkpoint, states, opt_g, opt_d, rng)
        self.train()
        with tqdm(total=self.iterations, initial=start, disable=not progress, desc="KnockoffGAN", leave=False) as bar:
            for it, x in zip(range(start, self.iterations), batches):
                fingerprint += self._fingerprint(x, it * self.batch_size)
                losses = self._step(x, rng, opt_g, opt_d)
                done = it + 1
                if checkpoint is not None and (done % self.checkpoint_every == 0 or done == self.iterations):
                    self._save_checkpoint(checkpoint, done, fingerprint, opt_g, opt_d, rng)
                bar.update(1)
                if done % 50 == 0:
                    bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()})
                if callback is not None:
                    callback(done, losses)
        return self.eval()

    def _step(self, x: Tensor, rng: torch.Generator, opt_g, opt_d) -> dict[str, float]:
        dev, batch = x.device, x.shape[0]
        grid = (self.work_hw[0] // self.block, self.work_hw[1] // self.block)
        z = torch.randn((batch, self.noise_channels, *self.work_hw), generator=rng).to(dev)
        masks = (torch.rand((2, batch, 1, *grid), generator=rng) < 0.5).float().to(dev)
        revealed = (torch.rand((2, batch, 1, *grid), generator=rng) < self.hint_rate).float().to(dev)
        hints = revealed * (2 * masks - 1)
        xk = self.G(x, z)

        self.D.requires_grad_(True)
        logits = self.D(torch.cat(swap_blocks(x, xk.detach(), masks[0]), 1), hints[0])
        loss_d = hidden_bce(logits, masks[0], revealed[0])
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()

        self.D.requires_grad_(False)  # the generator step must not accumulate D gradients
        logits = self.D(torch.cat(swap_blocks(x, xk, masks[1]), 1), hints[1])
        swap = hidden_bce(logits, torch.full_like(logits, 0.5), revealed[1]) - math.log(2)
        flat_x, flat_k = x.reshape(batch, -1), xk.reshape(batch, -1)
        decor = _batch_corr2(flat_x, flat_k)
        moments = _second_order_loss(flat_x, flat_k, self.layout)
        loss_g = swap + self.decorrelation_weight * decor + self.moment_weight * moments
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        self.D.requires_grad_(True)
        return {"d": loss_d.item(), "swap": swap.item(), "decor": decor.item(), "moments": moments.item()}

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self, path, iteration: int, fingerprint: float, opt_g, opt_d, rng: torch.Generator) -> None:
        checkpoint.save(
            path,
            CHECKPOINT_KIND,
            {
                "config": json.dumps(self.config()),
                "iteration": iteration,
                "fingerprint": fingerprint,
                "model": {k: v.detach().cpu() for k, v in self.state_dict().items()},
                "opt_g": opt_g.state_dict(),
                "opt_d": opt_d.state_dict(),
                "rng": rng.get_state(),
            },
        )

    def _read_checkpoint(self, path) -> tuple[int, float, dict]:
        """(iteration, fingerprint, states) of a progress checkpoint written with this config."""
        obj = checkpoint.load(path, CHECKPOINT_KIND)
        try:
            saved = json.loads(obj["config"])
            iteration = int(obj["iteration"])
            fingerprint = float(obj["fingerprint"])
            states = {key: obj[key] for key in ("model", "opt_g", "opt_d", "rng")}
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: incomplete KnockoffGAN checkpoint ({exc})") from None
        ours = self.config()
        differ = checkpoint.differing_keys(saved, ours, ignore=_RESUMABLE_CHANGES)
        if differ:
            detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs {ours.get(k)!r}" for k in differ)
            raise ValueError(f"{path}: checkpoint was written with another config ({detail})")
        if not 0 <= iteration <= self.iterations:
            raise ValueError(f"{path}: checkpoint iteration {iteration} is outside [0, {self.iterations}]")
        return iteration, fingerprint, states

    def _load_progress(self, path, states: dict, opt_g, opt_d, rng: torch.Generator) -> None:
        try:
            self.load_state_dict(states["model"])
            opt_g.load_state_dict(states["opt_g"])
            opt_d.load_state_dict(states["opt_d"])
            rng.set_state(states["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: checkpoint state does not fit this KnockoffGAN ({exc})") from None

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``G(x, z)`` at the working resolution, resized back to x's; z from ``generator``."""
        self._check_input(x, self.shape)
        device = next(self.G.parameters()).device
        xw = resize(x.to(device, torch.float32), self.work_hw)
        z = draw_normal((x.shape[0], self.noise_channels, *self.work_hw), generator, device)
        xk = self.G(xw, z)
        return resize(xk, tuple(self.shape[1:])).to(x.device, x.dtype)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, block={self.block}, arch={self.arch}, iterations={self.iterations}"
