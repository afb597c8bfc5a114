"""Hostile but realistic input to the ``scop`` command (issue 11): each case ends in one line on
stderr naming the argument or file and what was expected, with exit status 2, or, where the input
is legitimate, in a correct result.

Most cases run in this process through ``scop_ext.cli.main``; a few run as real ``scop``
processes, for the exit status and stderr a user sees, and two real processes contend for one
run folder's lock.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from scop_ext.train import checkpoint
from scop_ext.cli import main
from scop_ext.knockoffs import KnockoffGAN, make_generator
from scop_ext.models import build_model
from scop_ext.export import load_model, save_model
from scop_ext.run.lock import LOCK_NAME, RunLock

from tests._helpers import assert_one_line, cli
from tests.conftest import ENV

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = ["--scales-epochs", "1", "--finetune-epochs", "1", "--batch-size", "128", "--set", "latency=false",
         "--set", "bn_batches=2", "--quiet"]


# ------------------------------------------------------------------------------ test data

def image_tree(root: Path, classes=("a", "b"), *, broken: bool = False, per_class: int = 4) -> Path:
    """root/{train,val}/<class>/*.png: valid 8x8 RGB images, or random bytes named .png."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(per_class):
                path = folder / f"{i}.png"
                if broken:
                    path.write_bytes(rng.bytes(200))
                else:
                    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)
    return root


def edited_stem(baseline: str, to: Path, **arch) -> Path:
    """A copy of the baseline model stem with its description's keys set to ``arch``."""
    to.mkdir(parents=True, exist_ok=True)
    shutil.copy(baseline + ".safetensors", to / "model.safetensors")
    description = {**json.loads(Path(baseline + ".json").read_text()), **arch}
    (to / "model.json").write_text(json.dumps(description))
    return to / "model"


def gan_file(path: Path, **config) -> Path:
    """A knockoffs file of a KnockoffGAN whose recorded config is edited by ``config``."""
    gen = KnockoffGAN(shape=(1, 8, 8), width=4, iterations=1)
    gen.save(path)
    payload = checkpoint.load(path, "knockoff-generator")
    payload["config"] = json.dumps({**json.loads(payload["config"]), **config})
    checkpoint.save(path, "knockoff-generator", payload)
    return path


@pytest.fixture(scope="module")
def knockoffs_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("knockoffs")
    assert main(["knockoffs", "fit", "--out", str(out)]) == 0
    return out / "knockoffs.pt"


@pytest.fixture(scope="module")
def finished_run(baseline, tmp_path_factory) -> Path:
    """A complete `scop prune` folder (read only: copy it to change it)."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["prune", "--weights", baseline, *QUICK, "--out", str(out)]) == 0
    return out


def run_copy(finished_run: Path, to: Path) -> Path:
    shutil.copytree(finished_run, to)
    return to


def quick_prune(baseline, out, *extra) -> list[str]:
    return ["prune", "--weights", baseline, *QUICK, "--out", str(out), *extra]


# ------------------------------------------------------------------------------ the table
# Each case: (tmp_path, baseline, fixtures) -> (argv, what the line must name, pattern).

def _damaged_state(t, b, f):
    run = run_copy(f["run"], t / "run")
    state = json.loads((run / "state.json").read_text())
    (run / "state.json").write_text(json.dumps({"completed": state["completed"]}))
    return quick_prune(b, run, "--resume"), run / "state.json", r"cannot resume: not a scop run state"


def _scales_without_generators(t, b, f):
    run = run_copy(f["run"], t / "run")
    path = run / "scales-progress.pt"
    payload = checkpoint.load(path, "scales-progress")
    del payload["generators"]
    checkpoint.save(path, "scales-progress", payload)
    state = json.loads((run / "state.json").read_text())
    (run / "state.json").write_text(json.dumps({**state, "completed": ["knockoffs"]}))
    return quick_prune(b, run, "--resume"), path, r"malformed checkpoint \(lacks 'generators'\)"


def _nan_weights(t, b, f):
    stem = edited_stem(b, t / "nan")
    state = load_file(f"{stem}.safetensors")
    state["layers.1.0.conv2.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, f"{stem}.safetensors")
    return quick_prune(stem, t / "o"), f"{stem}.safetensors", r"tensor 'layers.1.0.conv2.weight' holds NaN or Inf"


def _small_model(t, num_classes, in_channels):
    stem = t / "m" / "model"
    save_model(build_model("resnet_digits", num_classes, in_channels), stem, model_name="resnet_digits",
               num_classes=num_classes, in_channels=in_channels)
    return str(stem)


def _config_file(t, name, text):
    (t / name).write_text(text)
    return t / name


CASES = {
    # 1, 10: a number of epochs that trains nothing
    "train epochs 0": lambda t, b, f: (["train", "--epochs", "0", "--out", t / "o"], "epochs", r"integer >= 1, got 0"),
    "train epochs -1": lambda t, b, f: (["train", "--epochs", "-1", "--out", t / "o"], "epochs", r">= 1, got -1"),
    "train lr inf": lambda t, b, f: (["train", "--lr", "inf", "--out", t / "o"], "lr", r"finite number > 0, got inf"),
    # 2: undecodable images
    "imagefolder of random bytes": lambda t, b, f: (
        ["train", "--dataset", "imagefolder", "--data-root", image_tree(t / "img", broken=True), "--epochs", "1",
         "--out", t / "o"], t / "img", r"\.png: not a readable image \(UnidentifiedImageError"),
    # 3: knockoff options, refused before the data or model are loaded (--weights does not exist)
    "unknown knockoff option": lambda t, b, f: (
        ["prune", "--weights", t / "none", "--set", "knockoff_options={shrink: banana}", "--out", t / "o"],
        "knockoff_options", r"unexpected keyword argument 'shrink'; it takes shape, block, working_size, method, shrinkage"),
    "knockoff option nosuch": lambda t, b, f: (
        ["prune", "--weights", t / "none", "--set", "knockoff_options={nosuch: 1}", "--out", t / "o"],
        "knockoff_options", r"'nosuch'"),
    "bad knockoff option value": lambda t, b, f: (
        ["prune", "--weights", t / "none", "--set", "knockoff_options={shrinkage: banana}", "--out", t / "o"],
        "knockoff_options", r"shrinkage must be 'ledoit-wolf' or a number"),
    "knockoff option of the wrong type": lambda t, b, f: (
        ["prune", "--knockoffs", "gan", "--set", "knockoff_options={lr: fast}", "--out", t / "o"],
        "knockoff_options", r"gan knockoffs: an option of the wrong type"),
    "knockoffs fit --option nosuch": lambda t, b, f: (
        ["knockoffs", "fit", "--option", "nosuch=1", "--out", t / "o"], "gaussian knockoffs", r"'nosuch'.*it takes"),
    # 4: sizes read from files
    "sidecar num_classes 1e9": lambda t, b, f: (
        ["export", "--model", edited_stem(b, t / "s", num_classes=10**9), "--out", t / "o"], t / "s" / "model.json",
        r"num_classes must be at most 100000, got 1000000000"),
    "sidecar num_classes 1e30": lambda t, b, f: (
        quick_prune(edited_stem(b, t / "s", num_classes=10**30), t / "o"), t / "s" / "model.json", r"num_classes must be"),
    "sidecar num_classes float": lambda t, b, f: (
        quick_prune(edited_stem(b, t / "s", num_classes=1e30), t / "o"), t / "s" / "model.json", r"num_classes"),
    "sidecar in_channels 1e9": lambda t, b, f: (
        ["export", "--model", edited_stem(b, t / "s", in_channels=10**9), "--out", t / "o"], t / "s" / "model.json",
        r"in_channels must be at most 1024, got 1000000000"),
    "sidecar naming vit_h_14": lambda t, b, f: (
        ["export", "--model", edited_stem(b, t / "s", model="torchvision:vit_h_14"), "--out", t / "o"],
        t / "s" / "model.json", r"model 'torchvision:vit_h_14' is a transformer"),
    "gan file noise_channels 1e9": lambda t, b, f: (
        ["knockoffs", "check", "--knockoffs", gan_file(t / "k.pt", noise_channels=10**9), "--out", t / "o"],
        t / "k.pt", r"noise_channels=1000000000 .* would hold 7.2e\+10 parameters; at most 1e\+09"),
    # 5: output paths (a read-only filesystem and a full disk: their own tests below)
    "--out under /sys": lambda t, b, f: (["train", "--epochs", "1", "--out", "/sys/scop-test"], "/sys/scop-test",
                                         r"Operation not permitted|Read-only file system|Permission denied"),
    "--out under a file": lambda t, b, f: (
        ["train", "--out", _config_file(t, "file", "x") / "sub"], t / "file", r"which is a file, expected a folder"),
    "--out is a file": lambda t, b, f: (
        quick_prune(b, _config_file(t, "file", "x")), t / "file", r"is a file, expected a folder"),
    # 6: an image size that would not fit while loading the data
    "image_size 30000": lambda t, b, f: (
        ["prune", "--dataset", "imagefolder", "--data-root", t, "--set", "image_size=30000", "--out", t / "o"],
        "image_size", r"1\.\.4096, got 30000"),
    # 7, 15: data that does not fit the model
    "RGB data, 1-channel model": lambda t, b, f: (
        ["prune", "--weights", b, "--dataset", "imagefolder", "--data-root", image_tree(t / "img"), "--set",
         "image_size=8", "--out", t / "o"], "3-channel images", r"the model \(.*\) takes 1 channels"),
    "more classes than outputs": lambda t, b, f: (
        ["prune", "--weights", _small_model(t, 1, 3), "--dataset", "imagefolder", "--data-root", image_tree(t / "img"),
         "--set", "image_size=8", "--out", t / "o"], "2 classes", r"has 1 outputs"),
    # 8
    "export image size 0": lambda t, b, f: (["export", "--model", b, "--image-size", "0", "--out", t / "o"],
                                            "--image-size", r"1\.\.4096, got 0"),
    "export image size -3": lambda t, b, f: (["export", "--model", b, "--image-size", "-3", "--out", t / "o"],
                                             "--image-size", r"got -3"),
    # 9: damaged run folders
    "state.json []": lambda t, b, f: (
        ["report", "--run", _config_file(t, "state.json", "[]").parent], t / "state.json", r"not a scop run state"),
    "state.json without results": _damaged_state,
    "scales progress without generators": _scales_without_generators,
    # 11
    "knockoffs check -n -5": lambda t, b, f: (
        ["knockoffs", "check", "--knockoffs", f["knockoffs"], "-n", "-5", "--out", t / "o"], "n must", r"got -5"),
    # 12: non-finite hyper-parameters, refused by the config validation wherever they come from
    "scales_lr inf": lambda t, b, f: (["prune", "--set", "scales_lr=.inf", "--out", t / "o"], "scales_lr",
                                      r"must be a finite number, got inf"),
    "finetune_lr nan": lambda t, b, f: (["prune", "--finetune-lr", "nan", "--out", t / "o"], "finetune_lr", r"finite"),
    "scales_betas nan": lambda t, b, f: (["prune", "--set", "scales_betas=[0.5, .nan]", "--out", t / "o"],
                                         "scales_betas[1]", r"finite"),
    "knockoff_options inf": lambda t, b, f: (
        ["prune", "--knockoffs", "gan", "--set", "knockoff_options={lr: .inf}", "--out", t / "o"],
        "knockoff_options.lr", r"finite"),
    "config file inf": lambda t, b, f: (
        ["prune", "--config", _config_file(t, "c.yaml", "ratio: .nan\npolicy: uniform\n"), "--out", t / "o"],
        t / "c.yaml", r"ratio must be a finite number"),
    # 13: a key given twice
    "duplicate key JSON": lambda t, b, f: (
        ["prune", "--config", _config_file(t, "c.json", '{"ratio": 0.3, "ratio": 0.6}'), "--out", t / "o"],
        t / "c.json", r"duplicate key 'ratio'"),
    "duplicate key YAML": lambda t, b, f: (
        ["prune", "--config", _config_file(t, "c.yaml", "ratio: 0.3\nbn: batch\nratio: 0.6\n"), "--out", t / "o"],
        t / "c.yaml", r"duplicate key 'ratio'"),
    "duplicate key in --set": lambda t, b, f: (
        ["prune", "--set", "knockoff_options={method: equi, method: sdp}", "--out", t / "o"], "--set",
        r"duplicate key 'method'"),
    # 14: a config naming another model than the stem's description
    "--model disagrees with the stem": lambda t, b, f: (
        quick_prune(b, t / "o", "--model", "resnet20"), f"{b}.json", r"is a 'resnet_digits' model .* but model is 'resnet20'"),
    # 16: another run's folder
    "other settings' run, no --resume": lambda t, b, f: (
        quick_prune(b, run_copy(f["run"], t / "run"), "--seed", "2"), t / "run",
        r"holds a run of other settings \(seed: 0 there, 2 now\), which is never overwritten"),
    "a train folder, no --resume": lambda t, b, f: (
        quick_prune(b, t / "tr") if main(["train", "--epochs", "1", "--out", str(t / "tr")]) == 0 else [],
        t / "tr", r"holds the files of a `scop train` run.*`scop prune` never writes into another command.s folder"),
    # 17
    "unknown skip name": lambda t, b, f: (
        quick_prune(b, t / "o", "--set", "skip=[layers.0.0.conv9]"), "skip", r"'layers.0.0.conv9' names no convolution "
                                                                             r"of the model; nearest: layers.0.0.conv2, layers.0.0.conv1"),
    "unknown ignored_layers name": lambda t, b, f: (
        quick_prune(b, t / "o", "--set", "ignored_layers=['*.downsample.*']"), "ignored_layers", r"names no convolution"),
    # the NaN weight message names the file and the layer
    "NaN weights": _nan_weights,
}


@pytest.fixture
def fixtures(request):
    """The module fixtures a case needs, created only when it needs them."""
    class Lazy(dict):
        def __missing__(self, key):
            value = request.getfixturevalue({"run": "finished_run", "knockoffs": "knockoffs_file"}[key])
            self[key] = value
            return value
    return Lazy()


@pytest.mark.parametrize("case", CASES)
def test_refused_in_one_line(case, tmp_path, baseline, fixtures, capsys):
    argv, named, pattern = CASES[case](tmp_path, baseline, fixtures)
    capsys.readouterr()  # what a case's set-up printed
    assert_one_line(*cli(capsys, *argv), named, pattern)


@pytest.mark.parametrize("case", ["train epochs 0", "knockoffs fit --option nosuch", "--out under /sys",
                                  "sidecar naming vit_h_14"])
def test_refused_by_a_real_scop_process(case, tmp_path, baseline, fixtures):
    argv, named, pattern = CASES[case](tmp_path, baseline, fixtures)
    proc = subprocess.run([sys.executable, "-m", "scop_ext.cli", *map(str, argv)], capture_output=True, text=True,
                          env=ENV, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert_one_line(proc.returncode, lines, named, pattern)
    assert "Traceback" not in proc.stderr


def test_refused_runs_leave_the_other_run_as_it_was(finished_run, tmp_path, baseline, capsys):
    """Item 16: refusing is not enough, nothing of the other run may be deleted or rewritten."""
    run = run_copy(finished_run, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != LOCK_NAME}
    assert "finetune-progress.pt" in before
    assert_one_line(*cli(capsys, *quick_prune(baseline, run, "--seed", "2")), run, "other settings")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != LOCK_NAME} == before


def test_the_stem_names_the_model_and_its_classes_survive(tmp_path, capsys):
    """Items 14 and 15, the legitimate side: a 2-class RGB model pruned on 1-class data (no --model
    given) records the stem's model and its 2 outputs, and the result reloads."""
    stem = _small_model(tmp_path, 2, 3)
    data = image_tree(tmp_path / "img", classes=("only",), per_class=6)
    assert main(["prune", "--weights", stem, "--dataset", "imagefolder", "--data-root", str(data), "--set",
                 "image_size=8", *QUICK, "--out", str(tmp_path / "o")]) == 0
    model, arch = load_model(tmp_path / "o" / "final")
    assert (arch["model"], arch["num_classes"], arch["in_channels"]) == ("resnet_digits", 2, 3)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 2)


def test_nan_weights_given_as_a_module_name_the_layer(baseline):
    """The Lemma 2 fit of a model handed over in memory names the layer whose weight is NaN."""
    from scop_ext.run.config import PruneConfig
    from scop_ext.run import ScopPruner

    model, _ = load_model(baseline)
    with torch.no_grad():
        model.layers[1][0].conv2.weight[0, 0, 0, 0] = float("inf")
    config = PruneConfig(weights=baseline, scales_epochs=1, bn_batches=2, latency=False, batch_size=128)
    pruner = ScopPruner.from_config(config, "/nonexistent/never-written", model=model, progress=False, log=lambda *a: None)
    pruner.knockoffs = make_generator("gaussian").fit(pruner._loader(pruner.train_set, shuffle=False))
    pruner.convert()
    with pytest.raises(ValueError, match=r"layer 'layers.1.0.conv2': weight contains NaN or Inf"):
        pruner.learn_scales()


# ------------------------------------------------------------------------------ full disk

@pytest.mark.parametrize("command", ["train", "prune"])
def test_full_disk_keeps_the_folder_resumable(command, tmp_path, baseline, monkeypatch, capsys):
    """ENOSPC in the middle of a run: one line naming the file, saying the folder is resumable;
    freeing the space and rerunning continues and finishes."""
    out = tmp_path / "o"
    argv = ["train", "--epochs", "3", "--out", out] if command == "train" else quick_prune(baseline, out)
    target = "metrics.json" if command == "train" else "report.json"
    real = checkpoint.tempfile.mkstemp

    def full(*args, suffix="", **kwargs):
        if suffix == target:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, suffix=suffix, **kwargs)

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", full)
    assert_one_line(*cli(capsys, *argv), out / target, r"No space left on device; the folder is left resumable")
    assert not [p for p in out.iterdir() if p.name.startswith(checkpoint.TEMP_PREFIX)]
    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", real)
    assert cli(capsys, *argv + (["--resume"] if command == "prune" else []))[0] == 0
    assert (out / target).exists()


def _tmpfs(path: Path, options: str) -> Path:
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()})")
    return path


@pytest.fixture
def small_disk(tmp_path):
    disk = _tmpfs(tmp_path / "disk", "size=600k")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


@pytest.fixture
def read_only(tmp_path):
    disk = _tmpfs(tmp_path / "ro", "ro,size=64k")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


def test_a_real_full_disk_during_prune(small_disk, baseline, capsys, tmp_path):
    out = small_disk / "run"
    status, lines = cli(capsys, *quick_prune(baseline, out))
    assert_one_line(status, lines, out, r"No space left on device; the folder is left resumable.*--resume")
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    assert cli(capsys, *quick_prune(baseline, out, "--resume"))[0] == 0
    load_model(out / "final")


def test_a_read_only_filesystem(read_only, capsys):
    assert_one_line(*cli(capsys, "train", "--epochs", "1", "--out", read_only / "x"), read_only / "x",
                   r"Read-only file system \(--out must be a folder this user can write\)")


# ------------------------------------------------------------------------------ umask

def test_files_honour_the_umask(tmp_path, capsys):
    old = os.umask(0o027)
    try:
        assert main(["train", "--epochs", "1", "--out", str(tmp_path / "o")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "o").iterdir()}
    assert modes and set(modes.values()) == {0o640}, modes


# ------------------------------------------------------------------------------ the run lock

def test_one_live_run_per_folder(baseline, tmp_path, capsys):
    """Item 18 with a real holder process: a second run into a live run's folder is refused naming
    the holder's pid and changes nothing; once the holder is SIGKILLed, --resume takes the lock
    over and finishes. The holder is paused (SIGSTOP) while the others try, so it is still alive
    however slowly they start on a busy machine; they run in this process (the lock is the
    holder's, not this process's), which spares two interpreter starts."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "scop_ext.cli", *quick_prune(baseline, out)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        for line in first.stdout:  # stage 2 has started: the folder holds the first run's files
            if line.startswith("[scales] running"):
                break
        else:
            pytest.fail(f"the first run ended early ({first.wait()})")
        first.send_signal(signal.SIGSTOP)
        assert (out / LOCK_NAME).read_text().strip() == str(first.pid)
        files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        for extra in (["--seed", "2"], ["--resume"]):
            assert_one_line(*cli(capsys, *quick_prune(baseline, out, *extra)), f"pid {first.pid}",
                            r"in use by another scop run")
        assert first.poll() is None
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == files
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert main(quick_prune(baseline, out, "--resume")) == 0, capsys.readouterr().err
    assert "[knockoffs] loaded" in capsys.readouterr().err
    load_model(out / "final")


def test_lock_is_exclusive_and_freed_on_release(tmp_path):
    with RunLock(tmp_path) as held:
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
        probe = subprocess.run([sys.executable, "-c", "import sys; from scop_ext.run.lock import RunLock; "
                                "RunLock(sys.argv[1]).acquire()", str(tmp_path)], capture_output=True, text=True, env=ENV)
        assert probe.returncode != 0 and f"pid {os.getpid()}" in probe.stderr
        assert held.acquire() is held  # re-entrant within the holder
    RunLock(tmp_path).acquire().release()
