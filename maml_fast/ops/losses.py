"""Per-task losses: one value per task, the mean over that task's examples.

Outputs are task-major ``[T, B, N]`` (every backend returns them so); labels ``[T, B]`` (integer class
indices) and regression targets ``[T, B, ...]`` as in a TaskBatch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy_per_task(logits, labels):
    """Mean cross-entropy of each task ``[T]`` and its accuracy ``[T]`` (detached)."""
    tasks, batch = labels.shape
    losses = F.cross_entropy(logits.reshape(tasks * batch, -1), labels.reshape(-1), reduction="none")
    with torch.no_grad():
        accuracy = (logits.argmax(-1) == labels).to(logits.dtype).mean(1)
    return losses.reshape(tasks, batch).mean(1), accuracy


def mse_per_task(prediction, targets):
    """Mean squared error of each task ``[T]``; regression has no accuracy (None)."""
    tasks = targets.shape[0]
    return (prediction.reshape(targets.shape) - targets).pow(2).reshape(tasks, -1).mean(1), None


LOSSES = {"cross_entropy": cross_entropy_per_task, "mse": mse_per_task}
