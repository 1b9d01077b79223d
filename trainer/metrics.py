"""Classification metrics, including WebVision's class-averaged top-k.

Scores may be larger than memory (a memory-mapped N x C float16 file): `accuracy_report` reads them
in row chunks and keeps only per-row hits, so no N x C float32 copy is ever made.
"""
from __future__ import annotations

import numpy as np

KS = (1, 5)
CHUNK_ROWS = 4096  # rows of scores converted to float32 at a time (x 5,000 classes: 80 MB)


def topk_hits(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per row: is the label among the k highest scores."""
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return (top == labels[:, None]).any(axis=1)


def class_averaged(hits: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes present of per-class accuracy (the WebVision metric)."""
    if not len(labels):
        return float("nan")
    counts = np.bincount(labels)
    present = counts > 0
    per_class = np.bincount(labels, weights=np.asarray(hits, dtype=np.float64), minlength=len(counts))
    return float(np.mean(per_class[present] / counts[present]))


def report_from_hits(hits: dict[int, np.ndarray], labels: np.ndarray) -> dict[str, float]:
    """top-k and class-averaged top-k from per-row hits ({k: bool per row}) over the rows with a label (>= 0)."""
    keep = labels >= 0
    labels = labels[keep]
    out = {}
    for k in KS:
        h = hits[k][keep]
        out[f"top{k}"] = float(h.mean()) if len(h) else float("nan")
        out[f"class_top{k}"] = class_averaged(h, labels)
    return out


def accuracy_report(scores: np.ndarray, labels: np.ndarray, chunk_rows: int = CHUNK_ROWS) -> dict[str, float]:
    """top-1/top-5 and class-averaged top-1/top-5 over the rows with a label (>= 0). `scores` (N x C, any
    float dtype, possibly a memory map) is read `chunk_rows` rows at a time."""
    labels = np.asarray(labels)
    hits = {k: np.zeros(len(labels), bool) for k in KS}
    for lo in range(0, len(labels), chunk_rows):
        hi = min(lo + chunk_rows, len(labels))
        lab = labels[lo:hi]
        rows = np.flatnonzero(lab >= 0)
        if not len(rows):
            continue
        block = np.asarray(scores[lo:hi], dtype=np.float32)[rows]
        for k in KS:
            hits[k][lo + rows] = topk_hits(block, lab[rows], k)
    return report_from_hits(hits, labels)
