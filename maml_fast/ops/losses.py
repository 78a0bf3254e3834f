"""Per-task losses: one value per task, the mean over that task's examples.

Outputs are task-major ``[T, B, N]`` (every backend returns them so); labels ``[T, B]`` (integer class
indices) and regression targets ``[T, B, ...]`` as in a TaskBatch.

`cross_entropy_per_task` and `mse_per_task` are the pure-PyTorch definitions: the references of the
compiled ops below (`LOSSES`). The fused ops (`FUSED_LOSSES`, the "fused" backend's losses) are
defined with x = logits, y = labels, g = grad_loss:

    cross_entropy_per_task(x [T, B, N], y [T, B] int64) -> (loss [T], accuracy [T], lse [T, B])
        lse = logsumexp(x, -1),  loss_t = mean_b (lse - x[y]),  accuracy_t = mean_b (argmax x == y)
    backward:         grad_x = g_t / B (p - onehot(y)),   p = softmax(x) = exp(x - lse)
    double backward of L = <gg, grad_x> (the softmax Jacobian diag(p) - p p^T is symmetric):
        d g_t = (1/B) sum_b <gg, p - onehot(y)>,   d x = g_t / B (p gg - p <p, gg>)

    mse_per_task(p [T, M], y [T, M]) -> loss_t = mean_m (p - y)^2
    backward:         grad_p = 2 g_t / M (p - y),   grad_y = -grad_p

Logits may be any dense layout whose rows (the N classes of an example) are contiguous, e.g. the
``[T, B, N]`` view of the grouped layout ``[B, T*N]``; the gradients with respect to logits come out
in the same layout (other layouts are copied to contiguous first). Each op reads its rows once (the cross-entropy forward finds max, sum of exp, the label's logit and
the first-maximum argmax in one pass over a row); lse is kept in the accumulation dtype (float32 for
float32/float16/bfloat16 logits, float64 for float64) and every sum accumulates in it.

Autograd: as for `batch_norm_relu`, each op's backward is itself a differentiable op: second-order
MAML differentiates the inner-loop gradient d loss/d logits again. `_CrossEntropyBackward`'s
backward runs the double-backward kernel, except when autograd records it (a third derivative was
asked for); then the same closed form runs as PyTorch ops. The MSE backward is bilinear in
(g, p - y), so its derivatives are a product and a row sum: plain PyTorch ops, which autograd
differentiates again to any order; a kernel would save one elementwise pass at most.

Labels: the CPU op rejects labels outside [0, N) (ValueError naming ``labels``). The CUDA kernels do
not check them: a device assert would kill the CUDA context and a check on the host would
synchronise. The caller checks on the host: MAML validates support and query labels against the
network's output size at the first loss (`maml_fast.task_batch.check_labels`). A CUDA kernel that
meets a bad label anyway reads nothing out of bounds and makes that task's loss NaN.

Here are the references, the input checks, the autograd glue, the launchers and the fake kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from maml_fast import _extension

from . import _autograd
from ._checks import check_tensor

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_OPS = _extension.CompiledOps("cross_entropy_per_task", "cross_entropy_per_task_backward",
                              "cross_entropy_per_task_double_backward", "mse_per_task", "mse_per_task_backward")
unavailable_reasons = _OPS.unavailable_reasons
is_available = _OPS.is_available


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the cross-entropy op's logsumexp output (and of every accumulation) for `dtype` logits."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------- references
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


# ------------------------------------------------------------------------------------- checks
def _check_floating(name: str, tensor) -> None:
    if tensor.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be a float32, float64, float16 or bfloat16 tensor, got {tensor.dtype}")


def _check_same_device(name: str, tensor, reference_name: str, reference) -> None:
    if tensor.device != reference.device:
        raise ValueError(f"{name} is on {tensor.device} but {reference_name} is on {reference.device}")


def check_cross_entropy_inputs(logits, labels) -> None:
    """Raise TypeError / ValueError naming the argument unless logits ``[T, B >= 1, N >= 1]`` of a
    supported floating dtype and int64 labels ``[T, B]`` on logits' device fit the op. The label
    range is the op's to check (on the CPU; see the module docstring for CUDA)."""
    check_tensor("logits", logits)
    check_tensor("labels", labels)
    _check_floating("logits", logits)
    if logits.dim() != 3:
        raise ValueError(f"logits must be 3-D [tasks, examples, classes], got shape {tuple(logits.shape)}")
    if logits.shape[1] < 1 or logits.shape[2] < 1:
        raise ValueError(f"logits needs at least one example per task and one class, got shape {tuple(logits.shape)}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be an int64 tensor of class indices, got {labels.dtype}")
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"labels must have shape {tuple(logits.shape[:2])} (logits has shape "
                         f"{tuple(logits.shape)}), got {tuple(labels.shape)}")
    _check_same_device("labels", labels, "logits", logits)


def check_mse_inputs(prediction, target) -> None:
    """Raise TypeError / ValueError naming the argument unless prediction ``[T, M >= 1]`` of a
    supported floating dtype and target of its shape, dtype and device fit the op."""
    check_tensor("prediction", prediction)
    check_tensor("target", target)
    _check_floating("prediction", prediction)
    if prediction.dim() != 2 or prediction.shape[1] < 1:
        raise ValueError("prediction must be 2-D [tasks, values] with at least one value per task, "
                         f"got shape {tuple(prediction.shape)}")
    if target.dtype != prediction.dtype:
        raise TypeError(f"target has dtype {target.dtype} but prediction has {prediction.dtype}")
    if target.shape != prediction.shape:
        raise ValueError(f"target has shape {tuple(target.shape)} but prediction has {tuple(prediction.shape)}")
    _check_same_device("target", target, "prediction", prediction)


def _check_runs_on(op: str, device: torch.device) -> None:
    if not is_available(device):
        raise RuntimeError(f"maml_fast.{op} cannot run: " + "; ".join(unavailable_reasons(device)))


# ------------------------------------------------------------------------------ autograd glue
class _CrossEntropy(torch.autograd.Function):
    """(loss, accuracy) by the forward op; accuracy is not differentiable; the backward is
    `_CrossEntropyBackward`."""

    @staticmethod
    def forward(ctx, logits, labels):
        loss, accuracy, logsumexp = torch.ops.maml_fast.cross_entropy_per_task(logits, labels)
        ctx.save_for_backward(logits, labels, logsumexp)
        ctx.mark_non_differentiable(accuracy)
        ctx.set_materialize_grads(False)  # (accuracy's gradient would be a tensor of zeros)
        return loss, accuracy

    @staticmethod
    def backward(ctx, grad_loss, grad_accuracy):
        if grad_loss is None:
            return None, None
        logits, labels, logsumexp = ctx.saved_tensors
        return _CrossEntropyBackward.apply(grad_loss, logits, labels, logsumexp), None


class _CrossEntropyBackward(torch.autograd.Function):
    """(grad_loss, logits) -> grad_logits by the backward op. logsumexp is the forward's cache and is
    not differentiated: the double backward returns the true derivative with respect to logits.

    The double backward runs the double-backward op, except when autograd records it (a third
    derivative was asked for); then `_cross_entropy_double_backward_composite` does."""

    @staticmethod
    def forward(ctx, grad_loss, logits, labels, logsumexp):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad_loss, logits, labels, logsumexp)
        return torch.ops.maml_fast.cross_entropy_per_task_backward(grad_loss, logits, labels, logsumexp)

    @staticmethod
    def backward(ctx, grad_grad_logits):
        if grad_grad_logits is None:
            return None, None, None, None
        d_grad_loss, d_logits = _cross_entropy_double_backward(grad_grad_logits, *ctx.saved_tensors)
        needs = ctx.needs_input_grad
        return d_grad_loss if needs[0] else None, d_logits if needs[1] else None, None, None


def _cross_entropy_double_backward(grad_grad_logits, grad_loss, logits, labels, logsumexp):
    """(d grad_loss, d logits) of the backward op: the double-backward op, or, when autograd records (a
    third derivative was asked for), `_cross_entropy_double_backward_composite`."""
    if torch.is_grad_enabled():
        return _cross_entropy_double_backward_composite(grad_grad_logits, grad_loss, logits, labels)
    return torch.ops.maml_fast.cross_entropy_per_task_double_backward(grad_grad_logits, grad_loss, logits, labels,
                                                                      logsumexp)


def _cross_entropy_double_backward_composite(grad_grad_logits, grad_loss, logits, labels):
    """The double-backward op's formulas (module docstring) as PyTorch ops, differentiable again
    (the softmax is recomputed from logits)."""
    acc = acc_dtype(logits.dtype)
    batch = logits.shape[1]
    p = torch.softmax(logits.to(acc), -1)
    gg = grad_grad_logits.to(acc)
    p_gg = p * gg
    s = p_gg.sum(-1, keepdim=True)
    d_grad_loss = (s.squeeze(-1) - gg.gather(-1, labels.unsqueeze(-1)).squeeze(-1)).sum(1) / batch
    d_logits = (grad_loss.to(acc) / batch)[:, None, None] * (p_gg - p * s)
    return d_grad_loss.to(logits.dtype), d_logits.to(logits.dtype)


class _Mse(torch.autograd.Function):
    """Per-task MSE by the forward op; the backward is `_MseBackward` (grad_target = -grad_prediction)."""

    @staticmethod
    def forward(ctx, prediction, target):
        ctx.save_for_backward(prediction, target)
        return torch.ops.maml_fast.mse_per_task(prediction, target)

    @staticmethod
    def backward(ctx, grad_loss):
        prediction, target = ctx.saved_tensors
        grad_prediction = _MseBackward.apply(grad_loss, prediction, target)
        needs = ctx.needs_input_grad
        return grad_prediction if needs[0] else None, -grad_prediction if needs[1] else None


class _MseBackward(torch.autograd.Function):
    """(grad_loss, prediction, target) -> grad_prediction = 2 g_t / M (p - y) by the backward op.

    Bilinear in (g, p - y): for L = <gg, grad_prediction>, d g_t = 2/M sum_m gg (p - y) and
    d p = -d y = 2 g_t / M gg, plain PyTorch ops that autograd differentiates to any order."""

    @staticmethod
    def forward(ctx, grad_loss, prediction, target):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad_loss, prediction, target)
        return torch.ops.maml_fast.mse_per_task_backward(grad_loss, prediction, target)

    @staticmethod
    def backward(ctx, grad_grad_prediction):
        if grad_grad_prediction is None:
            return None, None, None
        return _mse_double_backward(grad_grad_prediction, *ctx.saved_tensors, needs=ctx.needs_input_grad)


def _mse_double_backward(grad_grad_prediction, grad_loss, prediction, target, needs=(True, True, True)):
    """(d grad_loss, d prediction, d target) of the MSE backward op, in differentiable PyTorch ops."""
    acc = acc_dtype(prediction.dtype)
    scale = 2.0 / prediction.shape[1]
    gg = grad_grad_prediction.to(acc)
    d_grad_loss = scale * (gg * (prediction.to(acc) - target.to(acc))).sum(1)
    d_prediction = (scale * grad_loss.to(acc))[:, None] * gg
    return (d_grad_loss.to(grad_loss.dtype) if needs[0] else None,
            d_prediction.to(prediction.dtype) if needs[1] else None,
            -d_prediction.to(target.dtype) if needs[2] else None)


# ------------------------------------------------------------------------------------ launchers
def fused_cross_entropy_per_task(logits, labels):
    """`cross_entropy_per_task` of logits ``[T, B, N]`` and int64 labels ``[T, B]`` by the compiled
    op (with checks): (loss ``[T]``, differentiable twice in logits; accuracy ``[T]``, detached)."""
    check_cross_entropy_inputs(logits, labels)
    _check_runs_on("cross_entropy_per_task", logits.device)
    return _CrossEntropy.apply(logits, labels)


def fused_mse_per_task(prediction, target):
    """Mean of (prediction - target)^2 over the values of each task of ``[T, M]`` tensors by the
    compiled op (with checks): loss ``[T]``, differentiable twice in prediction and target."""
    check_mse_inputs(prediction, target)
    _check_runs_on("mse_per_task", prediction.device)
    return _Mse.apply(prediction, target)


def _extension_cross_entropy(logits, labels):
    """`cross_entropy_per_task` by the fused op where the inputs fit it, else by the reference."""
    fits = (logits.dim() == 3 and logits.dtype in _SUPPORTED_DTYPES and labels.dtype == torch.int64
            and logits.shape[1] >= 1 and logits.shape[2] >= 1 and is_available(logits.device))
    return fused_cross_entropy_per_task(logits, labels) if fits else cross_entropy_per_task(logits, labels)


def _extension_mse(prediction, targets):
    """`mse_per_task` by the fused op where the inputs fit it, else by the reference."""
    tasks = targets.shape[0]
    fits = (prediction.dtype == targets.dtype and prediction.dtype in _SUPPORTED_DTYPES
            and prediction.numel() == targets.numel() and targets.shape[1:].numel() >= 1
            and is_available(prediction.device))
    if not fits:
        return mse_per_task(prediction, targets)
    return fused_mse_per_task(prediction.reshape(tasks, -1), targets.reshape(tasks, -1)), None


#: `LOSSES` by the fused ops wherever the extension can run and the inputs fit them.
FUSED_LOSSES = {"cross_entropy": _extension_cross_entropy, "mse": _extension_mse}


# ---------------------------------------------------------------------------- fake (meta) kernels
if _OPS.registered:

    @torch.library.register_fake("maml_fast::cross_entropy_per_task")
    def _cross_entropy_per_task_fake(logits, labels):
        tasks, batch = logits.shape[:2]
        return (logits.new_empty((tasks,)), logits.new_empty((tasks,)),
                logits.new_empty((tasks, batch), dtype=acc_dtype(logits.dtype)))

    def _grad_logits_fake(logits):
        """The ops' gradient with respect to logits: laid out as logits when its rows are contiguous and
        it is dense (csrc/losses.h, with_contiguous_rows), else contiguous."""
        like = torch.empty_like(logits)  # (its strides are logits' exactly when logits is dense)
        return like if logits.stride(2) == 1 and like.stride() == logits.stride() else logits.new_empty(logits.shape)

    @torch.library.register_fake("maml_fast::cross_entropy_per_task_backward")
    def _cross_entropy_per_task_backward_fake(grad_loss, logits, labels, logsumexp):
        return _grad_logits_fake(logits)

    @torch.library.register_fake("maml_fast::cross_entropy_per_task_double_backward")
    def _cross_entropy_per_task_double_backward_fake(grad_grad_logits, grad_loss, logits, labels, logsumexp):
        return logits.new_empty((logits.shape[0],)), _grad_logits_fake(logits)

    @torch.library.register_fake("maml_fast::mse_per_task")
    def _mse_per_task_fake(prediction, target):
        return prediction.new_empty((prediction.shape[0],))

    @torch.library.register_fake("maml_fast::mse_per_task_backward")
    def _mse_per_task_backward_fake(grad_loss, prediction, target):
        return prediction.new_empty(prediction.shape)


# ---------------------------------------------------------------- autograd of the ops called directly
# The glue's derivatives registered on the operators: torch.ops.maml_fast.cross_entropy_per_task*,
# mse_per_task* called directly are differentiable to every order, as the fused losses are. The
# cross-entropy forward's logsumexp output is differentiable too (d lse / d logits = softmax); its
# accuracy is piecewise constant and marked non-differentiable; labels are integers. The
# cross-entropy backward ops treat logsumexp as the cached logsumexp of logits (the glue's
# contract): their derivative in logits is the total one, logsumexp gets none. The double-backward
# op's derivative is that of its differentiable composite (`_autograd.vjp_of`).
if _OPS.registered:

    def _save_inputs(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*inputs)

    def _cross_entropy_setup(ctx, inputs, output):
        logits, labels = inputs
        _, accuracy, logsumexp = output
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(accuracy)
        ctx.save_for_backward(logits, labels, logsumexp)

    def _cross_entropy_backward(ctx, grad_loss, grad_accuracy, grad_logsumexp):
        logits, labels, logsumexp = ctx.saved_tensors
        grad_logits = None
        if grad_loss is not None:
            grad_logits = _CrossEntropyBackward.apply(grad_loss, logits, labels, logsumexp)
        if grad_logsumexp is not None:
            softmax = torch.exp(logits.to(logsumexp.dtype) - logsumexp.unsqueeze(-1))
            grad_lse = (grad_logsumexp.to(logsumexp.dtype).unsqueeze(-1) * softmax).to(logits.dtype)
            grad_logits = grad_lse if grad_logits is None else grad_logits + grad_lse
        return grad_logits if ctx.needs_input_grad[0] else None, None

    def _cross_entropy_double_backward_backward(ctx, *grads):
        grad_grad_logits, grad_loss, logits, labels, _ = ctx.saved_tensors

        def composite(grad_grad_logits, grad_loss, logits):
            return _cross_entropy_double_backward_composite(grad_grad_logits, grad_loss, logits, labels)

        return (*_autograd.vjp_of(composite, (grad_grad_logits, grad_loss, logits), ctx.needs_input_grad[:3], grads),
                None, None)

    def _mse_backward(ctx, grad_loss):
        if grad_loss is None:
            return None, None
        prediction, target = ctx.saved_tensors
        grad_prediction = _MseBackward.apply(grad_loss, prediction, target)
        needs = ctx.needs_input_grad
        return grad_prediction if needs[0] else None, -grad_prediction if needs[1] else None

    torch.library.register_autograd("maml_fast::cross_entropy_per_task", _cross_entropy_backward,
                                    setup_context=_cross_entropy_setup)
    # (the backward ops save their inputs as the glue's Functions do: the same backward serves)
    torch.library.register_autograd("maml_fast::cross_entropy_per_task_backward", _CrossEntropyBackward.backward,
                                    setup_context=_save_inputs)
    torch.library.register_autograd("maml_fast::cross_entropy_per_task_double_backward",
                                    _cross_entropy_double_backward_backward, setup_context=_save_inputs)
    torch.library.register_autograd("maml_fast::mse_per_task", _mse_backward, setup_context=_save_inputs)
    torch.library.register_autograd("maml_fast::mse_per_task_backward", _MseBackward.backward,
                                    setup_context=_save_inputs)
