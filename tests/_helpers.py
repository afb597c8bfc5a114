"""Small pieces the tests share (kept out of conftest.py, which holds fixtures)."""

import re

import torch
from torch import nn

from scop_ext.cli import main


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """``x`` with the same values in the memory layout ``kind`` names."""
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "strided":  # a non-contiguous view: every other column of a wider tensor
        wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    if kind == "transposed":  # H and W swapped in memory: neither NCHW nor NHWC
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    if kind != "contiguous":
        raise ValueError(f"kind must be contiguous, channels_last, strided or transposed, got {kind!r}")
    return x


def masked_dense(model, example, plan):
    """A copy of ``model`` in which every channel ``plan`` removes is cut off from its readers
    (the input weights of each conv/linear layer reading it are zeroed): what the pruned network
    must compute, for any network whose normalisations are per channel (BatchNorm, not LayerNorm)."""
    import copy

    from torch import nn

    from scop_ext.nn import restore
    from scop_ext.prune import groups as grouping
    from scop_ext.prune import surgery

    dense = restore(copy.deepcopy(model))
    graph = grouping.dependency_graph(dense, example)
    groups, _ = grouping.graph_groups(graph, dense)
    with torch.no_grad():
        for group, root in groups:
            channels = surgery._group_channels(group, plan)
            if not channels:
                continue
            for item in graph.get_pruning_group(root.target.module, root.handler, channels):
                m = item.dep.target.module
                reads = isinstance(m, (nn.Conv2d, nn.Linear)) and not graph.is_out_channel_pruning_fn(item.dep.handler)
                if not reads or grouping.is_depthwise(m):
                    continue  # a depthwise conv's removed outputs are cut off at their own readers
                if isinstance(m, nn.Linear):
                    m.weight[:, list(item.idxs)] = 0
                    continue
                per, out_per = m.in_channels // m.groups, m.out_channels // m.groups
                for c in item.idxs:  # input c of a grouped conv feeds only its own slice's filters
                    m.weight[(c // per) * out_per : (c // per + 1) * out_per, c % per] = 0
    return dense


def cli(capsys, *args) -> tuple[int, list[str]]:
    """Run the ``scop`` command in this process: (exit status, stderr lines)."""
    status = main([str(a) for a in args])
    return status, capsys.readouterr().err.strip().splitlines()


# What a command may print on stderr before it stops: its progress (one line per stage and
# epoch, "[stage] ...") and one-line warnings. The error itself is one line, the last.
_PROGRESS = re.compile(r"^(\[[\w ]+\] |scop: warning: )")


def assert_one_line(status, lines, path, pattern):
    assert status == 2, lines
    assert lines, lines
    *before, error = lines
    assert all(_PROGRESS.match(line) for line in before), lines
    assert str(path) in error, error
    assert re.search(pattern, error), error


def _cuts(n: int) -> list[int]:
    return sorted({0, 1, 8, 64, n // 4, n // 2, n - 100, n - 22, n - 1} - {n})


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


def _psd_floor(matrix: torch.Tensor) -> float:
    """Smallest eigenvalue relative to the largest (>= -1e-9 means PSD up to rounding)."""
    evals = torch.linalg.eigvalsh((matrix + matrix.T) / 2)
    return float(evals[0]) / max(float(evals[-1].abs()), 1e-300)


def ar1(d: int, rho: float, scales: torch.Tensor | None = None) -> torch.Tensor:
    """(d, d) float64 AR(1) covariance ``rho^|i - j|``, rows and columns times ``scales`` when given."""
    idx = torch.arange(d)
    corr = rho ** (idx[:, None] - idx[None, :]).abs().to(torch.float64)
    if scales is None:
        return corr
    return corr * scales[:, None] * scales[None, :]


def scop_ready(net: nn.Module, mean: float = 0.5) -> nn.Module:
    """``net`` (float64) converted, with BatchNorm statistics as a trained network's (so frozen BN
    is not the identity: means in [-mean, mean], variances in [0.5, 2]) and every layer's Lemma 2
    bias fitted to a random knockoff diagonal."""
    from scop_ext import convert, scop_layers

    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-mean, mean)
            m.running_var.uniform_(0.5, 2.0)
    convert(net)
    for layer in scop_layers(net).values():
        layer.fit_knockoff_bias(torch.rand(layer.in_channels, dtype=torch.float64) + 0.1)
    return net
