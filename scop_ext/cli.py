"""The ``scop`` command: train a baseline, prune it with SCOP, plan a pruning dry run, inspect knockoffs, export.

Every sub-command has ``--help``; those that compute (``train``, ``prune``, ``knockoffs fit``,
``knockoffs check``, ``demo``) take ``--device`` and ``--seed``, and every one that writes files
takes ``--out``. Errors in the user's input (paths, configs, checkpoints) end with one line on
stderr and exit status 2; a run stopped by NaN/Inf or by a batch that would not fit in memory,
with one line and exit status 1.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys

__all__ = ["main"]


def _common(p: argparse.ArgumentParser, out_default: str | None = None,
            device_help: str = "cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)") -> None:
    p.add_argument("--device", default=None, help=device_help)
    p.add_argument("--seed", type=int, default=0, help="seed for data order, knockoffs and biases (default 0)")
    p.add_argument("--out", default=out_default, required=out_default is None, help="output folder")


def _device(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: not a device name: {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here")
    return name


def _parse_value(text: str):
    from .config import load_yaml

    return load_yaml(text)


def _key_values(pairs: list[str], flag: str) -> dict:
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


# ---------------------------------------------------------------------------------- train

def cmd_train(args) -> int:
    from .runlock import RunLock

    device = _device(args.device)
    with RunLock(args.out):
        return _train(args, device)


def _train(args, device: str) -> int:
    import torch

    from .checkpoint import write_json
    from .data import load_splits
    from .export import save_model
    from .models import build_model
    from .train import evaluate, fit, make_loader

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


# ---------------------------------------------------------------------------------- prune

PRUNE_FLAGS = {
    # config key (the flag is --key-with-dashes): (type, help)
    "preset": (str, "authors: the authors' whole recipe (README); other settings override it"),
    "model": (str, "model name (see `scop info`)"),
    "weights": (str, "trained weights: a .safetensors/state_dict file or a `scop train` model stem"),
    "dataset": (str, "digits (bundled), cifar10 or imagefolder"),
    "data_root": (str, "local folder of cifar10 / imagefolder data"),
    "batch_size": (int, "images per batch (real images; stage 2 adds as many knockoffs)"),
    "knockoffs": (str, "knockoff generator (see `scop info`)"),
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


def _config_values(args) -> dict:
    """The PruneConfig keys --config, the flags and --set give, later ones winning."""
    from .config import PruneConfig

    from .export import read_arch

    values = PruneConfig.file_values(args.config) if args.config else {}
    for key in PRUNE_FLAGS:
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    stem = values.get("weights")
    if "model" not in values and isinstance(stem, str) and os.path.isfile(stem + ".json"):
        values["model"] = read_arch(stem)["model"]  # a `scop train` stem names its model: no --model needed
    if args.no_knockoff_bias:
        values["knockoff_bias"] = False
    values.update(_key_values(args.set, "--set"))
    values["seed"] = args.seed if args.seed is not None else values.get("seed", 0)
    return values


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML or JSON file of PruneConfig keys")
    for key, (kind, text) in PRUNE_FLAGS.items():
        p.add_argument("--" + key.replace("_", "-"), dest=key, type=kind, default=None, help=text)
    p.add_argument("--no-knockoff-bias", action="store_true", help="turn the Lemma 2 biases off")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any PruneConfig key (repeatable)")


def _prune_config(args):
    from .config import PruneConfig

    values = _config_values(args)
    values["device"] = _device(args.device or values.get("device"))
    return PruneConfig.from_dict(values)


def cmd_prune(args) -> int:
    from . import distributed
    from .pipeline import ScopPruner
    from .report import format_table

    config = _prune_config(args)
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
    from .config import PruneConfig
    from .planner import dry_run, format_plan, run_defaults

    values = {**run_defaults(args.scores), **_config_values(args), "device": "cpu"}
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
    from .knockoffs import KnockoffGAN, make_generator
    from .runlock import RunLock

    device = _device(args.device)
    gen = make_generator(args.kind, **_key_values(args.option, "--option"))
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

    from .data import load_dataset
    from .knockoffs import KnockoffGAN

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
    from .data import load_dataset
    from .knockoffs import check, load
    from .export import load_model

    device = _device(args.device)
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
    from .report import format_table, write_report

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

    from .data import MAX_IMAGE_SIZE
    from .export import export_onnx, export_torchscript, load_model, onnx_missing, save_model

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

    from .knockoffs import generator_kinds
    from .models import model_names
    from .prune.importance import criterion_names
    from .prune.select import policy_names

    print(json.dumps({"build": scop_ext.build_info(), "models": model_names(), "knockoffs": generator_kinds(),
                      "importance": criterion_names(), "policies": policy_names()}, indent=2))
    return 0


# ---------------------------------------------------------------------------------- demo

def cmd_demo(args) -> int:
    """Baseline on digits, SCOP to about half the FLOPs, fine-tune, print the table."""
    import time

    from .config import PruneConfig
    from .pipeline import ScopPruner
    from .report import format_table

    start = time.time()
    device = _device(args.device)
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


# ---------------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scop", description="Knockoff-controlled filter pruning (SCOP) for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a baseline model", description="Train a baseline (SGD Nesterov, cosine).")
    p.add_argument("--model", default="resnet_digits")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the training split held out to pick the best epoch (0: keep the last)")
    _common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("prune", help="run the SCOP pipeline",
                       description="Prune a trained model with SCOP: knockoffs, scales, selection, surgery, "
                                   "fine-tuning, report. Settings come from --config (YAML/JSON), then flags, "
                                   "then --set KEY=VALUE (any PruneConfig key).")
    _add_config_flags(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last complete stage")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("plan", help="what a policy would prune, without training",
                       description="Dry run of selection and surgery: per-layer widths before and after, FLOPs and "
                                   "params reductions. Settings as for `scop prune` (--config, flags, --preset, --set).")
    _add_config_flags(p)
    p.add_argument("--scores", default="random",
                   help="random (seeded by --seed), l1, or run:<dir> (the learned scales of a `scop prune` run; "
                        "its model and weights unless --model/--weights say otherwise)")
    p.add_argument("--num-classes", type=int, help="classes of the model (default: 1000 for torchvision and timm, else 10)")
    p.add_argument("--in-channels", type=int, help="input channels (default: the model's own, e.g. 1 for resnet_digits)")
    p.add_argument("--image-size", type=int, help="side of the input FLOPs are counted on (default: the model's)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("knockoffs", help="fit or check knockoff generators")
    ksub = p.add_subparsers(dest="knockoffs_command", required=True)
    k = ksub.add_parser("fit", help="fit a knockoff generator", description="Fit a knockoff generator on training images.")
    k.add_argument("--kind", default="gaussian", help="knockoff generator (see `scop info`)")
    k.add_argument("--dataset", default="digits")
    k.add_argument("--data-root", default=None)
    k.add_argument("--batch-size", type=int, default=256)
    k.add_argument("--option", action="append", metavar="KEY=VALUE", help="generator constructor argument")
    k.add_argument("--resume", action="store_true",
                   help="gan: continue from the checkpoint an interrupted fit left in --out (knockoffs-progress.pt)")
    _common(k, device_help="where the gan trains: cpu, cuda, cuda:1 ... (default: cuda if available, else cpu); "
                           "gaussian and permutation fit on the CPU in float64")
    k.set_defaults(func=cmd_knockoffs_fit)
    k = ksub.add_parser("check", help="measure knockoff quality",
                        description="Exchangeability, power, label leakage, s0 and figures (seed Fig. S1/S2).")
    k.add_argument("--knockoffs", required=True, help="file written by `scop knockoffs fit`")
    k.add_argument("--dataset", default="digits")
    k.add_argument("--data-root", default=None)
    k.add_argument("--model", help="model stem (`scop train` output) to measure features of")
    k.add_argument("--layers", nargs="*", help="module names of --model to measure at")
    k.add_argument("-n", type=int, default=1000, help="images to use")
    k.add_argument("--grid", type=int, nargs=2, metavar=("ROWS", "COLS"),
                   help="swap blocks down and across (default: the generator's own grid)")
    k.add_argument("--max-dim", type=int,
                   help="most coordinates the exchangeability covariance is measured at; larger images are "
                        "block-cell averaged (default: scop_ext.knockoffs.exchangeability.MAX_DIM)")
    _common(k, device_help="where the knockoffs and --model run: cpu, cuda, cuda:1 ... (default: cuda if available)")
    k.set_defaults(func=cmd_knockoffs_check)

    p = sub.add_parser("report", help="rewrite the report of a run", description="Rewrite report.md/JSON/PNGs of a run.")
    p.add_argument("--run", required=True, help="the --out folder of `scop prune`")
    p.add_argument("--out", default=None, help="where to write (default: the run folder)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="export a model", description="Export a saved model (no pickle needed to reload).")
    p.add_argument("--model", required=True, help="model stem, e.g. runs/prune/final")
    p.add_argument("--format", default="all", choices=["safetensors", "torchscript", "onnx", "all"])
    p.add_argument("--image-size", type=int, default=8, help="example input size for tracing (8 for digits)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="the end-to-end demo on the bundled digits",
                       description="Train a small ResNet on digits, prune ~50%% of its FLOPs with SCOP, fine-tune.")
    p.add_argument("--train-epochs", type=int, default=15)
    p.add_argument("--scales-epochs", type=int, default=10)
    p.add_argument("--finetune-epochs", type=int, default=30)
    _common(p, out_default="runs/demo")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("info", help="what was built and which models exist")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .checkpoint import CheckpointError
    from .resources import ResourceError
    from .epochs import NonFiniteError

    try:
        _check_out(getattr(args, "out", None))
        return args.func(args)
    except (ValueError, CheckpointError) as exc:
        _error(args, exc, "")
        return 2
    except OSError as exc:  # FileNotFoundError, a full disk, a read-only or unwritable --out
        _error(args, _os_message(args, exc), "")
        return 2
    except NonFiniteError as exc:
        _error(args, exc, "; the last complete checkpoint is intact: fix the cause and rerun with --resume"
               if args.command == "prune" else "")
        return 1
    except ResourceError as exc:
        _error(args, exc, "")
        return 1


def _check_out(out: str | None) -> None:
    """--out must be a folder or be creatable as one: not a file, nor under one."""
    if not out:
        return
    path = os.path.abspath(out)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        where = "is a file" if path == os.path.abspath(out) else f"is under {path}, which is a file"
        raise ValueError(f"--out {out}: {where}, expected a folder")


# A full disk stops a command between two atomic writes: every complete file is whole.
_RESUME = {"prune": "rerun it with --resume", "train": "rerun the same command", "knockoffs": "rerun it (with --resume for --kind gan)"}


def _os_message(args, exc: OSError) -> str:
    if not exc.filename:
        return str(exc)
    text = f"{exc.filename}: {exc.strerror or exc}"
    out = getattr(args, "out", None)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        resume = _RESUME.get(args.command, "rerun it")
        return f"{text}; the folder is left resumable, every completed step kept: free some space and {resume} to continue"
    inside = out and os.path.abspath(exc.filename).startswith(os.path.abspath(out))
    if inside and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return f"{text} (--out must be a folder this user can write)"
    return text


def _error(args, exc: BaseException, hint: str) -> None:
    # One line, whatever the message: deeper errors (e.g. load_state_dict's) span several.
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    print(f"scop {args.command}: error: {text}{hint}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
