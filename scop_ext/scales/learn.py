"""Stage 2: learn the per-filter scales beta with the weights frozen, on batches of real images
paired with their knockoffs (:func:`learn_scales`), after the Lemma 2 bias fit that precedes it
(:func:`fit_knockoff_biases`)."""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..nn import lemma2
from ..nn.scop_conv import scop_layers
from ..ops.lemma2_sample import draw_seed
from ..train import distributed
from ..train.epochs import EpochLoop, NonFiniteError
from ..train.training import batchnorms, model_signature
from .batch_bn import batch_detached
from .split import split_forward

__all__ = ["BN_MODES", "fit_knockoff_biases", "layer_seed", "learn_scales", "ScaleHistory"]

# Stage 2's BatchNorm modes (learn_scales's ``bn``): over the paired batch with the exact gradient,
# over the paired batch with its statistics constant in the backward, or the stored statistics.
BN_MODES = ("batch", "batch_detached", "frozen")


def _check_bn(bn: str) -> None:
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {', '.join(map(repr, BN_MODES))}, got {bn!r}")


def _paired_loss(model: nn.Module, x: Tensor, xk: Tensor, y, bn: str, loss_fn=F.cross_entropy) -> Tensor:
    """``loss_fn`` of the real half's output of the paired batch ``[x; xk]``, as mode ``bn`` runs it
    (BatchNorms already in that mode's train/eval state)."""
    if bn == "frozen":  # frozen BN couples no samples, so the knockoff stream runs apart without autograd
        return loss_fn(split_forward(model, x, xk), y)
    with batch_detached() if bn == "batch_detached" else contextlib.nullcontext():
        return loss_fn(model(torch.cat([x, xk]))[: x.shape[0]], y)


@torch.no_grad()
def fit_knockoff_biases(model: nn.Module, pairs: DataLoader, device: torch.device | str, *, batches: int = 4,
                        gamma: float | None = None) -> dict[str, dict]:
    """Fit every ScopConv2d's Lemma 2 bias from the measured knockoff diagonal at its input.

    Real and knockoff images go through the network separately (SCOP mode off, eval mode), the
    inputs of each ScopConv2d are recorded, and ``s_j = Var(X_j) - Cov(X_j, X~_j)`` per input
    channel feeds :func:`scop_ext.lemma2.solve`. Measuring s at every layer handles BN, ReLU,
    pooling and residual adds, which the lemma's linear map does not cover.

    Under torchrun, give every process the same ``pairs`` (a plain, unsharded loader) so all
    processes fit the same factors.

    Returns, per layer: measured ``s_in`` (C_in,), ``lambda_max``, ``gamma``, the (S.5)
    ``margin`` and the lemma's own ``s_out`` (one value: S' is a multiple of I), for diagnostics.
    """
    device = torch.device(device)
    layers = scop_layers(model)
    if not layers:
        raise ValueError("model has no ScopConv2d layers: call scop_ext.convert(model) first")
    modes = {name: layer.scop_enabled for name, layer in layers.items()}
    was_training = model.training
    model.eval()
    feats: dict[str, list[Tensor]] = {name: [] for name in layers}
    hooks = [layer.register_forward_pre_hook(lambda m, args, name=name: feats[name].append(args[0].detach().cpu()))
             for name, layer in layers.items()]
    try:
        for layer in layers.values():
            layer.disable_scop()
        real = {name: [] for name in layers}
        knock = {name: [] for name in layers}
        for i, (x, xk, _) in enumerate(pairs):
            if i >= batches:
                break
            for batch, store in ((x, real), (xk, knock)):
                model(batch.to(device))
                for name in layers:
                    store[name].append(feats[name].pop())
    finally:
        for h in hooks:
            h.remove()
        for name, layer in layers.items():
            layer.scop_enabled = modes[name]
        model.train(was_training)
    report = {}
    for name, layer in layers.items():
        s_in = lemma2.estimate_s(torch.cat(real[name]), torch.cat(knock[name]))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                sol = layer.fit_knockoff_bias(s_in, gamma)
            except ValueError as exc:  # e.g. "weight contains NaN or Inf": say which layer
                raise ValueError(f"layer {name!r}: {exc}") from None
        for w in caught:  # lemma2.solve does not know which layer it solves for
            warnings.warn(f"layer {name!r}: {w.message}", w.category, stacklevel=2)
        report[name] = {"s_in": s_in, "lambda_max": sol.lambda_max, "gamma": sol.gamma, "margin": sol.margin,
                        "s_out": float(sol.s_out[0])}
    return report


def beta_spread(beta: Tensor) -> float:
    """How far stage 2 has separated the filters: the 90th percentile of ``|2 beta - 1|`` over all
    of them. Every beta starts at 0.5 (0 here); while it stays near 0 the importance scores are
    noise and any selection is close to random."""
    return float((2 * beta.float() - 1).abs().quantile(0.9))


# Below this spread the scores are too close to their start to rank filters (learn_scales warns).
MIN_SPREAD = 0.05


@dataclass
class ScaleHistory:
    """Per-epoch record of stage 2: mean loss and each layer's mean beta."""

    loss: list[float] = field(default_factory=list)
    beta_mean: dict[str, list[float]] = field(default_factory=dict)
    spread: float | None = None  # beta_spread of the final betas

    def as_dict(self) -> dict:
        return {"loss": self.loss, "beta_mean": self.beta_mean, "spread": self.spread}


def layer_seed(seed: int, name: str) -> int:
    """The seed of layer ``name``'s Lemma 2 bias stream in a run seeded ``seed``.

    Every layer needs its own stream: with one seed for all, layers of equal width would draw
    the same normals at every step and their biases would be perfectly correlated. Derived from
    the name, not the position, so a layer's stream does not change when others are skipped.
    """
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def _train_betas_only(model: nn.Module, layers: dict[str, nn.Module]) -> Callable[[], None]:
    """Freeze every parameter of ``model`` but the betas of ``layers``; returns the function that
    unfreezes what was trainable, puts the BatchNorm running statistics back and sets eval mode."""
    trainable = {p: p.requires_grad for p in model.parameters()}
    bn_state = [{k: v.clone() for k, v in m.state_dict().items()} for m in batchnorms(model)]
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        layer.beta.requires_grad_(True)

    def restore() -> None:
        for p, flag in trainable.items():
            p.requires_grad_(flag)
        for m, state in zip(batchnorms(model), bn_state):
            m.load_state_dict(state)
        model.eval()

    return restore


def _check_scales_args(model: nn.Module, bn: str, epochs: int, compile: bool) -> dict:
    """``model``'s ScopConv2d layers, once :func:`learn_scales`'s arguments are known to be usable."""
    _check_bn(bn)
    if compile and (bn == "batch_detached" or distributed.world_size() > 1):
        raise ValueError(f"compile=True runs with bn 'batch' or 'frozen' on one process, got bn={bn!r} on "
                         f"{distributed.world_size()} (batch_detached is the eager way to skip the knockoff backward)")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    layers = scop_layers(model)
    if not layers:
        raise ValueError("model has no ScopConv2d layers: call scop_ext.convert(model) first")
    return layers


def learn_scales(
    model: nn.Module,
    pairs: DataLoader,
    device: torch.device | str,
    *,
    epochs: int = 20,
    lr: float = 0.004,
    adam_betas: tuple[float, float] = (0.5, 0.9),
    use_knockoff_bias: bool = True,
    bn: str = "batch",
    seed: int = 0,
    checkpoint_path: str | None = None,
    settings: dict | None = None,
    progress: bool = True,
    compile: bool = False,
    metrics_path: str | None = None,
) -> ScaleHistory:
    """Train only the ScopConv2d scales beta on [real; knockoff] batches (stage 2).

    Every other parameter is frozen for the duration. Each step: logits of the 2N batch, cross
    entropy on the real half, Adam step, beta clamped to [0, 1].

    Args:
        pairs: yields (x, x~, y) with x, x~ of shape (N, C, H, W) (see :func:`~scop_ext.prune.pairs.pair_dataset`).
        use_knockoff_bias: add the Lemma 2 biases fitted by :func:`fit_knockoff_biases`.
        bn: ``"batch"`` normalises over the 2N batch as the authors do (running statistics are
            restored afterwards, so the pretrained model is unchanged), with the exact gradient;
            ``"batch_detached"`` runs the same forward but holds the batch statistics constant in
            the backward, which then skips the knockoff half
            (:func:`scop_ext.batch_detached.batch_detached`), an approximation whose effect on
            beta is measured in benchmarks/README.md; ``"frozen"`` uses the
            stored statistics, which couple no samples, so each step runs the knockoff stream
            apart without autograd (:func:`scop_ext.knockoff_stream.split_forward`): the same
            beta for about half the backward work. Under torchrun ``"batch"`` normalises over each process's own
            part of the batch (BatchNorm is not synchronised: torch's SyncBatchNorm runs on GPUs
            only), so beta then depends on the number of processes (so it does with
            ``"batch_detached"``); ``"frozen"`` does not.
        seed: keys the Lemma 2 bias draws (each layer its own stream, see :func:`layer_seed`);
            together with the loader's order it fixes the result.
        checkpoint_path: after each epoch the betas, optimizer and history are written there
            atomically; a later call with the same path and settings resumes after the last
            complete epoch (``epochs`` may grow: no schedule depends on it).
        compile: each step's forward (so its backward too) under ``torch.compile(fullgraph=True)``,
            which fuses the mixing with BatchNorm and ReLU (``bn`` batch or frozen; one process);
            the Lemma 2 keys are drawn from the layers' generators before each step, so beta is
            eager's to rounding. The first steps pay the compile.
        settings: anything else the result depends on (such as the caller's config), recorded in
            the progress file beside the arguments above, the layers and the number of batches
            and samples; a file written under other settings is refused, never resumed or
            overwritten.
        metrics_path: every epoch's loss and beta figures are appended to this JSON-lines file
            (each epoch also logs one line). When the betas end with a :func:`beta_spread` below
            :data:`MIN_SPREAD`, a warning says the scores cannot rank the filters yet.

    Raises:
        NonFiniteError: naming the step and the layer when the loss or a beta is not finite
            (for the loss, the first layer whose output is), on every process at once under
            torchrun. Nothing is written for that epoch, so the last checkpoint stays good.
        CheckpointError: ``checkpoint_path`` holds the progress of other settings, or of more
            epochs than ``epochs``.
    """
    layers = _check_scales_args(model, bn, epochs, compile)
    device = torch.device(device)
    model.to(device)
    restore = _train_betas_only(model, layers)
    _key_layers(layers, use_knockoff_bias, seed)
    run_settings = {**(settings or {}), "lr": lr, "adam_betas": list(adam_betas), "knockoff_bias": use_knockoff_bias,
                    "bn": bn, "seed": seed, "layers": model_signature({name: (layer.out_channels,) for name, layer in layers.items()}),
                    "batches": len(pairs), "samples": len(pairs.dataset)}
    loop = _ScaleLoop(model, pairs, epochs, device, layers=layers, lr=lr, adam_betas=adam_betas, bn=bn,
                      checkpoint_path=checkpoint_path, settings=run_settings, progress=progress, compile=compile,
                      metrics_path=metrics_path)
    try:
        loop.run()
    finally:
        restore()
        for layer in layers.values():
            layer.knockoff.shard, layer.knockoff.key_ahead = (0, 1), None
    loop.history.spread = _warn_if_unseparated(layers, epochs)
    return loop.history


def _key_layers(layers: dict, use_knockoff_bias: bool, seed: int) -> None:
    """SCOP mode on, and each layer's bias draws keyed on its own stream and this process's shard."""
    for name, layer in layers.items():
        layer.enable_scop()
        layer.use_knockoff_bias = use_knockoff_bias
        layer.generator = torch.Generator(device="cpu").manual_seed(layer_seed(seed, name))
        layer.knockoff.shard = (distributed.rank(), distributed.world_size())


def _warn_if_unseparated(layers: dict, epochs: int) -> float:
    """The final :func:`beta_spread`, with a warning when it is below :data:`MIN_SPREAD`."""
    spread = beta_spread(torch.cat([layer.beta.detach().flatten().cpu() for layer in layers.values()]))
    if spread < MIN_SPREAD:
        warnings.warn(f"learn_scales: after {epochs} epochs 90% of the filters still have |2 beta - 1| < "
                      f"{spread:.3f}: beta has barely left 0.5, so the importance scores cannot rank the filters "
                      "yet and selection would be close to random; train longer (scales_epochs) or with a larger "
                      "scales_lr", RuntimeWarning, stacklevel=3)
    return spread


class _ScaleLoop(EpochLoop):
    """:func:`learn_scales`'s epochs: Adam on the betas only, each clamped to [0, 1] after every step."""

    # Progress files written before Adam's coefficients were named apart from the learned betas.
    renamed_settings = {"betas": "adam_betas"}

    def __init__(self, model, pairs, epochs, device, *, layers, lr, adam_betas, bn, compile=False, **kw):
        super().__init__("scales", model, pairs, epochs, device, error_name="learn_scales", **kw)
        self.layers, self.bn = layers, bn
        self.loss = torch.compile(_paired_loss, fullgraph=True, dynamic=False) if compile else _paired_loss
        self.drawing = [layer.knockoff for layer in layers.values() if compile and layer.knockoff.enabled
                        and layer.knockoff.fitted]  # biases whose key is drawn ahead of each step
        for bias in self.drawing:
            bias.key_ahead = torch.zeros(1, dtype=torch.int64)
        self.named_betas = {name: layer.beta for name, layer in layers.items()}
        self.optimizer = torch.optim.Adam(self.named_betas.values(), lr=lr, betas=adam_betas)
        self.history = ScaleHistory(beta_mean={name: [] for name in layers})

    def start_epoch(self, epoch):
        self.model.eval()
        for m in batchnorms(self.model):
            m.train(self.bn != "frozen")
        self.loss_sum, self.seen = 0.0, 0

    def forward(self, batch):
        x, xk, self.y = (t.to(self.device) for t in batch)
        for bias in self.drawing:  # what the eager draw takes from the generator, taken before the graph
            bias.key_ahead.copy_(draw_seed(bias.generator))
            bias.key_taken = False
        return self.loss(self.ddp, x, xk, self.y, self.bn), torch.cat([x, xk])

    def update(self, loss, epoch, step):
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        for layer in self.layers.values():
            layer.clamp_beta_()
        # One check of every beta after the update (a single sync): a NaN/Inf gradient or
        # anything else that corrupted a beta shows up here, at the step that did it. The
        # gradients are averaged across processes, so every process stops here together.
        finite = torch.stack([torch.isfinite(beta).all() for beta in self.named_betas.values()])
        if not bool(finite.all()):
            name = list(self.named_betas)[int((~finite).nonzero()[0])]
            grad = self.named_betas[name].grad
            cause = "its gradient was NaN/Inf" if grad is not None and not bool(torch.isfinite(grad).all()) else "its gradient was finite"
            raise NonFiniteError(f"learn_scales: beta of layer {name!r} became NaN/Inf at epoch {epoch}, step {step} ({cause})")
        self.loss_sum += loss.item() * self.y.numel()
        self.seen += self.y.numel()
        means = [float(b.detach().mean()) for b in self.named_betas.values()]
        return {"loss": f"{loss.item():.3f}", "beta": f"{min(means):.2f}/{sum(means) / len(means):.2f}/{max(means):.2f}"}

    def end_epoch(self, epoch):
        totals = distributed.all_reduce_sum(torch.tensor([self.loss_sum, float(self.seen)], dtype=torch.float64))
        self.history.loss.append(totals[0].item() / max(totals[1].item(), 1.0))
        for name, beta in self.named_betas.items():
            self.history.beta_mean[name].append(float(beta.detach().mean()))
        beta = torch.cat([b.detach().flatten().float().cpu() for b in self.named_betas.values()])
        return {"loss": self.history.loss[-1], "beta_min": float(beta.min()), "beta_mean": float(beta.mean()),
                "beta_max": float(beta.max()), "spread": beta_spread(beta)}

    def state_dict(self):
        return {"betas": {name: beta.detach().cpu() for name, beta in self.named_betas.items()},
                "optimizer": self.optimizer.state_dict(),
                "generators": {name: layer.generator.get_state() for name, layer in self.layers.items()},
                "loss": self.history.loss, "beta_mean": self.history.beta_mean}

    def load_state_dict(self, state):
        with torch.no_grad():
            for name, beta in self.named_betas.items():
                beta.copy_(state["betas"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        for name, layer in self.layers.items():
            layer.generator.set_state(state["generators"][name])
        self.history = ScaleHistory(loss=list(state["loss"]), beta_mean={k: list(v) for k, v in state["beta_mean"].items()})
