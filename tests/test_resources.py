"""scop_ext.resources.saved_for_backward against what the autograd formulas are known to save."""

from __future__ import annotations

import torch

from scop_ext.resources import saved_for_backward


def test_saved_for_backward_counts_each_storage_once():
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(16, 4, requires_grad=True)
    with saved_for_backward() as saved:
        y = x @ w  # mm saves both operands
        z = (y * y).sum()  # mul saves y, twice as an operand but one storage
    assert sorted(n for n, _ in saved) == sorted([x.nbytes, w.nbytes, y.nbytes])
    assert all(dtype == torch.float32 for _, dtype in saved)
    z.backward()


def test_saved_for_backward_leaves_out_excluded_storages():
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(16, 4, requires_grad=True)
    with saved_for_backward(exclude={w.untyped_storage()._cdata}) as saved:
        x @ w
    assert [n for n, _ in saved] == [x.nbytes]


def test_nothing_is_saved_without_grad():
    x = torch.randn(8, 16)
    with saved_for_backward() as saved:
        torch.relu(x @ x.T)
    assert saved == []
