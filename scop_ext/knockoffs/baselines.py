"""Two baselines to compare knockoffs against: a shuffled copy of the batch, and any user model."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor

from .base import KnockoffGenerator

__all__ = ["PermutationKnockoffs", "ExternalKnockoffs"]


class PermutationKnockoffs(KnockoffGenerator):
    """``x~`` = the batch itself, shuffled so that no image is paired with itself (a random
    cyclic derangement), as MindSpore's SCOP port does.

    ``x~`` has the right marginal distribution but is independent of ``x``: exchangeability
    fails wherever coordinates are correlated, which makes it the null reference the
    diagnostics compare other generators to.

    Shape:
        - Input: :math:`(N, *)` with :math:`N \\ge 2`.
        - Output: :math:`(N, *)`, rows of the input in another order.
    """

    kind = "permutation"

    def sample(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] < 2:
            raise ValueError(f"x must be a Tensor with a batch of at least 2, got {getattr(x, 'shape', type(x))}")
        where = generator.device if generator is not None else x.device
        order = torch.randperm(x.shape[0], generator=generator, device=where).to(x.device)
        # i -> its successor in a random cycle: a permutation with no fixed point
        source = torch.empty_like(order)
        source[order] = order.roll(-1)
        return x[source]


class ExternalKnockoffs(KnockoffGenerator):
    """Wraps any callable ``fn(x) -> x~`` (or ``fn(x, generator) -> x~``), e.g. the pretrained
    unconditional GAN of the authors' code (``lambda x: G(torch.randn(len(x), z_dim))``).

    When ``fn`` is an ``nn.Module`` its parameters are part of this generator's state, so
    :meth:`save` stores them; :meth:`load` then needs ``fn=`` a module of the same architecture.

    Args:
        fn: the knockoff maker; its output must have ``x``'s shape.
        pass_generator: call ``fn(x, generator)``; default: whether ``fn`` takes a
            ``generator`` parameter. Otherwise ``fn(x)`` runs with torch's global RNG seeded
            from ``generator`` (and restored afterwards), so it is deterministic too.

    Shape:
        - Input: :math:`(N, *)`.
        - Output: :math:`(N, *)`, same dtype and device.
    """

    kind = "external"

    def __init__(self, fn: Callable[..., Tensor] | None = None, pass_generator: bool | None = None) -> None:
        super().__init__()
        if fn is None or not callable(fn):
            raise ValueError(f"fn must be a callable x -> x~ (when loading: pass fn=), got {fn!r}")
        self.fn = fn  # an nn.Module becomes a submodule here, so its weights join state_dict()
        if pass_generator is None:
            try:
                pass_generator = "generator" in inspect.signature(fn).parameters
            except (TypeError, ValueError):
                pass_generator = False
        self.pass_generator = bool(pass_generator)

    def config(self) -> dict:
        return {"pass_generator": self.pass_generator}

    @torch.no_grad()
    def sample(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if not isinstance(x, Tensor):
            raise ValueError(f"x must be a Tensor, got {type(x).__name__}")
        if self.pass_generator:
            out = self.fn(x, generator)
        elif generator is None:
            out = self.fn(x)
        else:
            seed = int(torch.randint(2**62, (), generator=generator, device=generator.device))
            devices = [x.device] if x.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                out = self.fn(x)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"fn must return a tensor of x's shape {tuple(x.shape)}, got {got}")
        return out.to(x.device, x.dtype)

    def extra_repr(self) -> str:
        return f"pass_generator={self.pass_generator}"
