"""The pruning pipeline and the `scop` command end to end on the bundled digits (tiny settings)."""

import json
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import scop_ext
from scop_ext import convert, scop_layers
from scop_ext.train.checkpoint import CheckpointError
from scop_ext.prune import PruningSpace, apply_plan, count_flops, make_importance, select
from scop_ext.export import export_onnx, export_torchscript, load_model
from scop_ext.run.config import PruneConfig
from scop_ext.run import ScopPruner
from scop_ext.train.epochs import NonFiniteError

from tests._helpers import cli
from tests.conftest import ENV, TINY, prune_args


def scop(*args, check=True, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "scop_ext.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"scop {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_api_end_to_end(baseline, tmp_path):
    config = PruneConfig(weights=baseline, flops_reduction=0.4, **TINY)
    results = ScopPruner.from_config(config, tmp_path, progress=False).run()
    assert results["flops_reduction"] == pytest.approx(0.4, abs=0.01)
    assert results["after"]["flops"] < results["before"]["flops"]
    assert results["after"]["top1"] > 0.5  # well above the 10% of chance after one epoch of fine-tuning
    for name in ("report.md", "report.json", "betas.png", "importance.png", "channels.png", "final.safetensors",
                 "final.json", "pruned.safetensors", "plan.json", "knockoffs.pt", "scales.pt", "state.json"):
        assert (tmp_path / name).exists(), name
    model, arch = load_model(tmp_path / "final")
    assert all(type(m) is nn.Conv2d for m in model.modules() if isinstance(m, nn.Conv2d))
    x = torch.randn(4, 1, 8, 8)
    assert count_flops(model, x[:1]) == results["after"]["flops"]
    # exported copies agree with the reloaded model
    export_torchscript(model, x, tmp_path / "m.ts")
    torch.testing.assert_close(torch.jit.load(str(tmp_path / "m.ts"))(x), model(x))
    ort = pytest.importorskip("onnxruntime")
    export_onnx(model, x, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), atol=1e-4, rtol=1e-4)


def test_validation_is_held_out_of_training(baseline, tmp_path):
    """Fine-tuning picks its epoch on a part of the training split nothing is trained on."""
    pruner = ScopPruner.from_config(PruneConfig(weights=baseline, val_fraction=0.2, **TINY), tmp_path, progress=False)
    fit_idx, val_idx = set(pruner.train_set.indices), set(pruner.val_set.indices)
    assert not fit_idx & val_idx and len(fit_idx | val_idx) == len(pruner.train_set.dataset)
    assert len(val_idx) == round(0.2 * len(pruner.train_set.dataset))
    assert pruner.train_aug.indices == pruner.train_set.indices
    assert ScopPruner.from_config(PruneConfig(weights=baseline, val_fraction=0.0, **TINY), tmp_path,
                      progress=False).val_set is None
    with pytest.raises(ValueError, match="val_fraction"):
        PruneConfig(weights=baseline, val_fraction=1.0).validate()


@pytest.mark.parametrize(
    "policy,params,check",
    [
        ("uniform", dict(ratio=0.5), lambda r: r["widths_after"]["layers.1.0.conv1"] == 16),
        ("global_ranking", dict(ratio=0.3), lambda r: sum(len(v) for v in r["removed"].values()) > 0),
        ("fdr", dict(fdr_q=0.2, min_channels=2), lambda r: all(w >= 2 for w in r["widths_after"].values())),
    ],
)
def test_policies_through_the_pipeline(baseline, tmp_path, policy, params, check):
    pruner = ScopPruner.from_config(PruneConfig(weights=baseline, policy=policy, **params, **TINY), tmp_path, progress=False)
    pruner.knockoffs = scop_ext.knockoffs.make_generator("gaussian").fit(pruner._loader(pruner.train_set, shuffle=False))
    pruner.convert()
    pruner.learn_scales()
    pruner.select()
    pruner.prune()
    assert check(pruner.results)
    assert (tmp_path / "scales-progress.pt").exists()  # stage 2 ran here, not resumed from another case
    pruner.model(torch.randn(2, 1, 8, 8))


def test_a_stage2_result_starts_another_pruner(baseline, tmp_path):
    """A model fresh from stage 2 (SCOP mode on, Lemma 2 biases fitted) is handed to a new pruner,
    as benchmarks/accuracy.py does to prune one stage 2 at several targets."""
    pruner = ScopPruner.from_config(PruneConfig(weights=baseline, **TINY), tmp_path / "a", progress=False)
    pruner.fit_knockoffs()
    pruner.convert()
    pruner.learn_scales()
    betas = {name: layer.beta.detach().clone() for name, layer in scop_layers(pruner.model).items()}
    again = ScopPruner.from_config(PruneConfig(weights=baseline, **TINY), tmp_path / "b", model=pruner.model,
                                   progress=False)
    assert (again.num_classes, again.in_channels) == (10, 1)
    layers = scop_layers(again.model)
    assert all(layer.scop_enabled for layer in layers.values())  # the size check left SCOP mode as it was
    assert all(torch.equal(layer.beta, betas[name]) for name, layer in layers.items())
    again.select()
    again.prune()


def test_progress_of_other_settings_is_refused_not_resumed(baseline, tmp_path):
    """A progress file left by a run with other settings is neither resumed nor overwritten."""
    first = ScopPruner.from_config(PruneConfig(weights=baseline, **TINY), tmp_path, progress=False)
    first.fit_knockoffs()
    first.convert()
    first.learn_scales()
    kept = (tmp_path / "scales-progress.pt").read_bytes()
    other = ScopPruner.from_config(PruneConfig(weights=baseline, **{**TINY, "scales_lr": 0.01}), tmp_path, progress=False)
    other.knockoffs = first.knockoffs
    other.convert()
    with pytest.raises(ValueError, match=r"holds a run of other settings \(scales_lr\), which is never overwritten"):
        other.learn_scales()
    assert (tmp_path / "scales-progress.pt").read_bytes() == kept
    assert all(torch.equal(layer.beta, torch.full_like(layer.beta, 0.5)) for layer in scop_layers(other.model).values())


def test_scop_train_refuses_the_progress_of_other_settings(tmp_path, capsys):
    from scop_ext.cli import main

    assert main(["train", "--epochs", "1", "--out", str(tmp_path)]) == 0
    kept = (tmp_path / "train-progress.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", "--epochs", "2", "--lr", "0.05", "--out", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "train-progress.pt: progress of a run with other settings (epochs: 1 there, 2 now, lr: 0.1 there, 0.05 now)" in lines[0]
    assert (tmp_path / "train-progress.pt").read_bytes() == kept


def test_global_ranking_normalizes_by_criterion():
    """SCOP's 2 beta - 1 is on one scale in every layer and is ranked raw; the rest are normalised."""
    ranking = dict(policy="global_ranking")
    assert PruneConfig(**ranking).policy_params()["normalize"] is None
    assert PruneConfig(**ranking, multiply_bn_gamma=True).policy_params()["normalize"] == "max"
    assert PruneConfig(**ranking, importance="l1").policy_params()["normalize"] == "max"
    assert PruneConfig(**ranking, importance="l1", normalize="none").policy_params()["normalize"] is None
    assert PruneConfig(**ranking, normalize="max").policy_params()["normalize"] == "max"
    with pytest.raises(ValueError, match="normalize must be 'auto', 'max' or 'none'"):
        PruneConfig(normalize="min").validate()


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_convert_prune_and_run(name):
    torch.manual_seed(0)
    model = scop_ext.models.build_model(f"torchvision:{name}", num_classes=10, in_channels=3).eval()
    convert(model)
    x = torch.randn(4, 3, 32, 32)
    out = model(x)  # paired batch through every ScopConv2d
    assert out.shape == (4, 10)
    out[:2].sum().backward()
    assert all(layer.beta.grad is not None for layer in scop_layers(model).values())
    scores = make_importance("scop")(model)
    space = PruningSpace(model, x[:1])
    plan = select(space, scores, "uniform", ratio=0.25)
    before = space.base_flops
    apply_plan(model, x[:1], plan)
    assert count_flops(model, x[:1]) == pytest.approx(before * (1 - space.reduction(plan)), rel=1e-6)
    assert model(x).shape == (4, 10)


def test_resume_after_kill_mid_stage(baseline, tmp_path):
    """SIGKILL during fine-tuning, then --resume: same final weights as a run never interrupted."""
    whole = tmp_path / "whole"
    scop(*prune_args(baseline, whole))
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "scop_ext.cli", *prune_args(baseline, killed)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "finetune-progress.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final.safetensors").exists(), "the run finished before it could be killed"
    scop(*prune_args(baseline, killed), "--resume")
    a, _ = load_model(whole / "final")
    b, _ = load_model(killed / "final")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_resume_refuses_a_changed_config(baseline, tmp_path):
    scop(*prune_args(baseline, tmp_path))
    proc = scop(*prune_args(baseline, tmp_path, "--fdr-q", "0.3"), "--resume", check=False)
    assert proc.returncode == 2 and "config differs" in proc.stderr and "fdr_q" in proc.stderr


def test_cli_commands(baseline, tmp_path):
    kn = tmp_path / "kn"
    scop("knockoffs", "fit", "--kind", "gaussian", "--out", str(kn))
    proc = scop("knockoffs", "check", "--knockoffs", str(kn / "knockoffs.pt"), "-n", "300", "--grid", "2", "2",
                "--max-dim", "16", "--out", str(kn / "check"))
    assert "exchangeability" in proc.stdout
    measured = json.loads((kn / "check" / "report.json").read_text())
    assert measured["grid"] == [2, 2] and measured["resolution"] == [1, 4, 4]  # 8x8 digits, 2x2 cells per block
    # the Gaussian's own 4x4 grid of 2x2 blocks is already 16 coordinates
    proc = scop("knockoffs", "check", "--knockoffs", str(kn / "knockoffs.pt"), "--max-dim", "8",
                "--out", str(kn / "small"), check=False)
    assert proc.returncode == 2 and "max_dim=8" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    run = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"weights: {baseline}\npolicy: uniform\nratio: 0.25\nscales_epochs: 1\nfinetune_epochs: 1\n"
                   "latency: false\nbn_batches: 2\n")
    proc = scop("prune", "--config", str(cfg), "--quiet", "--out", str(run))
    assert "FLOPs (2 x MACs" in proc.stdout
    scop("report", "--run", str(run), "--out", str(tmp_path / "rep"))
    assert (tmp_path / "rep" / "report.md").exists()
    scop("export", "--model", str(run / "final"), "--format", "torchscript", "--out", str(tmp_path / "exp"))
    assert (tmp_path / "exp" / "model.ts").exists()


def test_export_without_onnx(baseline, tmp_path, monkeypatch, capsys):
    """`all` skips ONNX with a note when it cannot be exported; asking for ONNX alone is one error line."""
    from scop_ext.cli import main

    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now fails, as where it is not installed
    assert main(["export", "--model", baseline, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "onnx: skipped, onnx is not installed (pip install onnx onnxscript)" in out
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "model.ts").exists()
    assert not (tmp_path / "model.onnx").exists()
    assert main(["export", "--model", baseline, "--format", "onnx", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "scop export: error: --format onnx: needs the onnx package (pip install onnx onnxscript)"]


def test_knockoffs_fit_resumes_a_gan_on_the_given_device(tmp_path, monkeypatch, capsys):
    from scop_ext.cli import main
    from scop_ext.knockoffs import KnockoffGAN, load

    devices = []
    real_fit = KnockoffGAN.fit
    monkeypatch.setattr(KnockoffGAN, "fit", lambda self, loader, **kw: devices.append(kw["device"]) or real_fit(self, loader, **kw))
    gan = ["knockoffs", "fit", "--kind", "gan", "--option", "checkpoint_every=5", "--option", "batch_size=32",
           "--option", "width=8", "--device", "cpu"]
    assert main([*gan, "--option", "iterations=10", "--out", str(tmp_path / "cut")]) == 0
    assert (tmp_path / "cut" / "knockoffs-progress.pt").exists()
    assert main([*gan, "--option", "iterations=20", "--resume", "--out", str(tmp_path / "cut")]) == 0
    assert main([*gan, "--option", "iterations=20", "--out", str(tmp_path / "whole")]) == 0
    assert devices == ["cpu"] * 3
    resumed, whole = load(tmp_path / "cut" / "knockoffs.pt"), load(tmp_path / "whole" / "knockoffs.pt")
    for (key, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key
    capsys.readouterr()
    assert main(["knockoffs", "fit", "--resume", "--out", str(tmp_path / "g")]) == 2
    assert "--resume: only --kind gan trains in steps that can be resumed, not 'gaussian'" in capsys.readouterr().err


def test_pipeline_gan_checkpoints_in_the_run_folder(tmp_path, monkeypatch):
    """A killed stage 1 resumes from knockoffs-progress.pt: the same generator as an uninterrupted fit."""
    from scop_ext.knockoffs.gan_trainer import GANTrainer

    def stage1(out):
        config = PruneConfig(knockoffs="gan", knockoff_options={"iterations": 20, "checkpoint_every": 5, "batch_size": 32, "width": 8}, **TINY)
        return ScopPruner.from_config(config, out, progress=False).fit_knockoffs()

    real_step, steps = GANTrainer.step, []

    def killed_after_10(self, x):
        if len(steps) == 10:
            raise KeyboardInterrupt  # the process dies here; the checkpoint after iteration 10 is on disk
        steps.append(1)
        return real_step(self, x)

    with monkeypatch.context() as m:
        m.setattr(GANTrainer, "step", killed_after_10)
        with pytest.raises(KeyboardInterrupt):
            stage1(tmp_path / "cut")
    assert (tmp_path / "cut" / "knockoffs-progress.pt").exists()
    resumed, whole = stage1(tmp_path / "cut"), stage1(tmp_path / "whole")
    assert next(resumed.parameters()).device.type == "cpu"
    for (key, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key


def test_config_file_and_flags_pick_the_same_default_device(tmp_path):
    from scop_ext.cli.entry import build_parser
    from scop_ext.cli.settings import prune_config, resolve_device

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("policy: uniform\n")
    for argv in ([], ["--config", str(cfg)]):
        args = build_parser().parse_args(["prune", *argv, "--out", str(tmp_path)])
        assert prune_config(args).device == resolve_device(None)
    cfg.write_text("device: cpu\n")
    assert prune_config(build_parser().parse_args(["prune", "--config", str(cfg), "--out", str(tmp_path)])).device == "cpu"


def test_prune_prints_the_table_on_process_0_only(tmp_path, monkeypatch, capsys):
    from scop_ext.cli import main
    from scop_ext.train import distributed

    process = {"rank": 1}
    monkeypatch.setattr(distributed, "setup", lambda device: True)
    monkeypatch.setattr(distributed, "teardown", lambda: process.update(rank=0))  # no group left: rank 0 everywhere
    monkeypatch.setattr(distributed, "rank", lambda: process["rank"])
    monkeypatch.setattr(ScopPruner, "from_config", classmethod(lambda cls, *a, **k: object.__new__(cls)))
    monkeypatch.setattr(ScopPruner, "run", lambda self, resume=False: {"before": {}, "after": {}})
    assert main(["prune", "--weights", "w", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out == ""


def test_importance_plot_draws_each_layers_cut(tmp_path, monkeypatch):
    import matplotlib.axes

    from scop_ext.plots import plot_curves, plot_importance

    cuts = []
    real = matplotlib.axes.Axes.hlines
    monkeypatch.setattr(matplotlib.axes.Axes, "hlines",
                        lambda self, y, lo, hi, **kw: cuts.append((y, (lo + hi) / 2)) or real(self, y, lo, hi, **kw))
    importance, removed = {"a": [-0.5, 0.1, 0.6], "b": [-0.2, 0.3], "c": [0.4, 0.9]}, {"a": [0], "b": [0]}
    plot_importance(importance, removed, str(tmp_path / "importance.png"))
    # midway between the highest removed and the lowest kept filter, over that layer's column;
    # layer c lost nothing, so it has no cut (the legend's empty entry is the last call)
    assert cuts[:2] == [(pytest.approx(-0.2), 0), (pytest.approx(0.05), 1)]
    assert (tmp_path / "importance.png").stat().st_size > 0
    plot_curves({"loss": [0.9, 0.7], "beta_mean": {"a": [0.5, 0.6]}},
                [{"epoch": 0, "train_loss": 1.0, "val_top1": 0.5}, {"epoch": 1, "train_loss": 0.8, "val_top1": 0.6}],
                str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_cli_help_on_every_command(capsys):
    from scop_ext.cli import main

    for cmd in (["--help"], ["train", "--help"], ["prune", "--help"], ["knockoffs", "fit", "--help"],
                ["knockoffs", "check", "--help"], ["report", "--help"], ["export", "--help"], ["demo", "--help"],
                ["info", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(cmd)
        assert exit_info.value.code == 0
        assert "usage: scop" in capsys.readouterr().out


def test_info_lists_every_registry(capsys):
    from scop_ext.cli import main
    from scop_ext.knockoffs import generator_kinds, make_generator
    from scop_ext.prune import criterion_names, policy_names

    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["knockoffs"] == generator_kinds() and "gaussian" in info["knockoffs"]
    assert info["importance"] == criterion_names() and "scop" in info["importance"]
    assert info["policies"] == policy_names() and "fdr" in info["policies"]
    for name in info["policies"]:  # every listed name is one a config accepts
        PruneConfig(policy=name).validate()
    for name in info["importance"]:
        PruneConfig(importance=name).validate()
        make_importance(name)
    assert type(make_generator("gaussian")).kind == "gaussian"


@pytest.mark.parametrize(
    "content,match",
    [
        ("policy: [unclosed", "malformed config"),
        ("- just\n- a list\n", "must be a mapping"),
        ("polcy: fdr\n", "unknown config keys \\['polcy'\\]"),
        ("fdr_q: 2.0\n", "fdr_q must be in \\(0, 1\\)"),
    ],
)
def test_malformed_configs_give_one_line(tmp_path, content, match):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(content)
    proc = scop("prune", "--config", str(cfg), "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(cfg) in lines[0]
    assert re.search(match, lines[0]), lines[0]


def test_missing_paths_are_reported(tmp_path):
    proc = scop("prune", "--weights", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "nope.safetensors" in proc.stderr
    proc = scop("train", "--dataset", "cifar10", "--data-root", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
                check=False)
    assert proc.returncode == 2 and "missing" in proc.stderr
    with pytest.raises(CheckpointError, match="no such model description"):
        load_model(tmp_path / "absent")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_SCRIPT = r"""
import sys, torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from scop_ext import convert, scop_layers
from scop_ext.train import distributed
from scop_ext.run import PruneConfig, ScopPruner
from scop_ext.scales import learn_scales, fit_knockoff_biases
from scop_ext.train.epochs import NonFiniteError
from scop_ext.train import fit, make_loader, evaluate
torch.set_num_threads(1)
distributed.setup("cpu")
out, global_batch, run_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
gen = torch.Generator().manual_seed(0)
x = torch.randn(128, 2, 6, 6, generator=gen); y = torch.randint(0, 3, (128,), generator=gen)
x[:, 0] += y[:, None, None]
pairs = TensorDataset(x, torch.randn(x.shape, generator=gen), y)

def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

net = convert(small_net())
fit_knockoff_biases(net, DataLoader(pairs, 64), "cpu", batches=1)  # same data on every rank
per_rank = global_batch // distributed.world_size()
learn_scales(net, make_loader(pairs, per_rank, shuffle=True, seed=3), "cpu", epochs=2, bn="frozen", progress=False)
for layer in scop_layers(net).values():
    layer.disable_scop()  # evaluate the plain network
metrics = evaluate(net, make_loader(TensorDataset(x, y), 50, shuffle=False, evaluation=True), "cpu")
# stage 1 and the BN recalibration of stage 4, through the pipeline
torch.manual_seed(0)
pruner = ScopPruner.from_config(PruneConfig(batch_size=64, bn_batches=3, latency=False), run_dir, progress=False)
knockoffs = {k: v.clone() for k, v in pruner.fit_knockoffs().state_dict().items()}
pruner.recalibrate_bn()
bn = {k: v.clone() for k, v in pruner.model.state_dict().items() if ".running_" in k}
# image 20 lies in process 1's half of the first global batch
poisoned = x.clone()
poisoned[20] = float("nan")
try:
    fit(small_net(), make_loader(TensorDataset(poisoned, y), per_rank, shuffle=False), None, epochs=1, lr=0.1,
        device="cpu", progress=False)
    error = None
except NonFiniteError as exc:
    error = str(exc)
torch.save({"betas": {n: l.beta.detach() for n, l in scop_layers(net).items()}, "metrics": metrics,
            "knockoffs": knockoffs, "bn": bn, "error": error}, f"{out}.{distributed.rank()}")
distributed.teardown()
"""


def test_ddp_two_processes_match_one(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    single = tmp_path / "single.pt"
    subprocess.run([sys.executable, str(script), str(single), "32", str(tmp_path / "run1")], check=True, env=ENV,
                   timeout=300)
    double = tmp_path / "double.pt"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                    str(_free_port()), str(script), str(double), "32", str(tmp_path / "run2")], check=True, env=ENV,
                   timeout=300, capture_output=True)
    a, b, b1 = torch.load(f"{single}.0"), torch.load(f"{double}.0"), torch.load(f"{double}.1")
    for name, beta in a["betas"].items():
        assert not torch.equal(beta, torch.full_like(beta, 0.5))
        torch.testing.assert_close(b["betas"][name], beta, atol=1e-5, rtol=1e-4)
    assert a["metrics"] == pytest.approx(b["metrics"])
    assert b["metrics"]["count"] == 128
    # every process holds the one generator and the BN statistics one process computes
    for part in ("knockoffs", "bn"):
        assert a[part].keys() == b[part].keys() == b1[part].keys() and a[part]
        for key, value in a[part].items():
            assert torch.equal(b[part][key], b1[part][key]), f"{part} {key} differs between the processes"
            assert torch.equal(b[part][key], value), f"{part} {key} differs from one process's"
    # a NaN only process 1 saw stopped both processes, with one message
    assert a["error"].startswith("finetune: loss became nan at epoch 0, step 0")
    assert b["error"] == b1["error"] == a["error"] + " (found by process 1 of 2)"


# ------------------------------------------------------------------- faults and determinism


@pytest.mark.usefixtures("one_thread")
def test_cli_reports_a_numerical_fault_in_one_line(monkeypatch, tmp_path, capsys):
    def fail(self, resume=False):
        raise NonFiniteError("learn_scales: loss became nan at epoch 3, step 7; first non-finite output: layer conv1 (ScopConv2d)")

    monkeypatch.setattr(ScopPruner, "from_config", classmethod(lambda cls, *a, **k: object.__new__(cls)))
    monkeypatch.setattr(ScopPruner, "run", fail)
    status, lines = cli(capsys, "prune", "--weights", "w", "--out", tmp_path)
    assert status == 1 and len(lines) == 1
    assert "epoch 3, step 7" in lines[0] and "layer conv1" in lines[0] and "rerun with --resume" in lines[0]


@pytest.mark.usefixtures("one_thread")
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
