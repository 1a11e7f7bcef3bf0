"""The training objective: the W2 loss at every hooked layer, back-propagated in micro-batches.

LinEAS (one concept, shared maps) and the hypernetwork (K concepts, per-sample maps) both
minimise the mean over layers of the per-neuron squared W2 distance between steered source
activations and the concept's targets. `w2_backward` computes its exact gradient with memory
bounded by a micro-batch of samples.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from htcli.core.transport import w2_loss
from htcli.data.forward import Frozen, Maps


def w2_backward(
    frozen: Frozen,
    inputs: Mapping[str, Tensor],
    maps_for: Callable[[slice], Maps],
    sorted_targets: Mapping[str, Tensor],
    groups: int,
    micro_batch: int,
    no_sync: Callable[[], object] | None = None,
) -> Tensor:
    """Back-propagate the W2 loss of `groups` concepts x N samples in micro-batches of samples.

    Rows of `inputs` are concept-major (K * N). `maps_for(rows)` returns the maps of those rows
    (shared (D,) or per-sample), built from whatever is being trained. Pass 1 runs every sample
    without a graph and takes the gradient of the loss with respect to the pooled activations
    (sorting fixes the pairing); pass 2 re-runs micro-batches with a graph and back-propagates
    those gradients. Samples do not interact inside the denoiser, so the accumulated gradient
    equals the one-pass gradient, while memory scales with `micro_batch` instead of K * N.
    Returns the loss (mean over groups and layers), detached.
    """
    total = inputs["noise"].shape[0]
    n = total // groups
    with torch.no_grad():
        pooled = frozen.pooled(inputs, maps_for(slice(0, total)))
    leaves = {layer: p.float().requires_grad_() for layer, p in pooled.items()}
    loss = torch.stack(
        [w2_loss(leaves[layer].view(groups, n, -1), sorted_targets[layer], y_is_sorted=True) for layer in leaves]
    ).mean()
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    for start in range(0, total, micro_batch):
        rows = slice(start, start + micro_batch)
        batch = {key: value[rows] for key, value in inputs.items()}
        out = frozen.pooled(batch, maps_for(rows), grad=True)
        surrogate = sum((out[layer].float() * grads[layer][rows]).sum() for layer in out)
        last = start + micro_batch >= total
        if no_sync is not None and not last:  # DDP: all-reduce once, after the last micro-batch
            with no_sync():
                surrogate.backward()
        else:
            surrogate.backward()
    return loss.detach()
