"""The ``scop`` command line: every sub-command's flags, with defaults and help. The sub-commands
themselves are :mod:`.commands` (``handler`` names the one to run)."""

from __future__ import annotations

import argparse

from .settings import add_config_flags

__all__ = ["build_parser"]


def _common(p: argparse.ArgumentParser, out_default: str | None = None,
            device_help: str = "cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)") -> None:
    p.add_argument("--device", default=None, help=device_help)
    p.add_argument("--seed", type=int, default=0, help="seed for data order, knockoffs and biases (default 0)")
    p.add_argument("--out", default=out_default, required=out_default is None, help="output folder")



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
    p.set_defaults(handler="train")

    p = sub.add_parser("prune", help="run the SCOP pipeline",
                       description="Prune a trained model with SCOP: knockoffs, scales, selection, surgery, "
                                   "fine-tuning, report. Settings come from --config (YAML/JSON), then flags, "
                                   "then --set KEY=VALUE (any PruneConfig key).")
    add_config_flags(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last complete stage")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", required=True)
    p.set_defaults(handler="prune")

    p = sub.add_parser("plan", help="what a policy would prune, without training",
                       description="Dry run of selection and surgery: per-layer widths before and after, FLOPs and "
                                   "params reductions. Settings as for `scop prune` (--config, flags, --preset, --set).")
    add_config_flags(p)
    p.add_argument("--scores", default="random",
                   help="random (seeded by --seed), l1, or run:<dir> (the learned scales of a `scop prune` run; "
                        "its model and weights unless --model/--weights say otherwise)")
    p.add_argument("--num-classes", type=int, help="classes of the model (default: 1000 for torchvision and timm, else 10)")
    p.add_argument("--in-channels", type=int, help="input channels (default: the model's own, e.g. 1 for resnet_digits)")
    p.add_argument("--image-size", type=int, help="side of the input FLOPs are counted on (default: the model's)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(handler="plan")

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
    k.set_defaults(handler="knockoffs_fit")
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
    k.set_defaults(handler="knockoffs_check")

    p = sub.add_parser("report", help="rewrite the report of a run", description="Rewrite report.md/JSON/PNGs of a run.")
    p.add_argument("--run", required=True, help="the --out folder of `scop prune`")
    p.add_argument("--out", default=None, help="where to write (default: the run folder)")
    p.set_defaults(handler="report")

    p = sub.add_parser("export", help="export a model", description="Export a saved model (no pickle needed to reload).")
    p.add_argument("--model", required=True, help="model stem, e.g. runs/prune/final")
    p.add_argument("--format", default="all", choices=["safetensors", "torchscript", "onnx", "all"])
    p.add_argument("--image-size", type=int, default=8, help="example input size for tracing (8 for digits)")
    p.add_argument("--out", required=True)
    p.set_defaults(handler="export")

    p = sub.add_parser("demo", help="the end-to-end demo on the bundled digits",
                       description="Train a small ResNet on digits, prune ~50%% of its FLOPs with SCOP, fine-tune.")
    p.add_argument("--train-epochs", type=int, default=15)
    p.add_argument("--scales-epochs", type=int, default=10)
    p.add_argument("--finetune-epochs", type=int, default=30)
    _common(p, out_default="runs/demo")
    p.set_defaults(handler="demo")

    p = sub.add_parser("info", help="what was built and which models exist")
    p.set_defaults(handler="info")
    return parser
