"""Planted redundancy: do the criteria find filters we know to be useless?

A trained ``resnet_digits`` is widened, without changing what it computes, by filters whose
redundancy is known, in the two block-internal convolutions ``layers.0.0.conv1`` (16 filters)
and ``layers.1.0.conv1`` (32 filters); each gets ``k`` planted filters of each kind (k = 2 and 4):

- **duplicate**: a copy of a random original filter j, rescaled by c ~ logUniform(1/2, 2): weight
  c W_j, BatchNorm gamma, beta and running mean c times j's, running variance c^2 times j's, so
  its ReLU output is exactly c times j's; the next conv's weight on j is split in half between
  the two (the copy's half divided by c). Either copy can go if the other stays: a pair counts as
  found when at least one of its two filters is removed (removing both is one hit and one miss).
- **ignored**: a random filter reading the real inputs, as large as the layer's largest filter
  (L1), with BatchNorm gamma as large as the layer's largest |gamma| and running statistics
  measured on the training images; the next conv's weight on it is zero.
- **noise**: a filter whose output carries no information about the image, yet reaches the next
  layer with weights as large as the originals'. It reads a constant channel: the residual
  stream of stage 1 gets one extra channel that is exactly 1 everywhere (the stem and the block's
  second conv get a zero filter with BatchNorm gamma 0 and beta 1 / 0, and every original filter
  has zero weight on it). The noise filter's only weight is the centre tap on that channel, as
  large as the layer's largest filter (L1), so on every image its output is the same constant;
  BatchNorm beta 0 makes its ReLU output 0 in the trained network, so planting changes nothing.
  In SCOP's stage 2 the Lemma 2 bias pair is added to every filter's output (DESIGN.md §2), and
  for this filter that pair is all there is: its real and knockoff features are exchangeable
  noise, the null the knockoff statistic is built for. (With the Lemma 2 bias off, its output is
  constant and the next layer sees nothing, as for an ignored filter.)

Every criterion then removes the same number of filters from each planted layer (policy
``uniform`` restricted to the planted layers; no other layer is touched), at two ratios: as many
as were planted (27%) and half the layer. Precision = hits / removed, recall = hits / planted
(one per duplicate pair), per kind and overall, mean ± std over seeds; each seed trains its own
baseline and draws its own planted filters, knockoffs and biases. "top-1 after" is the test
accuracy of the network with the chosen filters removed (no BN recalibration, no fine-tuning):
removing only planted filters leaves it unchanged.

    python benchmarks/planted.py --cache runs/bench-cache              # print the tables
    python benchmarks/planted.py --cache runs/bench-cache --write benchmarks/README.md
    python benchmarks/planted.py --quick                               # 2 seeds, short runs
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _baseline  # noqa: E402
import _report  # noqa: E402

from scop_ext import convert  # noqa: E402
from scop_ext.knockoffs import make_generator  # noqa: E402
from scop_ext.prune import PruningSpace, apply_plan, make_importance, select  # noqa: E402
from scop_ext.scales import fit_knockoff_biases, learn_scales  # noqa: E402
from scop_ext.scales.pairs import pair_dataset  # noqa: E402
from scop_ext.train import make_loader  # noqa: E402

KINDS = ("duplicate", "ignored", "noise")
PLANTED_LAYERS = {"layers.0.0": 2, "layers.1.0": 4}  # block: planted filters of each kind in its conv1


# --------------------------------------------------------------------------- widening layers


def _grow_conv(conv: nn.Conv2d, extra_out: int = 0, extra_in: int = 0) -> nn.Conv2d:
    """A conv with ``extra_out`` zero filters and ``extra_in`` zero input channels appended."""
    new = nn.Conv2d(conv.in_channels + extra_in, conv.out_channels + extra_out, conv.kernel_size, conv.stride,
                    conv.padding, conv.dilation, conv.groups, conv.bias is not None)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[: conv.out_channels, : conv.in_channels] = conv.weight
        if conv.bias is not None:
            new.bias.zero_()
            new.bias[: conv.out_channels] = conv.bias
    return new


def _grow_bn(bn: nn.BatchNorm2d, extra: int) -> nn.BatchNorm2d:
    """A BatchNorm with ``extra`` entries appended: gamma 0, beta 0, mean 0, variance 1."""
    new = nn.BatchNorm2d(bn.num_features + extra, bn.eps, bn.momentum)
    c = bn.num_features
    with torch.no_grad():
        new.weight.zero_()
        new.bias.zero_()
        new.weight[:c], new.bias[:c] = bn.weight, bn.bias
        new.running_mean[:c], new.running_var[:c] = bn.running_mean, bn.running_var
        new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new


def add_constant_channel(model: nn.Module) -> int:
    """Widen the stage-1 residual stream of a resnet_digits by one channel that is exactly 1.

    Returns the index of that channel. Nothing else the network computes changes.
    """
    c = model.conv1.out_channels
    model.conv1 = _grow_conv(model.conv1, extra_out=1)
    model.bn1 = _grow_bn(model.bn1, 1)
    block0, block1 = model.layers[0][0], model.layers[1][0]
    block0.conv1 = _grow_conv(block0.conv1, extra_in=1)
    block0.conv2 = _grow_conv(block0.conv2, extra_out=1)
    block0.bn2 = _grow_bn(block0.bn2, 1)
    block1.conv1 = _grow_conv(block1.conv1, extra_in=1)
    block1.shortcut[0] = _grow_conv(block1.shortcut[0], extra_in=1)
    with torch.no_grad():
        model.bn1.bias[c] = 1.0  # zero filter, gamma 0, beta 1: ReLU output 1 on every pixel
        # block 0's second conv adds 0 on this channel (gamma 0, beta 0); the identity shortcut carries the 1
    assert isinstance(block0.shortcut, nn.Identity)
    return c


@torch.no_grad()
def _layer_inputs(model: nn.Module, layer: nn.Module, x: Tensor) -> Tensor:
    store = []
    handle = layer.register_forward_pre_hook(lambda m, args: store.append(args[0].detach()))
    try:
        model.eval()(x)
    finally:
        handle.remove()
    return store[0]


@torch.no_grad()
def plant(model: nn.Module, block_name: str, k: int, const: int, x_train: Tensor, rng: torch.Generator) -> dict:
    """Append ``k`` planted filters of each kind to ``block_name``.conv1 (see the module docstring).

    Returns ``{"duplicate": [(copy, original), ...], "ignored": [...], "noise": [...]}`` (channel indices).
    """
    block = model.get_submodule(block_name)
    conv, bn, nxt = block.conv1, block.bn1, block.conv2
    c0 = conv.out_channels
    inputs = _layer_inputs(model, conv, x_train)
    l1 = conv.weight.abs().sum((1, 2, 3))
    max_l1, max_gamma = float(l1.max()), float(bn.weight.abs().max())
    col_norm = float(nxt.weight.flatten(2).norm(dim=(0, 2)).mean())  # mean norm of the next conv's input slice
    new_conv = _grow_conv(conv, extra_out=3 * k)
    new_bn = _grow_bn(bn, 3 * k)
    new_next = _grow_conv(nxt, extra_in=3 * k)
    labels = {kind: [] for kind in KINDS}
    originals = torch.randperm(c0, generator=rng)[:k].tolist()
    for i, j in enumerate(originals):  # duplicates
        ch = c0 + i
        scale = math.exp(math.log(2.0) * (2 * float(torch.rand((), generator=rng)) - 1))
        new_conv.weight[ch] = scale * conv.weight[j]
        new_bn.weight[ch], new_bn.bias[ch] = scale * bn.weight[j], scale * bn.bias[j]
        new_bn.running_mean[ch], new_bn.running_var[ch] = scale * bn.running_mean[j], scale**2 * bn.running_var[j]
        half = nxt.weight[:, j] / 2
        new_next.weight[:, j] = half
        new_next.weight[:, ch] = half / scale
        labels["duplicate"].append((ch, j))
    for i in range(k):  # ignored: real inputs, large norm, zero downstream weight
        ch = c0 + k + i
        w = torch.randn(conv.weight.shape[1:], generator=rng)
        w[const] = 0
        w *= max_l1 * (1 + 0.2 * float(torch.rand((), generator=rng))) / float(w.abs().sum())
        new_conv.weight[ch] = w
        out = torch.nn.functional.conv2d(inputs, w[None], None, conv.stride, conv.padding)
        new_bn.running_mean[ch], new_bn.running_var[ch] = out.mean(), out.var()
        new_bn.weight[ch] = max_gamma
        new_bn.bias[ch] = bn.bias.mean()
        labels["ignored"].append(ch)
    for i in range(k):  # noise: centre tap on the constant channel only, used downstream
        ch = c0 + 2 * k + i
        kh, kw = conv.kernel_size
        sign = 1.0 if float(torch.rand((), generator=rng)) < 0.5 else -1.0
        value = sign * max_l1 * (1 + 0.2 * float(torch.rand((), generator=rng)))
        new_conv.weight[ch, const, kh // 2, kw // 2] = value
        new_bn.running_mean[ch], new_bn.running_var[ch] = value, 0.0  # constant output
        new_bn.weight[ch], new_bn.bias[ch] = max_gamma, 0.0
        d = torch.randn(nxt.weight[:, 0].shape, generator=rng)
        new_next.weight[:, ch] = d * col_norm / float(d.norm())
        labels["noise"].append(ch)
    block.conv1, block.bn1, block.conv2 = new_conv, new_bn, new_next
    return labels


@torch.no_grad()
def stage2_loss_vs_noise_beta(scop_model: nn.Module, pairs, labels: dict, seed: int,
                              values=(0.0, 0.5, 1.0)) -> list[float]:
    """Stage-2 loss (cross entropy of the real half, BN over the paired batch, Lemma 2 biases
    drawn from a fixed seed) over the pair set with every noise filter's beta set to each of
    ``values`` and the other betas as learned. Shows which way the loss pushes the noise filters."""
    import torch.nn.functional as F

    from scop_ext import scop_layers

    layers = scop_layers(scop_model)
    bns = [m for m in scop_model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = copy.deepcopy(scop_model.state_dict())
    x, xk, y = pairs.tensors
    losses = []
    scop_model.eval()
    for value in values:
        for layer in layers.values():
            layer.enable_scop()
            layer.generator = torch.Generator().manual_seed(seed)
        for conv, lab in labels.items():
            layers[conv].beta[lab["noise"]] = value
        for bn in bns:
            bn.train()
        total = 0.0
        for i in range(0, len(y), 64):
            logits = scop_model(torch.cat([x[i : i + 64], xk[i : i + 64]]))[: len(y[i : i + 64])]
            total += float(F.cross_entropy(logits, y[i : i + 64], reduction="sum"))
        losses.append(total / len(y))
        scop_model.load_state_dict(saved)
    scop_model.eval()
    return losses


# --------------------------------------------------------------------------- scoring


def score_plan(plan: dict, labels: dict) -> dict:
    """Hits per kind, planted per kind, removed, over all planted layers."""
    out = {f"hit_{kind}": 0 for kind in KINDS} | {f"n_{kind}": 0 for kind in KINDS} | {"removed": 0}
    for conv, lab in labels.items():
        removed = set(plan.get(conv, []))
        out["removed"] += len(removed)
        out["n_duplicate"] += len(lab["duplicate"])
        out["hit_duplicate"] += sum(1 for ch, j in lab["duplicate"] if ch in removed or j in removed)
        for kind in ("ignored", "noise"):
            out[f"n_{kind}"] += len(lab[kind])
            out[f"hit_{kind}"] += sum(1 for ch in lab[kind] if ch in removed)
    hits = sum(out[f"hit_{kind}"] for kind in KINDS)
    planted = sum(out[f"n_{kind}"] for kind in KINDS)
    out["recall"] = hits / planted
    out["precision"] = hits / max(out["removed"], 1)
    for kind in KINDS:
        out[f"recall_{kind}"] = out[f"hit_{kind}"] / max(out[f"n_{kind}"], 1)
    return out


def run_seed(seed: int, args, log) -> list[dict]:
    """All criteria at both ratios for one seed; one row dict per (criterion, ratio)."""
    recipe = _baseline.RECIPES[args.dataset]
    train, _, test, _ = _baseline.datasets(args.dataset, args.data_root, subset=args.subset)
    base = _baseline.baseline(recipe["model"], args.dataset, seed, args.train_epochs, root=args.data_root,
                              cache=args.cache, batch_size=recipe["batch_size"], log=log)
    acc_base = _baseline.accuracy(base, test)
    model = copy.deepcopy(base)
    const = add_constant_channel(model)
    x_train = _baseline.images(train)
    rng = torch.Generator().manual_seed(1000 + seed)
    labels = {f"{b}.conv1": plant(model, b, k, const, x_train, rng) for b, k in PLANTED_LAYERS.items()}
    model.eval()
    acc_planted = _baseline.accuracy(model, test)
    with torch.no_grad():
        x_test = _baseline.images(test)
        drift = float((model(x_test) - base(x_test)).abs().max())
    log(f"  seed {seed}: top-1 {100 * acc_base:.2f}% before planting, {100 * acc_planted:.2f}% after "
        f"(max |logit change| {drift:.2e})")

    scores: dict[str, dict[str, Tensor]] = {}
    for crit in ("l1", "l2", "bn_scale"):
        scores[crit] = make_importance(crit)(model)
    scores["random"] = make_importance("random", seed=seed)(model)
    torch.manual_seed(seed)
    gen = make_generator("gaussian").fit(DataLoader(train, batch_size=256))
    pairs = pair_dataset(train, gen.sample, seed=seed)
    for name, bias in (("scop", True), ("scop (no Lemma 2 bias)", False)):
        if bias is False and args.no_bias_variant is False:
            continue
        t = time.time()
        scop_model = convert(copy.deepcopy(model))
        if bias:
            fit_knockoff_biases(scop_model, DataLoader(pairs, batch_size=64), "cpu")
        learn_scales(scop_model, make_loader(pairs, recipe["batch_size"], shuffle=True, seed=seed), "cpu", epochs=args.scales_epochs,
                     use_knockoff_bias=bias, bn=args.bn, seed=seed, progress=False)
        scores[name] = make_importance("scop")(scop_model)
        if bias:
            noise_loss = stage2_loss_vs_noise_beta(scop_model, pairs, labels, seed)
        log(f"  seed {seed}: {name} stage 2, {args.scales_epochs} epochs in {time.time() - t:.0f} s")

    example = x_train[:1]
    space = PruningSpace(model, example)
    rows = []
    for crit, sc in scores.items():
        planted_scores = {conv: sc[conv] for conv in labels}
        for ratio_name, ratio in args.ratios:
            plan = select(space, planted_scores, "uniform", ratio=ratio)
            pruned = apply_plan(copy.deepcopy(model), example, plan)
            row = score_plan(plan, labels)
            row.update(criterion=crit, ratio=ratio_name, seed=seed, top1=_baseline.accuracy(pruned, test),
                       base_top1=acc_base, planted_top1=acc_planted, drift=drift)
            rows.append(row)
        if crit.startswith("scop"):
            # where the planted filters sit in SCOP's statistic (2 beta - 1)
            for kind in KINDS:
                vals = []
                for conv, lab in labels.items():
                    chans = [c for c, _ in lab[kind]] if kind == "duplicate" else lab[kind]
                    vals += sc[conv][chans].tolist()
                rows[-1][f"stat_{kind}"] = sum(vals) / len(vals)
            originals = []
            for conv in labels:
                n0 = model.get_submodule(conv).out_channels - 3 * PLANTED_LAYERS[conv.rsplit(".", 1)[0]]
                originals += sc[conv][:n0].tolist()
            rows[-1]["stat_original"] = sum(originals) / len(originals)
            rows[-1]["frac_original_below0"] = sum(v < 0 for v in originals) / len(originals)
            if crit == "scop":
                rows[-1]["noise_loss"] = noise_loss
    return rows


# --------------------------------------------------------------------------- report

CRITERIA_ORDER = ["scop", "scop (no Lemma 2 bias)", "l1", "l2", "bn_scale", "random"]


def tables(rows: list[dict], ratios) -> str:
    pm = _baseline.pm
    out = []
    for ratio_name, _ in ratios:
        header = ["criterion", "recall: duplicate", "recall: ignored", "recall: noise", "recall (all)",
                  "precision (all)", "top-1 after removal %"]
        body = []
        for crit in CRITERIA_ORDER:
            sel = [r for r in rows if r["criterion"] == crit and r["ratio"] == ratio_name]
            if not sel:
                continue
            body.append([f"`{crit}`", pm(r["recall_duplicate"] for r in sel), pm(r["recall_ignored"] for r in sel),
                         pm(r["recall_noise"] for r in sel), pm(r["recall"] for r in sel),
                         pm(r["precision"] for r in sel), pm((r["top1"] for r in sel), 100, 1)])
        out.append(f"**Removing {ratio_name} of each planted layer**\n\n" + _report.markdown_table(header, body))
    return "\n\n".join(out)


def stat_table(rows: list[dict]) -> str:
    pm = _baseline.pm
    header = ["SCOP run", "I = 2β − 1: duplicates", "ignored", "noise", "original filters",
              "share of original filters with I < 0", "stage-2 loss, noise filters' β = 0 / 0.5 / 1"]
    body = []
    for crit in CRITERIA_ORDER[:2]:
        sel = [r for r in rows if r["criterion"] == crit and "stat_noise" in r]
        if sel:
            loss = "–"
            if all("noise_loss" in r for r in sel):
                loss = " / ".join(f"{_baseline.mean_std([r['noise_loss'][i] for r in sel])[0]:.3f}" for i in range(3))
            body.append([f"`{crit}`", pm(r["stat_duplicate"] for r in sel), pm(r["stat_ignored"] for r in sel),
                         pm(r["stat_noise"] for r in sel), pm(r["stat_original"] for r in sel),
                         pm(r["frac_original_below0"] for r in sel), loss])
    return _report.markdown_table(header, body)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", choices=["digits", "fashion-mnist"],
                        help="digits: resnet_digits; fashion-mnist: resnet8 (its first two stages are planted)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--subset", type=int, help="training images stage 2 and the planting statistics use")
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (0, 1, ...)")
    parser.add_argument("--train-epochs", type=int, default=15, help="baseline epochs (as `scop train`)")
    parser.add_argument("--scales-epochs", type=int, default=10, help="SCOP stage-2 epochs (as `scop demo`)")
    parser.add_argument("--cache", help="folder for trained baselines, shared with accuracy.py / figures.py")
    parser.add_argument("--no-bias-variant", action=argparse.BooleanOptionalAction, default=True,
                        help="also run SCOP with the Lemma 2 bias off (default on)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: these models are tiny)")
    _baseline.add_bn_argument(parser)
    parser.add_argument("--quick", action="store_true", help="2 seeds, 5 baseline and 3 stage-2 epochs")
    parser.add_argument("--write", metavar="README", help="write the tables into this file's `planted` section")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.train_epochs, args.scales_epochs = 2, 5, 3
    torch.set_num_threads(args.threads)
    planted = 3 * sum(PLANTED_LAYERS.values())
    total = planted + 16 + 32
    frac = 3 * 2 / (16 + 3 * 2)
    args.ratios = [(f"{100 * frac:.0f}% (= planted)", frac), ("50%", 0.5)]
    load = _baseline.load_line()
    start = time.time()
    rows = []
    for seed in range(args.seeds):
        rows += run_seed(seed, args, lambda *a: print(*a, file=sys.stderr, flush=True))
    seconds = time.time() - start
    text = tables(rows, args.ratios)
    stats = stat_table(rows)
    base = [r["base_top1"] for r in rows if r["criterion"] == "l1" and r["ratio"] == args.ratios[0][0]]
    after = [r["planted_top1"] for r in rows if r["criterion"] == "l1" and r["ratio"] == args.ratios[0][0]]
    drift = max(r["drift"] for r in rows)
    print(text)
    print()
    print(stats)
    print(f"\n{seconds:.0f} s", file=sys.stderr)
    if args.write:
        body = "\n".join([
            "## Planted redundancy: which criterion finds filters known to be useless?"
            + ("" if args.dataset == "digits" else f" ({args.dataset})"),
            "",
            f"`{_report.command_line()}` at {_report.git_revision()}; {_report.machine()}; {load}; "
            f"{seconds / 60:.1f} min.",
            "",
            f"`{_baseline.RECIPES[args.dataset]['model']}` on {args.dataset}"
            + (f" ({args.subset} training images for stage 2 and the planting)" if args.subset else "")
            + f", {args.seeds} seeds (mean ± std); each seed trains a baseline "
            f"({args.train_epochs} epochs, test top-1 {_baseline.pm(base, 100)}%), plants "
            f"{planted} filters in `layers.0.0.conv1` (16 → 22) and `layers.1.0.conv1` (32 → 44), one third of "
            f"each kind ({total} filters in the two layers), and runs SCOP stage 2 with Gaussian knockoffs "
            f"({args.scales_epochs} epochs, Adam 0.004, {_baseline.BN_MODES[args.bn]}). Test top-1 after planting "
            f"{_baseline.pm(after, 100)}%, largest change of any test logit {drift:.1e} (BatchNorm's ε does not "
            "scale with a duplicate's variance): the planted network computes the same function. How each kind is built is in the docstring of "
            "`benchmarks/planted.py`; in short: *duplicate* = rescaled copy of an original filter (found if "
            "either copy is removed), *ignored* = large-norm filter whose output the next conv has zero weight "
            "on, *noise* = large-norm filter reading a constant channel, so it carries no image information, "
            "with large weights in the next conv. Planted filters have the L1 norm and |BN γ| of the layer's "
            "largest originals.",
            "",
            text,
            "",
            "Where SCOP puts the planted filters (mean importance `I = 2β − 1` per kind, all planted layers; the "
            "last column is the stage-2 loss over the training pairs with every noise filter's β forced to 0, 0.5 "
            "and 1 and the other β as learned):",
            "",
            stats,
            "",
            "How to read it. An *ignored* filter's β gets no gradient, so it stays at 0.5 (I = 0) while the "
            "filters the network uses rise; weight norms and |γ| cannot see it by construction. A *noise* "
            "filter's real and knockoff features differ only by the Lemma 2 bias noise, so it is a true null "
            "and should stay near I = 0. It drifts above 0 because the stage-2 loss is not symmetric in β "
            "(last column): the next layer mixes its own real and knockoff branches, so the real branch's "
            "noise is not independent of the knockoff branch's and β → 0 costs more than β → 1. It ranks "
            "below the original filters as long as they rise further. Without the Lemma 2 bias its output is "
            "a constant, nothing reaches the loss and it stays at exactly 0. *Duplicates* are SCOP's blind "
            "spot: each copy carries half of a useful feature, so the knockoff test rates both as useful "
            "and removes one of a pair only by chance; magnitude criteria find more of them only because the "
            "copy's scale is drawn from [1/2, 2], so one copy is often the smaller. Neither BN recalibration "
            "nor fine-tuning is applied before *top-1 after removal*.",
        ])
        _report.write_section(args.write, "planted" + ("" if args.dataset == "digits" else f"-{args.dataset}"), body)


if __name__ == "__main__":
    main()
