"""``ScopConv2d``: a drop-in ``nn.Conv2d`` that can run SCOP's knockoff-controlled forward, and
``convert`` / ``restore``, which swap it in and out of any module tree."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import reference
from ..ops.dual_scaled_conv2d import dual_scaled_conv2d
from . import lemma2
from .lemma2 import KnockoffBias

__all__ = ["ScopConv2d", "convert", "restore", "scop_layers"]


class ScopConv2d(nn.Conv2d):
    r"""``nn.Conv2d`` with a SCOP mode (stage 2 of the method).

    The constructor, parameters and ``state_dict`` keys are those of ``nn.Conv2d``; outside SCOP
    mode the forward *is* ``nn.Conv2d.forward``, bit for bit. :meth:`enable_scop` adds the
    per-filter scale ``beta`` (a Parameter, initialised to 0.5) and switches the forward to the
    paired batch: the real half becomes ``beta * real + (1 - beta) * knockoff`` per filter and the
    knockoff half passes through, each with its Lemma 2 knockoff bias once :meth:`fit_knockoff_bias`
    (or :meth:`set_knockoff_bias`) has run. ``beta`` and the bias factor (``knockoff.R``,
    ``knockoff.gamma``) join the state_dict only once they exist, and loading a state_dict that
    has them creates them.

    Shape (SCOP mode):
        - Input: :math:`(2N, C_{in}, H, W)`, the N real images first, then their N knockoffs.
        - Output: :math:`(2N, C_{out}, H_{out}, W_{out})`, in the same order.

    Attributes:
        beta: (C_out,) Parameter in [0, 1], or None before :meth:`enable_scop`.
        knockoff: the layer's :class:`~scop_ext.nn.lemma2.KnockoffBias`: the Lemma 2 factor and
            gamma, whether they are used (``use_knockoff_bias``), the generator each step's
            draw is keyed from (``generator``) and the data-parallel shard.

    Example::

        >>> conv = ScopConv2d(16, 32, 3, padding=1).enable_scop()
        >>> out = conv(torch.randn(2 * 8, 16, 32, 32))  # 8 real images + 8 knockoffs
        >>> conv.importance().shape
        torch.Size([32])
    """

    # 2: the Lemma 2 factor moved from the buffers knockoff_R / knockoff_gamma to knockoff.R / .gamma
    _version = 2
    beta: nn.Parameter | None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_parameter("beta", None)
        self.knockoff = KnockoffBias(self.out_channels)
        self.scop_enabled = False
        # Set by scop_ext.scales.split while it runs the two streams apart: called as
        # stream(layer, input) in place of the paired forward.
        self.stream: Callable[[ScopConv2d, Tensor], Tensor] | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> ScopConv2d:
        """A ScopConv2d sharing ``conv``'s weight and bias Parameters (no copy)."""
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        return _sharing(cls, conv)

    def to_conv(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` sharing this layer's weight and bias (SCOP state is dropped)."""
        return _sharing(nn.Conv2d, self)

    # ------------------------------------------------------------------ SCOP state

    def enable_scop(self, beta_init: float = 0.5) -> ScopConv2d:
        """Switch to SCOP mode, creating ``beta`` (filled with ``beta_init``) if it is missing."""
        if not 0.0 <= beta_init <= 1.0:
            raise ValueError(f"beta_init must be in [0, 1], got {beta_init}")
        if self.beta is None:
            self.beta = nn.Parameter(
                torch.full((self.out_channels,), float(beta_init), dtype=self.weight.dtype, device=self.weight.device)
            )
        self.scop_enabled = True
        return self

    def disable_scop(self) -> ScopConv2d:
        """Back to the plain ``nn.Conv2d`` forward; ``beta`` and the Lemma 2 state are kept."""
        self.scop_enabled = False
        return self

    def fit_knockoff_bias(self, s_in: Tensor, gamma: float | None = None) -> lemma2.Lemma2Solution:
        """Solve Lemma 2 for this layer's (frozen) weight and keep ``R`` and ``gamma``.

        Args:
            s_in: (C_in,) knockoff diagonal at this layer's input, >= 0
                (:func:`scop_ext.nn.lemma2.estimate_s`).
            gamma: see :func:`scop_ext.nn.lemma2.solve`.

        Returns:
            The :class:`~scop_ext.nn.lemma2.Lemma2Solution` (M, lambda_max, S', Sigma_b, R, margin).
        """
        return self.knockoff.fit(self.weight, s_in, gamma, self.groups)

    def set_knockoff_bias(self, R: Tensor, gamma: float) -> None:
        """Keep a Lemma 2 factor ``R`` (C_out, C_out) and ``gamma`` for the forward to sample from."""
        self.knockoff.set(R, gamma, like=self.weight)

    def clear_knockoff_bias(self) -> None:
        """Drop the Lemma 2 state: the forward adds no knockoff bias until the next fit or set."""
        self.knockoff.clear()

    # The names these had before the bias state moved into ``knockoff``: they keep working.
    @property
    def use_knockoff_bias(self) -> bool:
        return self.knockoff.enabled

    @use_knockoff_bias.setter
    def use_knockoff_bias(self, value: bool) -> None:
        self.knockoff.enabled = bool(value)

    @property
    def generator(self) -> torch.Generator | None:
        return self.knockoff.generator

    @generator.setter
    def generator(self, value: torch.Generator | None) -> None:
        self.knockoff.generator = value

    @property
    def knockoff_R(self) -> Tensor | None:
        return self.knockoff.R

    @property
    def knockoff_gamma(self) -> Tensor | None:
        return self.knockoff.gamma

    @property
    def knockoff_bias(self) -> bool:
        warnings.warn("ScopConv2d.knockoff_bias was renamed use_knockoff_bias", DeprecationWarning, stacklevel=2)
        return self.use_knockoff_bias

    @knockoff_bias.setter
    def knockoff_bias(self, value: bool) -> None:
        # Setting the old name once set an attribute nothing read: it now does what it says.
        warnings.warn("ScopConv2d.knockoff_bias was renamed use_knockoff_bias", DeprecationWarning, stacklevel=2)
        self.use_knockoff_bias = value

    @torch.no_grad()
    def clamp_beta_(self) -> None:
        """Project ``beta`` back onto [0, 1] (call after every optimiser step)."""
        if self.beta is not None:
            self.beta.clamp_(0.0, 1.0)

    def importance(self) -> Tensor:
        """Per-filter importance ``beta - beta~ = 2 beta - 1`` in [-1, 1], detached, shape (C_out,)."""
        if self.beta is None:
            raise RuntimeError("importance() needs beta: call enable_scop() and learn the scales first")
        return (2 * self.beta - 1).detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("version", 1) < 2:  # checkpoints written before the KnockoffBias module
            for old, new in (("knockoff_R", "knockoff.R"), ("knockoff_gamma", "knockoff.gamma")):
                if prefix + old in state_dict:
                    state_dict[prefix + new] = state_dict.pop(prefix + old)
        # Materialise the beta the checkpoint carries, so a converted model reloads it.
        if self.beta is None and prefix + "beta" in state_dict:
            self.beta = nn.Parameter(torch.empty(self.out_channels, dtype=self.weight.dtype, device=self.weight.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    # ------------------------------------------------------------------ forward

    def forward(self, input: Tensor) -> Tensor:
        if not self.scop_enabled:
            return super().forward(input)
        if self.stream is not None:
            return self.stream(self, input)
        input, padding = self.padded(input)
        knockoff_bias = None
        if self.knockoff.enabled and self.knockoff.fitted:
            if input.dim() != 4 or input.shape[0] % 2:
                raise ValueError(
                    f"input must be a paired batch (2N, C, H, W) in SCOP mode, got shape {tuple(input.shape)}"
                )
            knockoff_bias = self.knockoff.draw(input.shape[0] // 2)
        args = (input, self.weight, self.bias, self.beta, knockoff_bias, self.stride, padding, self.dilation, self.groups)
        if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
            # Plain ops, so inductor fuses the mixing with the BN and ReLU around it (an opaque
            # custom op would be a fusion barrier); eager and export keep the fused kernels.
            return reference.dual_scaled_conv2d(*args)
        return dual_scaled_conv2d(*args)

    def padded(self, input: Tensor) -> tuple[Tensor, tuple[int, int] | int]:
        """``input`` padded as ``nn.Conv2d`` would for string padding or a non-zero padding mode,
        and the numeric padding the convolution itself should then use."""
        padding = self.padding
        if isinstance(padding, str) or self.padding_mode != "zeros":
            # 'same' may need uneven padding and non-zero modes need F.pad, exactly as nn.Conv2d does.
            if padding != "valid":
                mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
                input = F.pad(input, self._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        return input, padding

    def draw_knockoff_bias(self, n: int) -> Tensor | None:
        """This process's (n, 2, C_out) Lemma 2 pairs ``[b, b~]`` for n real images, or None when
        the layer adds no knockoff bias (:meth:`KnockoffBias.draw`)."""
        return self.knockoff.draw(n)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", scop={'on' if self.scop_enabled else 'off'}"
        if self.beta is not None:
            s += f", beta=({self.beta.shape[0]},)"
        if self.knockoff.fitted:
            s += f", knockoff_bias={'on' if self.knockoff.enabled else 'off'}(gamma={self.knockoff._gamma:.3g})"
        return s

    def __repr__(self) -> str:
        # One line, as nn.Conv2d's: the knockoff bias is part of the layer, shown in extra_repr.
        return f"{self._get_name()}({self.extra_repr()})"


# ---------------------------------------------------------------------- model conversion


def _sharing(cls: type[nn.Conv2d], conv: nn.Conv2d) -> nn.Conv2d:
    """A ``cls`` with ``conv``'s hyperparameters holding the very same weight and bias Parameters
    (built on the meta device first, so nothing is allocated and thrown away)."""
    new = cls(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device="meta",
        dtype=conv.weight.dtype,
    )
    new.weight = conv.weight
    new.bias = conv.bias
    new.train(conv.training)
    return new


def _matcher(skip: Iterable[str] | Callable[[str, nn.Module], bool] | None) -> Callable[[str, nn.Module], bool]:
    if skip is None:
        return lambda name, module: False
    if callable(skip):
        return skip
    if isinstance(skip, str):
        raise ValueError("skip must be a list of module names/patterns, not a single string")
    patterns = list(skip)
    return lambda name, module: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _replace(model: nn.Module, wanted: Callable[[str, nn.Module], bool], make: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """Swaps every module ``wanted`` picks for ``make(module)``, in place; returns ``model``, or
    the replacement when ``model`` itself is picked.

    A module registered under several names gets one replacement under all of them, so layers
    shared in the original stay shared.
    """
    names: dict[nn.Module, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(module, []).append(name)
    todo = []
    for module, paths in names.items():
        picked = [path for path in paths if wanted(path, module)]
        if picked and len(picked) < len(paths):  # checked for all before anything is swapped
            left = [path for path in paths if path not in picked]
            raise ValueError(
                f"skip names {left} but not {picked}, which are one {type(module).__name__} "
                "registered under several names: skip all of its names or none"
            )
        if picked:
            todo.append((module, paths))
    for module, paths in todo:
        new = make(module)
        if paths == [""]:
            return new
        for path in paths:
            model.set_submodule(path, new)
    return model


def convert(
    model: nn.Module,
    skip: Iterable[str] | Callable[[str, nn.Module], bool] | None = None,
    enable: bool = True,
) -> nn.Module:
    """Replace every ``nn.Conv2d`` in ``model`` (in place) with a :class:`ScopConv2d` sharing its weights.

    A convolution registered under several names becomes one ScopConv2d under all of them.

    Args:
        model: any module tree.
        skip: qualified module names or ``fnmatch`` patterns (``"conv1"``, ``"*.downsample.0"``),
            or a predicate ``(name, module) -> bool``, naming convolutions to leave alone.
        enable: also switch the new layers to SCOP mode.

    Returns:
        ``model``; or, when ``model`` is itself an ``nn.Conv2d`` (nothing holds it to swap it
        in), the new ScopConv2d.
    """
    skipped = _matcher(skip)

    def make(conv: nn.Module) -> ScopConv2d:
        new = ScopConv2d.from_conv(conv)
        return new.enable_scop() if enable else new

    return _replace(model, lambda name, m: type(m) is nn.Conv2d and not skipped(name, m), make)


def restore(model: nn.Module) -> nn.Module:
    """Replace every :class:`ScopConv2d` in ``model`` (in place) by a plain ``nn.Conv2d`` sharing its weights.

    Returns:
        ``model``; or, when ``model`` is itself a ScopConv2d, the new ``nn.Conv2d``.
    """
    return _replace(model, lambda name, m: isinstance(m, ScopConv2d), lambda m: m.to_conv())


def scop_layers(model: nn.Module) -> dict[str, ScopConv2d]:
    """The :class:`ScopConv2d` layers of ``model`` by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ScopConv2d)}
