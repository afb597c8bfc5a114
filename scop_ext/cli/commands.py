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
    from ..run.lock import RunLock

    device = resolve_device(args.device)
    with RunLock(args.out):
        return _train(args, device)


def _train(args, device: str) -> int:
    import torch

    from ..data import load_splits
    from ..export import save_model
    from ..models import build_model
    from ..train.checkpoint import write_json
    from ..train.training import evaluate, fit, make_loader

    torch.manual_seed(args.seed)
    data = load_splits(args.dataset, args.data_root, val_fraction=args.val_fraction)
    info = data.info
    val = make_loader(data.val, 256, shuffle=False, evaluation=True) if data.val is not None else None
    model = build_model(args.model, info.num_classes, info.in_channels)
    # An earlier run's progress in --out is resumed only if it had these same settings.
    settings = {"model_name": args.model, "dataset": args.dataset, "data_root": args.data_root,
                "batch_size": args.batch_size, "val_fraction": args.val_fraction, "seed": args.seed}
    result = fit(model, make_loader(data.train_aug, args.batch_size, shuffle=True, seed=args.seed),
                 val, epochs=args.epochs, lr=args.lr,
                 device=device, weight_decay=args.weight_decay, stage="train",
                 checkpoint_path=os.path.join(args.out, "train-progress.pt"), settings=settings, log=print)
    metrics = evaluate(model, make_loader(data.test, 256, shuffle=False, evaluation=True), device)
    paths = save_model(model, os.path.join(args.out, "model"), model_name=args.model,
                       num_classes=info.num_classes, in_channels=info.in_channels)
    write_json(os.path.join(args.out, "metrics.json"), {"test": metrics, "history": result.history})
    print(f"trained {args.model} on {args.dataset}: test top-1 {100 * metrics['top1']:.2f}% -> {paths['weights']}")
    return 0


def cmd_prune(args) -> int:
    from ..run.pruner import ScopPruner
    from ..run.report import format_table
    from ..train import distributed

    config = prune_config(args)
    distributed.setup(config.device)
    main = distributed.is_main()  # after teardown every process would call itself the main one
    try:
        pruner = ScopPruner.from_config(config, args.out, progress=not args.quiet)
        results = pruner.run(resume=args.resume)
    finally:
        distributed.teardown()
    if main:
        print(format_table(results.get("before", {}), results.get("after", {})))
        print(f"report: {os.path.join(args.out, 'report.md')}")
    return 0


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
    print(json.dumps(result, indent=1) if args.json else format_plan(result))
    return 0


# ------------------------------------------------------------------------------ knockoffs

def cmd_knockoffs_fit(args) -> int:
    from ..knockoffs import KnockoffGAN, make_generator
    from ..run.lock import RunLock

    device = resolve_device(args.device)
    gen = make_generator(args.kind, **parse_key_values(args.option, "--option"))
    gan = isinstance(gen, KnockoffGAN)
    if args.resume and not gan:
        raise ValueError(f"--resume: only --kind gan trains in steps that can be resumed, not {args.kind!r}")
    with RunLock(args.out):
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
    train, _ = load_dataset(args.dataset, args.data_root, "train", augment=False)
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
    test, _ = load_dataset(args.dataset, args.data_root, "test")
    model, layers = None, None
    if args.model:
        model, _ = load_model(args.model, map_location=device)
        layers = args.layers or None
    report = check(gen, test, args.out, model=model, layers=layers, seed=args.seed, n=args.n, grid=args.grid,
                   **({} if args.max_dim is None else {"max_dim": args.max_dim}))
    print(json.dumps({k: report[k] for k in ("exchangeability", "power", "leakage") if k in report}, indent=2, default=str))
    print(f"report and figures in {args.out}")
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
    out = args.out or args.run
    paths = write_report(out, results)
    print(format_table(results.get("before", {}), results.get("after", {})))
    print(f"report: {paths['md']}")
    return 0


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

    if not 1 <= args.image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"--image-size must be in 1..{MAX_IMAGE_SIZE}, got {args.image_size}")
    missing = onnx_missing() if args.format in ("onnx", "all") else None
    if missing and args.format == "onnx":
        raise ValueError(f"--format onnx: needs the {missing} package (pip install onnx onnxscript)")
    model, arch = load_model(args.model)
    example = torch.randn(1, arch["in_channels"], args.image_size, args.image_size)
    try:
        with torch.no_grad():
            model(example)
    except RuntimeError as exc:  # e.g. pooling below 1x1: say so before tracing fails the same way
        raise ValueError(f"--image-size {args.image_size}: {args.model} cannot run on inputs of that size "
                         f"({str(exc).strip().splitlines()[0]})") from None
    os.makedirs(args.out, exist_ok=True)
    formats = ["safetensors", "torchscript", "onnx"] if args.format == "all" else [args.format]
    for fmt in formats:
        if fmt == "safetensors":
            paths = save_model(model, os.path.join(args.out, "model"), model_name=arch["model"],
                               num_classes=arch["num_classes"], in_channels=arch["in_channels"])
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
    if not os.path.exists(os.path.join(base, "model.json")):
        cmd_train(build_parser().parse_args(["train", "--epochs", str(args.train_epochs), "--device", device,
                                             "--seed", str(args.seed), "--out", base]))
    config = PruneConfig(model="resnet_digits", weights=os.path.join(base, "model"), dataset="digits",
                         scales_epochs=args.scales_epochs, finetune_epochs=args.finetune_epochs, finetune_lr=0.02,
                         policy="flops_target", flops_reduction=0.5, device=device, seed=args.seed)
    results = ScopPruner.from_config(config, os.path.join(args.out, "prune")).run(resume=True)
    print()
    print(format_table(results["before"], results["after"]))
    print(f"\nFLOPs reduction {100 * results.get('flops_reduction', 0):.1f}%, "
          f"top-1 right after pruning {100 * results['after_prune']['top1']:.2f}%; "
          f"report: {os.path.join(args.out, 'prune', 'report.md')}; {time.time() - start:.0f} s")
    return 0

