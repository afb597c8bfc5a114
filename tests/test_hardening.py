"""Bad input, faults and untrusted files: the process neither crashes nor loses work.

- untrusted files: pickles with payloads are refused before they run; truncated, corrupt,
  wrong-architecture and wrong-version files and malformed configs give one error line naming the
  file (through the API and the ``scop`` command, exit status 2);
- numerical faults: NaN/Inf stops stage 2 and fine-tuning at the step, naming the layer, with the
  last checkpoint intact; singular covariances are regularised with a warning, never a crash or a
  non-PSD sampler;
- determinism, resumable random augmentation, crash-safe writes, and memory prediction.
"""

from __future__ import annotations

import builtins
import copy
import json
import os
import pickle
import re
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import scop_ext
from scop_ext import checkpoint, convert, lemma2, scop_layers
from scop_ext.checkpoint import CheckpointError
from scop_ext.cli import main
from scop_ext.knockoffs import GaussianKnockoffs
from scop_ext.knockoffs import load as load_generator
from scop_ext.models import build_model
from scop_ext import resources
from scop_ext.export import load_model, save_model
from scop_ext.config import PruneConfig
from scop_ext.pipeline import ScopPruner
from scop_ext.report import write_report
from scop_ext.prune.excavate import fit_knockoff_biases, learn_scales
from scop_ext.train import NonFiniteError, fit, make_loader

from .conftest import ENV, TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def cli(capsys, *args) -> tuple[int, list[str]]:
    """Run the ``scop`` command in this process: (exit status, stderr lines)."""
    status = main([str(a) for a in args])
    return status, capsys.readouterr().err.strip().splitlines()


def assert_one_line(status, lines, path, pattern):
    assert status == 2, lines
    assert len(lines) == 1, lines
    assert str(path) in lines[0], lines[0]
    assert re.search(pattern, lines[0]), lines[0]


# ------------------------------------------------------------------------- untrusted files


class Payload:
    """Unpickling this runs ``os.system``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _hostile_files(folder: Path, marker: Path) -> dict[str, Path]:
    files = {
        # a scop checkpoint whose payload holds the object
        "scop checkpoint": {"format": "scop", "version": checkpoint.FORMAT_VERSION, "kind": "knockoff-generator",
                            "payload": {"kind": "gaussian", "config": "{}", "state": Payload(marker)}},
        # a plain state_dict with the object among its tensors
        "state_dict": {"conv1.weight": torch.zeros(1), "evil": Payload(marker)},
    }
    paths = {}
    for name, obj in files.items():
        paths[name] = folder / f"{name.replace(' ', '_')}.pt"
        torch.save(obj, paths[name])
    paths["raw pickle"] = folder / "raw.pt"  # the legacy, non-zip format
    paths["raw pickle"].write_bytes(pickle.dumps(Payload(marker)))
    return paths


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch, on the raw pickle
def test_pickle_payloads_are_refused_and_never_run(tmp_path, capsys):
    marker = tmp_path / "PAYLOAD_RAN"
    # control: the payload is live, plain pickle.load would run it
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()
    marker.unlink()
    for name, path in _hostile_files(tmp_path, marker).items():
        # a raw pickle is not even a torch.save file: its first opcode is already refused
        expected = "truncated or corrupt checkpoint" if name == "raw pickle" else "refused: it holds objects other than tensors"
        with pytest.raises(CheckpointError, match=expected):
            checkpoint.load(path, "knockoff-generator")
        with pytest.raises(ValueError, match=re.escape(str(path))):
            load_generator(path)
        with pytest.raises(ValueError, match="could not be read as a state_dict"):
            build_model("resnet_digits", 10, 1, weights=path)
        assert_one_line(*cli(capsys, "knockoffs", "check", "--knockoffs", path, "--out", tmp_path / "o"), path, expected)
        assert_one_line(*cli(capsys, "prune", "--weights", path, "--out", tmp_path / "o"), path, "could not be read")
        assert not marker.exists(), f"the payload of the {name} ran"


def test_pickle_payload_refused_by_a_real_scop_process(tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    path = _hostile_files(tmp_path, marker)["scop checkpoint"]
    proc = subprocess.run([sys.executable, "-m", "scop_ext.cli", "knockoffs", "check", "--knockoffs", str(path),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and str(path) in proc.stderr
    assert not marker.exists()


@pytest.fixture(scope="module")
def generator_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gen") / "knockoffs.pt"
    x = torch.rand(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    GaussianKnockoffs().fit(DataLoader(TensorDataset(x), batch_size=32)).save(path)
    return path


def _cuts(n: int) -> list[int]:
    return sorted({0, 1, 8, 64, n // 4, n // 2, n - 100, n - 22, n - 1} - {n})


def test_truncated_and_corrupt_checkpoints(generator_file, tmp_path, capsys):
    data = generator_file.read_bytes()
    tried = 0
    for cut in _cuts(len(data)):
        bad = tmp_path / f"cut{cut}.pt"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=re.escape(str(bad)) + ": truncated or corrupt checkpoint"):
            checkpoint.load(bad, "knockoff-generator")
        tried += 1
    # zip entries are not checksummed on read, so corrupt the structure rather than the tensor bytes
    with zipfile.ZipFile(generator_file) as z:
        names = z.namelist()
    for i, name in enumerate(n for n in names if n.endswith("data.pkl")):
        bad = tmp_path / f"pkl{i}.pt"
        blob = bytearray(data)
        start = blob.find(b"\x80\x02", blob.find(name.encode()))  # the pickle stream's protocol header
        blob[start + 2 : start + 40] = b"\xff" * 38
        bad.write_bytes(bytes(blob))
        with pytest.raises(CheckpointError, match=re.escape(str(bad))):
            checkpoint.load(bad, "knockoff-generator")
        tried += 1
    bad = tmp_path / f"cut{len(data) // 2}.pt"
    assert_one_line(*cli(capsys, "knockoffs", "check", "--knockoffs", bad, "--out", tmp_path / "o"), bad, "truncated or corrupt")
    print(f"truncated/corrupt checkpoints tried: {tried}")


def _scop_file(path: Path, **fields) -> Path:
    blob = {"format": "scop", "version": checkpoint.FORMAT_VERSION, "kind": "knockoff-generator", "payload": {}}
    blob.update(fields)
    torch.save(blob, path)
    return path


@pytest.mark.parametrize(
    "fields,pattern",
    [
        (dict(version=99), "checkpoint format version 99; this scop reads version 1"),
        (dict(version="1"), "checkpoint format version '1'"),
        (dict(kind="scales"), "holds a 'scales' checkpoint, expected 'knockoff-generator'"),
        (dict(format="other"), "not a scop checkpoint"),
        (dict(payload=[1, 2]), "unknown generator kind None"),
        (dict(payload={"kind": ["gaussian"]}), "unknown generator kind"),
        (dict(payload={"kind": "nope"}), "unknown generator kind 'nope'"),
        (dict(payload={"kind": "gaussian", "config": "{not json", "state": {}}), "does not fit its config"),
        (dict(payload={"kind": "gaussian", "config": "[1]", "state": {}}), "does not fit its config"),
        (dict(payload={"kind": "gaussian", "config": '{"method": "bogus"}', "state": {}}), "method must be"),
        (dict(payload={"kind": "gaussian", "config": '{"colour": 1}', "state": {}}), "unexpected keyword"),
        (dict(payload={"kind": "gaussian", "config": '{"shape": [1, 4, 4]}', "state": {"mean": torch.zeros(3)}}),
         "does not fit its config"),
        (dict(payload={"kind": "gaussian", "config": '{"shape": 7}', "state": {}}), "does not fit its config"),
        (dict(payload={"kind": "gaussian"}), "does not fit its config"),
    ],
)
def test_wrong_version_kind_and_malformed_generator_files(tmp_path, capsys, fields, pattern):
    path = _scop_file(tmp_path / "gen.pt", **fields)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + pattern):
        load_generator(path)
    assert_one_line(*cli(capsys, "knockoffs", "check", "--knockoffs", path, "--out", tmp_path / "o"), path, pattern)


def test_not_a_scop_checkpoint(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"a": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="not a scop checkpoint"):
        checkpoint.load(path, "scales")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        checkpoint.load(tmp_path / "absent.pt", "scales")


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


# (file name, content, pattern of the one error line)
CONFIGS = [
    ("syntax.yaml", "policy: [unclosed\n", "malformed config \\(ParserError"),
    ("tabs.yaml", "policy: fdr\n\tratio: 0.3\n", "malformed config"),
    ("syntax.json", '{"policy": "fdr",}', "malformed config \\(JSONDecodeError"),
    ("truncated.json", '{"policy": "fd', "malformed config \\(JSONDecodeError"),
    ("binary.yaml", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "malformed config \\(not UTF-8"),
    ("laughs.yaml", "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n", "malformed config \\(ComposerError: alias \\*a is not allowed"),
    ("empty.yaml", "", "a config must be a mapping of keys to values, got NoneType"),
    ("list.yaml", "- a\n- b\n", "a config must be a mapping of keys to values, got list"),
    ("scalar.json", "3", "a config must be a mapping of keys to values, got int"),
    ("unknown.yaml", "polcy: fdr\n", "unknown config keys \\['polcy'\\]"),
    ("numeric_key.yaml", "1: 2\n", "unknown config keys \\['1'\\]"),
    ("batch_str.yaml", "batch_size: '64'\n", "batch_size must be an integer, got str"),
    ("batch_float.yaml", "batch_size: 6.4\n", "batch_size must be an integer, got float"),
    ("batch_bool.json", '{"batch_size": true}', "batch_size must be an integer, got bool"),
    ("ratio_str.yaml", "ratio: half\n", "ratio must be a number, got str"),
    ("betas_str.yaml", "scales_betas: fast\n", "scales_betas must be a list, got str"),
    ("betas_three.yaml", "scales_betas: [0.5, 0.9, 0.99]\n", "scales_betas must be a pair of numbers in \\[0, 1\\)"),
    ("betas_words.yaml", "scales_betas: [a, b]\n", "scales_betas must be a pair of numbers"),
    ("skip_str.yaml", "skip: conv1\n", "skip must be a list, got str"),
    ("skip_ints.yaml", "skip: [1, 2]\n", "skip, ignored_layers and the keys of knockoff_options must be strings"),
    ("options_list.yaml", "knockoff_options: [1]\n", "knockoff_options must be a mapping, got list"),
    ("amp_str.yaml", "amp: yes please\n", "amp must be true or false or null, got str"),
    ("weights_int.yaml", "weights: 5\n", "weights must be a string or null, got int"),
    ("batch_zero.yaml", "batch_size: 0\n", "batch_size must be >= 1"),
    ("epochs_negative.yaml", "finetune_epochs: -1\n", "finetune_epochs must be >= 0"),
    ("ratio_one.yaml", "ratio: 1.0\n", "ratio must be in \\[0, 1\\)"),
    ("fdr_big.json", '{"fdr_q": 2}', "fdr_q must be in \\(0, 1\\)"),
    ("lr_zero.yaml", "scales_lr: 0\n", "scales_lr and finetune_lr must be > 0"),
    ("gamma_negative.yaml", "bias_gamma: -0.1\n", "bias_gamma must be > 0"),
    ("bn_mode.yaml", "bn: sync\n", "bn must be 'batch' or 'frozen'"),
    ("policy.yaml", "policy: greedy\n", "policy must be one of"),
    ("importance.yaml", "importance: scpo\n", "importance must be one of"),
    ("knockoffs.yaml", "knockoffs: diffusion\n", "knockoffs must be one of"),
    ("scope.yaml", "fdr_scope: network\n", "fdr_scope must be 'layer' or 'global'"),
    ("device.yaml", "device: banana\n", "device must be a device name"),
]


@pytest.mark.parametrize("value,pattern", [("ratio=[1,", "ParserError"), ("ratio=*a", "alias \\*a is not allowed"),
                                           ("ratio", "expects KEY=VALUE")])
def test_malformed_set_values_give_one_line(tmp_path, capsys, value, pattern):
    status, lines = cli(capsys, "prune", "--set", value, "--out", tmp_path)
    assert status == 2 and len(lines) == 1
    assert re.search(r"--set .*" + pattern, lines[0]), lines[0]


@pytest.mark.parametrize("name,content,pattern", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_malformed_configs_give_one_line_naming_the_file(tmp_path, capsys, name, content, pattern):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + pattern):
        PruneConfig.from_file(path)
    assert_one_line(*cli(capsys, "prune", "--config", path, "--out", tmp_path / "o"), path, pattern)
    assert not (tmp_path / "o").exists(), "a run started from a bad config"


def test_config_that_is_a_folder_or_missing(tmp_path, capsys):
    for path, pattern in ((tmp_path, "cannot read config \\(Is a directory\\)"),
                          (tmp_path / "nope.yaml", "cannot read config \\(No such file")):
        assert_one_line(*cli(capsys, "prune", "--config", path, "--out", tmp_path / "o"), path, pattern)


def test_bad_set_values_are_one_line(tmp_path, capsys):
    status, lines = cli(capsys, "prune", "--set", "batch_size=many", "--out", tmp_path / "o")
    assert status == 2 and lines == ["scop prune: error: batch_size must be an integer, got str 'many'"]
    status, lines = cli(capsys, "prune", "--set", "nokey", "--out", tmp_path / "o")
    assert status == 2 and len(lines) == 1 and "--set expects KEY=VALUE" in lines[0]


# ------------------------------------------------------------------------ numerical faults


def _tiny_net(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def _toy_data(n=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 6, 6, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    x[:, 0] += y[:, None, None]
    return x, y


class PoisonAfter(Dataset):
    """Serves ``items`` cleanly for the first ``clean`` fetches, then with NaN in the image."""

    def __init__(self, items: Dataset, clean: int):
        self.items, self.clean, self.fetched = items, clean, 0

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        self.fetched += 1
        x, *rest = self.items[i]
        if self.fetched > self.clean:
            x = x.clone()
            x[0, 0, 0] = float("nan")
        return (x, *rest)


def test_nan_input_during_finetuning_stops_at_the_step_and_keeps_the_checkpoint(tmp_path):
    x, y = _toy_data()
    data = PoisonAfter(TensorDataset(x, y), clean=len(x) + 40)  # epoch 1 clean, then mid-epoch 2 (batch 3 of 4)
    model = _tiny_net()
    snapshots = []
    ckpt = tmp_path / "finetune-progress.pt"
    with pytest.raises(NonFiniteError) as info:
        fit(model, make_loader(data, 24, shuffle=True, seed=1), None, epochs=3, lr=0.05, device="cpu", progress=False,
            checkpoint_path=str(ckpt), log=lambda line: snapshots.append(copy.deepcopy(model.state_dict())))
    message = str(info.value)
    assert "finetune: loss became nan at epoch 1, step 1" in message
    assert "input batch already holds NaN/Inf" in message and "first non-finite output: layer 0 (Conv2d)" in message
    assert len(snapshots) == 1  # epoch 1 finished, epoch 2 did not
    state = checkpoint.load(ckpt, "finetune-progress")
    assert state["epoch"] == 0
    for key, value in snapshots[0].items():
        assert torch.equal(state["model"][key], value), key


def test_nan_weights_name_the_layer_where_they_start(tmp_path):
    x, y = _toy_data()
    model = _tiny_net()
    calls = []

    def poison(module, args):  # the second BN's scale turns Inf at the 6th forward (epoch 2, step 1)
        calls.append(1)
        if len(calls) == 6:
            with torch.no_grad():
                model[4].weight.fill_(float("inf"))

    model.register_forward_pre_hook(poison)
    with pytest.raises(NonFiniteError, match="at epoch 1, step 1; first non-finite output: layer 4 \\(BatchNorm2d\\)"):
        fit(model, make_loader(TensorDataset(x, y), 24, shuffle=True, seed=1), None, epochs=2, lr=0.05, device="cpu",
            progress=False)


def _paired(x, y):
    return TensorDataset(x, torch.randn(x.shape, generator=torch.Generator().manual_seed(5)), y)


def _scop_net():
    net = convert(_tiny_net())
    x, y = _toy_data()
    fit_knockoff_biases(net, DataLoader(_paired(x, y), 48), "cpu", batches=1)
    return net


def test_nan_input_during_stage2_stops_at_the_step_and_keeps_the_checkpoint(tmp_path):
    x, y = _toy_data()
    ckpt = tmp_path / "scales-progress.pt"
    net = _scop_net()
    data = PoisonAfter(_paired(x, y), clean=len(x) + 40)
    with pytest.raises(NonFiniteError) as info:
        learn_scales(net, make_loader(data, 24, shuffle=True, seed=2), "cpu", epochs=3, checkpoint_path=str(ckpt),
                     progress=False)
    assert re.search(r"learn_scales: loss became nan at epoch 1, step 1; the input batch already holds NaN/Inf "
                     r"\(first non-finite output: layer 0 \(ScopConv2d\)\)", str(info.value)), str(info.value)
    # the checkpoint holds exactly epoch 1 of the run: the same as a clean one-epoch run
    clean = _scop_net()
    learn_scales(clean, make_loader(_paired(x, y), 24, shuffle=True, seed=2), "cpu", epochs=1, progress=False)
    state = checkpoint.load(ckpt, "scales-progress")
    assert state["epoch"] == 0
    for name, layer in scop_layers(clean).items():
        assert not torch.equal(layer.beta.detach(), torch.full_like(layer.beta, 0.5))
        assert torch.equal(state["betas"][name], layer.beta.detach()), name


def test_nan_beta_names_the_layer_and_step(monkeypatch):
    net = _scop_net()
    layer = scop_layers(net)["3"]
    steps = []

    def clamp_then_poison():
        steps.append(1)
        with torch.no_grad():
            layer.beta.clamp_(0, 1)
            if len(steps) == 3:
                layer.beta[2] = float("nan")

    monkeypatch.setattr(layer, "clamp_beta_", clamp_then_poison)
    x, y = _toy_data()
    with pytest.raises(NonFiniteError, match="beta of layer '3' became NaN/Inf at epoch 0, step 2 \\(its gradient was finite\\)"):
        learn_scales(net, make_loader(_paired(x, y), 24, shuffle=True, seed=2), "cpu", epochs=2, progress=False)


def test_cli_reports_a_numerical_fault_in_one_line(monkeypatch, tmp_path, capsys):
    def fail(self, resume=False):
        raise NonFiniteError("learn_scales: loss became nan at epoch 3, step 7; first non-finite output: layer conv1 (ScopConv2d)")

    monkeypatch.setattr(ScopPruner, "from_config", classmethod(lambda cls, *a, **k: object.__new__(cls)))
    monkeypatch.setattr(ScopPruner, "run", fail)
    status, lines = cli(capsys, "prune", "--out", tmp_path)
    assert status == 1 and len(lines) == 1
    assert "epoch 3, step 7" in lines[0] and "layer conv1" in lines[0] and "rerun with --resume" in lines[0]


# -------------------------------------------------- singular covariances: jitter, never a crash


def _psd_floor(matrix: torch.Tensor) -> float:
    """Smallest eigenvalue relative to the largest (>= -1e-9 means PSD up to rounding)."""
    evals = torch.linalg.eigvalsh((matrix + matrix.T) / 2)
    return float(evals[0]) / max(float(evals[-1].abs()), 1e-300)


def _degenerate_images(kind: str) -> torch.Tensor:
    x = torch.rand(200, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    if kind == "constant pixels":
        x[:, :, 0, :] = 0.0  # a border that never changes, as on digits
    elif kind == "duplicated channels":
        x[:, 1] = x[:, 0]
    elif kind == "all constant":
        x[:] = 0.25
    return x


@pytest.mark.parametrize("kind", ["constant pixels", "duplicated channels", "all constant"])
@pytest.mark.parametrize("method", ["equi", "sdp"])
def test_singular_image_covariance_is_jittered_with_a_warning(kind, method):
    shrinkage = "ledoit-wolf" if kind == "all constant" else 0.0  # Ledoit-Wolf has nothing to shrink there
    loader = DataLoader(TensorDataset(_degenerate_images(kind)), batch_size=50)
    with pytest.warns(UserWarning, match="covariance is singular or ill-conditioned.*added .* to its diagonal"):
        gen = GaussianKnockoffs(method=method, block=2, shrinkage=shrinkage).fit(loader)
    sigma, s = gen.cov, gen.S
    joint = torch.cat([torch.cat([sigma, sigma - s], 1), torch.cat([sigma - s, sigma], 1)])
    assert _psd_floor(joint) > -1e-9
    # the sampler draws exactly from 2S - S Sigma^-1 S: its factor was not clipped
    cond = 2 * s - s @ torch.linalg.solve(sigma, s)
    noise = gen.noise_factor.double()
    torch.testing.assert_close(noise @ noise.T, cond, atol=1e-5 * float(cond.abs().max()) + 1e-12, rtol=0)
    xk = gen.sample(_degenerate_images(kind)[:8], generator=torch.Generator().manual_seed(1))
    assert bool(torch.isfinite(xk).all())


def test_well_conditioned_covariance_gives_no_warning():
    loader = DataLoader(TensorDataset(torch.rand(200, 1, 4, 4, generator=torch.Generator().manual_seed(0))), batch_size=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GaussianKnockoffs(block=2).fit(loader)


def _sampler_covariance(sol: lemma2.Lemma2Solution) -> torch.Tensor:
    """Joint covariance of [b, b~] as lemma2_sample draws it: gamma I +- R R^T."""
    rr = sol.R @ sol.R.T
    eye = sol.gamma * torch.eye(rr.shape[0], dtype=torch.float64)
    return torch.cat([torch.cat([eye + rr, eye - rr], 1), torch.cat([eye - rr, eye + rr], 1)])


@pytest.mark.parametrize(
    "case,pattern",
    [
        ("all-zero weights", "M = W\\^T diag\\(s_in\\) W is zero"),
        ("constant pixels (s_in = 0)", "M = W\\^T diag\\(s_in\\) W is zero"),
        ("duplicated filters, tiny gamma", "below the numerical floor"),
    ],
)
def test_degenerate_lemma2_is_regularised_with_a_warning(case, pattern):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 4, 3, 3, generator=gen) * 1e3
    s_in, gamma = torch.rand(4, generator=gen), None
    if case == "all-zero weights":
        weight.zero_()
    elif case == "constant pixels (s_in = 0)":
        s_in.zero_()
    else:
        weight[3:] = weight[:3]
        gamma = 1e-30
    with pytest.warns(UserWarning, match=pattern):
        sol = lemma2.solve(weight, s_in, gamma)
    assert sol.margin >= -1e-12 * max(sol.lambda_max, 1.0)
    assert _psd_floor(sol.covariance()) > -1e-9
    torch.testing.assert_close(_sampler_covariance(sol), sol.covariance(), atol=1e-9 * max(sol.lambda_max, 1.0), rtol=0)
    draws = scop_ext.lemma2_sample(sol.R, sol.gamma, 5, seed=3)
    assert bool(torch.isfinite(draws).all())


def test_layer_fit_warnings_name_the_layer():
    net = _tiny_net()
    with torch.no_grad():
        net[3].weight.zero_()
    convert(net)
    x, y = _toy_data()
    with pytest.warns(UserWarning, match="layer '3': M = W\\^T diag"):
        fit_knockoff_biases(net, DataLoader(_paired(x, y), 48), "cpu", batches=1)


# ---------------------------------------------------------------------------- determinism


def test_same_seed_same_device_same_betas_plan_and_weights(tmp_path, baseline):
    runs = []
    for name in ("a", "b"):
        config = PruneConfig(weights=baseline, policy="uniform", ratio=0.4, **TINY)
        results = ScopPruner.from_config(config, tmp_path / name, progress=False, log=lambda *a: None).run()
        runs.append((results, tmp_path / name))
    (ra, a), (rb, b) = runs
    assert ra["betas"] == rb["betas"] and any(v != 0.5 for betas in ra["betas"].values() for v in betas)
    assert json.loads((a / "plan.json").read_text()) == json.loads((b / "plan.json").read_text())
    assert sum(len(v) for v in json.loads((a / "plan.json").read_text()).values()) > 0
    for stem in ("pruned", "final"):
        wa, wb = load_file(str(a / f"{stem}.safetensors")), load_file(str(b / f"{stem}.safetensors"))
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), f"{stem}: {key}"


class RandomFlip(Dataset):
    """Flips images at random with the global generator, as torchvision augmentation does."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        x, y = self.items[i]
        return (x.flip(-1) if torch.rand(()) < 0.5 else x), y


def test_resumed_fit_with_random_augmentation_equals_an_uninterrupted_one(tmp_path):
    x, y = _toy_data()
    data = RandomFlip(TensorDataset(x, y))

    def run(ckpt, stop_at=None):
        torch.manual_seed(0)
        model = _tiny_net()
        lines = []

        def log(line):
            lines.append(line)
            if len(lines) == stop_at:
                raise KeyboardInterrupt  # killed after the last complete epoch's checkpoint, mid-way
        fit(model, make_loader(data, 24, shuffle=True, seed=1), None, epochs=3, lr=0.05, device="cpu",
            progress=False, checkpoint_path=str(ckpt), log=log)
        return model

    whole = run(tmp_path / "whole.pt")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut.pt", stop_at=3)  # the third epoch's checkpoint is never written
    torch.manual_seed(123)  # whatever the state of the process that resumes
    resumed = run(tmp_path / "cut.pt")
    for (key, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key


# ------------------------------------------------------------------------ crash-safe writes


def test_every_run_file_is_written_through_a_temporary_and_renamed(tmp_path, monkeypatch, generator_file):
    """Direct writes into the run folder are refused; every file must arrive by os.replace."""
    real_open, real_replace = builtins.open, os.replace
    renamed = []

    def guarded_open(file, mode="r", *args, **kwargs):
        name = os.fspath(file) if isinstance(file, (str, os.PathLike)) else ""
        if any(m in mode for m in "wax+") and name.startswith(str(tmp_path)):
            raise AssertionError(f"direct write to {name}")
        return real_open(file, mode, *args, **kwargs)

    def recording_replace(src, dst, *args, **kwargs):
        assert os.path.basename(src).startswith(checkpoint.TEMP_PREFIX)
        renamed.append(os.path.basename(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "replace", recording_replace)
    results = {"before": {"flops": 2.0, "top1": 0.9}, "after": {"flops": 1.0, "top1": 0.8}, "betas": {"a": [0.2, 0.7]},
               "importance": {"a": [-0.6, 0.4]}, "removed": {"a": [0]}, "widths_before": {"a": 2},
               "widths_after": {"a": 1}, "notes": ["n"]}
    paths = write_report(str(tmp_path), results)
    save_model(_tiny_net(), tmp_path / "final", model_name="x", num_classes=3, in_channels=2)
    checkpoint.save(tmp_path / "scales.pt", "scales", {"model": {}})
    load_generator(generator_file).save(tmp_path / "knockoffs.pt")
    expected = {os.path.basename(p) for p in paths.values()} | {"final.safetensors", "final.json", "scales.pt", "knockoffs.pt"}
    assert expected <= set(renamed), expected - set(renamed)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(checkpoint.TEMP_PREFIX)]


# --------------------------------------------------------------------------- memory limits


# Appended to a script that defines `estimate`, `step(b)` and `batch`: prints the predicted bytes
# (optimizer state left out: the script makes none) and the measured rise of the peak RSS.
PEAK_RSS = r"""
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

step(2)  # thread pools, primitive caches and the allocator's arenas exist before the baseline
open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM) to the current RSS
base = status("VmRSS:")
step(batch)
print(estimate.total(batch) - estimate.fixed["optimizer state"], status("VmHWM:") - base)
"""


def predicted_and_measured(tmp_path, script: str, *args) -> tuple[int, int]:
    path = tmp_path / "measure.py"
    path.write_text(script + PEAK_RSS)
    proc = subprocess.run([sys.executable, str(path), *map(str, args)], capture_output=True, text=True, env=ENV,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    predicted, measured = map(int, proc.stdout.split())
    assert measured > 20 * 2**20, "too small to measure against the process's noise"
    return predicted, measured


MEASURE = r"""
import sys, torch, torch.nn.functional as F
torch.set_num_threads(1)
from scop_ext import convert, scop_layers
from scop_ext.models import build_model
from scop_ext import resources
name, size, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = convert(build_model(name, 10, 3))
for layer in scop_layers(model).values():
    layer.set_knockoff_bias(0.1 * torch.eye(layer.out_channels), 0.01)
for pname, p in model.named_parameters():
    p.requires_grad_(pname.endswith("beta"))
model.eval()
for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
        m.train()
estimate = resources.estimate_step(model, torch.zeros(1, 3, size, size), paired=True,
                                   trainable=lambda n: n.endswith("beta"), optimizer_slots=2)

def step(b):
    out = model(torch.randn(2 * b, 3, size, size))[:b]
    F.cross_entropy(out, torch.randint(0, 10, (b,))).backward()
    for p in model.parameters():
        p.grad = None
"""

# Prediction over measurement stays within this factor either way (measured on the ResNets here:
# 0.8 to 1.3); the estimate errs on the high side for deep, narrow nets.
FACTOR = 1.6


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to measure peak RSS")
@pytest.mark.parametrize("name,size,batch", [("resnet20", 32, 64), ("resnet_digits", 8, 1024)])
def test_stage2_memory_prediction_matches_measurement(tmp_path, name, size, batch):
    predicted, measured = predicted_and_measured(tmp_path, MEASURE, name, size, batch)
    print(f"{name} {size}px, paired batch of {2 * batch}: predicted {predicted / 2**20:.0f} MiB, "
          f"measured {measured / 2**20:.0f} MiB")
    assert 1 / FACTOR <= predicted / measured <= FACTOR


MEASURE_AMP = r"""
import sys, torch, torch.nn.functional as F
torch.set_num_threads(1)
from scop_ext.models import build_model
from scop_ext import resources
name, size, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = build_model(name, 10, 3).train()
estimate = resources.estimate_step(model, torch.zeros(1, 3, size, size), paired=False, trainable=lambda n: True,
                                   optimizer_slots=1, activation_dtype=torch.bfloat16)

def step(b):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(torch.randn(b, 3, size, size)).float(), torch.randint(0, 10, (b,)))
    loss.backward()
    for p in model.parameters():
        p.grad = None
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to measure peak RSS")
def test_mixed_precision_memory_prediction_matches_measurement(tmp_path):
    """Fine-tuning under autocast (bfloat16 on the CPU, as float16/bfloat16 on CUDA) holds 16-bit activations."""
    predicted, measured = predicted_and_measured(tmp_path, MEASURE_AMP, "resnet20", 32, 64)
    print(f"resnet20 32px under bfloat16 autocast, batch 64: predicted {predicted / 2**20:.0f} MiB, "
          f"measured {measured / 2**20:.0f} MiB")
    assert 1 / FACTOR <= predicted / measured <= FACTOR


def test_estimate_scales_linearly_and_doubles_for_the_paired_batch():
    model = convert(build_model("resnet20", 10, 3))
    example = torch.zeros(1, 3, 32, 32)
    stats = {name: b.clone() for name, b in model.named_buffers()}
    everything = lambda n: True  # noqa: E731
    paired = resources.estimate_step(model, example, paired=True, trainable=everything, optimizer_slots=1)
    for layer in scop_layers(model).values():
        layer.disable_scop()
    plain = resources.estimate_step(model, example, paired=False, trainable=everything, optimizer_slots=1)
    # twice the images, and at most the real half's branch difference on top (kept for grad beta)
    assert 2.0 <= paired.per_sample / plain.per_sample <= 3.0
    assert paired.total(64) - paired.total(32) == 32 * paired.per_sample
    betas = resources.estimate_step(model, example, paired=True, trainable=lambda n: n.endswith("beta"), optimizer_slots=2)
    n_betas = sum(layer.out_channels for layer in scop_layers(model).values())
    assert betas.fixed == {"gradients": 4 * n_betas, "optimizer state": 8 * n_betas}
    # the trace ran on meta copies: the model's own tensors are where they were, untouched
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(torch.equal(b, stats[name]) for name, b in model.named_buffers())


def test_stage2_that_would_not_fit_is_refused_before_any_work(tmp_path, monkeypatch, capsys, baseline):
    config = PruneConfig(weights=baseline, **TINY)
    pruner = ScopPruner.from_config(config, tmp_path, progress=False, log=lambda *a: None)
    pruner.convert()
    betas = {name: layer.beta.detach().clone() for name, layer in scop_layers(pruner.model).items()}
    monkeypatch.setattr(resources, "available_memory", lambda device: 3 * 2**20)
    with pytest.raises(resources.ResourceError) as info:
        pruner.learn_scales()
    message = str(info.value)
    assert re.search(r"stage 2 \(learn_scales\) with batch_size=128 needs about [\d.]+ MiB \(activations [\d.]+ MiB, "
                     r".*pair cache [\d.]+ KiB\) but only 3.0 MiB is available on cpu; the largest batch size that "
                     r"fits is about (\d+) \(--batch-size \1\)", message), message
    largest = int(re.search(r"--batch-size (\d+)", message).group(1))
    assert 1 <= largest < 128
    assert not os.listdir(tmp_path), "stage 2 wrote something before refusing"
    assert all(torch.equal(betas[n], l.beta) for n, l in scop_layers(pruner.model).items())
    # the suggested batch size does fit
    pruner.config = PruneConfig(weights=baseline, **{**TINY, "batch_size": largest})
    pruner._require_memory("stage 2 (learn_scales)", paired=True, optimizer_slots=2,
                           host_cache=2 * len(pruner.train_set) * pruner.example.nbytes)
    monkeypatch.setattr(resources, "available_memory", lambda device: 2**10)
    with pytest.raises(resources.ResourceError, match="no batch size fits"):
        pruner.learn_scales()


def test_cli_reports_a_batch_that_would_not_fit_in_one_line(tmp_path, monkeypatch, capsys, baseline):
    monkeypatch.setattr(resources, "available_memory", lambda device: 2**20)
    status, lines = cli(capsys, "prune", "--weights", baseline, "--set", "latency=false", "--quiet",
                        "--out", tmp_path)
    assert status == 1 and len(lines) == 1, lines
    assert "needs about" in lines[0] and "1.0 MiB is available" in lines[0] and "largest batch size" in lines[0]
    assert json.loads((tmp_path / "state.json").read_text())["completed"] == ["knockoffs"]


@pytest.mark.parametrize("amp", [False, True])
def test_finetuning_is_checked_too(tmp_path, monkeypatch, baseline, amp):
    model, _ = load_model(baseline)
    pruner = ScopPruner.from_config(PruneConfig(weights=baseline, amp=amp, **TINY), tmp_path, model=model,
                                    progress=False, log=lambda *a: None)
    monkeypatch.setattr(resources, "available_memory", lambda device: 2**20)
    with pytest.raises(resources.ResourceError, match="fine-tuning with batch_size=128 needs about .*optimizer state") as info:
        pruner.finetune()
    assert ("16-bit weight copies" in str(info.value)) == amp  # checked under mixed precision too, as such
    assert not os.listdir(tmp_path)


def test_mixed_precision_halves_the_predicted_activations():
    model = build_model("resnet20", 10, 3)
    example, everything = torch.zeros(1, 3, 32, 32), lambda n: True  # noqa: E731
    full = resources.estimate_step(model, example, paired=False, trainable=everything, optimizer_slots=1)
    half = resources.estimate_step(model, example, paired=False, trainable=everything, optimizer_slots=1,
                                   activation_dtype=torch.float16)
    # max-pool indices and the fp32 input batch stay as they are; every floating activation halves
    assert 0.5 <= half.per_sample / full.per_sample <= 0.6
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert half.fixed == {**full.fixed, "16-bit weight copies": 2 * weights}
