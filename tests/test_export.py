"""Saved model files (scop_ext.export): a round trip, and wrong-architecture, malformed,
truncated and garbled files giving one error line naming the file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from scop_ext.train.checkpoint import CheckpointError
from scop_ext.export import load_model, save_model
from scop_ext.models import build_model

from tests._helpers import _cuts, assert_one_line, cli

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    stems = {}
    for name, classes in (("resnet_digits", 10), ("resnet20", 10)):
        stems[name] = folder / name
        save_model(build_model(name, classes, 1), stems[name], model_name=name, num_classes=classes, in_channels=1)
    return stems


def _copy_model(stem: Path, to: Path, arch_edit=None, weights: bytes | None = None) -> Path:
    arch = json.loads(Path(f"{stem}.json").read_text())
    if arch_edit is not None:
        arch_edit(arch)
    Path(f"{to}.json").write_text(json.dumps(arch))
    Path(f"{to}.safetensors").write_bytes(weights if weights is not None else Path(f"{stem}.safetensors").read_bytes())
    return to


def test_saved_model_round_trip(saved_models):
    model, arch = load_model(saved_models["resnet_digits"])
    assert arch["model"] == "resnet_digits" and model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def _set(key, value):
    return lambda arch: arch.__setitem__(key, value)


def _narrow(arch):
    name = next(iter(arch["widths"]))
    arch["widths"][name] -= 1


MODEL_CASES = [
    # (what, arch edit, weights from, file named, pattern)
    ("weights of another architecture", None, "resnet20", "safetensors", "does not match the architecture"),
    ("widths narrower than the weights", _narrow, None, "json", "coupled convs|does not match the architecture"),
    ("unknown model name", _set("model", "resnet9000"), None, "json", "describes no model that can be built"),
    ("widths of unknown convs", _set("widths", {"conv9": 3}), None, "json", "describes no model that can be built"),
    ("width zero", lambda a: a["widths"].update({k: 0 for k in a["widths"]}), None, "json", "malformed model description: widths"),
    ("width as string", lambda a: a["widths"].update({k: "16" for k in a["widths"]}), None, "json", "malformed model description: widths"),
    ("widths a list", _set("widths", [16, 16]), None, "json", "malformed model description: widths"),
    ("num_classes negative", _set("num_classes", -1), None, "json", "malformed model description: num_classes"),
    ("in_channels boolean", _set("in_channels", True), None, "json", "malformed model description: in_channels"),
    ("model a number", _set("model", 7), None, "json", "malformed model description: model"),
    ("future version", _set("version", 2), None, "json", "model description version 2; this scop reads 1"),
    ("other format", _set("format", "onnx"), None, "json", "not a scop model description"),
    ("missing key", lambda a: a.pop("widths"), None, "json", "lacks \\['widths'\\]"),
]


@pytest.mark.parametrize("what,edit,weights_from,named,pattern", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_wrong_architecture_and_malformed_model_files(saved_models, tmp_path, capsys, what, edit, weights_from, named, pattern):
    weights = Path(f"{saved_models[weights_from]}.safetensors").read_bytes() if weights_from else None
    stem = _copy_model(saved_models["resnet_digits"], tmp_path / "m", edit, weights)
    with pytest.raises(CheckpointError, match=pattern):
        load_model(stem)
    assert_one_line(*cli(capsys, "export", "--model", stem, "--format", "safetensors", "--out", tmp_path / "o"),
                    f"{stem}.{named}", pattern)


def test_truncated_and_garbled_model_files(saved_models, tmp_path, capsys):
    data = Path(f"{saved_models['resnet_digits']}.safetensors").read_bytes()
    variants = {f"cut{c}": data[:c] for c in _cuts(len(data))}
    variants["huge header length"] = (2**62).to_bytes(8, "little") + data[8:]
    variants["header not JSON"] = data[:8] + b"#" * 40 + data[48:]
    for name, blob in variants.items():
        stem = _copy_model(saved_models["resnet_digits"], tmp_path / name.replace(" ", "_"), weights=blob)
        with pytest.raises(CheckpointError, match=re.escape(f"{stem}.safetensors") + ": truncated or corrupt"):
            load_model(stem)
    assert_one_line(*cli(capsys, "export", "--model", stem, "--out", tmp_path / "o"), f"{stem}.safetensors", "truncated or corrupt")
    json_path = Path(f"{stem}.json")
    json_path.write_text('{"format": "scop-model", "version": 1, "model": ')
    assert_one_line(*cli(capsys, "export", "--model", stem, "--out", tmp_path / "o"), json_path, "not valid JSON")
    json_path.write_bytes(b"\xff\xfe\x00garbage")
    assert_one_line(*cli(capsys, "export", "--model", stem, "--out", tmp_path / "o"), json_path, "not valid JSON")
    print(f"malformed model files tried: {len(variants) + 2}")
