"""Meta-loss and meta-gradient of every algorithm on every backend that runs on the CPU against the
independent float64 reference in `reference_maml` (relative error <= 1e-9), proof that second order is
really present, and adapt()/predict() against the reference's adapted networks.

Backends: "loop", "vmap", "torch" and "fused" (the compiled C++ ops; skipped, with the reason, where the
extension is not built) run the whole matrix. "triton" runs on the CPU only under Triton's interpreter
(tests/conftest.py turns it on for a session without CUDA), which executes every kernel program in
Python: it runs a slice of the matrix (`TRITON_CASES`, one case per code path the backend changes: conv
and linear kernels, the conv+BatchNorm-statistics and conv+ReLU fusions, first order, learned rates,
per-step BatchNorm), because the whole matrix would add minutes to the suite. Its GPU run is
tests/test_triton_*.py's business (the tests here run on the CPU)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import maml_fast as mf
import reference_maml as ref
from conftest import cpu_backend_param
from maml_fast.ops import conv2d as conv_ops
from maml_fast.ops import low_rank_conv

TOL = 1e-9


BACKENDS = [cpu_backend_param(name) for name in ("torch", "vmap", "loop", "fused")]
NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


# --------------------------------------------------------------------------- networks
def _fc(ways, norm):
    return nn.Sequential(nn.Flatten(), *mf.models.mlp((16, 8, 6, ways), norm=norm))


# name -> (factory(ways), example shape, regression)
NETWORKS = {
    "conv4_stride_layer": (lambda n: mf.models.conv4(1, n, hidden=3, downsample="stride", norm="layer"), (1, 8, 8), False),
    "conv4_stride_none": (lambda n: mf.models.conv4(2, n, hidden=4, downsample="stride", norm="none"), (2, 10, 10), False),
    "conv4_maxpool_batch": (lambda n: mf.models.conv4(1, n, hidden=3, downsample="maxpool", norm="batch",
                                                      image_size=16), (1, 16, 16), False),
    "fc_layer": (lambda n: _fc(n, "layer"), (1, 4, 4), False),
    "fc_none": (lambda n: _fc(n, "none"), (16,), False),
    "sinusoid": (lambda n: mf.models.sinusoid_mlp(hidden=5), (1,), True),
    "mlp_batch_regression": (lambda n: mf.models.mlp((1, 6, 5, 1), norm="batch"), (1,), True),
    # BatchNorm where a single example has one value per channel (BatchNorm1d; 1x1 final conv map)
    "fc_batch": (lambda n: _fc(n, "batch"), (1, 4, 4), False),
    "conv4_stride_batch": (lambda n: mf.models.conv4(1, n, hidden=3, downsample="stride", norm="batch"),
                           (1, 8, 8), False),
}


def build_network(name, ways):
    factory, shape, regression = NETWORKS[name]
    net = factory(ways).double()
    with torch.no_grad():  # norm affine parameters away from their 1/0 init, so they matter
        for module in net.modules():
            if isinstance(module, NORMS):
                for p in module.parameters(recurse=False):
                    p.add_(0.2 * torch.randn_like(p))
    return net, shape, regression


def perturb_learned_extras(learner):
    """Learned inner lrs and per-step BN copies start identical across steps/elements; spread them."""
    with torch.no_grad():
        for name, p in learner.named_parameters():
            if name.startswith("inner_lrs."):
                p.mul_(1 + 0.3 * torch.rand_like(p))
            elif name.startswith("per_step_bn."):
                p.add_(0.2 * torch.randn_like(p))


def expected_adapted(net, rule):
    names = [n for n, _ in net.named_parameters()]
    if rule == "all":
        return names
    if rule == "head":
        owners = [m for m, mod in net.named_modules() if m and list(mod.parameters(recurse=False))]
        return [n for n in names if n.startswith(owners[-1] + ".")]
    if rule == "no_norm":
        norm = {f"{m}.{p}" for m, mod in net.named_modules() if isinstance(mod, NORMS)
                for p, _ in mod.named_parameters(recurse=False)}
        return [n for n in names if n not in norm]
    raise AssertionError(rule)


def batch_norm_names(net):
    return [f"{m}.{p}" for m, mod in net.named_modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)
            for p, _ in mod.named_parameters(recurse=False)]


# --------------------------------------------------------------------------- comparison
def rel_err(actual, expected, floor=0.0):
    """||actual - expected|| / max(||expected||, floor); None counts as zeros. ``floor`` keeps tensors
    whose true gradient is 0 up to rounding (a conv bias before BatchNorm) from dividing noise by noise."""
    actual = torch.zeros_like(expected) if actual is None else actual
    denom = max(float(expected.norm()), floor)
    if denom == 0:
        return float(actual.norm())
    return float((actual - expected).norm()) / denom


def reference_leaves(learner, adapted, per_step_names):
    """Fresh leaf copies of the learner's current values, keyed like learner.named_parameters()."""
    leaves = {n: p.detach().clone().requires_grad_() for n, p in learner.named_parameters()}
    theta = {n[len("model."):]: t for n, t in leaves.items() if n.startswith("model.")}
    lrs = {adapted[int(n.split(".")[1])]: t for n, t in leaves.items() if n.startswith("inner_lrs.")}
    per_step = {per_step_names[int(n.split(".")[1])]: t for n, t in leaves.items() if n.startswith("per_step_bn.")}
    return leaves, theta, lrs, per_step


def check_against_reference(learner, batch, cfg_kwargs, adapted, per_step_names):
    """One learner meta-step (forward + backward) vs the reference at the learner's current values."""
    leaves, theta, lrs, per_step = reference_leaves(learner, adapted, per_step_names)
    cfg = ref.Config(adapted=adapted, lrs=lrs, per_step=per_step, **cfg_kwargs)
    expected_loss, expected_final, _ = ref.meta_objective(learner.model, theta, cfg, batch)
    names = list(leaves)
    grads = torch.autograd.grad(expected_loss, [leaves[n] for n in names], allow_unused=True)
    expected_grads = {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, grads)}

    learner.zero_grad(set_to_none=True)
    out = learner(batch)
    out.loss.backward()
    actual = dict(learner.named_parameters())
    assert set(actual) == set(expected_grads)
    assert rel_err(out.loss.detach(), expected_loss.detach()) <= TOL, (out.loss.item(), expected_loss.item())
    assert rel_err(out.query_loss_per_task, expected_final) <= TOL
    floor = 1e-3 * max(float(g.norm()) for g in expected_grads.values())
    errors = {n: rel_err(actual[n].grad, expected_grads[n], floor) for n in names}
    bad = {n: e for n, e in errors.items() if not e <= TOL}
    assert not bad, f"meta-gradient differs from the reference: {bad}"
    # The test has teeth: every network parameter has a non-trivial meta-gradient, except exactly those
    # whose meta-gradient is zero in exact arithmetic (there the reference's is rounding noise).
    largest = max(float(g.norm()) for g in expected_grads.values())
    nontrivial = {n[len("model."):] for n in names if n.startswith("model.") and float(expected_grads[n].norm()) > 1e-8 * largest}
    zero = zero_gradient_parameters(learner.model, per_step_names)
    assert nontrivial == {n for n, _ in learner.model.named_parameters()} - zero, sorted(nontrivial ^ zero)
    return out


def zero_gradient_parameters(net, per_step_names):
    """The network parameters whose meta-gradient is zero in exact arithmetic: the bias of a conv or linear
    layer directly followed by a BatchNorm with batch statistics (which cancels it), and the BatchNorm
    affine parameters that MAML++ per-step BatchNorm replaces by its per-step copies."""
    plan = ref.layer_plan(net)
    cancelled = {f"{prefix}bias" for (prefix, layer), (_, following) in zip(plan, plan[1:])
                 if isinstance(layer, (nn.Conv2d, nn.Linear)) and layer.bias is not None
                 and isinstance(following, nn.modules.batchnorm._BatchNorm)}
    return cancelled | set(per_step_names)


# --------------------------------------------------------------------------- algorithms x backends
# name -> (learner class, learner kwargs, network, (ways, shots, queries, tasks), reference setup)
#   reference setup: adapted rule, lr_mode, per_step_bn, inner_scale, train/eval, first-order schedule
CASES = {
    "maml_2nd_order": (mf.MAML, dict(inner_lr=0.4, inner_steps=2), "conv4_stride_layer", (2, 1, 2, 2), {}),
    "fomaml": (mf.MAML, dict(inner_lr=0.4, inner_steps=2, first_order=True), "fc_layer", (3, 2, 3, 2),
               dict(second_order=False)),
    "anil": (mf.ANIL, dict(inner_lr=0.5, inner_steps=2), "conv4_maxpool_batch", (3, 2, 3, 2), dict(rule="head")),
    "meta_sgd": (mf.MetaSGD, dict(inner_lr=0.3, inner_steps=2), "fc_none", (2, 1, 2, 3),
                 dict(lr_mode="per_element")),
    "lslr": (mf.MAML, dict(inner_lr=0.3, inner_steps=3, inner_lr_mode="per_layer_per_step"), "conv4_stride_none",
             (2, 1, 2, 2), dict(lr_mode="per_layer_per_step")),
    "multi_step_loss": (mf.MAML, dict(inner_lr=0.3, inner_steps=3, multi_step_loss_iterations=4), "fc_layer",
                        (2, 2, 2, 2), dict(multi_step=4, calls=2)),
    "per_step_bn": (mf.MAML, dict(inner_lr=0.3, inner_steps=2, per_step_bn=True, adapt_bn_affine=False),
                    "conv4_maxpool_batch", (2, 1, 3, 2), dict(rule="no_norm", per_step_bn=True)),
    "per_step_bn_regression": (mf.MAML, dict(inner_lr=0.1, inner_steps=2, per_step_bn=True, adapt_bn_affine=False),
                               "mlp_batch_regression", (1, 5, 4, 3), dict(rule="no_norm", per_step_bn=True)),
    "maml_plus_plus": (mf.MAMLPlusPlus, dict(inner_lr=0.2, inner_steps=2, multi_step_loss_iterations=3,
                                             first_order_iterations=1), "conv4_maxpool_batch", (2, 1, 2, 2),
                       dict(rule="no_norm", per_step_bn=True, lr_mode="per_layer_per_step", multi_step=3,
                            first_order_iterations=1, calls=2)),
    "order_annealing": (mf.MAML, dict(inner_lr=0.4, inner_steps=2, first_order_iterations=1), "sinusoid",
                        (1, 4, 3, 2), dict(first_order_iterations=1, calls=2)),
    "no_bn_affine_adaptation": (mf.MAML, dict(inner_lr=0.4, inner_steps=1, adapt_bn_affine=False),
                                "conv4_stride_layer", (3, 2, 3, 2), dict(rule="no_norm")),
    "inner_loss_reference": (mf.MAML, dict(inner_lr=0.1, inner_steps=2, inner_loss="reference"), "fc_layer",
                             (3, 1, 2, 2), dict(inner_scale="reference")),
    "checkpoint_inner_steps": (mf.MAML, dict(inner_lr=0.4, inner_steps=3, checkpoint_inner_steps=True),
                               "conv4_maxpool_batch", (2, 1, 2, 2), {}),
    "checkpoint_meta_sgd": (mf.MetaSGD, dict(inner_lr=0.2, inner_steps=2, checkpoint_inner_steps=True),
                            "fc_layer", (2, 2, 2, 2), dict(lr_mode="per_element")),
    "checkpoint_anil_first_order": (mf.ANIL, dict(inner_lr=0.4, inner_steps=2, first_order=True,
                                                  checkpoint_inner_steps=True), "conv4_stride_layer", (2, 2, 2, 2),
                                    dict(rule="head", second_order=False)),
    # (conv4 with stride: the pooled head, one op on "fused", in ANIL's head-only and FOMAML's first-order steps)
    "anil_pooled_head": (mf.ANIL, dict(inner_lr=0.5, inner_steps=2), "conv4_stride_batch", (3, 2, 3, 2),
                         dict(rule="head")),
    "fomaml_pooled_head": (mf.MAML, dict(inner_lr=0.4, inner_steps=2, first_order=True), "conv4_stride_batch",
                           (2, 1, 2, 2), dict(second_order=False)),
    "zero_inner_steps": (mf.MAML, dict(inner_lr=0.4, inner_steps=0), "fc_layer", (2, 1, 2, 2), {}),
    "eval_inner_steps": (mf.MAML, dict(inner_lr=0.3, inner_steps=1, eval_inner_steps=3), "conv4_stride_none",
                         (2, 1, 2, 2), dict(calls=2, train_then_eval=True)),
    "eval_lslr_more_steps": (mf.MAML, dict(inner_lr=0.3, inner_steps=1, eval_inner_steps=2,
                                           inner_lr_mode="per_layer_per_step"), "sinusoid", (1, 3, 3, 2),
                             dict(lr_mode="per_layer_per_step", calls=2, train_then_eval=True)),
}


#: The "triton" slice of the matrix (see the module doc): conv kernels with the conv+BatchNorm-statistics
#: fusion (maxpool batch) and the conv+ReLU fusion (stride none), the linear kernel (fc), first order,
#: learned per-layer and per-element rates, per-step BatchNorm.
TRITON_CASES = ["maml_2nd_order", "fomaml", "meta_sgd", "lslr", "per_step_bn"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_meta_loss_and_gradient_match_reference(case, backend, make_batch):
    check_case(case, backend, make_batch)


@pytest.mark.parametrize("case", [pytest.param(case, marks=cpu_backend_param("triton").marks) for case in TRITON_CASES])
def test_triton_meta_loss_and_gradient_match_reference(case, make_batch):
    check_case(case, "triton", make_batch)


def check_case(case, backend, make_batch):
    cls, kwargs, net_name, (ways, shots, queries, tasks), setup = CASES[case]
    net, shape, regression = build_network(net_name, ways)
    learner = cls(net, backend=backend, **kwargs)
    perturb_learned_extras(learner)
    adapted = expected_adapted(net, setup.get("rule", "all"))
    assert learner.adapted_names == adapted
    per_step_names = [n for n in batch_norm_names(net) if n not in adapted] if setup.get("per_step_bn") else []
    assert learner.per_step_bn_names == per_step_names
    batch = make_batch(tasks, ways, shots, queries, shape, regression=regression)

    for call in range(setup.get("calls", 1)):
        evaluating = setup.get("train_then_eval") and call == 1
        learner.train(not evaluating)
        steps = kwargs.get("eval_inner_steps", kwargs["inner_steps"]) if evaluating else kwargs["inner_steps"]
        second_order = setup.get("second_order", True)
        if not evaluating and call < setup.get("first_order_iterations", 0):
            second_order = False
        weights = None
        if not evaluating and setup.get("multi_step") and call < setup["multi_step"] and steps > 1:
            weights = ref.maml_pp_step_weights(steps, call, setup["multi_step"])
        cfg = dict(steps=steps, inner_lr=kwargs["inner_lr"], second_order=second_order,
                   lr_mode=setup.get("lr_mode", "fixed"), query_weights=weights,
                   inner_scale=setup.get("inner_scale", "mean"))
        check_against_reference(learner, batch, cfg, adapted, per_step_names)


#: Cases whose convs read θ shared by the tasks at the first inner step: second order, first order,
#: several steps, ANIL (θ of the body shared at every step), checkpointed steps.
SHARED_CONV_CASES = ["maml_2nd_order", "lslr", "anil", "checkpoint_inner_steps", "fomaml_pooled_head"]


@pytest.mark.parametrize("backend", [cpu_backend_param(name) for name in ("torch", "fused")])
@pytest.mark.parametrize("case", SHARED_CONV_CASES)
def test_meta_gradient_with_shared_weight_convolutions(case, backend, make_batch, monkeypatch):
    """The convs of θ shared by the tasks as one dense convolution (`TorchConvPrimitives.shares_weight`,
    which full-size layers take on the CPU), forced here on the test's narrow layers: the meta-loss and
    meta-gradient still match the float64 reference, and the shared formulation did run."""
    monkeypatch.setattr(conv_ops.TorchConvPrimitives, "shared_min_channels", 1)
    calls = []
    as_depth = conv_ops._tasks_as_depth
    monkeypatch.setattr(conv_ops, "_tasks_as_depth", lambda *a: calls.append(1) or as_depth(*a))
    check_case(case, backend, make_batch)
    assert calls


#: Cases whose conv weights keep their inner updates factored when forced (`maml_fast.ops.low_rank_conv`):
#: second order with LayerNorm and stride 2, LSLR's learned step sizes over 3 steps, per-step BN weights,
#: first order, unadapted norms, more steps in eval than in training, MAML++ (multi-step loss, first-order
#: iterations), checkpointed steps (the factors pass through as tensors); and cases that must not factor
#: (ANIL adapts no conv).
LOW_RANK_CASES = ["maml_2nd_order", "lslr", "per_step_bn", "fomaml_pooled_head", "no_bn_affine_adaptation",
                  "eval_inner_steps", "maml_plus_plus", "checkpoint_inner_steps"]
DENSE_ONLY_CASES = ["anil", "checkpoint_anil_first_order"]


@pytest.mark.parametrize("backend", [cpu_backend_param(name) for name in ("torch", "fused")])
@pytest.mark.parametrize("case", LOW_RANK_CASES + DENSE_ONLY_CASES)
def test_meta_gradient_with_factored_conv_updates(case, backend, make_batch, monkeypatch):
    """Every conv weight allowed to keep its updates factored (which full-size wide layers on small maps
    do on the CPU), forced here on the test's narrow layers: the meta-loss and meta-gradient still match
    the float64 reference, and the factored convolutions ran exactly where they may."""
    monkeypatch.setattr(conv_ops.TorchConvPrimitives, "per_task_min_channels", 1)
    monkeypatch.setattr(conv_ops.TorchConvPrimitives, "low_rank_max_fraction", float("inf"))
    calls = []
    correction = low_rank_conv.correction
    monkeypatch.setattr(low_rank_conv, "correction", lambda *a: calls.append(1) or correction(*a))
    check_case(case, backend, make_batch)
    assert bool(calls) == (case in LOW_RANK_CASES)


def test_per_element_step_sizes_keep_conv_weights_dense(make_batch, monkeypatch):
    """Meta-SGD's step size has the weight's shape, so its update has no low-rank form: nothing factors."""
    monkeypatch.setattr(conv_ops.TorchConvPrimitives, "per_task_min_channels", 1)
    monkeypatch.setattr(conv_ops.TorchConvPrimitives, "low_rank_max_fraction", float("inf"))
    decisions = []
    monkeypatch.setattr(conv_ops.TorchConvPrimitives, "factors_updates", lambda *a: decisions.append(a) or True)
    net, shape, _ = build_network("conv4_stride_none", 2)
    batch = make_batch(2, 2, 1, 2, shape)
    mf.MetaSGD(net, inner_lr=0.3, inner_steps=2, backend="torch")(batch).loss.backward()
    assert not decisions
    mf.MAML(net, inner_lr=0.3, inner_steps=2, backend="torch")(batch).loss.backward()
    assert decisions


# --------------------------------------------------------------------------- networks x shapes
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("net_name,ways,shots,queries,tasks,steps", [
    ("conv4_stride_none", 2, 1, 1, 2, 1),
    ("conv4_maxpool_batch", 3, 2, 3, 3, 2),
    ("fc_layer", 2, 1, 2, 2, 3),
    ("fc_batch", 3, 1, 2, 2, 2),
    ("conv4_stride_batch", 2, 1, 3, 2, 2),
    ("sinusoid", 1, 5, 4, 3, 2),
])
def test_second_order_maml_networks(net_name, ways, shots, queries, tasks, steps, backend, make_batch):
    net, shape, regression = build_network(net_name, ways)
    learner = mf.MAML(net, inner_lr=0.3, inner_steps=steps, backend=backend)
    batch = make_batch(tasks, ways, shots, queries, shape, regression=regression)
    adapted = expected_adapted(net, "all")
    check_against_reference(learner, batch, dict(steps=steps, inner_lr=0.3), adapted, [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("net_name,ways", [("conv4_maxpool_batch", 2), ("conv4_stride_layer", 3)])
def test_float32_backends_agree_with_float64_reference(net_name, ways, backend, make_batch):
    """float32: the backend's meta-loss and meta-gradient within ~1e-5 of the float64 truth."""
    net64, shape, regression = build_network(net_name, ways)
    batch64 = make_batch(2, ways, 2, 2, shape, regression=regression)
    theta = {n: p.detach().clone().requires_grad_() for n, p in net64.named_parameters()}
    expected, _, _ = ref.meta_objective(net64, theta, ref.Config(steps=2, inner_lr=0.3), batch64)
    expected_grads = dict(zip(theta, torch.autograd.grad(expected, list(theta.values()))))
    # float32 rounding on gradients that are 0 in exact arithmetic (conv bias before BatchNorm) is
    # measured against 1% of the largest gradient
    floor = 1e-2 * max(float(g.norm()) for g in expected_grads.values())
    net32 = copy.deepcopy(net64).float()
    learner = mf.MAML(net32, inner_lr=0.3, inner_steps=2, backend=backend)
    out = learner(batch64.to(torch.float32))
    out.loss.backward()
    assert rel_err(out.loss.detach().double(), expected.detach()) < 1e-5
    for n, p in net32.named_parameters():
        assert rel_err(p.grad.double(), expected_grads[n], floor) < 3e-5, n


def test_multi_step_loss_weights_match_maml_plus_plus():
    for steps, iteration, anneal in [(2, 0, 4), (3, 1, 4), (5, 7, 10), (4, 100, 10), (3, 3, 4)]:
        actual = mf.multi_step_loss_weights(steps, iteration, anneal)
        expected = ref.maml_pp_step_weights(steps, iteration, anneal) if iteration < anneal else [0.0] * (steps - 1) + [1.0]
        assert actual == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------- second order is real
def _flat_grad(learner, batch):
    learner.zero_grad(set_to_none=True)
    learner(batch).loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in learner.model.parameters()])


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_order_gradient_is_present_and_matches_finite_differences(backend, make_batch):
    net = mf.models.mlp((3, 4, 2)).double()
    batch = make_batch(2, 2, 2, 3, (3,))
    second = mf.MAML(net, inner_lr=0.8, inner_steps=2, backend=backend)
    first = mf.MAML(net, inner_lr=0.8, inner_steps=2, first_order=True, backend=backend)
    g2, g1 = _flat_grad(second, batch), _flat_grad(first, batch)

    params = list(net.parameters())
    eps, fd = 1e-6, []
    with torch.no_grad():
        for p in params:
            flat = p.view(-1)
            for i in range(flat.numel()):
                old = flat[i].item()
                flat[i] = old + eps
                plus = second(batch).loss.item()
                flat[i] = old - eps
                minus = second(batch).loss.item()
                flat[i] = old
                fd.append((plus - minus) / (2 * eps))
    fd = torch.tensor(fd, dtype=torch.float64)
    assert rel_err(g1, g2) > 0.05, "first- and second-order meta-gradients should differ clearly"
    assert rel_err(g2, fd) < 1e-6, rel_err(g2, fd)
    assert rel_err(g1, fd) > 0.05, "the first-order gradient unexpectedly matches finite differences"


# --------------------------------------------------------------------------- adapt / predict
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("net_name,ways,steps", [("conv4_maxpool_batch", 3, 2), ("fc_layer", 2, 3), ("sinusoid", 1, 2)])
def test_adapt_and_predict_match_reference(net_name, ways, steps, backend, make_batch):
    net, shape, regression = build_network(net_name, ways)
    learner = mf.MAML(net, inner_lr=0.3, inner_steps=1, backend=backend)
    batch = make_batch(3, ways, 2, 3, shape, regression=regression)
    fast = learner.adapt(batch.support_x, batch.support_y, steps=steps)
    assert fast.steps == steps and fast.num_tasks == 3
    logits = learner.predict(fast, batch.query_x)

    theta = {n: p.detach() for n, p in net.named_parameters()}
    theta = {n: t.clone().requires_grad_() for n, t in theta.items()}
    cfg = ref.Config(steps=steps, inner_lr=0.3, second_order=False)
    for t in range(3):
        history = ref.adapt_one_task(ref.layer_plan(net), theta, cfg, batch.support_x[t], batch.support_y[t])
        for name, value in history[steps].items():
            assert rel_err(fast.params[name][t], value.detach()) <= TOL, name
        expected = ref.predict_one_task(net, theta, cfg, history[steps], steps, batch.query_x[t]).detach()
        assert rel_err(logits[t], expected) <= TOL
