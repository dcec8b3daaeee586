"""Accuracy exactly as MMAction2 defines it (``mmaction/evaluation/functional/accuracy.py``)."""

from __future__ import annotations

import numpy as np


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, topk=(1, 5)) -> list[float]:
    """Fraction of videos whose label is among the k highest scores (``np.argsort(...)[:, -k:][:, ::-1]``)."""
    scores = np.asarray(scores)
    labels = np.asarray(labels).reshape(-1, 1)
    out = []
    for k in topk:
        top = np.argsort(scores, axis=1)[:, -k:][:, ::-1]
        out.append(float((top == labels).any(axis=1).mean()))
    return out


def mean_class_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean per-class recall over the union of predicted and true labels; a class that is predicted
    but never true counts 0."""
    pred = np.argmax(scores, axis=1)
    labels = np.asarray(labels)
    classes = np.unique(np.concatenate([pred, labels]))
    recalls = []
    for c in classes:
        truth = labels == c
        recalls.append(float((pred[truth] == c).mean()) if truth.any() else 0.0)
    return float(np.mean(recalls))


def evaluate(scores, labels) -> dict:
    top1, top5 = top_k_accuracy(scores, labels, (1, 5))
    return {"top1": top1, "top5": top5, "mean_class_accuracy": mean_class_accuracy(scores, labels)}
