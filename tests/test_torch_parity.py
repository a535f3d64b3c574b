"""The JAX models and the PyTorch reference compute the same logits and score gradients."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")

from fedmask_jax import models  # noqa: E402
from fedmask_jax.reference import torch_fedpm  # noqa: E402


@pytest.mark.parametrize("name,shape,width", [("conv4", (28, 28, 1), 0.25), ("mlp", (28, 28, 1), 0.5),
                                              ("conv6", (32, 32, 3), 0.125)])
def test_logits_and_score_gradients_match(name, shape, width):
    model = models.build_model(name, 10, width=width)
    rng = np.random.default_rng(0)
    # Continuous pixel values: with +-c frozen weights, integer pixels make exact cancellations
    # (pre-activations of ~1e-7) likely, where float rounding order decides the ReLU gate.
    x = rng.uniform(0, 255, (16, *shape)).astype(np.float32)
    y = rng.integers(0, 10, 16)
    v = jax.jit(model.init)({"params": jax.random.key(0), "frozen": jax.random.key(1),
                             "mask": jax.random.key(2)}, jnp.asarray(x))
    key = jax.random.key(3)

    def loss_fn(scores):
        logits, state = model.apply({"params": scores, "frozen": v["frozen"]}, jnp.asarray(x),
                                    rngs={"mask": key}, mutable=["intermediates"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean()
        return loss, (logits, state["intermediates"])

    (loss, (logits, masks)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(v["params"])

    net = torch_fedpm.build_like(name, shape, 10, width=width)
    torch_fedpm.load_jax_variables(net, v["frozen"], v["params"], masks)
    t_logits = net(torch_fedpm.to_torch_input(x))
    t_loss = torch.nn.functional.cross_entropy(t_logits, torch.from_numpy(y))
    t_loss.backward()

    np.testing.assert_allclose(t_logits.detach().numpy(), np.asarray(logits), rtol=2e-4, atol=2e-4)
    assert float(t_loss.detach()) == pytest.approx(float(loss), rel=1e-4)
    names = sorted(grads, key=lambda n: (not n.startswith("MaskedConv"), int(n.split("_")[-1])))
    for layer, lname in zip(net.masked_layers(), names):
        g = grads[lname]["kernel"]
        g = np.asarray(g).transpose(3, 2, 0, 1) if g.ndim == 4 else np.asarray(g).T
        scale = np.abs(g).max() + 1e-12
        np.testing.assert_allclose(layer.weight_scores.grad.numpy() / scale, g / scale, atol=2e-4)
        gb = np.asarray(grads[lname]["bias"])
        np.testing.assert_allclose(layer.bias_scores.grad.numpy() / scale, gb / scale, atol=2e-4)


def test_torch_reference_round_learns():
    from tests.helpers import digits

    ds = digits()
    torch.manual_seed(0)  # torch.bernoulli draws from the global generator, as the reference
    fed = torch_fedpm.TorchFedPM("mlp", (8, 8, 1), 10, mlp_hidden=(64,), seed=0)
    x = torch_fedpm.to_torch_input(ds.x_train)
    y = torch.from_numpy(ds.y_train.astype(np.int64))
    data = [(x[i::4], y[i::4]) for i in range(4)]

    def accuracy(masks=10):  # each forward samples a mask: average over several
        with torch.no_grad():
            x_test = torch_fedpm.to_torch_input(ds.x_test)
            return float(np.mean([(fed.global_net(x_test).argmax(1).numpy() == ds.y_test).mean()
                                  for _ in range(masks)]))

    before = accuracy()
    for _ in range(3):
        fed.round(data, [0, 1, 2, 3], epochs=1, batch_size=32)
    # Over seeds 0-7 the 10-mask mean after 3 rounds was 0.45-0.58 (from 0.02-0.10).
    assert accuracy() > max(before + 0.2, 0.35)


FASHION = "/usr/share/datasets/fashion-mnist"


def _tied_windows(activation) -> float:
    """Fraction of 2x2 windows whose positive maximum is reached more than once."""
    win = np.asarray(models._pool_windows(jnp.maximum(activation, 0.0)))
    top = win.max(axis=(2, 4), keepdims=True)
    ties = ((win == top).sum(axis=(2, 4)) > 1) & (top[:, :, 0, :, 0] > 0)
    return float(ties.mean())


def _score_gradients(pool=None):
    """Conv4 (width 1, the authors' init) on 16 real Fashion-MNIST test images: our score
    gradients with masks sampled once, the conv pre-activations, and the images."""
    from fedmask_jax.data import archives

    x = archives.read_idx_gz(os.path.join(FASHION, "t10k-images-idx3-ubyte.gz"))[:16, :, :, None]
    y = archives.read_idx_gz(os.path.join(FASHION, "t10k-labels-idx1-ubyte.gz"))[:16].astype(np.int64)
    model = models.build_model("conv4", 10)
    v = jax.jit(model.init)({"params": jax.random.key(0), "frozen": jax.random.key(1),
                             "mask": jax.random.key(2)}, jnp.asarray(x))

    def loss_fn(scores):
        logits, state = model.apply({"params": scores, "frozen": v["frozen"]}, jnp.asarray(x),
                                    rngs={"mask": jax.random.key(3)}, mutable=["intermediates"],
                                    capture_intermediates=True)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean()
        return loss, state["intermediates"]

    (loss, inter), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(v["params"])
    return x, y, v, loss, inter, grads


@pytest.mark.skipif(not os.path.isdir(FASHION), reason="needs Debian's dataset-fashion-mnist (scripts/setup.sh)")
def test_score_gradients_match_the_reference_at_pooling_ties_on_real_images():
    """Conv4 as the authors run it: real uint8 Fashion-MNIST images, their +-e*sqrt(1/fan_in)
    weights, fixed masks. Integer pixels and +-c weights make tied maxima in the pooling
    windows; PyTorch's max_pool2d routes each window's gradient to its first maximum, and so
    must we: an even split changes conv 1's score gradients by up to 0.3% of its largest
    entry here, and conv 2's by 0.07%.

    The reference's conv outputs are pinned to ours (equal to float32 rounding, and now
    bit-equal), its backward pass left as it is: pre-activations that cancel exactly on the
    images' uniform background come out 0 in one framework and +-1e-7 in the other, by
    summation order, and would otherwise open different ReLU gates and break ties
    differently. What is compared is how each framework routes the same gradient back."""
    x, y, v, loss, inter, grads = _score_gradients()
    pre = [np.asarray(inter[f"MaskedConv_{i}"]["__call__"][0]) for i in range(4)]
    # The batch has ties where it matters: in the windows pooled after conv 2 and conv 4.
    assert _tied_windows(pre[1]) > 0.05 and _tied_windows(pre[3]) > 0.0

    net = torch_fedpm.build_like("conv4", (28, 28, 1), 10)
    torch_fedpm.load_jax_variables(net, v["frozen"], v["params"], inter)

    def pin(i):
        target = torch.from_numpy(pre[i].transpose(0, 3, 1, 2).copy())

        def hook(module, inputs, output):
            assert float((output.detach() - target).abs().max()) < 1e-4  # the same computation
            pinned = target + (output - output.detach())  # our values, its gradient path
            assert torch.equal(pinned, target)
            return pinned
        return hook

    for i, conv in enumerate(net.convs):
        conv.register_forward_hook(pin(i))
    t_loss = torch.nn.functional.cross_entropy(net(torch_fedpm.to_torch_input(x)), torch.from_numpy(y))
    t_loss.backward()
    assert float(t_loss.detach()) == pytest.approx(float(loss), rel=1e-5)
    names = sorted(grads, key=lambda n: (not n.startswith("MaskedConv"), int(n.split("_")[-1])))
    for layer, name in zip(net.masked_layers(), names):
        g = np.asarray(grads[name]["kernel"])
        g = g.transpose(3, 2, 0, 1) if g.ndim == 4 else g.T
        for ours, theirs in ((g, layer.weight_scores.grad.numpy()),
                             (np.asarray(grads[name]["bias"]), layer.bias_scores.grad.numpy())):
            scale = np.abs(theirs).max()
            np.testing.assert_allclose(ours / scale, theirs / scale, atol=1e-5, err_msg=name)
