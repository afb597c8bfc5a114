"""Small pieces the operator tests share (kept out of conftest.py, which holds fixtures)."""

import torch


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

    from scop_ext.prune import surgery

    dense = copy.deepcopy(model)
    graph = surgery._dependency_graph(dense, example)
    groups, _ = surgery._graph_groups(graph, dense)
    with torch.no_grad():
        for group, root in groups:
            channels = surgery._group_channels(group, plan)
            if not channels:
                continue
            for item in graph.get_pruning_group(root.target.module, root.handler, channels):
                m = item.dep.target.module
                reads = isinstance(m, (nn.Conv2d, nn.Linear)) and not graph.is_out_channel_pruning_fn(item.dep.handler)
                if not reads or surgery.is_depthwise(m):
                    continue  # a depthwise conv's removed outputs are cut off at their own readers
                if isinstance(m, nn.Linear):
                    m.weight[:, list(item.idxs)] = 0
                    continue
                per, out_per = m.in_channels // m.groups, m.out_channels // m.groups
                for c in item.idxs:  # input c of a grouped conv feeds only its own slice's filters
                    m.weight[(c // per) * out_per : (c // per + 1) * out_per, c % per] = 0
    return dense
