"""What the local rules share: a layer-local gradient through the circuit's parameter VJP, PyTorch's
gradient clipping by global norm, and a step's counts (docs/equations.md, section 9)."""

from __future__ import annotations

import numpy as np

from substrate import Counts, VectorField
from substrate import counts as C


def local_gradients(network, x, free, errors: dict, prefix: str = "") -> dict:
    """{prefix + parameter name: gradient} from layer-local errors ``errors`` = {layer: dL/du (batch,
    size)} at the relaxed states ``free.u``: W_post<-pre gets e_post^T r_pre and b_post the sum of e_post
    over the batch (the circuit's outer products, ``VectorField.param_vjp``). Layers without an error
    contribute nothing, and nothing flows between layers (every error is the derivative of a local
    loss with the layer's input held fixed)."""
    w = np.zeros_like(free.u)
    for name, e in errors.items():
        w[:, network.slices[name]] = e
    vf = free.field if free.field is not None and free.field.network is network else VectorField(network, x)
    g = vf.param_vjp(free.u, w)
    out = {f"{prefix}W:{c.name}": g["weights"][c.name] for c in network.connections
           if not c.tied and c.post in errors}
    out.update({f"{prefix}b:{k}": g["biases"][k] for k in errors})
    return out


def clip_norm(grads: dict, names, max_norm: float) -> int:
    """Scale the gradients ``names`` of ``grads`` in place by max_norm / (||g|| + 1e-6) when that is
    below 1, ||g|| their joint Euclidean norm (``torch.nn.utils.clip_grad_norm_``); 0: no clipping.
    Returns the digital operations it took: a multiply-add per entry for the norm, a multiply per
    entry if it scaled."""
    if not max_norm:
        return 0
    size = sum(int(np.size(grads[k])) for k in names)
    norm = float(np.sqrt(sum(float(np.sum(grads[k] ** 2)) for k in names)))
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for k in names:
            grads[k] = grads[k] * coef
        return 3 * size
    return 2 * size


def step_counts(phases, batch: int, flops: float, held: float) -> Counts:
    """What one step on ``batch`` samples did (a :class:`substrate.Counts`): the relaxations ``phases``
    (their Counts, each with its settling, conversions and analog products), and in digital ``flops``
    operations and ``held`` values held at once (a peak over the phases' own), written once and read
    once (traffic)."""
    run = C.total(phases)
    return run.replace(samples=batch, flops=run.flops + flops, memory=max(run.memory, held),
                       traffic=run.traffic + 2 * held)
