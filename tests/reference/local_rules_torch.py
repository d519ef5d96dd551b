"""Plain digital PyTorch implementations of counter-current learning and Forward-Forward, written from
the papers' equations (autograd on each layer's local loss, inputs detached), for comparison with the
substrate's rules in models.local: same data, same initial weights, same hyper-parameters, the same
minibatches and negative labels (drawn from a generator seeded alike, in the same order as
models.train.train draws them)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from models.data import minibatches

ACTIVATIONS = {"tanh": torch.tanh, "hard_sigmoid": lambda u: torch.clamp(u, 0.0, 1.0), "identity": lambda u: u}


def _tensors(arrays):
    return [torch.tensor(np.array(a, dtype=np.float64), requires_grad=True) for a in arrays]


class CounterCurrentMLP:
    """Forward weights ``fw`` [(W_l, b_l)] and readout (V, c); feedback ``fb`` [(B, e)] from the top
    (classes -> c_{L-1}) down to c_0 (linear)."""

    def __init__(self, fw, readout, fb, activation="tanh", scale=128.0):
        self.fw = [_tensors(p) for p in fw]
        self.readout = _tensors(readout)
        self.fb = [_tensors(p) for p in fb]
        self.act, self.scale = ACTIVATIONS[activation], scale

    def forward_parameters(self):
        return [t for p in self.fw for t in p] + self.readout

    def feedback_parameters(self):
        return [t for p in self.fb for t in p]

    def logits(self, x):
        a = x
        for W, b in self.fw:
            a = self.act(F.linear(a.detach(), W, b))
        return F.linear(a.detach(), *self.readout)

    def loss(self, x, labels):
        """The counter-current loss: layer-pair terms (every input detached) and the readout's CE."""
        K = self.readout[0].shape[0]
        acts = [x]
        for W, b in self.fw:
            acts.append(self.act(F.linear(acts[-1].detach(), W, b)))
        z = F.linear(acts[-1].detach(), *self.readout)
        c, sig = torch.eye(K, dtype=torch.float64), []
        for i, (B, e) in enumerate(self.fb):
            c = F.linear(c.detach(), B, e)
            c = c if i == len(self.fb) - 1 else self.act(c)
            sig.append(c)
        y = F.one_hot(labels, K).double()
        loss = F.cross_entropy(z, labels)
        for a, c in zip(acts, sig[::-1]):  # (x, c_0), (a_1, c_1), ...
            loss = loss + self.scale * ((a @ c.T - y) ** 2).sum() / (a.shape[1] * K * len(x))
        return loss


def train_counter_current(model: CounterCurrentMLP, data, *, epochs, batch_size, lr, clip, seed):
    """SGD (no momentum) on each network, gradients clipped per network; the test accuracy after training."""
    opt_f = torch.optim.SGD(model.forward_parameters(), lr=lr)
    opt_b = torch.optim.SGD(model.feedback_parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    x, y = torch.tensor(data.x_train, dtype=torch.float64), torch.tensor(data.y_train)
    for _ in range(epochs):
        for idx in minibatches(len(x), batch_size, rng):
            opt_f.zero_grad(), opt_b.zero_grad()
            model.loss(x[idx], y[idx]).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.forward_parameters(), clip)
                torch.nn.utils.clip_grad_norm_(model.feedback_parameters(), clip)
            opt_f.step(), opt_b.step()
    with torch.no_grad():
        pred = model.logits(torch.tensor(data.x_test, dtype=torch.float64)).argmax(1).numpy()
    return float(np.mean(pred == data.y_test))


class ForwardForwardMLP:
    """Layers [(W, b)] (the first (W, b, U) with the label appended through U); ``label`` "replace"
    (the first K inputs) or "append"; ``normalise_input``: the first layer's input (with the label)
    scaled to unit length; ``goodness`` "mean" or "sum" of squares in the training loss."""

    def __init__(self, layers, classes, activation="hard_sigmoid", threshold=0.5, label="replace",
                 normalise_input=False, goodness="mean"):
        self.layers = [_tensors(p) for p in layers]
        self.K, self.act, self.threshold, self.label = classes, ACTIVATIONS[activation], threshold, label
        self.normalise_input, self.kind = normalise_input, goodness

    def parameters(self):
        return [t for p in self.layers for t in p]

    def goodness(self, x, y, kind="mean"):
        """[G_l (batch,)] per layer for x carrying one-hot labels y."""
        if self.label == "replace":
            x = torch.cat([y, x[:, self.K:]], dim=1)
        if self.normalise_input:
            norm = torch.sqrt((x * x).sum(1, keepdim=True) + ((y * y).sum(1, keepdim=True) if self.label == "append"
                                                              else 0)) + 1e-4
            x, y = x / norm, (y / norm if self.label == "append" else y)
        out, h = [], x
        for i, p in enumerate(self.layers):
            u = F.linear(h.detach(), p[0], p[1])
            if len(p) == 3:
                u = u + F.linear(y, p[2])
            a = self.act(u)
            out.append((a * a).mean(1) if kind == "mean" else (a * a).sum(1))
            h = a / (a.norm(dim=1, keepdim=True) + 1e-4)
        return out

    def loss(self, x, y, wrong):
        """sum_l mean_b softplus(theta - G_l(x+)) + mean_{b,n} softplus(G_l(x-_n) - theta); ``wrong``
        (batch, N) wrong labels."""
        pos = self.goodness(x, y, self.kind)
        negs = [self.goodness(x, F.one_hot(wrong[:, n], self.K).double(), self.kind) for n in range(wrong.shape[1])]
        return sum(F.softplus(self.threshold - p).mean()
                   + sum(F.softplus(neg[l] - self.threshold).mean() for neg in negs) / len(negs)
                   for l, p in enumerate(pos))

    def predict(self, x):
        with torch.no_grad():
            eye = torch.eye(self.K, dtype=torch.float64)
            s = torch.stack([sum(self.goodness(x, eye[k].expand(len(x), -1))) for k in range(self.K)], 1)
        return s.argmax(1).numpy()


def draw_wrong(labels, classes, n, rng):
    """n distinct wrong labels per sample, uniformly: the first n of a random order of the others."""
    r = rng.random((len(labels), classes))
    r[np.arange(len(labels)), labels] = np.inf
    return np.argsort(r, axis=1)[:, :n]


def train_forward_forward(model: ForwardForwardMLP, data, *, epochs, batch_size, lr, seed, negatives=1):
    """Adam on every layer's local loss, ``negatives`` wrong labels per sample; the test accuracy."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    x, y = torch.tensor(data.x_train, dtype=torch.float64), torch.tensor(data.y_train)
    for _ in range(epochs):
        for idx in minibatches(len(x), batch_size, rng):
            labels = y[idx]
            wrong = torch.tensor(draw_wrong(labels.numpy(), model.K, negatives, rng))
            opt.zero_grad()
            model.loss(x[idx], F.one_hot(labels, model.K).double(), wrong).backward()
            opt.step()
    return float(np.mean(model.predict(torch.tensor(data.x_test, dtype=torch.float64)) == data.y_test))


def counter_current_from(model, activation="tanh", scale=128.0) -> CounterCurrentMLP:
    """The torch twin of a models.local.ccl.CounterCurrentModel, starting from its parameters."""
    p, net, fb = model.parameters(), model.forward.network, model.feedback
    fw = [(p[f"W:{c.name}"], p[f"b:{c.post}"]) for c in net.connections]
    back = [(p[f"feedback.W:{c.name}"], p[f"feedback.b:{c.post}"]) for c in fb.connections]
    return CounterCurrentMLP(fw, (p["readout.weight"], p["readout.bias"]), back, activation, scale)


def forward_forward_from(model, activation="hard_sigmoid", threshold=0.5, goodness="mean") -> ForwardForwardMLP:
    """The torch twin of a models.local.forward_forward.ForwardForwardModel, from its parameters."""
    p = model.parameters()
    layers = [(p[f"L{i}.W:x->h"], p[f"L{i}.b:h"]) + ((p["L0.W:label->h"],) if f"L{i}.W:label->h" in p else ())
              for i in range(len(model.layers))]
    return ForwardForwardMLP(layers, model.classes, activation, threshold, model.label, model.normalise_input, goodness)
