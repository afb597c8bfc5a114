"""The resumable epoch loop every training stage runs on (baseline training, stage 2, fine-tuning),
and its NaN/Inf checks: which layer's output first went non-finite, and stopping every process
at once when one of them finds a fault."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn
from torch.utils.data import DataLoader

from . import checkpoint, distributed
from .metrics import EpochLog

__all__ = ["EpochLoop", "NonFiniteError", "first_nonfinite_layer", "nonfinite_error", "raise_on_every_process",
           "set_epoch"]


class NonFiniteError(FloatingPointError):
    """NaN or Inf appeared; the message names the stage, step and layer where it was found."""


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _all_finite(value) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in _tensors(value) if t.is_floating_point())


@torch.no_grad()
def first_nonfinite_layer(model: nn.Module, batch: torch.Tensor) -> str | None:
    """Name of the first module, in execution order, whose output holds NaN or Inf on ``batch``.

    Re-runs the forward with a hook on every module, so it costs a forward pass and is meant for
    the failure path only; buffers the forward updates (BN statistics) are put back afterwards.
    Returns None when every output is finite.
    """
    names = {module: name or type(model).__name__ for name, module in model.named_modules()}
    found: list[str] = []

    def hook(module, args, output):
        if not found and not _all_finite(output):
            found.append(f"{names[module]} ({type(module).__name__})")

    buffers = {name: b.clone() for name, b in model.named_buffers()}
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        model(batch)
    finally:
        for h in handles:
            h.remove()
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    return found[0] if found else None


def nonfinite_error(stage: str, what: str, epoch: int, step: int, model: nn.Module, batch: torch.Tensor) -> NonFiniteError:
    """The error for ``what`` (e.g. "loss became nan") at a step, naming where the NaN/Inf starts."""
    layer = first_nonfinite_layer(model, batch)
    if not _all_finite(batch):
        where = "the input batch already holds NaN/Inf" + (f" (first non-finite output: layer {layer})" if layer else "")
    elif layer is not None:
        where = f"first non-finite output: layer {layer}"
    else:
        where = "every layer's output is finite, so the loss itself overflowed"
    return NonFiniteError(f"{stage}: {what} at epoch {epoch}, step {step}; {where}")


def raise_on_every_process(local: NonFiniteError | None) -> None:
    """Raise, on every process, the error of the first process that found a fault (``local`` is
    None on the others).

    Call it on every process once any of them has found one (:func:`distributed.any_process`):
    a process raising alone would leave the others waiting forever in the next all-reduce.
    """
    messages = distributed.gather_objects(None if local is None else str(local))
    first = next(r for r, m in enumerate(messages) if m is not None)
    where = f" (found by process {first} of {len(messages)})" if len(messages) > 1 else ""
    raise NonFiniteError(messages[first] + where)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    sampler = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


class EpochLoop:
    """The skeleton every resumable training stage shares: load its progress, run the epochs
    (each step's loss checked for NaN/Inf on every process), save the progress after each epoch,
    wait for the other processes.

    A stage subclasses it and gives ``start_epoch``, ``forward`` (a batch to the loss), ``update``
    (backward and optimizer step) and ``end_epoch``, and ``state_dict`` / ``load_state_dict`` for
    what its progress file holds beside the epoch.

    Args:
        stage: names the progress file's kind (``{stage}-progress``) and the progress bar.
        model: the network; under torchrun it is wrapped in DistributedDataParallel as ``self.ddp``.
        loader: yields the batches; its sampler is told each epoch (:func:`set_epoch`).
        checkpoint_path: the progress file (None: nothing is saved or resumed). A later run with
            the same path and ``settings`` resumes after the last complete epoch; a file written
            under other settings, or holding more epochs than ``epochs``, is refused.
        settings: what the result depends on, recorded in the progress file to be matched.
        error_name: names the stage in a NonFiniteError (default ``stage``).
    """

    # {old settings key: its name now}, so progress saved before a rename still resumes.
    renamed_settings: dict[str, str] = {}

    def __init__(self, stage: str, model: nn.Module, loader: DataLoader, epochs: int, device: torch.device, *,
                 checkpoint_path: str | None, settings: dict, progress: bool, error_name: str | None = None,
                 metrics_path: str | None = None):
        self.stage, self.model, self.loader, self.epochs, self.device = stage, model, loader, epochs, device
        self.checkpoint_path, self.settings, self.progress = checkpoint_path, settings, progress
        self.error_name = error_name or stage
        self.ddp: nn.Module = model
        self.metrics = EpochLog(stage, epochs, metrics_path)

    def start_epoch(self, epoch: int) -> None:
        pass

    def forward(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, inputs)`` of one batch; ``inputs`` is what a NaN diagnosis re-runs the model on."""
        raise NotImplementedError

    def update(self, loss: torch.Tensor, epoch: int, step: int) -> dict[str, str]:
        """Backward and optimizer step; returns the progress bar's figures."""
        raise NotImplementedError

    def end_epoch(self, epoch: int) -> dict:
        """The epoch's figures, for its log line and the metrics file."""
        return {}

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def diagnosis_context(self):
        """Where a NaN diagnosis runs (fine-tuning: under the step's autocast)."""
        return nullcontext()

    def run(self) -> None:
        from tqdm.auto import tqdm

        kind, start = f"{self.stage}-progress", 0
        state = checkpoint.load_progress(self.checkpoint_path, kind, self.settings, self.device,
                                         renamed=self.renamed_settings) if self.checkpoint_path else None
        if state is not None:
            with checkpoint.malformed(self.checkpoint_path):  # a part missing or of the wrong shape: one line
                if int(state["epoch"]) + 1 > self.epochs:
                    raise checkpoint.CheckpointError(f"{self.checkpoint_path}: holds {int(state['epoch']) + 1} epochs of "
                                                     f"progress, more than the epochs={self.epochs} asked for; delete it "
                                                     "to start over")
                self.load_state_dict(state)
                start = int(state["epoch"]) + 1
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.model) if distributed.world_size() > 1 else self.model
        quiet = not (self.progress and distributed.is_main())
        self.metrics.start(start)
        for epoch in range(start, self.epochs):
            set_epoch(self.loader, epoch)
            self.start_epoch(epoch)
            bar = tqdm(self.loader, desc=f"{self.stage} {epoch + 1}/{self.epochs}", disable=True if quiet else None,
                       leave=False)
            for step, batch in enumerate(bar):
                loss, inputs = self.forward(batch)
                finite = bool(torch.isfinite(loss))
                if distributed.any_process(not finite):
                    with self.diagnosis_context():  # find the layer under the precision the step ran in
                        error = None if finite else nonfinite_error(
                            self.error_name, f"loss became {loss.item()}", epoch, step, self.model, inputs)
                    raise_on_every_process(error)
                bar.set_postfix(self.update(loss, epoch, step))
            self.metrics.epoch(epoch, self.end_epoch(epoch))
            if self.checkpoint_path and distributed.is_main():
                checkpoint.save_progress(self.checkpoint_path, kind, self.settings, {**self.state_dict(), "epoch": epoch})
            distributed.barrier()
