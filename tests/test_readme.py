"""The README's examples cannot rot: every ```python block runs as written, as a program of its
own in a fresh folder, and every `scop ...` line of a ```bash block parses with today's flags."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from scop_ext.cli.parser import build_parser
from tests.conftest import ENV

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_examples():
    assert len(blocks("python")) >= 5 and blocks("bash")


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs(index, tmp_path):
    code = blocks("python")[index]
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=ENV,
                          timeout=900)
    assert proc.returncode == 0, f"README python block {index} failed:\n{code}\n{proc.stderr[-3000:]}"


def _commands(block: str) -> list[list[str]]:
    text = block.replace("\\\n", " ")
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("scop ")]


def test_every_cli_line_parses(capsys):
    parser = build_parser()
    commands = [c for block in blocks("bash") for c in _commands(block)]
    assert len(commands) >= 10
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit:  # argparse's way of refusing
            pytest.fail(f"README: `scop {' '.join(argv)}` does not parse: {capsys.readouterr().err.strip()}")
