"""`scop plan` (scop_ext.planner) and the `authors` preset: the paper's FLOPs rows, a closed form
of the authors' scheme, config precedence, learned scales of a finished run, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from scop_ext.cli import main
from scop_ext.run.config import PruneConfig
from scop_ext.run.dry_run import dry_run
from scop_ext.run.presets import PRESETS

from tests.conftest import ENV, prune_args


def scop(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "scop_ext.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"scop {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def plan_json(*args: str) -> dict:
    return json.loads(scop("plan", *args, "--json").stdout)


# The paper's rows (DESIGN.md §1) as the authors' scheme gives them: FLOPs and params reductions
# in percent, with the stem and downsample convs left whole. ResNet-50 at its own 224 px: at lower
# resolutions the unpruned classifier's share of the FLOPs grows (0.6% at 64 px) and moves the ratio.
ROWS = [
    ("resnet56", 0.45, 56.0, 56.1),
    ("resnet20", 0.45, 55.8, 56.3),
    ("torchvision:resnet50", 0.35, 45.4, 42.8),
    ("torchvision:resnet50", 0.44, 54.7, 51.3),
]


@pytest.mark.parametrize("model, ratio, flops, params", ROWS)
def test_paper_rows_with_one_command(model, ratio, flops, params):
    result = plan_json("--model", model, "--preset", "authors", "--ratio", str(ratio), "--scores", "random")
    assert abs(100 * result["flops"]["reduction"] - flops) <= 0.3
    assert abs(100 * result["params"]["reduction"] - params) <= 0.3
    assert result["predicted_flops_reduction"] == pytest.approx(result["flops"]["reduction"], abs=1e-12)
    scattered = {layer["conv"] for layer in result["layers"] if layer["scattered"]}
    assert scattered and all(c.endswith(("conv2", "conv3")) for c in scattered)


def cifar_closed_form(depth: int, ratio: float) -> tuple[int, int, int, int]:
    """(FLOPs before, after, params before, after) of our CIFAR ResNet (option B shortcuts) under
    the authors' scheme: every conv but the stem and the shortcuts keeps C - floor(ratio C)
    filters; a block's second conv reads its first conv's kept ones and is scattered back."""
    n, widths, classes = (depth - 2) // 6, (16, 32, 64), 10

    def kept(c):
        return c - math.floor(ratio * c)

    macs, params = [0, 0], [0, 0]
    side, c_in = 32, 16
    for i, k in enumerate((lambda c: c, kept)):
        macs[i] = 16 * 3 * 9 * 32 * 32 + 64 * classes
        params[i] = 16 * 3 * 9 + 2 * 16 + 64 * classes + classes
        side, c_in = 32, 16
        for s, w in enumerate(widths):
            side = side // 2 if s else side
            for b in range(n):
                first_in = c_in if b == 0 else w
                macs[i] += (k(w) * first_in * 9 + k(w) * k(w) * 9) * side * side
                params[i] += k(w) * first_in * 9 + k(w) * k(w) * 9 + 2 * 2 * k(w)
                if b == 0 and s > 0:  # projection shortcut, never pruned
                    macs[i] += w * first_in * side * side
                    params[i] += w * first_in + 2 * w
            c_in = w
    return 2 * macs[0], 2 * macs[1], params[0], params[1]


@pytest.mark.parametrize("model, ratio", [("resnet20", 0.45), ("resnet56", 0.45), ("resnet20", 0.3)])
def test_authors_scheme_matches_its_closed_form(model, ratio):
    result = dry_run(PruneConfig.from_dict({"model": model, "preset": "authors", "ratio": ratio}), "l1")
    f0, f1, p0, p1 = cifar_closed_form(int(model[6:]), ratio)
    assert (result["flops"]["before"], result["flops"]["after"]) == (f0, f1)
    assert (result["params"]["before"], result["params"]["after"]) == (p0, p1)


def test_preset_fills_only_the_keys_not_given(tmp_path):
    config = PruneConfig.from_dict({"preset": "authors", "ratio": 0.3, "finetune_epochs": 5})
    assert (config.ratio, config.finetune_epochs) == (0.3, 5)
    for key, value in PRESETS["authors"].items():
        if key not in ("ratio", "finetune_epochs"):
            assert (list if key == "scales_betas" else type(value))(getattr(config, key)) == value, key
    assert PruneConfig().block_width == "prune" and PruneConfig().knockoff_bias  # our defaults differ
    # A config file's preset, then a flag over it, then --set over both.
    (tmp_path / "c.yaml").write_text("preset: authors\nmodel: resnet20\nratio: 0.2\n")
    settings = plan_json("--config", str(tmp_path / "c.yaml"), "--ratio", "0.3", "--set", "round_to=2")["settings"]
    assert (settings["ratio"], settings["round_to"], settings["block_width"], settings["preset"]) == (0.3, 2, "scatter", "authors")


def test_plan_text_output():
    out = scop("plan", "--model", "resnet_digits", "--policy", "flops_target", "--flops-reduction", "0.4",
               "--block-width", "scatter", "--set", "skip=[conv1]", "--scores", "l1").stdout
    rows = {l.split(" | ")[0][2:]: l.split(" | ")[1:] for l in out.splitlines() if l.startswith("| ") and "---" not in l}
    assert rows["conv1"] == ["16", "16 |"]  # skipped: not wrapped, so not scored
    assert rows["layers.1.0.conv2"][1].endswith("(scattered to 32) |")
    line = next(l for l in out.splitlines() if l.startswith("FLOPs (2 x MACs, one image)"))
    assert abs(float(line.split(", ")[-1].split("%")[0]) - 40) <= 1.0  # flops_target's 1-point tolerance


@pytest.mark.parametrize("args, message", [
    (["--scores", "best"], "--scores must be random, l1 or run:<dir>"),
    (["--scores", "run:/no/such/run"], "--scores run:/no/such/run: no such run folder"),
    (["--model", "resnet7"], "unknown model name 'resnet7'"),
    (["--preset", "theirs"], "preset must be one of authors"),
    (["--block-width", "wide"], "block_width must be one of prune, keep, scatter"),
    (["--set", "keep_block_width=true"], "keep_block_width was replaced by block_width"),
    (["--num-classes", "0"], "--num-classes must be >= 1"),
    (["--weights", "/no/such.safetensors"], "/no/such.safetensors"),
])
def test_plan_bad_input_is_one_line(args, message, capsys):
    assert main(["plan", "--model", "resnet20", *args]) == 2  # in process: one interpreter start for all
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and message in err and out == ""


def test_plan_from_a_finished_runs_scales_is_what_the_run_pruned(baseline, tmp_path):
    run = tmp_path / "run"
    scop(*prune_args(baseline, run, "--preset", "authors", "--finetune-epochs", "1"))
    result = plan_json("--preset", "authors", "--scores", f"run:{run}")  # model and weights: the run's
    assert result["weights"] == baseline
    assert result["removed"] == json.loads((run / "plan.json").read_text())
    final = json.loads((run / "final.json").read_text())
    assert {layer["conv"]: layer["after"] for layer in result["layers"]} == final["widths"]
    assert sorted(layer["conv"] for layer in result["layers"] if layer["scattered"]) == final["scatter"]
    # Other settings on the same scales: a different plan, but from the same learned statistics.
    other = plan_json("--preset", "authors", "--ratio", "0.25", "--scores", f"run:{run}")
    assert sum(map(len, other["removed"].values())) < sum(map(len, result["removed"].values()))
