"""Classification metrics, including WebVision's class-averaged top-k."""
from __future__ import annotations

import numpy as np


def topk_hits(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per row: is the label among the k highest scores."""
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return (top == labels[:, None]).any(axis=1)


def class_averaged(hits: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes present of per-class accuracy (the WebVision metric)."""
    classes = np.unique(labels)
    if not len(classes):
        return float("nan")
    return float(np.mean([hits[labels == c].mean() for c in classes]))


def accuracy_report(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """top-1/top-5 and class-averaged top-1/top-5 over the rows with a label (>= 0)."""
    keep = labels >= 0
    scores, labels = scores[keep], labels[keep]
    out = {}
    for k in (1, 5):
        hits = topk_hits(scores, labels, k)
        out[f"top{k}"] = float(hits.mean()) if len(hits) else float("nan")
        out[f"class_top{k}"] = class_averaged(hits, labels)
    return out
