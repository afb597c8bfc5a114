"""Will a training stage fit in memory? Predicted before the stage starts, so that a batch too large
is reported with the memory it needs instead of the process being killed by the OOM killer hours in.

The prediction traces one forward and backward on the ``meta`` device (shapes only: nothing is
allocated, no state or random stream is touched) and records, through
``torch.autograd.graph.saved_tensors_hooks``, every tensor autograd keeps for the backward. Those
activations grow linearly with the batch; stage 2 runs the paired batch [real; knockoff], which
doubles them. Parameters already sit in memory, so only what the stage adds on top is counted:
gradients and optimizer state of what it trains, and any cache it builds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["ResourceError", "MemoryEstimate", "available_memory", "autocast_itemsize", "estimate_step", "require",
           "require_step", "format_bytes", "saved_for_backward"]

# The backward's own transients (the gradient being computed beside the one flowing in, the
# logits and their gradient) on top of the saved activations, as a fraction of them; measured on
# ResNets (tests/train/test_resources.py compares prediction and measurement).
_BACKWARD_OVERHEAD = 0.5


class ResourceError(MemoryError):
    """A stage would need more memory than is available; the message says how much and what fits."""


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass
class MemoryEstimate:
    """Bytes a training step adds to what is already resident.

    Attributes:
        per_sample: activations saved for the backward plus the input, per (real) sample.
        fixed: parts that do not depend on the batch size, by name (gradients, optimizer state,
            caches).
    """

    per_sample: int
    fixed: dict[str, int] = field(default_factory=dict)

    def total(self, batch_size: int) -> int:
        return self.per_sample * batch_size + sum(self.fixed.values())

    def largest_batch(self, available: int) -> int:
        return max(0, (available - sum(self.fixed.values())) // max(self.per_sample, 1))


def _cgroup_available() -> int | None:
    """Room left under the container's memory limit (cgroup v2, then v1), or None without one."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:  # no limit set
            return None
        return int(limit) - usage
    return None


def available_memory(device: torch.device | str) -> int | None:
    """Bytes a new allocation on ``device`` can still get, or None where that is unknown.

    CPU: ``MemAvailable`` of /proc/meminfo, capped by the cgroup limit when one is set (the OOM
    killer acts on whichever is hit first). CUDA: free device memory plus what torch's caching
    allocator holds unused.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    room = _cgroup_available()
    return available if room is None else min(available, room)


@contextmanager
def saved_for_backward(exclude: set[int] = frozenset()) -> Iterator[list[tuple[int, torch.dtype]]]:
    """Record ``(bytes, dtype)`` of every storage autograd saves for the backward inside the block,
    each storage once (keyed by its C++ address, ``untyped_storage()._cdata``, which a meta storage
    has too), leaving out the keys in ``exclude``.

    Example::

        >>> with saved_for_backward() as saved:
        ...     loss = model(x).sum()
        >>> sum(n for n, _ in saved)   # bytes held for loss.backward()
    """
    seen = set(exclude)
    saved: list[tuple[int, torch.dtype]] = []

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage._cdata not in seen:
            seen.add(storage._cdata)
            saved.append((storage.nbytes(), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


def autocast_itemsize(device: torch.device | str, dtype: torch.dtype) -> int:
    """Bytes to count per floating activation element of a ``dtype`` autocast step on ``device``.

    ``dtype.itemsize`` where the backend computes convs natively in it: CUDA, and x86 CPUs whose
    oneDNN has 16-bit kernels (AVX-512 or AMX; the check ATen's convolution makes itself).
    Elsewhere (AVX2-only x86, oneDNN disabled) autocast still casts and saves 16-bit tensors, but
    the fallback convolution allocates and frees float32 work buffers at every layer, and glibc's
    heap keeps them: the process's resident memory over a few steps then grows to what
    ``dtype.itemsize + 4`` bytes per element predicts (resnet20, 32 px, batch 64, bfloat16: 190 to
    257 MiB measured over 3 to 6 steps, 225 MiB predicted; tests/train/test_resources.py forces this
    path with ``ONEDNN_MAX_CPU_ISA=AVX2``). The buffers live inside the kernels, where no
    saved-tensor hook or dispatch mode sees them, so the backend is modelled rather than traced.
    """
    if torch.device(device).type != "cpu":
        return dtype.itemsize
    native = {torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
              torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported}.get(dtype)
    if native is not None and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled and native():
        return dtype.itemsize
    return dtype.itemsize + torch.float32.itemsize


def _saved_activation_bytes(model: nn.Module, batch: torch.Tensor, trainable: Callable[[str], bool],
                            float_itemsize: int | None) -> tuple[int, int]:
    """(bytes of tensors saved for the backward, bytes of the largest) for one step on meta, floating
    tensors counted at ``float_itemsize`` bytes per element when given."""
    state = {name: torch.empty_like(p, device="meta").requires_grad_(trainable(name))
             for name, p in model.named_parameters()}
    state.update({name: torch.empty_like(b, device="meta") for name, b in model.named_buffers()})
    # Every storage seen stays alive in the graph or in `state` until the trace ends, so no
    # address is reused while they are being counted.
    resident = {t.untyped_storage()._cdata for t in state.values()}
    with saved_for_backward(exclude=resident) as saved:
        out = torch.func.functional_call(model, state, (batch,))
        loss = out.float().logsumexp(1).sum()
    if loss.requires_grad:
        loss.backward()
    sizes = [n // dtype.itemsize * float_itemsize if float_itemsize is not None and dtype.is_floating_point else n
             for n, dtype in saved]
    return sum(sizes), max(sizes, default=0)


def estimate_step(model: nn.Module, example: torch.Tensor, *, paired: bool, trainable: Callable[[str], bool],
                  optimizer_slots: int, probe_batch: int = 8, activation_dtype: torch.dtype | None = None,
                  device: torch.device | str = "cpu") -> MemoryEstimate:
    """Predict the memory one training step of ``model`` adds, per sample and fixed.

    Args:
        example: one input, (1, C, H, W) or (C, H, W); only its shape and dtype are used.
        paired: stage 2's [real; knockoff] batch: twice the images per real sample.
        trainable: which parameter names (``model.named_parameters()``) the stage trains.
        optimizer_slots: state tensors the optimizer keeps per trained parameter (Adam 2, SGD
            with momentum 1).
        probe_batch: real samples in the traced batch; activations scale linearly from it.
        activation_dtype: the 16-bit type of a mixed-precision step. The meta device runs no
            autocast, so the trace is in full precision; its floating activations are counted at
            the size :func:`autocast_itemsize` gives for ``device`` (where the backend computes
            convs natively in 16 bits, autocast runs them and all that follows up to the loss in
            it), and the 16-bit copies of the conv and linear weights autocast keeps are added.
        device: where the step runs; only read with ``activation_dtype``.

    Raises:
        NotImplementedError, RuntimeError: the model cannot run on the meta device (e.g. it
            branches on tensor values).
    """
    # Lemma 2 draws would consume random numbers; their (N, 2, C) tensors are negligible beside
    # the (N, C, H, W) activations, so the trace runs without them.
    from ..nn.scop_conv import scop_layers

    layers = scop_layers(model).values()
    bias_on = [layer.use_knockoff_bias for layer in layers]
    for layer in layers:
        layer.use_knockoff_bias = False
    images = probe_batch * (2 if paired else 1)
    shape = example.shape[1:] if example.dim() == 4 else example.shape
    batch = torch.empty((images, *shape), dtype=example.dtype, device="meta")
    try:
        saved, largest = _saved_activation_bytes(model, batch, trainable,
                                                 None if activation_dtype is None else autocast_itemsize(device, activation_dtype))
    finally:
        for layer, flag in zip(layers, bias_on):
            layer.use_knockoff_bias = flag
    step = saved + batch.nbytes + _BACKWARD_OVERHEAD * saved + largest
    trained = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if trainable(name))
    fixed = {"gradients": trained, "optimizer state": optimizer_slots * trained}
    if activation_dtype is not None:
        fixed["16-bit weight copies"] = activation_dtype.itemsize * sum(
            m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    return MemoryEstimate(per_sample=int(step / probe_batch), fixed=fixed)


def require(estimate: MemoryEstimate, batch_size: int, device: torch.device | str, what: str) -> None:
    """Raise :class:`ResourceError` when ``what`` at ``batch_size`` would not fit on ``device``.

    Does nothing where the available memory cannot be read (see :func:`available_memory`).
    """
    available = available_memory(device)
    need = estimate.total(batch_size)
    if available is None or need <= available:
        return
    parts = ", ".join(f"{name} {format_bytes(b)}" for name, b in
                      {"activations": estimate.per_sample * batch_size, **estimate.fixed}.items() if b)
    fits = estimate.largest_batch(available)
    advice = (f"the largest batch size that fits is about {fits} (--batch-size {fits})" if fits >= 1 else
              "no batch size fits: free memory or use a smaller model / device with more memory")
    raise ResourceError(
        f"{what} with batch_size={batch_size} needs about {format_bytes(need)} ({parts}) but only "
        f"{format_bytes(available)} is available on {torch.device(device)}; {advice}"
    )


def require_step(model: nn.Module, example: torch.Tensor, batch_size: int, device: torch.device | str, what: str, *,
                 paired: bool, trainable: Callable[[str], bool], optimizer_slots: int, host_cache: int = 0,
                 activation_dtype: torch.dtype | None = None) -> str | None:
    """Stop with :class:`ResourceError` before ``what`` starts if one step at ``batch_size`` would not fit.

    Arguments as :func:`estimate_step`; ``host_cache`` is the bytes of a cache the stage builds in
    host memory (counted on the CPU whatever ``device`` is). Under torchrun give the batch of one
    process: each checks what it needs on its own device.

    Returns:
        None, or a note saying why nothing could be predicted (a model the meta device cannot run).
    """
    try:
        estimate = estimate_step(model, example, paired=paired, trainable=trainable, optimizer_slots=optimizer_slots,
                                 activation_dtype=activation_dtype, device=device)
    except (NotImplementedError, RuntimeError) as exc:
        return f"{what}: memory use not predicted ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    if host_cache and torch.device(device).type != "cpu":
        require(MemoryEstimate(0, {"pair cache": host_cache}), 0, "cpu", what)
    elif host_cache:
        estimate.fixed["pair cache"] = host_cache
    require(estimate, batch_size, device, what)
    return None
