"""How the ``scop`` command turns its flags into settings: the device flag, ``KEY=VALUE`` pairs,
and the PruneConfig that ``scop prune`` and ``scop plan`` build from --config, flags and --set."""

from __future__ import annotations

import argparse
import os

__all__ = ["PRUNE_FLAGS", "add_config_flags", "config_values", "parse_key_values", "prune_config", "resolve_device"]


def resolve_device(name: str | None) -> str:
    import torch

    if name is None or name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: not a device name: {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here")
    return name


def _parse_value(text: str):
    from ..run.config import load_yaml

    return load_yaml(text)


def parse_key_values(pairs: list[str], flag: str) -> dict:
    values = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} expects KEY=VALUE, got {pair!r}")
        try:
            values[key.replace("-", "_")] = _parse_value(value)
        except Exception as exc:  # yaml's error types; one line that names the flag either way
            raise ValueError(f"{flag} {pair!r}: not a YAML value ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    return values


PRUNE_FLAGS = {
    # config key (the flag is --key-with-dashes): (type, help)
    "preset": (str, "authors: the authors' whole recipe (README); other settings override it"),
    "model": (str, "model name (see `scop info`)"),
    "weights": (str, "trained weights: a .safetensors/state_dict file or a `scop train` model stem"),
    "dataset": (str, "digits (bundled), fashion-mnist, cifar10 or imagefolder"),
    "data_root": (str, "local data folder (fashion-mnist: default Debian's /usr/share/datasets/fashion-mnist)"),
    "image_size": (int, "side images are cropped to (imagefolder; scop plan: the input FLOPs are counted on)"),
    "batch_size": (int, "images per batch (real images; stage 2 adds as many knockoffs)"),
    "knockoffs": (str, "knockoff generator (see `scop info`), or the knockoffs.pt of `scop knockoffs fit` to use "
                       "instead of fitting one"),
    "scales_epochs": (int, "stage 2 epochs"),
    "bn": (str, "stage-2 BatchNorm: batch (authors, exact gradient), batch_detached (same forward, statistics constant in the backward) or frozen"),
    "importance": (str, "importance criterion (see `scop info`)"),
    "policy": (str, "selection policy (see `scop info`)"),
    "ratio": (float, "fraction of channels removed (uniform / global_ranking)"),
    "normalize": (str, "global_ranking: auto (raw scores for scop, else max), max or none"),
    "flops_reduction": (float, "target FLOPs reduction (flops_target)"),
    "latency_reduction": (float, "target share of predicted latency removed (latency_target)"),
    "latency_ms": (float, "or an absolute latency budget in ms at --latency-batch (latency_target)"),
    "latency_batch": (int, "batch the latency model is measured at (latency_target; default 64)"),
    "fdr_q": (float, "target false discovery rate (fdr)"),
    "min_channels": (int, "fewest channels a layer keeps"),
    "round_to": (int, "kept channels rounded up to a multiple of this"),
    "block_width": (str, "residual widths: prune (default), keep, or scatter (the authors' scheme)"),
    "finetune_epochs": (int, "fine-tuning epochs"),
    "finetune_lr": (float, "fine-tuning learning rate"),
}


def config_values(args) -> dict:
    """The PruneConfig keys --config, the flags and --set give, later ones winning."""
    from ..export import read_arch
    from ..knockoffs import generator_kinds
    from ..run.config import PruneConfig

    values = PruneConfig.file_values(args.config) if args.config else {}
    for key in PRUNE_FLAGS:
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    kind = values.get("knockoffs")
    if isinstance(kind, str) and kind not in generator_kinds() and (os.path.exists(kind) or kind.endswith(".pt")):
        values["knockoffs_file"] = values.pop("knockoffs")  # a fitted generator, not a kind
    if getattr(args, "no_latency", False):
        values["latency"] = False
    stem = values.get("weights")
    if "model" not in values and isinstance(stem, str) and os.path.isfile(stem + ".json"):
        values["model"] = read_arch(stem)["model"]  # a `scop train` stem names its model: no --model needed
    if args.no_knockoff_bias:
        values["knockoff_bias"] = False
    values.update(parse_key_values(args.set, "--set"))
    values["seed"] = args.seed if args.seed is not None else values.get("seed", 0)
    return values


def add_config_flags(p: argparse.ArgumentParser) -> None:
    import dataclasses

    from ..run.config import PruneConfig

    # The flags default to None so that a config file's value stands unless a flag is given;
    # their help shows PruneConfig's own default instead.
    defaults = {f.name: f.default for f in dataclasses.fields(PruneConfig) if f.default is not dataclasses.MISSING}
    p.add_argument("--config", help="YAML or JSON file of PruneConfig keys")
    for key, (kind, text) in PRUNE_FLAGS.items():
        shown = f" (default: {defaults[key]})" if defaults.get(key) is not None else ""
        p.add_argument("--" + key.replace("_", "-"), dest=key, type=kind, default=None, help=text + shown)
    p.add_argument("--no-knockoff-bias", action="store_true", help="turn the Lemma 2 biases off")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any PruneConfig key (repeatable)")


def prune_config(args):
    from ..run.config import PruneConfig

    values = config_values(args)
    values["device"] = resolve_device(args.device or values.get("device"))
    return PruneConfig.from_dict(values)
