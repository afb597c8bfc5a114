"""What a new user sees: every stage's epoch lines and metrics file, the report's latency timed in
turns without touching malloc, a step-by-step run that `scop report` reads, unfinished runs and
missing weights refused in one line, presets announced, knockoff verdicts, demo reruns."""

from __future__ import annotations

import json
import logging
import os

import pytest

from scop_ext.run import PruneConfig, ScopPruner
from scop_ext.run import report as report_module
from scop_ext.train import timing
from tests._helpers import assert_one_line, cli
from tests.conftest import TINY


def test_every_stage_logs_its_epochs_and_writes_metrics(baseline, tmp_path, caplog, monkeypatch):
    config = PruneConfig(weights=baseline, **{**TINY, "scales_epochs": 2, "finetune_epochs": 2})
    with caplog.at_level(logging.INFO, logger="scop_ext"):
        ScopPruner.from_config(config, tmp_path, progress=False).run()
    lines = [r.getMessage() for r in caplog.records]
    for stage in ("scales", "finetune"):
        epochs = [line for line in lines if line.startswith(f"[{stage}] epoch")]
        assert [line.split()[2] for line in epochs] == ["1/2", "2/2"] and all("ETA" in line for line in epochs)
    assert any("spread" in line for line in lines if line.startswith("[scales] epoch"))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in records] == [("scales", 0), ("scales", 1), ("finetune", 0), ("finetune", 1)]
    assert all(r["seconds"] > 0 for r in records) and "beta_mean" in records[0] and "val_top1" in records[-1]


def test_report_latency_is_timed_in_turns_with_malloc_left_alone(baseline, tmp_path, monkeypatch):
    calls, malloc = [], []
    real = report_module.measure_latencies

    def spy(models, *args, **kw):
        calls.append((len(models), kw.get("tune_malloc", True)))
        return real(models, *args, **kw)

    monkeypatch.setattr(report_module, "measure_latencies", spy)
    if timing.LIBC is not None:
        monkeypatch.setattr(timing, "LIBC", type("Libc", (), {"mallopt": staticmethod(lambda *a: malloc.append(a))})())
    config = PruneConfig(weights=baseline, **{**TINY, "latency": True})
    results = ScopPruner.from_config(config, tmp_path, progress=False).run()
    assert calls == [(2, False), (2, False)]  # batch 1 and 64: dense and pruned together, malloc untouched
    assert not malloc
    for which in ("before", "after"):
        assert results[which]["latency_ms_b1"] > 0 and results[which]["latency_ms_b64"] > 0
    assert "timed in turns" in (tmp_path / "report.md").read_text()
    assert set(results["latency_conditions"]) == {"load_average", "threads", "device"}


def test_a_step_by_step_run_is_a_run(baseline, tmp_path, capsys):
    pruner = ScopPruner.from_config(PruneConfig(weights=baseline, **TINY), tmp_path, progress=False)
    pruner.fit_knockoffs()
    pruner.convert()
    pruner.learn_scales()
    pruner.select()
    pruner.prune()
    pruner.recalibrate_bn()
    assert json.loads((tmp_path / "state.json").read_text())["completed"] == ["knockoffs", "scales", "select", "prune"]
    capsys.readouterr()  # the steps' own log lines
    status, lines = cli(capsys, "report", "--run", tmp_path)
    assert_one_line(status, lines, tmp_path, r"unfinished \(last complete stage: prune\).*--resume")
    pruner.finetune()
    pruner.evaluate()
    pruner.report()
    assert cli(capsys, "report", "--run", tmp_path)[0] == 0
    resumed = ScopPruner.from_config(PruneConfig(weights=baseline, **TINY), tmp_path, progress=False).run(resume=True)
    assert resumed["after"]["top1"] == pytest.approx(pruner.results["after"]["top1"])


def test_missing_weights_and_presets_are_said(tmp_path, capsys, caplog, monkeypatch):
    assert_one_line(*cli(capsys, "prune", "--out", tmp_path / "p"), "--weights", "no trained model given")
    monkeypatch.setattr(ScopPruner, "from_config", classmethod(lambda cls, *a, **k: (_ for _ in ()).throw(ValueError("stop"))))
    with caplog.at_level(logging.INFO, logger="scop_ext"):
        cli(capsys, "prune", "--preset", "authors", "--weights", "w", "--out", tmp_path / "q")
    assert "preset authors: " in caplog.text and "finetune_epochs=120" in caplog.text and "finetune_lr=0.2" in caplog.text


def test_plan_json_is_one_line_and_transformers_are_refused(capsys):
    from scop_ext.cli import main

    assert main(["plan", "--model", "resnet20", "--ratio", "0.5", "--policy", "uniform", "--json"]) == 0
    text = capsys.readouterr().out.strip()
    assert "\n" not in text and json.loads(text)["removed"]
    assert_one_line(*cli(capsys, "plan", "--model", "torchvision:vit_b_16"), "vit_b_16", "transformer.*out of scope")


def test_knockoffs_check_ends_with_a_verdict(tmp_path, capsys):
    from scop_ext.knockoffs import check, make_generator
    from scop_ext.data import digits
    from torch.utils.data import DataLoader

    train, test = digits("train"), digits("test")
    for kind, word in (("gaussian", "ok   "), ("permutation", "bad  ")):
        gen = make_generator(kind).fit(DataLoader(train, batch_size=256))
        report = check(gen, test, tmp_path / kind, n=300, swap_test_steps=0)
        lines = {line.split(":")[0].split()[-1]: line for line in report["verdict"]}
        assert set(lines) == {"exchangeability", "power", "leakage"}
        assert lines["exchangeability"].startswith(word), lines["exchangeability"]


def test_demo_reruns_what_other_settings_change(tmp_path, capsys):
    from scop_ext.cli import main

    out = str(tmp_path / "demo")
    fast = ["demo", "--scales-epochs", "1", "--finetune-epochs", "1", "--out", out]
    assert main([*fast, "--train-epochs", "1"]) == 0
    assert main([*fast, "--train-epochs", "2"]) == 0  # the baseline's epochs changed: retrained
    text = capsys.readouterr().out
    assert "baseline in" in text and "starting it over" in text
    with open(os.path.join(out, "baseline", "metrics.json")) as f:
        assert json.load(f)["settings"]["epochs"] == 2
    assert main([*fast[:-2], "--finetune-epochs", "2", "--train-epochs", "2", "--out", out]) == 0
    text = capsys.readouterr().out
    assert "reusing" in text and "pruning run in" in text  # same baseline, a new pruning run, no "cannot resume"
