"""scop's file formats read and written safely (scop_ext.checkpoint): pickles with payloads are
refused before they run; truncated, corrupt, wrong-version and wrong-kind files give one error
line naming the file (through the API and the ``scop`` command, exit status 2); every run file
arrives by an atomic rename."""

from __future__ import annotations

import builtins
import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from scop_ext.train import checkpoint
from scop_ext.train.checkpoint import CheckpointError
from scop_ext.export import save_model
from scop_ext.knockoffs import GaussianKnockoffs
from scop_ext.knockoffs import load as load_generator
from scop_ext.models import build_model
from scop_ext.run.report import write_report

from tests._helpers import _cuts, _tiny_net, assert_one_line, cli
from tests.conftest import ENV

pytestmark = pytest.mark.usefixtures("one_thread")


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
