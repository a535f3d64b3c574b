"""FedPM in PyTorch, structured as the authors' reference: one model and one Adam per client,
clients trained one after another, masks drawn with ``torch.bernoulli`` and a custom autograd
backward that returns theta * g.

It exists to (1) check that the JAX models compute the same logits and score gradients, and
(2) time the reference's way of running a round on the same machine. Inputs are numpy arrays
fed through ``torch.from_numpy`` (no torchvision).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class _BernoulliThetaGrad(torch.autograd.Function):
    """m ~ Bernoulli(theta) forward; theta * g backward (the reference's GetSubnet)."""

    @staticmethod
    def forward(ctx, theta, given):
        ctx.save_for_backward(theta)
        return given if given is not None else torch.bernoulli(theta)

    @staticmethod
    def backward(ctx, g):
        (theta,) = ctx.saved_tensors
        return theta * g, None


class _Masked(nn.Module):
    def __init__(self, weight_shape, bias_shape, fan_in: int, scale_kind: str, generator):
        super().__init__()
        c = math.e * math.sqrt(1.0 / fan_in) if scale_kind == "signed_constant" else math.sqrt(2.0 / fan_in)
        sign = lambda shape: (torch.randint(0, 2, shape, generator=generator) * 2 - 1).float()  # noqa: E731
        self.register_buffer("weight", sign(weight_shape) * c)
        self.register_buffer("bias", sign(bias_shape) * c)
        self.weight_scores = nn.Parameter(torch.randn(weight_shape, generator=generator))
        self.bias_scores = nn.Parameter(torch.randn(bias_shape, generator=generator))
        self.given_masks = None  # (weight mask, bias mask) to replay a JAX sample

    def effective(self):
        given = self.given_masks or (None, None)
        mw = _BernoulliThetaGrad.apply(torch.sigmoid(self.weight_scores), given[0])
        mb = _BernoulliThetaGrad.apply(torch.sigmoid(self.bias_scores), given[1])
        return self.weight * mw, self.bias * mb


class MaskedLinear(_Masked):
    def __init__(self, fin, fout, init="signed_constant", generator=None):
        super().__init__((fout, fin), (fout,), fin, init, generator)

    def forward(self, x):
        w, b = self.effective()
        return F.linear(x, w, b)


class MaskedConv2d(_Masked):
    def __init__(self, cin, cout, init="signed_constant", generator=None):
        super().__init__((cout, cin, 3, 3), (cout,), 9 * cin, init, generator)

    def forward(self, x):
        w, b = self.effective()
        return F.conv2d(x, w, b, padding=1)


class TorchMaskedNet(nn.Module):
    """MLP or ConvN with the same layer sizes as ``fedmask_jax.models`` (NCHW inside)."""

    def __init__(self, conv_widths: Sequence[int], dense_widths: Sequence[int], in_shape,
                 num_classes: int, init="signed_constant", seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        h, w, c = in_shape
        self.convs = nn.ModuleList()
        for wd in conv_widths:
            self.convs.append(MaskedConv2d(c, wd, init, g))
            c = wd
        pools = len(conv_widths) // 2
        self.conv_out = (c, h >> pools, w >> pools)
        fin = c * (h >> pools) * (w >> pools) if conv_widths else h * w * c
        self.denses = nn.ModuleList()
        for wd in [*dense_widths, num_classes]:
            self.denses.append(MaskedLinear(fin, wd, init, g))
            fin = wd

    def forward(self, x):  # x: float NCHW, already normalised
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            if i % 2 == 1:
                x = F.max_pool2d(x, 2)
        if self.convs:
            # Flatten in (h, w, c) order, as the JAX model does on NHWC activations.
            x = x.permute(0, 2, 3, 1)
        x = x.reshape(x.shape[0], -1)
        for i, dense in enumerate(self.denses):
            x = dense(x)
            if i < len(self.denses) - 1:
                x = F.relu(x)
        return x

    def masked_layers(self):
        return [*self.convs, *self.denses]


def build_like(model_name: str, in_shape, num_classes: int, width: float = 1.0,
               mlp_hidden=(300, 100), seed: int = 0) -> TorchMaskedNet:
    from fedmask_jax.models import _CONV_DENSE, _CONV_WIDTHS, _scaled

    if model_name == "mlp":
        return TorchMaskedNet((), [_scaled(h, width) for h in mlp_hidden], in_shape, num_classes, seed=seed)
    return TorchMaskedNet([_scaled(c, width) for c in _CONV_WIDTHS[model_name]],
                          [_scaled(d, width) for d in _CONV_DENSE], in_shape, num_classes, seed=seed)


def to_torch_input(x_uint8: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW normalised with mean 0.5, std 0.5 (the reference transform)."""
    x = torch.from_numpy(np.ascontiguousarray(x_uint8, np.float32)).div_(255.0).sub_(0.5).div_(0.5)
    return x.permute(0, 3, 1, 2).contiguous()


def load_jax_variables(net: TorchMaskedNet, frozen, scores, masks=None) -> None:
    """Copies JAX frozen weights and scores (and optionally sampled masks) into ``net``.

    Flax layer order matches ``net.masked_layers()``; kernels go HWIO -> OIHW and (in, out) ->
    (out, in).
    """
    def conv_k(a):
        return torch.from_numpy(np.asarray(a).transpose(3, 2, 0, 1).copy())

    def dense_k(a):
        return torch.from_numpy(np.asarray(a).T.copy())

    names = sorted(frozen, key=lambda n: (not n.startswith("MaskedConv"), int(n.split("_")[-1])))
    with torch.no_grad():
        for layer, name in zip(net.masked_layers(), names):
            conv = isinstance(layer, MaskedConv2d)
            k = conv_k if conv else dense_k
            layer.weight.copy_(k(frozen[name]["kernel"]))
            layer.bias.copy_(torch.from_numpy(np.asarray(frozen[name]["bias"]).copy()))
            layer.weight_scores.copy_(k(scores[name]["kernel"]))
            layer.bias_scores.copy_(torch.from_numpy(np.asarray(scores[name]["bias"]).copy()))
            if masks is not None:
                m = masks[name]
                layer.given_masks = (k(m["kernel_mask"][0]),
                                     torch.from_numpy(np.asarray(m["bias_mask"][0]).copy()))


def train_client(net: TorchMaskedNet, opt: torch.optim.Optimizer, x: torch.Tensor,
                 y: torch.Tensor, epochs: int, batch_size: int, generator: torch.Generator) -> float:
    """The reference's local loop: epochs of reshuffled mini-batches, mean cross-entropy."""
    n, last = len(y), 0.0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator).to(x.device)  # CPU generator, any device
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x[idx]), y[idx])
            loss.backward()
            opt.step()
            last = float(loss.detach())
    return last


class TorchFedPM:
    """Server + clients of the reference, run sequentially in one process."""

    def __init__(self, model_name: str, in_shape, num_classes: int, width=1.0,
                 mlp_hidden=(300, 100), lr=0.1, epsilon=0.01, seed=0, device: str = "cpu"):
        self.device = torch.device(device)
        self.make = lambda: build_like(model_name, in_shape, num_classes, width, mlp_hidden,
                                       seed).to(self.device)
        self.global_net = self.make()
        self.lr, self.epsilon = lr, epsilon
        self.generator = torch.Generator().manual_seed(seed)
        self.clients: dict[int, tuple[TorchMaskedNet, torch.optim.Optimizer]] = {}

    def _client(self, cid: int):
        if cid not in self.clients:  # one model and one Adam per client, as the reference
            net = self.make()
            self.clients[cid] = (net, torch.optim.Adam(net.parameters(), lr=self.lr))
        return self.clients[cid]

    def round(self, client_data: Sequence[tuple[torch.Tensor, torch.Tensor]], cohort,
              epochs: int, batch_size: int) -> dict:
        """One round: broadcast scores, train each client in turn, Beta-aggregate masks."""
        global_scores = [p.detach() for p in self.global_net.parameters()]
        sums = [torch.zeros_like(p) for p in global_scores]
        for cid in cohort:
            net, opt = self._client(int(cid))
            with torch.no_grad():
                for p, g in zip(net.parameters(), global_scores):
                    p.copy_(g)
            x, y = (t.to(self.device) for t in client_data[int(cid)])
            train_client(net, opt, x, y, epochs, batch_size, self.generator)
            with torch.no_grad():
                for s, p in zip(sums, net.parameters()):
                    m = torch.bernoulli(torch.sigmoid(p))
                    s += m * (1 - 2 * self.epsilon) + self.epsilon
        k = len(cohort)
        with torch.no_grad():
            for p, s in zip(self.global_net.parameters(), sums):
                theta = s / k  # Beta mode with the prior reset every round, lambda0 = 1
                p.copy_(torch.log(theta) - torch.log1p(-theta))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # a timed round ends when its work has
        return {"clients": k}
