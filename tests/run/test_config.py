"""Pruning configs (scop_ext.config): malformed files and ``--set`` values give one error line
naming the file or flag, and no run starts."""

from __future__ import annotations

import re

import pytest

from scop_ext.run.config import PruneConfig

from tests._helpers import assert_one_line, cli

pytestmark = pytest.mark.usefixtures("one_thread")


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
    ("bn_mode.yaml", "bn: sync\n", "bn must be one of batch, batch_detached, frozen"),
    ("policy.yaml", "policy: greedy\n", "policy must be one of"),
    ("importance.yaml", "importance: scpo\n", "importance must be one of"),
    ("knockoffs.yaml", "knockoffs: diffusion\n", "knockoffs must be one of"),
    ("scope.yaml", "fdr_scope: network\n", "fdr_scope must be 'layer' or 'global'"),
    ("device.yaml", "device: banana\n", "device must be auto or a device name"),
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


def test_a_preset_is_applied_by_from_dict_and_refused_by_the_constructor():
    # The constructor cannot tell knockoff_bias=True given from knockoff_bias left out, so it
    # cannot fill only the keys left out: it refuses rather than ignore the preset silently.
    with pytest.raises(ValueError, match=r"^preset: PruneConfig\(preset='authors'\) .* use PruneConfig\.from_dict"):
        PruneConfig(preset="authors")
    config = PruneConfig.from_dict({"preset": "authors", "knockoff_bias": True})
    assert (config.preset, config.block_width, config.ratio) == ("authors", "scatter", 0.45)  # filled in
    assert config.knockoff_bias is True  # given at its default value, and still it wins over the preset
    assert PruneConfig.from_dict(config.to_dict()) == config  # what a run folder records reads back the same
