"""The knockoff-generator interface, the pixel-block groups it swaps over, and its file format.

A generator maps a batch of real inputs ``x`` to paired knockoffs ``x~`` (DESIGN.md §1, stage 1).
Files written by :meth:`KnockoffGenerator.save` are scop checkpoints (:mod:`scop_ext.checkpoint`:
atomic, read with ``weights_only=True``) of kind ``"knockoff-generator"`` whose payload is::

    {"kind": "gaussian", "class": "GaussianKnockoffs",
     "config": "<JSON of the constructor arguments>", "state": <state_dict>}
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..train import checkpoint

__all__ = [
    "FILE_KIND",
    "KnockoffGenerator",
    "load",
    "make_generator",
    "generator_kinds",
    "pixel_groups",
    "default_block",
    "draw_normal",
    "images_of",
    "working_layout",
    "resize",
]

FILE_KIND = "knockoff-generator"

_REGISTRY: dict[str, type[KnockoffGenerator]] = {}


def default_block(size: int) -> int:
    """Edge in pixels of the swap blocks at a working resolution of ``size``: 2 up to 32 pixels,
    then ``size // 16`` so that large images keep a 16 x 16 grid of blocks."""
    return 2 if size <= 32 else size // 16


def pixel_groups(shape: tuple[int, ...], block: int) -> Tensor:
    """The group index of every coordinate of a flattened input, (prod(shape),) int64.

    For an image shape ``(C, H, W)`` a group is a ``block x block`` pixel square with all its
    channels ("multiple pixels as a whole", seed §S2), numbered row-major over the block grid.
    For a vector shape ``(d,)`` a group is ``block`` consecutive coordinates.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if len(shape) == 1:
        (d,) = shape
        if d % block:
            raise ValueError(f"block={block} does not divide the {d} coordinates")
        return torch.arange(d) // block
    if len(shape) != 3:
        raise ValueError(f"shape must be (C, H, W) or (d,), got {tuple(shape)}")
    c, h, w = shape
    if h % block or w % block:
        raise ValueError(f"block={block} does not divide the image size {h}x{w}")
    rows = torch.arange(h) // block
    cols = torch.arange(w) // block
    grid = rows[:, None] * (w // block) + cols[None, :]
    return grid.expand(c, h, w).reshape(-1).clone()


def working_layout(hw: tuple[int, int], working_size: int | None, block: int | None) -> tuple[tuple[int, int], int]:
    """The (h, w) an (H, W) image is knockoffed at and the swap-block edge there, so that the
    blocks tile the working image exactly. ``working_size`` and ``block``: positive or None
    (the generators check them, see :func:`scop_ext._checks.check_counts`).

    An image whose longer edge exceeds ``working_size`` is scaled so that edge is about
    ``working_size`` (seed §S2 generates ImageNet knockoffs at 64 x 64 and upsamples them), each
    edge rounded to the nearest multiple of the block (default :func:`default_block` of
    ``working_size``): 224 x 160 at 32 is worked at 32 x 22 with 2-pixel blocks. An image that
    fits keeps its size, so the block must divide both edges; the default is the largest divisor
    of both up to :func:`default_block` (a 9 x 9 image gets 1-pixel blocks).

    Raises:
        ValueError: naming ``block`` and the valid values when it cannot tile the image.
    """
    h, w = hw
    longer = max(h, w)
    if working_size is not None and longer > working_size:
        b = default_block(working_size) if block is None else block
        if b > working_size:
            raise ValueError(f"block={b} must be at most working_size={working_size}")
        scale = working_size / longer
        return (b * max(1, round(h * scale / b)), b * max(1, round(w * scale / b))), b
    common = math.gcd(h, w)
    divisors = [k for k in range(1, common + 1) if common % k == 0]
    if block is None:
        return (h, w), max(k for k in divisors if k <= default_block(longer))
    if common % block:
        raise ValueError(f"block={block} does not divide the image size {h}x{w}; valid blocks: {divisors}")
    return (h, w), block


def resize(x: Tensor, hw: tuple[int, int]) -> Tensor:
    """(N, C, H, W) -> (N, C, h, w): area averaging to go down, bilinear to go up."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    if hw[0] <= x.shape[-2] and hw[1] <= x.shape[-1]:
        return torch.nn.functional.interpolate(x, size=hw, mode="area")
    return torch.nn.functional.interpolate(x, size=hw, mode="bilinear", align_corners=False)


def images_of(batch: Any) -> Tensor:
    """The input tensor of a loader batch: ``x`` itself or the first item of ``(x, y, ...)``."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, Tensor):
        raise ValueError(f"loader batches must be tensors or (x, y) pairs, got {type(x).__name__}")
    return x


class KnockoffGenerator(nn.Module):
    """Base class: maps real inputs to paired knockoffs.

    Subclasses set ``kind`` (the name :func:`make_generator` knows them by), implement
    :meth:`sample` and, when they learn anything, :meth:`fit` and :meth:`config`.

    Shape:
        - Input: :math:`(N, *shape)`, usually :math:`(N, C, H, W)`.
        - Output: the same shape, dtype and device; row ``i`` is the knockoff of ``x[i]``.

    :meth:`swap_grid` says which pixel blocks the knockoffs are meant to be exchangeable over
    (what the diagnostics swap).
    """

    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            _REGISTRY[cls.kind] = cls

    def fit(self, loader: Iterable) -> KnockoffGenerator:
        """Learn from a loader of ``x`` or ``(x, y)`` batches; returns ``self``. The base
        generator has nothing to learn."""
        return self

    def sample(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Knockoffs of ``x``: (N, ...) -> (N, ...), deterministic given ``generator``."""
        raise NotImplementedError

    def swap_grid(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """How many swap blocks an input of ``shape`` (without the batch) is cut into: (rows,
        columns) of blocks for ``(C, H, W)``, the number of groups for ``(d,)``.

        Blocks are given as a grid, not as an edge in input pixels, because a generator working
        at a lower resolution has blocks that need not be a whole number of input pixels
        (100 pixels knockoffed at 32 with 2-pixel blocks: 16 blocks of 6.25 pixels). The base
        generator has no block structure of its own and uses the blocks of
        :func:`working_layout` at the input size; ``(d,)`` inputs: every coordinate alone.
        """
        if len(shape) == 1:
            return (shape[0],)
        if len(shape) != 3:
            raise ValueError(f"shape must be (C, H, W) or (d,), got {tuple(shape)}")
        (h, w), b = working_layout(tuple(shape[1:]), None, None)
        return h // b, w // b

    def config(self) -> dict:
        """JSON-able constructor arguments that rebuild this generator's structure."""
        return {}

    def save(self, path: str | os.PathLike) -> None:
        """Write config and ``state_dict`` to ``path`` atomically (see the module docstring)."""
        config = json.dumps(self.config())
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        checkpoint.save(
            path, FILE_KIND, {"kind": self.kind, "class": type(self).__name__, "config": config, "state": state}
        )

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: Any = "cpu", **kwargs) -> KnockoffGenerator:
        """Rebuild a generator saved by :meth:`save`.

        Called on the base class it returns whichever kind the file holds; called on a subclass
        the file must hold that kind. ``kwargs`` go to the constructor beside the saved config
        (e.g. ``fn=`` for :class:`~scop_ext.knockoffs.ExternalKnockoffs`).

        Raises:
            ValueError: naming the file when it is unreadable, of another format version, of
                another kind, or its state does not fit the config.
        """
        obj = checkpoint.load(path, FILE_KIND, map_location)
        kind = obj.get("kind") if isinstance(obj, dict) else None
        if not isinstance(kind, str) or kind not in _REGISTRY:
            raise ValueError(f"{path}: unknown generator kind {kind!r}; known: {sorted(_REGISTRY)}")
        if cls.kind and kind != cls.kind:
            raise ValueError(f"{path}: holds a {kind!r} generator, not {cls.kind!r}")
        try:
            config = json.loads(obj["config"])
            gen = _REGISTRY[kind](**config, **kwargs)
            gen.load_state_dict(obj["state"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # ValueError: also bad JSON, bad settings
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"{path}: {kind!r} generator state does not fit its config ({first})") from None
        return gen.to(map_location) if map_location is not None else gen

    def _require_fitted(self, fitted: tuple[int, ...] | None) -> None:
        if fitted is None:
            raise ValueError(f"{type(self).__name__} is not fitted: call fit() (or load()) first")

    def _check_shape(self, shape: tuple[int, ...], fitted: tuple[int, ...] | None) -> None:
        self._require_fitted(fitted)
        if tuple(shape) != tuple(fitted):
            raise ValueError(f"shape must be the fitted input shape {tuple(fitted)}, got {tuple(shape)}")

    def _check_input(self, x: Tensor, shape: tuple[int, ...] | None) -> None:
        if not isinstance(x, Tensor):
            raise ValueError(f"x must be a Tensor, got {type(x).__name__}")
        self._require_fitted(shape)
        if tuple(x.shape[1:]) != tuple(shape) or x.dim() != len(shape) + 1:
            raise ValueError(f"x must have shape (N, {', '.join(map(str, shape))}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be floating point, got {x.dtype}")


def draw_normal(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Standard normals drawn on ``generator``'s device (so the numbers depend on the generator
    alone, not on where the model lives), then moved to ``device``. float32."""
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where).to(device)


def load(path: str | os.PathLike, map_location: Any = "cpu", **kwargs) -> KnockoffGenerator:
    """Load any generator saved by :meth:`KnockoffGenerator.save`."""
    return KnockoffGenerator.load(path, map_location=map_location, **kwargs)


def generator_kinds() -> list[str]:
    """The names :func:`make_generator` accepts (every registered generator), sorted."""
    return sorted(_REGISTRY)


def make_generator(name: str, **kwargs) -> KnockoffGenerator:
    """A generator by name: ``"gaussian"``, ``"gan"``, ``"permutation"`` or ``"external"``;
    ``kwargs`` go to its constructor.

    Raises:
        ValueError: an unknown name, an option the constructor does not take (the message lists
            those it does) or a value it refuses.
    """
    if name not in _REGISTRY:
        raise ValueError(f"name must be one of {generator_kinds()}, got {name!r}")
    cls = _REGISTRY[name]
    signature = inspect.signature(cls)
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        raise ValueError(f"{name} knockoffs: {exc}; it takes {', '.join(signature.parameters)}") from None
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a value of the wrong type met a comparison or an arithmetic step
        raise ValueError(f"{name} knockoffs: an option of the wrong type ({exc})") from None
