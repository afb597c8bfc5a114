"""Knockoff data for SCOP (DESIGN.md §1, stage 1): generators that pair every real input with a
knockoff, and measures of how good the knockoffs are.

Generators share one interface (:class:`KnockoffGenerator`): ``fit(loader)``,
``sample(x, generator=None) -> x~`` of x's shape, dtype and device, ``state_dict()`` /
``load_state_dict()``, ``save(path)`` / ``load(path)``.

- :class:`GaussianKnockoffs` (``"gaussian"``): exact second-order group knockoffs; the fast default.
- :class:`KnockoffGAN` (``"gan"``): seed §S2's generator / swap-discriminator pair.
- :class:`PermutationKnockoffs` (``"permutation"``) and :class:`ExternalKnockoffs`
  (``"external"``): baselines.

Example::

    >>> from scop_ext.data import digits
    >>> from torch.utils.data import DataLoader
    >>> gen = make_generator("gaussian").fit(DataLoader(digits("train"), batch_size=256))
    >>> x, _ = next(iter(DataLoader(digits("test"), batch_size=16)))
    >>> gen.sample(x, generator=torch.Generator().manual_seed(0)).shape
    torch.Size([16, 1, 8, 8])
"""

from .base import KnockoffGenerator, generator_kinds, load, make_generator
from .baselines import ExternalKnockoffs, PermutationKnockoffs
from .gan import KnockoffGAN
from .gaussian import GaussianKnockoffs
from .quality import check

__all__ = [
    "KnockoffGenerator",
    "GaussianKnockoffs",
    "KnockoffGAN",
    "PermutationKnockoffs",
    "ExternalKnockoffs",
    "make_generator",
    "generator_kinds",
    "load",
    "check",
]
