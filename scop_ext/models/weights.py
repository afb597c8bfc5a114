"""Reading a weights file into a model: the state_dict in it (plain, nested in a training
checkpoint, or safetensors), made to fit a model built for other data (a new classifier, a
summed stem), with one log line per change and one error line naming the file otherwise."""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor, nn

__all__ = ["read_state_dict", "load_weights"]

logger = logging.getLogger(__name__)


_WRAPPERS = ("state_dict_ema", "model_ema", "state_dict", "model")


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state_dict in a weights file: ``.safetensors``, or a ``torch.save`` file read with
    ``weights_only=True`` holding a state_dict or a training checkpoint that nests one (under
    ``state_dict``, ``model``, or their ``_ema`` forms, as timm's checkpoints do), with
    DataParallel's ``module.`` prefix removed. Nothing is unpickled beyond tensors and containers.

    Raises:
        ValueError: naming the file, when it is missing, unreadable, or holds no state_dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"weights file {path!r} does not exist (expected a state_dict saved with torch.save "
                         "or safetensors)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the readers raise many types for a corrupt file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"weights file {path!r} could not be read as a state_dict: {first}") from None
    if isinstance(state, dict):
        nested = next((state[k] for k in _WRAPPERS if isinstance(state.get(k), dict) and state[k]), None)
        state = nested if nested is not None else state
    if not (isinstance(state, dict) and state and
            all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items())):
        raise ValueError(f"weights file {path!r} does not hold a state_dict (a dict of str -> Tensor)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, name: str, path: str | os.PathLike) -> None:
    path = os.fspath(path)
    state = read_state_dict(path)
    from ..train.checkpoint import first_nonfinite

    bad = first_nonfinite(state)
    if bad is not None:
        raise ValueError(f"weights file {path!r}: tensor {bad!r} holds NaN or Inf; the model is unusable")
    state, notes, dropped = _fitted_to(model, state)
    try:
        result = model.load_state_dict(state, strict=False)
        missing = sorted(set(result.missing_keys) - dropped)
        if missing or result.unexpected_keys:
            raise RuntimeError(f"missing keys {missing[:5]}, unexpected keys {sorted(result.unexpected_keys)[:5]}")
    except RuntimeError as exc:
        text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise ValueError(f"weights file {path!r} does not match the architecture {name!r}: {text}") from None
    for note in notes:
        logger.info("weights %s: %s", path, note)


def _fitted_to(model: nn.Module, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str], set[str]]:
    """``state`` made to fit ``model`` where a pretrained checkpoint meets other data: a classifier
    for another number of classes is left out (the model keeps its own, new head), and a 3-channel
    stem meeting 1-channel images is summed over its input channels (timm's convention). Any
    other difference is left for load_state_dict to report. Returns the state, what changed, and
    the model's keys left to their own initialisation."""
    own = model.state_dict()
    differ = [k for k in state if k in own and state[k].shape != own[k].shape]
    if not differ:
        return state, [], set()
    state, notes, dropped = dict(state), [], set()
    head = [k for k in differ if own[k].dim() >= 1 and own[k].shape[1:] == state[k].shape[1:]
            and own[k].shape[0] != state[k].shape[0]]
    counts = {state[k].shape[0] for k in head}
    if head and len(counts) == 1 and {own[k].shape[0] for k in head} == {_outputs(model)}:
        module = head[0].rsplit(".", 1)[0]
        if all(k.rsplit(".", 1)[0] == module for k in head):
            missing = [k for k in own if k.startswith(module + ".") and k not in head]
            for k in head + missing:
                state.pop(k, None)
            dropped = set(head + missing)
            notes.append(f"classifier {module!r} has {counts.pop()} outputs there; it is replaced by a new, randomly "
                         f"initialised one with {_outputs(model)} (train or fine-tune to fit it)")
            differ = [k for k in differ if k not in head]
    stem = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    key = f"{stem}.weight"
    if key in differ and state[key].shape[1] == 3 and own[key].shape[1] == 1 and \
            state[key].shape[0] == own[key].shape[0] and state[key].shape[2:] == own[key].shape[2:]:
        state[key] = state[key].sum(1, keepdim=True)
        notes.append(f"stem {stem!r} reads 3 channels there; its weights are summed over them for 1-channel images")
        differ.remove(key)
    return (state, notes, dropped) if not differ else (state, [], set())


def _outputs(model: nn.Module) -> int | None:
    """The class count the model was built for: the out_features of its last Linear (or the out
    channels of a conv classifier such as squeezenet's), None when neither exists."""
    last = None
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            last = m
    if last is None:
        return None
    return last.out_features if isinstance(last, nn.Linear) else last.out_channels
