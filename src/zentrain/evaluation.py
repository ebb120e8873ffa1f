"""Evaluation metrics: ROC AUC (rank-based, no sklearn), log-loss, and a model evaluator."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ArrayLike = Tensor | np.ndarray | Sequence[float]


def _np(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """ROC AUC: the probability that a random positive outscores a random negative, ties
    counting one half (Mann-Whitney U with average ranks). NaN when a class is absent."""
    s, y = _np(scores), _np(labels) > 0.5
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # Average 1-based rank of each run of tied scores.
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(len(s))
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def log_loss(probs: ArrayLike, labels: ArrayLike, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities (clipped to [eps, 1 - eps])."""
    p, y = np.clip(_np(probs), eps, 1 - eps), _np(labels)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[dict[str, Tensor]], kind: str) -> dict[str, float]:
    """Mean eval loss over ``batches`` (``kind="gpt"``), plus AUC and log-loss over all
    samples for ``kind="deepfm"``. Runs in eval mode and restores the previous mode."""
    if kind not in ("gpt", "deepfm"):
        raise ValueError(f"unknown evaluation kind {kind!r} (allowed: 'gpt', 'deepfm')")
    if not batches:
        return {}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        loss_sum, items = 0.0, 0
        logits_all, labels_all = [], []
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            logits, loss = model(**batch)
            n = len(next(iter(batch.values())))  # rows in the batch
            loss_sum += float(loss) * n
            items += n
            if kind == "deepfm":
                logits_all.append(logits.float().cpu())
                labels_all.append(batch["labels"].float().cpu())
        out = {"eval_loss": loss_sum / items}
        if kind == "deepfm":
            logits_t, labels_t = torch.cat(logits_all), torch.cat(labels_all)
            out["auc"] = auc(logits_t, labels_t)
            out["log_loss"] = float(F.binary_cross_entropy_with_logits(logits_t.double(),
                                                                       labels_t.double()))
        return out
    finally:
        model.train(was_training)
