"""The ``scop`` command line: every sub-command's flags, with their defaults and help, one
``add_*`` per command. The sub-commands themselves are :mod:`.commands` (``handler`` names the
one to run)."""

from __future__ import annotations

import argparse

from ..data import DATASETS
from .settings import add_config_flags

__all__ = ["build_parser"]

DEVICE_HELP = "cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)"
DATASET_HELP = f"one of {', '.join(DATASETS)} (digits is bundled; nothing is downloaded)"
DATA_ROOT_HELP = ("local data folder: fashion-mnist's four IDX files (default: Debian's "
                  "/usr/share/datasets/fashion-mnist), cifar10's python batches, or an image folder with train/ and val/")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in every flag's help (flags without one, or defaulting to None, say nothing)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _command(sub, name: str, **kw) -> argparse.ArgumentParser:
    p = sub.add_parser(name, formatter_class=_Formatter, **kw)
    p.set_defaults(handler=name.replace(" ", "_"))
    return p


def _common(p: argparse.ArgumentParser, out_default: str | None = None, device_help: str = DEVICE_HELP) -> None:
    p.add_argument("--device", default=None, help=device_help)
    p.add_argument("--seed", type=int, default=0, help="seed for data order, knockoffs and biases")
    p.add_argument("--out", default=out_default, required=out_default is None, help="output folder")


def _data(p: argparse.ArgumentParser, image_size: bool = True) -> None:
    p.add_argument("--dataset", default="digits", help=DATASET_HELP)
    p.add_argument("--data-root", default=None, help=DATA_ROOT_HELP)
    if image_size:
        p.add_argument("--image-size", type=int, default=None,
                       help="side images are cropped to (imagefolder; default 224, the others have a fixed size)")


def add_train(sub) -> None:
    p = _command(sub, "train", help="train (or fine-tune) a baseline model",
                 description="Train a baseline with SGD (Nesterov momentum 0.9) and a cosine schedule; with --weights, "
                             "start from a pretrained checkpoint (its classifier is replaced when the dataset has "
                             "another number of classes).")
    p.add_argument("--model", default="resnet_digits", help="model name (see `scop info`)")
    p.add_argument("--weights", default=None,
                   help="start from this checkpoint: a state_dict (.pth/.pt, or a training checkpoint nesting one), "
                        "a .safetensors file, or a `scop train` model stem; nothing is downloaded")
    _data(p)
    p.add_argument("--epochs", type=int, default=15, help="training epochs")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the cosine schedule")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the training split held out to pick the best epoch (0: keep the last)")
    _common(p)


def add_prune(sub) -> None:
    p = _command(sub, "prune", help="run the SCOP pipeline",
                 description="Prune a trained model with SCOP: knockoffs, scales, selection, surgery, fine-tuning, "
                             "report. Settings come from --config (YAML/JSON), then flags, then --set KEY=VALUE (any "
                             "PruneConfig key); the defaults shown are PruneConfig's.")
    add_config_flags(p)
    p.add_argument("--no-latency", action="store_true", help="skip the latency rows of the report (latency: false)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last complete stage")
    p.add_argument("--quiet", action="store_true", help="no progress bars (the per-epoch log lines stay)")
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--seed", type=int, default=None, help="seed for data order, knockoffs and biases (default 0)")
    p.add_argument("--out", required=True, help="the run folder")


def add_plan(sub) -> None:
    p = _command(sub, "plan", help="what a policy would prune, without training",
                 description="Dry run of selection and surgery: per-layer widths before and after, FLOPs and params "
                             "reductions. Settings as for `scop prune` (--config, flags, --preset, --set).")
    add_config_flags(p)
    p.add_argument("--scores", default="random",
                   help="random (seeded by --seed), l1, or run:<dir> (the learned scales of a `scop prune` run; its "
                        "model and weights unless --model/--weights say otherwise)")
    p.add_argument("--num-classes", type=int, help="classes of the model (default: 1000 for torchvision and timm, else 10)")
    p.add_argument("--in-channels", type=int, help="input channels (default: the model's own, e.g. 1 for resnet_digits)")
    p.add_argument("--json", action="store_true", help="print the result as one line of JSON")
    p.add_argument("--seed", type=int, default=None, help="seed of --scores random (default 0)")


def add_knockoffs(sub) -> None:
    p = sub.add_parser("knockoffs", help="fit or check knockoff generators")
    ksub = p.add_subparsers(dest="knockoffs_command", required=True)
    k = _command(ksub, "fit", help="fit a knockoff generator", description="Fit a knockoff generator on training images; "
                 "`scop prune --knockoffs DIR/knockoffs.pt` then uses it instead of fitting its own.")
    k.set_defaults(handler="knockoffs_fit")
    k.add_argument("--kind", default="gaussian", help="knockoff generator (see `scop info`)")
    _data(k)
    k.add_argument("--batch-size", type=int, default=256, help="images per batch while fitting")
    k.add_argument("--option", action="append", metavar="KEY=VALUE", help="generator constructor argument (repeatable)")
    k.add_argument("--resume", action="store_true",
                   help="gan: continue from the checkpoint an interrupted fit left in --out (knockoffs-progress.pt)")
    _common(k, device_help="where the gan trains: cpu, cuda, cuda:1 ... (default: cuda if available, else cpu); "
                           "gaussian and permutation fit on the CPU in float64")
    k = _command(ksub, "check", help="measure knockoff quality, with a verdict",
                 description="Exchangeability, power, label leakage, s0 and figures (the paper's Fig. S1/S2), each "
                             "with what it means for pruning.")
    k.set_defaults(handler="knockoffs_check")
    k.add_argument("--knockoffs", required=True, help="file written by `scop knockoffs fit`")
    _data(k)
    k.add_argument("--model", help="model stem (`scop train` output) to measure features of")
    k.add_argument("--layers", nargs="*", help="module names of --model to measure at")
    k.add_argument("-n", type=int, default=1000, help="images to use")
    k.add_argument("--grid", type=int, nargs=2, metavar=("ROWS", "COLS"),
                   help="swap blocks down and across (default: the generator's own grid)")
    k.add_argument("--max-dim", type=int,
                   help="most coordinates the exchangeability covariance is measured at; larger images are "
                        "block-cell averaged (default: scop_ext.knockoffs.exchangeability.MAX_DIM)")
    _common(k, device_help="where the knockoffs and --model run: cpu, cuda, cuda:1 ... (default: cuda if available)")


def add_report(sub) -> None:
    p = _command(sub, "report", help="rewrite the report of a finished run",
                 description="Rewrite report.md/JSON/PNGs of a finished `scop prune` run.")
    p.add_argument("--run", required=True, help="the --out folder of `scop prune`")
    p.add_argument("--out", default=None, help="where to write (default: the run folder)")


def add_export(sub) -> None:
    p = _command(sub, "export", help="export a model", description="Export a saved model: safetensors (no pickle "
                 "needed to reload), TorchScript and ONNX (batch and image size dynamic where the model allows).")
    p.add_argument("--model", required=True, help="model stem, e.g. runs/prune/final")
    p.add_argument("--format", default="all", choices=["safetensors", "torchscript", "onnx", "all"], help="what to write")
    p.add_argument("--image-size", type=int, default=None,
                   help="example input size for tracing (default: the size the model was trained at, from its .json)")
    p.add_argument("--out", required=True, help="output folder")


def add_demo(sub) -> None:
    p = _command(sub, "demo", help="the end-to-end demo on the bundled digits",
                 description="Train a small ResNet on digits, prune ~50%% of its FLOPs with SCOP, fine-tune. A rerun "
                             "with other settings retrains or reprunes what they change.")
    p.add_argument("--train-epochs", type=int, default=15, help="baseline epochs")
    p.add_argument("--scales-epochs", type=int, default=10, help="stage-2 epochs")
    p.add_argument("--finetune-epochs", type=int, default=30, help="fine-tuning epochs")
    _common(p, out_default="runs/demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scop", description="Knockoff-controlled filter pruning (SCOP) for PyTorch. "
                                     "Also `python -m scop_ext ...`, and under torchrun.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_train, add_prune, add_plan, add_knockoffs, add_report, add_export, add_demo):
        add(sub)
    _command(sub, "info", help="what was built and which models and settings exist")
    return parser
