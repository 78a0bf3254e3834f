"""Task-batched linear layer: y[:, t] = x[:, t] @ weight[t].T + bias[t].

x is ``[B, T*F]`` (the grouped layout), weight ``[T, O, F]``, bias ``[T, O]``. One batched matmul for all
tasks; its derivatives are batched matmuls again, so every order of derivative stays task-batched.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x, weight, bias=None):
    if weight.dim() != 3:
        raise ValueError(f"weight must have shape [tasks, out, in], got {tuple(weight.shape)}")
    tasks, out_features, in_features = weight.shape
    if x.dim() != 2 or x.shape[1] != tasks * in_features:
        raise ValueError(
            f"x must have shape [batch, tasks*in_features={tasks * in_features}], got {tuple(x.shape)}"
        )
    if bias is not None and bias.shape != (tasks, out_features):
        raise ValueError(f"bias must have shape {(tasks, out_features)}, got {tuple(bias.shape)}")
    batch = x.shape[0]
    task_major = x.reshape(batch, tasks, in_features).transpose(0, 1)            # [T, B, F]
    if bias is None:
        y = torch.bmm(task_major, weight.transpose(1, 2))
    else:
        y = torch.baddbmm(bias.unsqueeze(1), task_major, weight.transpose(1, 2))  # [T, B, O]
    return y.transpose(0, 1).reshape(batch, tasks * out_features)


def linear_reference(x, weight, bias=None):
    tasks, _, in_features = weight.shape
    return torch.cat(
        [F.linear(x[:, t * in_features:(t + 1) * in_features], weight[t], None if bias is None else bias[t])
         for t in range(tasks)],
        dim=1,
    )
