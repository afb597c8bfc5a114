"""The ``scop`` sub-commands, one ``cmd_*`` function each (:mod:`scop_ext.cli` parses the
arguments and turns their errors into one line)."""

from __future__ import annotations

import json
import os

from .parser import build_parser
from .settings import config_values, parse_key_values, prune_config, resolve_device

__all__ = ["cmd_demo", "cmd_export", "cmd_info", "cmd_knockoffs_check", "cmd_knockoffs_fit", "cmd_plan", "cmd_prune",
           "cmd_report", "cmd_train"]


# ---------------------------------------------------------------------------------- train

def cmd_train(args) -> int:
    from ..run.folder import claim
    from ..run.lock import RunLock

    device = resolve_device(args.device)
    with RunLock(args.out):
        claim(args.out, "train")
        return _train(args, device)


def _train(args, device: str) -> int:
    import torch

    from ..data import load_splits
    from ..export import save_model
    from ..models import data_config
    from ..run.trained_model import load_trained
    from ..train.checkpoint import write_json
    from ..train.training import evaluate, fit, make_loader

    torch.manual_seed(args.seed)
    image_size = args.image_size or 224
    normalization = data_config(args.model) if args.dataset == "imagefolder" else None
    data = load_splits(args.dataset, args.data_root, val_fraction=args.val_fraction, image_size=image_size,
                       normalization=normalization)
    info = data.info
    val = make_loader(data.val, 256, shuffle=False, evaluation=True) if data.val is not None else None
    model = load_trained(args.model, info, args.weights)
    # An earlier run's progress in --out is resumed only if it had these same settings.
    settings = {"model_name": args.model, "weights": args.weights, "dataset": args.dataset, "data_root": args.data_root,
                "image_size": info.image_size, "batch_size": args.batch_size, "val_fraction": args.val_fraction,
                "seed": args.seed}
    result = fit(model, make_loader(data.train_aug, args.batch_size, shuffle=True, seed=args.seed),
                 val, epochs=args.epochs, lr=args.lr,
                 device=device, weight_decay=args.weight_decay, stage="train",
                 checkpoint_path=os.path.join(args.out, "train-progress.pt"), settings=settings,
                 metrics_path=os.path.join(args.out, "metrics.jsonl"))
    metrics = evaluate(model, make_loader(data.test, 256, shuffle=False, evaluation=True), device)
    paths = save_model(model, os.path.join(args.out, "model"), model_name=args.model, num_classes=info.num_classes,
                       in_channels=info.in_channels, extra={"image_size": info.image_size, "dataset": args.dataset})
    write_json(os.path.join(args.out, "metrics.json"), {"test": metrics, "history": result.history,
                                                        "settings": {**settings, "epochs": args.epochs, "lr": args.lr}})
    print(f"trained {args.model} on {args.dataset}: test top-1 {100 * metrics['top1']:.2f}% -> {paths['weights']}")
    return 0


def cmd_prune(args) -> int:
    from ..run.pruner import ScopPruner
    from ..run.report import format_table
    from ..train import distributed

    config = prune_config(args)
    if not config.weights:
        raise ValueError("--weights: no trained model given; scop prune removes the filters a trained network does "
                         "not need (train one with `scop train`, or pass a checkpoint file)")
    _announce_preset(config)
    distributed.setup(config.device)
    main = distributed.is_main()  # after teardown every process would call itself the main one
    try:
        pruner = ScopPruner.from_config(config, args.out, progress=not args.quiet)
        results = pruner.run(resume=args.resume)
    finally:
        distributed.teardown()
    if main:
        print(format_table(results.get("before", {}), results.get("after", {}), results.get("latency_conditions")))
        print(f"report: {os.path.join(args.out, 'report.md')}")
    return 0


def _announce_preset(config) -> None:
    """One line naming what a preset set, so its recipe (120 epochs at lr 0.2 for `authors`) is no surprise."""
    import logging

    from ..run.presets import PRESETS

    if config.preset:
        values = config.to_dict()
        chosen = ", ".join(f"{k}={values[k]!r}" for k in PRESETS[config.preset] if k in values)
        logging.getLogger("scop_ext").info("preset %s: %s (flags, --set and the config file override these)",
                                           config.preset, chosen)


def cmd_plan(args) -> int:
    from ..run.config import PruneConfig
    from ..run.dry_run import dry_run, format_plan, run_defaults

    values = {**run_defaults(args.scores), **config_values(args), "device": "cpu"}
    for flag, value in (("--num-classes", args.num_classes), ("--in-channels", args.in_channels),
                        ("--image-size", args.image_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    result = dry_run(PruneConfig.from_dict(values), args.scores, num_classes=args.num_classes,
                     in_channels=args.in_channels, image_size=args.image_size)
    # One line: a plan lists every removed channel, which indented JSON spreads over a line each.
    print(json.dumps(result, separators=(",", ":")) if args.json else format_plan(result))
    return 0


# ------------------------------------------------------------------------------ knockoffs

def cmd_knockoffs_fit(args) -> int:
    from ..knockoffs import KnockoffGAN, make_generator
    from ..run.folder import claim
    from ..run.lock import RunLock

    device = resolve_device(args.device)
    gen = make_generator(args.kind, **parse_key_values(args.option, "--option"))
    gan = isinstance(gen, KnockoffGAN)
    if args.resume and not gan:
        raise ValueError(f"--resume: only --kind gan trains in steps that can be resumed, not {args.kind!r}")
    with RunLock(args.out):
        # what the folder's generator is: another kind or data is refused; iterations may grow (--resume)
        claim(args.out, "knockoffs fit", {"kind": args.kind, "dataset": args.dataset, "data_root": args.data_root})
        _fit_generator(gen, args, device)
    print(f"fitted {args.kind} knockoffs on {args.dataset} -> {os.path.join(args.out, 'knockoffs.pt')}")
    return 0


def _fit_generator(gen, args, device: str) -> None:
    import torch
    from torch.utils.data import DataLoader

    from ..data import load_dataset
    from ..knockoffs import KnockoffGAN

    gan = isinstance(gen, KnockoffGAN)
    torch.manual_seed(args.seed)
    train, _ = load_dataset(args.dataset, args.data_root, "train", augment=False, image_size=args.image_size or 224)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    if gan:
        gen.fit(loader, device=device, checkpoint=os.path.join(args.out, "knockoffs-progress.pt"), resume=args.resume)
    else:
        gen.fit(loader)
    gen.save(os.path.join(args.out, "knockoffs.pt"))


def cmd_knockoffs_check(args) -> int:
    from ..data import load_dataset
    from ..export import load_model
    from ..knockoffs import check, load

    device = resolve_device(args.device)
    gen = load(args.knockoffs, map_location=device)
    test, _ = load_dataset(args.dataset, args.data_root, "test", image_size=args.image_size or 224)
    model, layers = None, None
    if args.model:
        model, _ = load_model(args.model, map_location=device)
        layers = args.layers or None
    report = check(gen, test, args.out, model=model, layers=layers, seed=args.seed, n=args.n, grid=args.grid,
                   **({} if args.max_dim is None else {"max_dim": args.max_dim}))
    print("\n".join(report["verdict"]))
    print(f"every figure in {os.path.join(args.out, 'report.json')}; pictures in {args.out}")
    return 0


# -------------------------------------------------------------------------- report / export

def cmd_report(args) -> int:
    from ..run.report import format_table, write_report

    path = os.path.join(args.run, "state.json")
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable scop run state ({exc})") from None
    results = state.get("results") if isinstance(state, dict) else None
    if not isinstance(results, dict):
        raise ValueError(f"{path}: not a scop run state (expected a mapping whose \"results\" is a mapping)")
    _refuse_unfinished(args.run, state)
    out = args.out or args.run
    paths = write_report(out, results)
    print(format_table(results.get("before", {}), results.get("after", {}), results.get("latency_conditions")))
    print(f"report: {paths['md']}")
    return 0


def _refuse_unfinished(run: str, state: dict) -> None:
    """A report describes a finished run: one still running, or stopped before its report stage,
    is refused in one line (saying how to finish it) instead of an empty table."""
    from ..run.lock import RunLock
    from ..run.runner import STAGES

    holder = RunLock(run).holder()
    if holder is not None:
        raise ValueError(f"{run}: the run is still going (pid {holder}); report it once it has finished")
    completed = state.get("completed")
    done = completed if isinstance(completed, list) else []
    missing = [s for s in STAGES if s not in done]
    after = state["results"].get("after")
    if missing or not isinstance(after, dict) or not after:
        last = next((s for s in reversed(STAGES) if s in done), None)
        raise ValueError(f"{run}: the run is unfinished (last complete stage: {last or 'none'}); finish it with "
                         f"`scop prune --resume --out {run}` and its settings")


def cmd_export(args) -> int:
    import torch

    from ..data import MAX_IMAGE_SIZE
    from ..export import (
        export_onnx,
        export_torchscript,
        load_model,
        onnx_missing,
        save_model,
    )
    from ..models import example_input
    from ..run.folder import claim

    missing = onnx_missing() if args.format in ("onnx", "all") else None
    if missing and args.format == "onnx":
        raise ValueError(f"--format onnx: needs the {missing} package (pip install onnx onnxscript)")
    model, arch = load_model(args.model)
    size = args.image_size if args.image_size is not None else (arch.get("image_size")
                                                                 or example_input(arch["model"]).shape[-1])
    if not 1 <= size <= MAX_IMAGE_SIZE:
        raise ValueError(f"--image-size must be in 1..{MAX_IMAGE_SIZE}, got {size}")
    example = torch.randn(2, arch["in_channels"], size, size)  # batch 2: export keeps the batch axis dynamic
    try:
        with torch.no_grad():
            model(example)
    except RuntimeError as exc:  # e.g. pooling below 1x1: say so before tracing fails the same way
        raise ValueError(f"--image-size {size}: {args.model} cannot run on inputs of that size "
                         f"({str(exc).strip().splitlines()[0]})") from None
    claim(args.out, "export")
    formats = ["safetensors", "torchscript", "onnx"] if args.format == "all" else [args.format]
    for fmt in formats:
        if fmt == "safetensors":
            paths = save_model(model, os.path.join(args.out, "model"), model_name=arch["model"],
                               num_classes=arch["num_classes"], in_channels=arch["in_channels"],
                               extra={"image_size": size})
            print(f"safetensors: {paths['weights']} + {paths['arch']}")
        elif fmt == "torchscript":
            export_torchscript(model, example, os.path.join(args.out, "model.ts"))
            print(f"torchscript: {os.path.join(args.out, 'model.ts')}")
        elif missing:
            print(f"onnx: skipped, {missing} is not installed (pip install onnx onnxscript)")
        else:
            export_onnx(model, example, os.path.join(args.out, "model.onnx"))
            print(f"onnx: {os.path.join(args.out, 'model.onnx')}")
    return 0


def cmd_info(args) -> int:
    import scop_ext

    from ..knockoffs import generator_kinds
    from ..models import model_names
    from ..prune.importance import criterion_names
    from ..prune.select import policy_names

    print(json.dumps({"build": scop_ext.build_info(), "models": model_names(), "knockoffs": generator_kinds(),
                      "importance": criterion_names(), "policies": policy_names()}, indent=2))
    return 0


# ---------------------------------------------------------------------------------- demo

def cmd_demo(args) -> int:
    """Baseline on digits, SCOP to about half the FLOPs, fine-tune, print the table."""
    import time

    from ..run.config import PruneConfig
    from ..run.pruner import ScopPruner
    from ..run.report import format_table

    start = time.time()
    device = resolve_device(args.device)
    base = os.path.join(args.out, "baseline")
    _demo_baseline(args, device, base)
    config = PruneConfig(model="resnet_digits", weights=os.path.join(base, "model"), dataset="digits",
                         scales_epochs=args.scales_epochs, finetune_epochs=args.finetune_epochs, finetune_lr=0.02,
                         policy="flops_target", flops_reduction=0.5, device=device, seed=args.seed)
    folder = os.path.join(args.out, "prune")
    _clear_if_other(folder, "config.json", config.to_dict(), "pruning run")
    results = ScopPruner.from_config(config, folder).run(resume=True)
    print()
    print(format_table(results["before"], results["after"], results.get("latency_conditions")))
    print(f"\nFLOPs reduction {100 * results.get('flops_reduction', 0):.1f}%, "
          f"top-1 right after pruning {100 * results['after_prune']['top1']:.2f}%; "
          f"report: {os.path.join(args.out, 'prune', 'report.md')}; {time.time() - start:.0f} s")
    return 0


def _demo_baseline(args, device: str, base: str) -> None:
    """The demo's baseline: reused when it was trained with these settings, else trained again."""
    wanted = {"epochs": args.train_epochs, "seed": args.seed}
    metrics = os.path.join(base, "metrics.json")
    saved = _read_json(metrics).get("settings", {})
    if os.path.exists(os.path.join(base, "model.json")) and all(saved.get(k) == v for k, v in wanted.items()):
        print(f"baseline: reusing {base} (trained with {wanted})")
        return
    _clear_if_other(base, "metrics.json", {**saved, **wanted}, "baseline", keys=tuple(wanted))
    cmd_train(build_parser().parse_args(["train", "--epochs", str(args.train_epochs), "--device", device,
                                         "--seed", str(args.seed), "--out", base]))


def _clear_if_other(folder: str, name: str, wanted: dict, what: str, keys: tuple | None = None) -> None:
    """The demo owns its folders: one holding a run of other settings is emptied, with a line saying why."""
    import shutil

    saved = _read_json(os.path.join(folder, name))
    if name == "metrics.json":
        saved = saved.get("settings", {})
    differ = sorted(k for k in (keys or wanted) if k in saved and saved.get(k) != wanted.get(k))
    if os.path.isdir(folder) and (differ or (not saved and os.listdir(folder))):
        print(f"{what} in {folder} had other settings ({', '.join(differ) or 'unknown'}): starting it over")
        shutil.rmtree(folder)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
