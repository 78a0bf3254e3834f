"""Bad input fails early with ValueError / TypeError whose message names the offending argument."""
from __future__ import annotations

import math

import pytest
import torch

import maml_fast as mf

BAD = (ValueError, TypeError)


def tiny_net(ways=3):
    return mf.models.conv4(1, ways, hidden=3, downsample="stride", norm="layer")


def fields(make_batch, **kw):
    b = make_batch(2, 3, 1, 2, (1, 8, 8), dtype=torch.float32, **kw)
    return dict(support_x=b.support_x, support_y=b.support_y, query_x=b.query_x, query_y=b.query_y)


def assert_names(excinfo, name):
    assert name in str(excinfo.value), f"message does not name {name!r}: {excinfo.value}"


# --------------------------------------------------------------------------- TaskBatch
@pytest.mark.parametrize("field", ["support_y", "query_x", "query_y"])
def test_mismatched_task_counts(field, make_batch):
    f = fields(make_batch)
    f[field] = f[field][:1]
    with pytest.raises(ValueError) as e:
        mf.TaskBatch(**f)
    assert_names(e, field)


@pytest.mark.parametrize("field,shape_fn", [
    ("support_x", lambda t: t[:, :, 0, 0, 0]),          # [T, S]: no feature dims
    ("query_x", lambda t: t[0]),                        # task dim missing
    ("support_y", lambda t: t.unsqueeze(-1)),           # class labels [T, S, 1]
    ("query_y", lambda t: t[:, 0]),                     # [T]
    ("support_y", lambda t: t[:, :1]),                  # one label for S examples
])
def test_wrong_ranks_and_shapes(field, shape_fn, make_batch):
    f = fields(make_batch)
    f[field] = shape_fn(f[field])
    with pytest.raises(BAD) as e:
        mf.TaskBatch(**f)
    assert_names(e, field)


@pytest.mark.parametrize("field", ["support_x", "query_x"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_inputs(field, value, make_batch):
    f = fields(make_batch)
    f[field] = f[field].clone()
    f[field][1, 0, 0, 2, 3] = value
    with pytest.raises(ValueError) as e:
        mf.TaskBatch(**f)
    assert_names(e, field)


@pytest.mark.parametrize("split", ["support", "query"])
def test_empty_sets(split, make_batch):
    f = fields(make_batch)
    f[f"{split}_x"], f[f"{split}_y"] = f[f"{split}_x"][:, :0], f[f"{split}_y"][:, :0]
    with pytest.raises(ValueError) as e:
        mf.TaskBatch(**f)
    assert_names(e, f"{split}_x")


def test_no_tasks(make_batch):
    f = {k: v[:0] for k, v in fields(make_batch).items()}
    with pytest.raises(ValueError) as e:
        mf.TaskBatch(**f)
    assert_names(e, "support_x")


def test_non_tensor_and_integer_inputs(make_batch):
    f = fields(make_batch)
    with pytest.raises(TypeError) as e:
        mf.TaskBatch(**{**f, "query_x": f["query_x"].tolist()})
    assert_names(e, "query_x")
    with pytest.raises(TypeError) as e:
        mf.TaskBatch(**{**f, "support_x": f["support_x"].long()})
    assert_names(e, "support_x")
    with pytest.raises(TypeError) as e:  # labels in one split, targets in the other
        mf.TaskBatch(**{**f, "query_y": f["query_y"].float()})
    assert "query_y" in str(e.value)


# --------------------------------------------------------------------------- labels (checked by the learner)
@pytest.mark.parametrize("backend", ["torch", "vmap", "loop"])
@pytest.mark.parametrize("field", ["support_y", "query_y"])
@pytest.mark.parametrize("bad_label", [3, -1])
def test_labels_outside_class_range(field, bad_label, backend, make_batch):
    f = fields(make_batch)
    f[field] = f[field].clone()
    f[field][1, 0] = bad_label
    learner = mf.MAML(tiny_net(ways=3), inner_lr=0.1, inner_steps=1, backend=backend)
    with pytest.raises(ValueError) as e:
        learner(mf.TaskBatch(**f))
    assert_names(e, field)


def test_labels_outside_class_range_in_adapt(make_batch):
    f = fields(make_batch)
    learner = mf.MAML(tiny_net(ways=3), inner_lr=0.1, inner_steps=1, backend="torch")
    with pytest.raises(ValueError) as e:
        learner.adapt(f["support_x"], f["support_y"] + 1)
    assert_names(e, "support_y")


def test_float_labels_with_cross_entropy(make_batch):
    f = fields(make_batch)
    f["support_y"], f["query_y"] = f["support_y"].float(), f["query_y"].float()
    learner = mf.MAML(tiny_net(), inner_lr=0.1, inner_steps=1, loss="cross_entropy", backend="torch")
    with pytest.raises(TypeError) as e:
        learner(mf.TaskBatch(**f))
    assert_names(e, "support_y")


def test_float_labels_for_a_classifier_with_default_loss(make_batch):
    """Float class labels [T, S] given to a 3-class network, loss chosen by dtype (mse): one target per
    example cannot match the [T, S, 3] outputs, and the learner says so before any loss runs, with a
    ValueError naming the labels and the model's output shape."""
    f = fields(make_batch)
    f["support_y"], f["query_y"] = f["support_y"].float(), f["query_y"].float()
    learner = mf.MAML(tiny_net(), inner_lr=0.1, inner_steps=1, backend="torch")
    with pytest.raises(ValueError, match=r"floating targets .* the model outputs \(3,\)") as e:
        learner(mf.TaskBatch(**f))
    assert "support_y" in str(e.value) or "query_y" in str(e.value), str(e.value)


# --------------------------------------------------------------------------- learner arguments
@pytest.mark.parametrize("inner_lr", [math.nan, math.inf, -0.1, "0.1", None, True])
def test_bad_inner_lr(inner_lr):
    with pytest.raises(BAD) as e:
        mf.MAML(tiny_net(), inner_lr=inner_lr, inner_steps=1)
    assert_names(e, "inner_lr")


@pytest.mark.parametrize("backend", ["cudnn", "Torch", "", 3])
def test_unknown_backend(backend):
    with pytest.raises(BAD) as e:
        mf.MAML(tiny_net(), inner_lr=0.1, inner_steps=1, backend=backend)
    assert_names(e, "backend")


@pytest.mark.parametrize("name,value", [("inner_steps", -1), ("inner_steps", 1.5), ("inner_steps", True),
                                        ("inner_steps", "2"), ("eval_inner_steps", -2),
                                        ("first_order_iterations", -1), ("multi_step_loss_iterations", 0.5)])
def test_bad_step_counts(name, value):
    kwargs = {"inner_lr": 0.1, "inner_steps": 1, name: value}
    with pytest.raises(BAD) as e:
        mf.MAML(tiny_net(), **kwargs)
    assert_names(e, name)


@pytest.mark.parametrize("name,value", [("inner_lr_mode", "per_task"), ("inner_loss", "sum"), ("loss", "hinge")])
def test_unknown_option_values(name, value):
    with pytest.raises(ValueError) as e:
        mf.MAML(tiny_net(), inner_lr=0.1, inner_steps=1, **{name: value})
    assert_names(e, name)


def test_unknown_adapt_names():
    with pytest.raises(ValueError) as e:
        mf.MAML(tiny_net(), inner_lr=0.1, inner_steps=1, adapt=["12.weight", "no_such_layer.weight"])
    assert_names(e, "adapt")
    assert "no_such_layer.weight" in str(e.value)


def test_adapt_selecting_nothing():
    with pytest.raises(ValueError) as e:
        mf.MAML(tiny_net(), inner_lr=0.1, inner_steps=1, adapt=lambda name: False)
    assert_names(e, "adapt")


def test_anil_unknown_head():
    with pytest.raises(ValueError) as e:
        mf.ANIL(tiny_net(), inner_lr=0.1, inner_steps=1, head="99")
    assert_names(e, "head")


def test_per_step_bn_is_not_silently_ignored():
    """MAML(per_step_bn=True) with the default adapt_bn_affine=True: the BatchNorm affine parameters
    become MAML++ per-step copies (meta-learned, never adapted), whatever adapt_bn_affine says; a model
    without BatchNorm is refused naming per_step_bn."""
    net = mf.models.conv4(1, 2, hidden=3, downsample="maxpool", norm="batch", image_size=16)
    learner = mf.MAML(net, inner_lr=0.1, inner_steps=2, per_step_bn=True)
    batch_norm = [f"{m}.{p}" for m, module in net.named_modules() if isinstance(module, torch.nn.BatchNorm2d)
                  for p in ("weight", "bias")]
    assert learner.per_step_bn_names == batch_norm and len(batch_norm) == 8
    assert not set(batch_norm) & set(learner.adapted_names)
    assert [tuple(p.shape) for p in learner.per_step_bn] == [(3, 3)] * 8  # steps 0..2, 3 channels
    with pytest.raises(ValueError, match="per_step_bn"):
        mf.MAML(tiny_net(), inner_lr=0.1, inner_steps=2, per_step_bn=True)


def test_model_not_a_module():
    with pytest.raises(TypeError) as e:
        mf.MAML(lambda x: x, inner_lr=0.1, inner_steps=1)
    assert_names(e, "model")


def test_forward_needs_a_task_batch(make_batch):
    learner = mf.MAML(tiny_net(), inner_lr=0.1, inner_steps=1)
    with pytest.raises(TypeError) as e:
        learner(tuple(fields(make_batch).values()))
    assert_names(e, "batch")


# --------------------------------------------------------------------------- adapt / predict
def test_adapt_bad_steps(make_batch):
    f = fields(make_batch)
    learner = mf.MAML(tiny_net(), inner_lr=0.1, inner_steps=1, backend="torch")
    for steps in (-1, 1.0):
        with pytest.raises(ValueError) as e:
            learner.adapt(f["support_x"], f["support_y"], steps=steps)
        assert_names(e, "steps")


@pytest.mark.parametrize("backend", ["torch", "loop"])
def test_predict_with_mismatched_task_count(backend, make_batch):
    b = make_batch(3, 3, 1, 2, (1, 8, 8), dtype=torch.float32)
    learner = mf.MAML(tiny_net(), inner_lr=0.1, inner_steps=1, backend=backend)
    fast = learner.adapt(b.support_x, b.support_y, steps=1)
    for query_x in (b.query_x[:2], torch.cat([b.query_x, b.query_x[:1]]), b.query_x[0]):  # 2, 4 tasks; no task dim
        with pytest.raises(ValueError) as e:
            learner.predict(fast, query_x)
        assert_names(e, "query_x")
    with pytest.raises(TypeError) as e:
        learner.predict(fast.params, b.query_x)
    assert_names(e, "fast")


@pytest.mark.parametrize("backend", ["torch", "loop"])
def test_predict_with_wrong_example_shape(backend, make_batch):
    """Query examples with 2 channels for a network adapted on 1-channel images: predict() compares
    them with the support examples' shape that adapt() recorded and raises a ValueError naming
    query_x before the network sees them (a network that flattens first would otherwise accept a
    wrongly shaped query of the right size)."""
    b = make_batch(3, 3, 1, 2, (1, 8, 8), dtype=torch.float32)
    learner = mf.MAML(tiny_net(), inner_lr=0.1, inner_steps=1, backend=backend)
    fast = learner.adapt(b.support_x, b.support_y, steps=1)
    with pytest.raises(ValueError, match=r"query_x has examples of shape \(2, 8, 8\) but the support set") as e:
        learner.predict(fast, b.query_x.repeat(1, 1, 2, 1, 1))
    assert_names(e, "query_x")


def test_adapt_rejects_non_finite_support(make_batch):
    f = fields(make_batch)
    x = f["support_x"].clone()
    x[0, 0, 0, 0, 0] = math.nan
    learner = mf.MAML(tiny_net(), inner_lr=0.1, inner_steps=1, backend="torch")
    with pytest.raises(ValueError) as e:
        learner.adapt(x, f["support_y"])
    assert_names(e, "support_x")


# --------------------------------------------------------------------------- models
@pytest.mark.parametrize("name,value", [
    ("in_channels", 0), ("in_channels", 1.0), ("num_classes", -1), ("num_classes", True),
    ("hidden", 0), ("hidden", "64"), ("downsample", "avgpool"), ("norm", "instance"),
])
def test_conv4_bad_arguments(name, value):
    with pytest.raises(BAD) as e:
        mf.models.conv4(**{name: value})
    assert_names(e, name)


@pytest.mark.parametrize("image_size", [0, -4, 8, 15])
def test_conv4_bad_image_size(image_size):
    with pytest.raises(BAD) as e:
        mf.models.conv4(downsample="maxpool", image_size=image_size)
    assert_names(e, "image_size")
