"""Saving and loading pruned models without pickle, and exports for deployment.

A model is stored as ``<stem>.safetensors`` (its state_dict) beside ``<stem>.json`` (model name,
classes, input channels, the image size it was trained at, every conv's output width and, under
``block_width="scatter"``, the
convs whose outputs are scattered back to full width), so a pruned architecture is re-created by
:func:`~scop_ext.prune.surgery.rebuild` and nothing executable is ever loaded. A scatter's kept
channel indices are a buffer of the state_dict.
"""

from __future__ import annotations

import collections
import importlib
import io
import json
import os
import warnings

import torch
from torch import nn

from .models import build_model, check_sizes
from .prune.surgery import channel_widths, rebuild, scattered_convs
from .train import checkpoint

__all__ = ["ARCH_VERSION", "save_model", "load_model", "read_arch", "export_torchscript", "export_onnx", "onnx_missing"]

ARCH_VERSION = 1


def save_model(model: nn.Module, stem: str | os.PathLike, *, model_name: str, num_classes: int, in_channels: int,
               extra: dict | None = None) -> dict[str, str]:
    """Write ``<stem>.safetensors`` and ``<stem>.json`` atomically; returns their paths."""
    from safetensors.torch import save

    stem = os.fspath(stem)
    state_dict = model.state_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    # Module versions travel in the state_dict's _metadata, which safetensors does not keep;
    # some modules refuse to load without theirs (torchvision's MNASNet).
    versions = {prefix: meta["version"] for prefix, meta in state_dict._metadata.items() if "version" in meta}
    arch = {"format": "scop-model", "version": ARCH_VERSION, "model": model_name, "num_classes": num_classes,
            "in_channels": in_channels, "widths": channel_widths(model), "module_versions": versions,
            **(extra or {})}
    scattered = scattered_convs(model)
    if scattered:  # absent otherwise, so descriptions of other models read as before
        arch["scatter"] = scattered
    paths = {"weights": stem + ".safetensors", "arch": stem + ".json"}
    checkpoint.atomic_write_bytes(paths["weights"], save(state))
    checkpoint.write_json(paths["arch"], arch)
    return paths


def read_arch(stem: str | os.PathLike) -> dict:
    """The architecture record ``<stem>.json`` written by :func:`save_model`, validated."""
    path = os.fspath(stem) + ".json"
    try:
        with open(path) as f:
            arch = json.load(f)
    except FileNotFoundError:
        raise checkpoint.CheckpointError(f"{path}: no such model description") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise checkpoint.CheckpointError(f"{path}: not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None
    if not isinstance(arch, dict) or arch.get("format") != "scop-model":
        raise checkpoint.CheckpointError(f"{path}: not a scop model description")
    if arch.get("version") != ARCH_VERSION:
        raise checkpoint.CheckpointError(f"{path}: model description version {arch.get('version')!r}; this scop reads {ARCH_VERSION}")
    missing = [k for k in ("model", "num_classes", "in_channels", "widths") if k not in arch]
    if missing:
        raise checkpoint.CheckpointError(f"{path}: model description lacks {missing}")
    positive = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1  # noqa: E731
    wrong = [k for k, ok in (("model", isinstance(arch["model"], str)),
                             ("num_classes", positive(arch["num_classes"])),
                             ("in_channels", positive(arch["in_channels"])),
                             ("widths", isinstance(arch["widths"], dict) and all(positive(w) for w in arch["widths"].values())),
                             ("module_versions", isinstance(arch.get("module_versions", {}), dict)
                              and all(positive(v) for v in arch.get("module_versions", {}).values())),
                             ("scatter", isinstance(arch.get("scatter", []), list)
                              and all(isinstance(c, str) for c in arch.get("scatter", []))),
                             ("image_size", arch.get("image_size") is None or positive(arch["image_size"])))
             if not ok]
    if wrong:
        raise checkpoint.CheckpointError(f"{path}: malformed model description: {', '.join(wrong)} "
                                         "(model a name, num_classes and in_channels integers >= 1, widths {conv: integer >= 1}, "
                                         "module_versions {module: integer >= 1}, scatter a list of conv names)")
    try:
        check_sizes(arch["num_classes"], arch["in_channels"])
    except ValueError as exc:
        raise checkpoint.CheckpointError(f"{path}: {exc}") from None
    return arch


def _check_tensors(stem: str, arch: dict, weights: str) -> None:
    """Refuse, before the model is built for real, a weights file that is not the model in
    ``<stem>.json``: the dense model is built on the meta device (no memory) and each of its
    convolutions must have its weight in the file (pruning narrows convs, never removes them).
    A description naming a far larger model than its weights (``vit_h_14`` beside a small net)
    is caught here instead of after building it."""
    from safetensors import safe_open

    try:
        with torch.device("meta"):
            dense = build_model(arch["model"], arch["num_classes"], arch["in_channels"])
    except ValueError as exc:
        raise checkpoint.CheckpointError(f"{stem}.json: describes no model that can be built ({exc})") from None
    except Exception:  # noqa: BLE001 (an initialiser the meta device lacks, say): the real build still checks
        return
    with safe_open(weights, framework="pt") as f:
        names = set(f.keys())
    missing = sorted(f"{name}.weight" for name, m in dense.named_modules()
                     if isinstance(m, nn.Conv2d) and f"{name}.weight" not in names)
    if missing:
        raise checkpoint.CheckpointError(f"{weights}: does not match the architecture in {stem}.json: lacks the weights "
                                         f"of {len(missing)} convolutions of a {arch['model']!r} model, e.g. {missing[0]!r}")


def load_model(stem: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Re-create a model saved by :func:`save_model`: ``(model in eval mode, architecture dict)``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    arch = read_arch(stem)
    weights = os.fspath(stem) + ".safetensors"
    if not os.path.isfile(weights):
        raise checkpoint.CheckpointError(f"{weights}: no such weights file")
    try:
        _check_tensors(os.fspath(stem), arch, weights)
        state = load_file(weights, device=str(map_location))
    except (SafetensorError, OSError, ValueError) as exc:
        if isinstance(exc, checkpoint.CheckpointError):
            raise
        raise checkpoint.CheckpointError(f"{weights}: truncated or corrupt safetensors file ({exc})") from None
    bad = checkpoint.first_nonfinite(state)
    if bad is not None:
        raise checkpoint.CheckpointError(f"{weights}: tensor {bad!r} holds NaN or Inf; the model is unusable")
    try:
        model = rebuild(arch["model"], arch["widths"], arch["num_classes"], arch["in_channels"],
                        scattered=arch.get("scatter", ()))
    except ValueError as exc:
        raise checkpoint.CheckpointError(f"{os.fspath(stem)}.json: describes no model that can be built ({exc})") from None
    # Files written before module versions were recorded load without them, as they always did.
    state = collections.OrderedDict(state)  # a plain dict cannot carry _metadata
    state._metadata = {prefix: {"version": v} for prefix, v in arch.get("module_versions", {}).items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise checkpoint.CheckpointError(f"{weights}: does not match the architecture in {os.fspath(stem)}.json ({first})") from None
    return model.to(map_location).eval(), arch


def export_torchscript(model: nn.Module, example: torch.Tensor, path: str | os.PathLike) -> None:
    """A traced TorchScript file (torch.jit is deprecated upstream but still what many C++ servers load)."""
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, example)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
    checkpoint.atomic_write_bytes(path, buffer.getvalue())


def onnx_missing() -> str | None:
    """The first package ONNX export needs (onnx, onnxscript) that cannot be imported, or None."""
    for name in ("onnx", "onnxscript"):
        try:
            importlib.import_module(name)
        except ImportError:
            return name
    return None


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike) -> None:
    """An ONNX file whose batch, height and width are dynamic where the model allows (a model whose
    ops fix a size keeps it fixed); needs the ``onnx`` and ``onnxscript`` packages.

    ``example`` (N, C, H, W) is traced with at least 2 images: export specialises a size-1
    dimension to the constant 1, which a dynamic batch axis then contradicts.

    Raises:
        ImportError: naming the package that is missing.
    """
    missing = onnx_missing()
    if missing:
        raise ImportError(f"ONNX export needs the {missing} package: pip install onnx onnxscript")
    model = model.eval()
    if example.shape[0] < 2:
        example = example.expand(2, *example.shape[1:]).contiguous()
    auto = torch.export.Dim.AUTO
    program = torch.onnx.export(model, (example,), input_names=["input"], output_names=["logits"],
                                dynamic_shapes=({0: auto, 2: auto, 3: auto},), dynamo=True)
    checkpoint.atomic_write_bytes(path, program.model_proto.SerializeToString())
