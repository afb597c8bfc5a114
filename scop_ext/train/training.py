"""Training, evaluation and BN recalibration, shared by baseline training and stage 4
(DESIGN.md §1: BN recalibration and fine-tuning); :func:`fit` runs on the resumable epoch loop of
:mod:`scop_ext.epochs` (per-epoch crash-safe checkpoints, NaN detection)."""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import distributed
from .epochs import EpochLoop

__all__ = ["make_loader", "evaluate", "recalibrate_bn", "fit", "FitResult", "batchnorms", "model_signature", "amp_dtype",
           "default_amp"]


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, drop_last: bool = False,
                num_workers: int = 0, evaluation: bool = False, sharded: bool = True) -> DataLoader:
    """A DataLoader whose order depends only on ``seed`` and the epoch (see :func:`scop_ext.epochs.set_epoch`).

    Training loaders split every global batch across processes under torchrun (``sharded=False``:
    every process gets every batch whole, for work all processes must do identically), and drop a
    last batch of one image: BatchNorm in training mode cannot normalise a single value per
    channel (a network whose last feature map is 1x1 fails on it). Evaluation loaders give each
    index to exactly one process.
    """
    if evaluation:
        return DataLoader(dataset, batch_size=batch_size, sampler=distributed.ShardSampler(len(dataset)),
                          num_workers=num_workers)
    lone = len(dataset) > 1 and len(dataset) % batch_size == 1
    sampler = distributed.ShardedBatchSampler(len(dataset), batch_size, shuffle=shuffle, seed=seed,
                                              drop_last=drop_last or lone, shard=None if sharded else (0, 1))
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers)


def amp_dtype(device: torch.device | str) -> torch.dtype:
    """The 16-bit type mixed precision computes in on ``device``: bfloat16 where supported, else float16."""
    device = torch.device(device)
    return torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16


def _autocast(device: torch.device, amp: bool):
    if not amp:
        return nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype(device))


def default_amp(device: torch.device) -> bool:
    """Mixed precision where it pays: on CUDA. CPU autocast is usually slower for convs."""
    return torch.device(device).type == "cuda"


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device | str, *, amp: bool = False) -> dict:
    """Loss, top-1 and (with more than 5 classes) top-5 accuracy over the whole loader.

    Under torchrun each process evaluates its shard and the sums are all-reduced, so the figures
    are exact for the full dataset.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1 hits, top-5 hits, count
    classes = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(device, amp):
            logits = model(x)
        logits = logits.float()
        classes = logits.shape[1]
        totals[0] += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, classes), dim=1).indices
        totals[1] += (top[:, 0] == y).sum().item()
        totals[2] += (top == y[:, None]).any(1).sum().item()
        totals[3] += y.numel()
    model.train(was_training)
    totals = distributed.all_reduce_sum(totals)
    count = max(totals[3].item(), 1.0)
    result = {"loss": totals[0].item() / count, "top1": totals[1].item() / count, "count": int(totals[3].item())}
    if classes > 5:
        result["top5"] = totals[2].item() / count
    return result


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def model_signature(named: dict[str, tuple[int, ...]]) -> str:
    """A short record of an architecture, ``{name: shape}``, for progress files to be matched by:
    the count of tensors and values and a digest of every name and shape."""
    digest = hashlib.sha256(repr(sorted((k, tuple(v)) for k, v in named.items())).encode()).hexdigest()[:12]
    return f"{len(named)} tensors, {sum(math.prod(v) for v in named.values())} values, digest {digest}"


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: DataLoader, device: torch.device | str, batches: int = 50) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batches`` training batches.

    After physical pruning the stored statistics no longer describe the smaller network's
    activations. Uses a cumulative average (momentum None), then restores each layer's momentum.
    Returns the number of batches used.

    Under torchrun give every process the same, unsharded loader (``make_loader(...,
    sharded=False)``): every process then computes the same statistics.
    """
    device = torch.device(device)
    bns = batchnorms(model)
    if not bns:
        return 0
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    was_training = model.training
    model.train()
    used = 0
    for x, _ in loader:
        model(x.to(device))
        used += 1
        if used >= batches:
            break
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    model.train(was_training)
    return used


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_top1: float = -1.0
    best_epoch: int = -1


def _rng_state(device: torch.device) -> dict:
    # Random augmentation draws from the global generators, so a resumed run continues their
    # streams where the interrupted one stood at the end of its last complete epoch.
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


class _FitLoop(EpochLoop):
    """:func:`fit`'s epochs: SGD with a cosine schedule, the best epoch on validation kept."""

    def __init__(self, model, loader, val_loader, epochs, device, *, optimizer, scheduler, scaler, amp, log, **kw):
        super().__init__(kw.pop("stage"), model, loader, epochs, device, **kw)
        self.val_loader, self.optimizer, self.scheduler, self.scaler, self.amp, self.log = (
            val_loader, optimizer, scheduler, scaler, amp, log)
        self.result, self.best_state = FitResult(), None

    def start_epoch(self, epoch):
        self.model.train()
        self.loss_sum, self.hits, self.seen = 0.0, 0, 0

    def diagnosis_context(self):
        return _autocast(self.device, self.amp)

    def forward(self, batch):
        x, y = (t.to(self.device, non_blocking=True) for t in batch)
        with _autocast(self.device, self.amp):
            self.logits = self.ddp(x)
            loss = F.cross_entropy(self.logits.float(), y)
        self.y = y
        return loss, x

    def update(self, loss, epoch, step):
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.loss_sum += loss.item() * self.y.numel()
        self.hits += (self.logits.argmax(1) == self.y).sum().item()
        self.seen += self.y.numel()
        return {"loss": f"{loss.item():.3f}", "lr": f"{self.scheduler.get_last_lr()[0]:.2g}"}

    def end_epoch(self, epoch):
        result = self.result
        record = {"epoch": epoch, "train_loss": self.loss_sum / max(self.seen, 1), "train_top1": self.hits / max(self.seen, 1)}
        if self.val_loader is not None:
            record.update({f"val_{k}": v for k, v in evaluate(self.model, self.val_loader, self.device, amp=self.amp).items()})
            # Top-1 on a small validation set ties often (one image is a whole step): the lower
            # loss breaks the tie, so a later, better-fitted epoch is not lost to an early one.
            best = result.history[result.best_epoch] if result.best_epoch >= 0 else None
            if best is None or (record["val_top1"], -record["val_loss"]) > (best["val_top1"], -best["val_loss"]):
                result.best_top1, result.best_epoch = record["val_top1"], epoch
                self.best_state = copy.deepcopy(self.model.state_dict())
        result.history.append(record)
        if self.log is not None and distributed.is_main():
            self.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        return {k: v for k, v in record.items() if k not in ("epoch", "val_count")}

    def state_dict(self):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "best_model": self.best_state, "history": self.result.history,
                "best_top1": self.result.best_top1, "best_epoch": self.result.best_epoch, "rng": _rng_state(self.device)}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.best_state = state["best_model"]
        _set_rng_state(state["rng"], self.device)
        self.result = FitResult(history=list(state["history"]), best_top1=float(state["best_top1"]),
                                best_epoch=int(state["best_epoch"]))


def _check_hyperparameters(*, epochs, lr, momentum, weight_decay) -> None:
    """ValueError naming the first argument of :func:`fit` out of range; NaN and Inf never pass."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    for name, value, low, strict in (("lr", lr, 0.0, True), ("momentum", momentum, 0.0, False),
                                     ("weight_decay", weight_decay, 0.0, False)):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number and math.isfinite(value) and (value > low if strict else value >= low)):
            raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low:g}, got {value!r}")


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader | None,
    *,
    epochs: int,
    lr: float,
    device: torch.device | str,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    nesterov: bool = True,
    amp: bool | None = None,
    checkpoint_path: str | None = None,
    settings: dict | None = None,
    stage: str = "finetune",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    metrics_path: str | None = None,
) -> FitResult:
    """Train all parameters with SGD (Nesterov) and a cosine schedule; keep the best-on-validation weights.

    At the end ``model`` holds the best epoch's weights (the last epoch's without ``val_loader``).
    With ``checkpoint_path`` the state after every epoch (weights, optimizer, schedule, best
    weights, history) is written atomically, and a later call with the same path and the same
    settings resumes after the last complete epoch, giving the same result as an uninterrupted
    run. The file records those settings (the arguments above, the architecture, the number of
    batches and samples, and ``settings``: anything else the result depends on, such as the
    caller's config); a file written under other settings is refused, never resumed or
    overwritten.

    Every epoch logs one line (``scop_ext`` logger: losses, top-1, time, ETA) and, with
    ``metrics_path``, appends its figures to that JSON-lines file; ``log`` also gets a
    ``key=value`` line per epoch.

    Raises:
        NonFiniteError: at the step whose loss is NaN/Inf, naming the first layer whose output
            is not finite, on every process at once under torchrun. Nothing is written for that
            epoch, so the last checkpoint stays good.
        CheckpointError: ``checkpoint_path`` holds the progress of a run with other settings.
    """
    _check_hyperparameters(epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay)
    device = torch.device(device)
    amp = default_amp(device) if amp is None else amp
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    steps_per_epoch = max(len(train_loader), 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / (epochs * steps_per_epoch), 1.0)))
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda" and not torch.cuda.is_bf16_supported())
    run_settings = {**(settings or {}), "stage": stage, "epochs": epochs, "lr": lr, "momentum": momentum,
                    "weight_decay": weight_decay, "nesterov": nesterov, "amp": amp,
                    "model": model_signature({k: tuple(v.shape) for k, v in model.state_dict().items()}),
                    "batches": len(train_loader), "samples": len(train_loader.dataset)}
    loop = _FitLoop(model, train_loader, val_loader, epochs, device, optimizer=optimizer, scheduler=scheduler,
                    scaler=scaler, amp=amp, log=log, stage=stage, checkpoint_path=checkpoint_path,
                    settings=run_settings, progress=progress, metrics_path=metrics_path)
    loop.run()
    if loop.best_state is not None:
        model.load_state_dict(loop.best_state)
    return loop.result
