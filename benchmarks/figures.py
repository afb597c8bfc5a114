"""The README's pictures (seed §S3 equivalents and one demo run), written under docs/figures/.

- ``knockoff_embedding.png`` (seed Fig. S1): ``[A, Ã]`` and ``[A, Ã]_swap`` in 2-D for the input
  images and for the features of a shallow (``layers.0.0``) and a deep (``layers.1.0``) block of
  a trained ``resnet_digits``; exchangeable knockoffs give overlapping clouds.
- ``knockoff_grid.png`` (seed Fig. S2): real digits, their Gaussian knockoffs, and the channel
  mean of both at the two blocks.
- ``demo_betas.png`` / ``demo_importance.png`` / ``demo_channels.png``: the learned scales per
  layer, the importance histogram with the cut, and the widths kept, from ``ScopPruner`` at the
  ``scop demo`` settings (stage 2 for 10 epochs, 50% fewer FLOPs, fine-tuning 10 epochs at lr
  0.02) on the same baseline.

Both use the Gaussian knockoffs and seed 0; ``--cache`` shares the trained baseline with
planted.py and accuracy.py. Each PNG is kept under 200 KB. ``--dataset fashion-mnist`` draws
Fig. S1/S2 for Fashion-MNIST and its ``resnet8`` instead (``fashion_mnist_<generator>_*.png``,
for the Gaussian knockoffs at ``--block`` and, with ``--gan-iterations``, a KnockoffGAN), on 2,000
test images.

    python benchmarks/figures.py --cache runs/bench-cache
    python benchmarks/figures.py --cache runs/bench-cache --dataset fashion-mnist --gan-iterations 3000
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _baseline  # noqa: E402

from scop_ext.knockoffs import check, make_generator  # noqa: E402
from scop_ext.run.config import PruneConfig  # noqa: E402
from scop_ext.run import ScopPruner  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ["layers.0.0", "layers.1.0"]
MAX_BYTES = 200_000


def _shrink(path: str) -> None:
    """Re-save a PNG with a palette if it is over MAX_BYTES (keeps the picture, drops size)."""
    if os.path.getsize(path) <= MAX_BYTES:
        return
    from PIL import Image

    Image.open(path).convert("RGB").quantize(colors=128).save(path, optimize=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "figures"))
    parser.add_argument("--cache", help="folder of trained baselines (shared with planted.py / accuracy.py)")
    parser.add_argument("--train-epochs", type=int, default=15)
    parser.add_argument("--scales-epochs", type=int, default=10)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", default="digits", choices=["digits", "fashion-mnist"])
    parser.add_argument("--block", type=int, help="Gaussian knockoffs' swap block (default: the generator's)")
    parser.add_argument("--gan-iterations", type=int, default=0, help="also draw a KnockoffGAN's (fashion-mnist)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    written = _fashion_mnist(args) if args.dataset == "fashion-mnist" else _digits(args)
    for path in written:
        _shrink(path)
        print(f"{os.path.relpath(path, ROOT)}: {os.path.getsize(path) / 1e3:.0f} KB")
    print(f"{time.time() - start:.0f} s")


def _checked(gen, test, model, layers, seed, n, out: str, prefix: str) -> list[str]:
    """Fig. S1/S2 of ``gen`` copied to ``out`` as ``<prefix>embedding.png`` / ``<prefix>grid.png``."""
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        report = check(gen, test, os.path.join(tmp, "check"), model=model, layers=layers, seed=seed, n=n,
                       swap_test_steps=0)
        for name in ("embedding", "grid"):
            dst = os.path.join(out, f"{prefix}{name}.png")
            shutil.copyfile(os.path.join(tmp, "check", f"{name}.png"), dst)
            written.append(dst)
    for name, summary in [("input", report["exchangeability"]), *report["layers"].items()]:
        print(f"{prefix}{name}: exchangeability gap {summary['gap']:.3f} (permutation {summary['null_gap']:.3f}, "
              f"noise floor {summary['noise_floor']:.3f})")
    return written


def _fashion_mnist(args) -> list[str]:
    recipe = _baseline.RECIPES["fashion-mnist"]
    train, _, test, _ = _baseline.datasets("fashion-mnist")
    model = _baseline.baseline(recipe["model"], "fashion-mnist", args.seed, recipe["train_epochs"], cache=args.cache,
                               batch_size=recipe["batch_size"])
    loader = DataLoader(train, batch_size=256, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    torch.manual_seed(args.seed)
    gens = {"gaussian": make_generator("gaussian", **({"block": args.block} if args.block else {})).fit(loader)}
    if args.gan_iterations:
        gens["gan"] = make_generator("gan", iterations=args.gan_iterations, seed=args.seed)
        gens["gan"].fit(loader, progress=False)
    written = []
    for kind, gen in gens.items():
        written += _checked(gen, test, model, LAYERS, args.seed, 2000, args.out, f"fashion_mnist_{kind}_")
    return written


def _digits(args) -> list[str]:
    train, _, test, _ = _baseline.datasets("digits")
    model = _baseline.baseline("resnet_digits", "digits", args.seed, args.train_epochs, cache=args.cache)
    torch.manual_seed(args.seed)
    gen = make_generator("gaussian").fit(DataLoader(train, batch_size=256))
    written = _checked(gen, test, model, LAYERS, args.seed, len(test), args.out, "knockoff_")
    with tempfile.TemporaryDirectory() as tmp:
        config = PruneConfig(model="resnet_digits", dataset="digits", scales_epochs=args.scales_epochs,
                             finetune_epochs=args.finetune_epochs, finetune_lr=0.02, policy="flops_target",
                             flops_reduction=0.5, seed=args.seed, latency=False)
        run_dir = os.path.join(tmp, "demo")
        results = ScopPruner.from_config(config, run_dir, model=model, progress=False).run()
        for name in ("betas", "importance", "channels", "curves"):
            dst = os.path.join(args.out, f"demo_{name}.png")
            shutil.copyfile(os.path.join(run_dir, f"{name}.png"), dst)
            written.append(dst)
        print(f"demo: top-1 {100 * results['before']['top1']:.2f}% -> {100 * results['after']['top1']:.2f}% "
              f"(right after pruning {100 * results['after_prune']['top1']:.2f}%), FLOPs reduction "
              f"{100 * results['flops_reduction']:.1f}%")
    return written


if __name__ == "__main__":
    main()
