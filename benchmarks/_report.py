"""Shared by the benchmark scripts: machine description and writing one section of a README.

Each script owns the section between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` of
benchmarks/README.md, so scripts can rerun independently without clobbering each other.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys

import torch


def machine() -> str:
    """One line naming the machine, date and software the figures were measured with."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{datetime.date.today().isoformat()}, {cpu} ({os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads), {gpu}, torch {torch.__version__}, Python {platform.python_version()}"
    )


def git_revision() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command_line() -> str:
    return " ".join(["python", *sys.argv])


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(path: str, name: str, body: str) -> None:
    """Replace (or append) the ``name`` section of the markdown file at ``path``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = open(path).read() if os.path.exists(path) else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def publish(title: str, section: str, conditions: str, paragraphs: list[str], write: str | None) -> str:
    """Print a section (its title, the command and revision that made it, ``conditions`` such as
    the machine and its load, then ``paragraphs``) and, with ``write``, put it in that README."""
    text = "\n\n".join([f"## {title}", f"`{command_line()}` at {git_revision()}; {conditions}.", *paragraphs])
    print(text)
    if write:
        write_section(write, section, text)
    return text
