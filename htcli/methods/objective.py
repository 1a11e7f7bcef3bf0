"""The training objective: the W2 loss at every hooked layer, back-propagated in micro-batches.

LinEAS (one concept, shared maps) and the hypernetwork (K concepts, per-sample maps) both
minimise the mean over layers of the per-neuron squared W2 distance between steered source
activations and the concept's targets. `w2_backward` computes its exact gradient, in one pass
or with memory bounded by a micro-batch of samples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from htcli.core.transport import residual_ratio, w2_loss
from htcli.data.forward import Frozen, Maps
from htcli.models.call import DenoiserCall


def _w2(pooled: Mapping[str, Tensor], sorted_targets: Mapping[str, Tensor], groups: int) -> Tensor:
    """Mean over groups and layers of the W2 loss; rows of `pooled` are group-major (K * N, D)."""
    return torch.stack([
        w2_loss(acts.float().view(groups, acts.shape[0] // groups, -1), sorted_targets[layer], y_is_sorted=True)
        for layer, acts in pooled.items()
    ]).mean()


def w2_backward(
    frozen: Frozen,
    inputs: DenoiserCall,
    maps_for: Callable[[slice], Maps],
    sorted_targets: Mapping[str, Tensor],
    groups: int,
    micro_batch: int | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> Tensor:
    """Back-propagate the W2 loss of `groups` concepts x N samples; returns the loss, detached.

    Rows of `inputs` are concept-major (K * N). `maps_for(rows)` returns the maps of those rows
    (shared (D,) or per-sample), built from whatever is being trained. `sorted_targets` hold
    (K, N, D) targets sorted along samples.

    micro_batch None: the frozen model's (what fits in memory); 0 (or >= K * N): one forward
    pass with a graph. Otherwise two passes: pass 1
    runs every sample without a graph and takes the gradient of the loss with respect to the
    pooled activations (sorting fixes the pairing); pass 2 re-runs micro-batches with a graph
    and back-propagates those gradients. Samples do not interact inside the denoiser, so the
    accumulated gradient equals the one-pass gradient, while memory scales with `micro_batch`.

    `no_sync` (DDP's): every micro-batch but the last runs inside it, its `maps_for` forward
    pass included, so DDP all-reduces the gradients once per call rather than per micro-batch.
    """
    total = len(inputs)
    micro_batch = frozen.micro_batch if micro_batch is None else micro_batch
    if not micro_batch or micro_batch >= total:
        with frozen.graph(inputs, maps_for(slice(0, total))) as pooled:
            loss = _w2(pooled, sorted_targets, groups)
            loss.backward()
        return loss.detach()

    with torch.no_grad():
        pooled = frozen.pooled(inputs, maps_for(slice(0, total)))
    leaves = {layer: p.float().requires_grad_() for layer, p in pooled.items()}
    loss = _w2(leaves, sorted_targets, groups)
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    for start in range(0, total, micro_batch):
        rows = slice(start, start + micro_batch)
        last = start + micro_batch >= total
        batch = inputs[rows]
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            with frozen.graph(batch, maps_for(rows)) as out:
                surrogate = sum((out[layer].float() * grads[layer][rows]).sum() for layer in out)
                surrogate.backward()
    return loss.detach()


def residuals(
    frozen: Frozen, inputs: DenoiserCall, source: Mapping[str, Tensor], target: Mapping[str, Tensor], maps: Maps
) -> tuple[float, dict[str, float]]:
    """Residual ratio W2(steered, target) / W2(source, target), overall and per layer.

    Overall concatenates every layer's neurons. `inputs`, `source` and `target` are the
    evaluation samples: never the ones the maps were fitted on.
    """
    steered = frozen.pooled(inputs, maps)
    per_layer = {n: residual_ratio(steered[n], source[n], target[n]) for n in target}
    cat = lambda acts: torch.cat([acts[n] for n in target], dim=-1)
    return residual_ratio(cat(steered), cat(source), cat(target)), per_layer
