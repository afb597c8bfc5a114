"""Do the knockoffs leak the label? ``x~ ⊥ y | x`` tested with held-out classifiers, beside chance
and beside the real inputs."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["label_leakage"]


def _classifier_features(x: Tensor, max_features: int) -> Tensor:
    """(N, ...) -> (N, <= max_features): images are average-pooled spatially to fit."""
    if x.dim() == 4 and x[0].numel() > max_features:
        side = max(1, int(math.sqrt(max_features / x.shape[1])))
        x = F.adaptive_avg_pool2d(x, side)
    return x.flatten(1)


def label_leakage(x: Tensor, xk: Tensor, y: Tensor, seed: int = 0, max_features: int = 1024) -> dict:
    """Does ``x~`` carry label information beyond what ``x`` has? Held-out accuracies of three
    classifiers, on ``x``, on ``x~`` and on ``[x, x~]``.

    The knockoff condition is ``x~ ⊥ y | x``, not ``x~ ⊥ y``, so chance is not the target for
    ``x~`` alone: a valid knockoff of correlated inputs depends on ``x`` and predicts ``y`` as
    far as it keeps ``x``'s information (the closer to ``x``, the less power, the nearer
    ``real_acc``). Only an ``x~`` independent of ``x``, such as a permutation, sits at chance.
    What is tested is the conditional statement: ``excess = joint_acc - real_acc`` should be 0
    up to sampling error; a knockoff that encodes ``y`` makes the classifier on ``[x, x~]``
    beat the one on ``x``. ``excess`` is bounded by ``1 - real_acc``, so the test is blind where
    ``x`` alone already predicts every label.

    Each classifier (scikit-learn ``LogisticRegression`` on standardised features; images
    average-pooled to at most ``max_features`` coordinates) is fitted on a stratified half (by
    ``seed``) and scored on the other half.

    Returns:
        dict: ``knockoff_acc``, ``real_acc``, ``joint_acc``, ``excess``, ``chance``
        (majority-class share of the test half), ``n_test``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = y.detach().cpu().numpy()
    if len(labels) != x.shape[0]:
        raise ValueError(f"y must have one label per sample ({x.shape[0]}), got {len(labels)}")
    real = _classifier_features(x.detach().cpu().float(), max_features).numpy()
    knock = _classifier_features(xk.detach().cpu().float(), max_features).numpy()
    counts = torch.bincount(torch.as_tensor(labels))
    stratify = labels if int(counts[counts > 0].min()) >= 2 else None
    train, test = train_test_split(torch.arange(len(labels)).numpy(), test_size=0.5, random_state=seed, stratify=stratify)

    def accuracy(features) -> float:
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        clf.fit(features[train], labels[train])
        return float(clf.score(features[test], labels[test]))

    real_acc, knock_acc = accuracy(real), accuracy(knock)
    joint_acc = accuracy(np.concatenate([real, knock], 1))
    test_counts = np.bincount(labels[test])
    return {
        "knockoff_acc": knock_acc,
        "real_acc": real_acc,
        "joint_acc": joint_acc,
        "excess": joint_acc - real_acc,
        "chance": float(test_counts.max() / test_counts.sum()),
        "n_test": len(test),
    }
