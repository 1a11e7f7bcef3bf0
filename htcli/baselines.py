"""Per-concept baselines: Linear-AcT, LinEAS and mean shift, fitted from a cached dataset.

All three produce per-layer (omega, beta) maps. Linear-AcT and mean shift are closed forms
on pooled activations (`htcli.transport`); Linear-AcT can also be fitted incrementally, layer
by layer on activations already steered upstream. LinEAS optimises all layers jointly, end to
end through the frozen denoiser, with the W2 loss at every hooked layer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from htcli.errors import HTError
from htcli.hooks import Steering
from htcli.models import ModelSpec
from htcli.runner import pooled_activations
from htcli.transport import fit_linear_act, fit_mean_shift, prox_sparse_group_lasso, residual_ratio, w2_loss

Maps = dict[str, tuple[Tensor, Tensor]]


@dataclass
class LineasConfig:
    steps: int = 1000
    lr: float = 1e-2
    optimizer: str = "adam"
    l1: float = 0.0
    group: float = 0.0
    seed: int = 0
    micro_batch: int = 0  # samples per backward pass; 0 = all N at once

    def __post_init__(self) -> None:
        if self.micro_batch < 0:
            raise HTError(f"--micro-batch must be 0 (off) or positive, got {self.micro_batch}")
        if self.steps < 1:
            raise HTError(f"--steps must be positive, got {self.steps}")
        if not self.lr > 0:
            raise HTError(f"--lr must be positive, got {self.lr}")
        if self.optimizer not in ("adam", "sgd"):
            raise HTError(f"--optimizer must be adam or sgd, got {self.optimizer!r}")
        if self.l1 < 0 or self.group < 0:
            raise HTError("--l1 and --group must be non-negative")


@dataclass
class Frozen:
    """A frozen denoiser, its hooked layers, and batched forward passes from cached inputs."""

    spec: ModelSpec
    model: nn.Module
    layers: Mapping[str, nn.Module]
    batch_size: int = 32

    def pooled(self, inputs: Mapping[str, Tensor], maps: Maps | None = None, grad: bool = False) -> dict[str, Tensor]:
        """Pooled (N, D) activations of every hooked layer for all N samples of `inputs`.

        `maps` hold (D,) tensors shared by all samples, or (N, D) per-sample maps.
        """
        n = inputs["noise"].shape[0]
        parts: dict[str, list[Tensor]] = {name: [] for name in self.layers}
        with torch.set_grad_enabled(grad):
            for start in range(0, n, self.batch_size):
                rows = slice(start, start + self.batch_size)
                batch = {k: v[rows] for k, v in inputs.items()}
                steering = None
                if maps:
                    steering = Steering({name: (o[rows], b[rows]) if o.ndim == 2 else (o, b) for name, (o, b) in maps.items()})
                out = pooled_activations(self.spec, self.model, self.layers, batch, steering)
                for name in self.layers:
                    parts[name].append(out[name])
        return {name: torch.cat(p) for name, p in parts.items()}

    def execution_order(self, inputs: Mapping[str, Tensor]) -> list[str]:
        """Hooked layers in the order the forward pass reaches them (for UNets this is not
        the order of their names)."""
        one = {k: v[:1] for k, v in inputs.items()}
        with torch.no_grad():
            return list(pooled_activations(self.spec, self.model, self.layers, one))


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


def _cpu(maps: Maps) -> Maps:
    return {name: (o.detach().float().cpu(), b.detach().float().cpu()) for name, (o, b) in maps.items()}


def fit_mean_shift_maps(source: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> Maps:
    return {name: fit_mean_shift(source[name], target[name]) for name in target}


def fit_linear_act_maps(source: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> Maps:
    """Linear-AcT with every layer estimated independently on the unsteered source."""
    return {name: fit_linear_act(source[name], target[name]) for name in target}


def fit_linear_act_incremental(frozen: Frozen, inputs: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> Maps:
    """Linear-AcT, layer l fitted on source activations with layers < l already steered."""
    maps: Maps = {}
    for name in frozen.execution_order(inputs):
        steered = frozen.pooled(inputs, maps)  # layer `name` itself is not steered yet
        maps[name] = fit_linear_act(steered[name], target[name])
    return maps


def step_sizes(optimizer: torch.optim.Optimizer, param: Tensor, lr: float) -> Tensor:
    """Per-entry step sizes of the last update: `lr` for SGD, `lr / (sqrt(v_hat) + eps)` for
    Adam. Taking the prox in the optimizer's own metric keeps `l1`/`group` in units of the
    loss gradient (a neuron stays at the identity when its gradient is below `l1`) whichever
    optimizer runs; with Adam's raw `lr` every coordinate would drift by ~lr per step.
    """
    state = optimizer.state.get(param, {})
    if "exp_avg_sq" not in state:
        return torch.full_like(param, lr)
    beta2, eps = optimizer.param_groups[0]["betas"][1], optimizer.param_groups[0]["eps"]
    v_hat = state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))
    return lr / (v_hat.sqrt() + eps)


def fit_lineas(
    frozen: Frozen,
    inputs: Mapping[str, Tensor],
    target: Mapping[str, Tensor],
    config: LineasConfig,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[Maps, list[float]]:
    """LinEAS: all layers' maps optimised jointly through the frozen model (identity init).

    Each step runs the N source samples with the current maps, takes the W2 loss at every
    hooked layer against the (pre-sorted) targets, averages over layers and steps the maps;
    the sparse-group-lasso prox follows each step. Cosine learning-rate schedule.
    """
    device = frozen.model.device
    torch.manual_seed(config.seed)
    delta = {n: torch.zeros(t.shape[-1], device=device, requires_grad=True) for n, t in target.items()}
    beta = {n: torch.zeros(t.shape[-1], device=device, requires_grad=True) for n, t in target.items()}
    params = [*delta.values(), *beta.values()]
    optimizer = (
        torch.optim.Adam(params, lr=config.lr) if config.optimizer == "adam" else torch.optim.SGD(params, lr=config.lr, momentum=0.9)
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
    sorted_target = {n: torch.sort(t.float().to(device), dim=0).values for n, t in target.items()}
    history = []
    for step in range(config.steps):
        optimizer.zero_grad(set_to_none=True)
        if config.micro_batch:
            shared = lambda rows: {n: (1 + delta[n], beta[n]) for n in target}  # noqa: E731
            loss = w2_backward(frozen, inputs, shared, {n: t[None] for n, t in sorted_target.items()}, 1, config.micro_batch)
        else:
            pooled = frozen.pooled(inputs, {n: (1 + delta[n], beta[n]) for n in target}, grad=True)
            loss = torch.stack([w2_loss(pooled[n], sorted_target[n], y_is_sorted=True) for n in target]).mean()
            loss.backward()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        schedule.step()
        if config.l1 or config.group:
            with torch.no_grad():
                for n in target:
                    steps = torch.cat([step_sizes(optimizer, delta[n], lr), step_sizes(optimizer, beta[n], lr)])
                    new_delta, new_beta = prox_sparse_group_lasso(delta[n], beta[n], config.l1, config.group, steps)
                    delta[n].copy_(new_delta)
                    beta[n].copy_(new_beta)
        history.append(loss.item())
        if on_step:
            on_step(step, history[-1])
        if not math.isfinite(history[-1]):
            raise HTError(f"LinEAS diverged at step {step} (loss {history[-1]}); lower --lr")
    return _cpu({n: (1 + delta[n], beta[n]) for n in target}), history


def residuals(
    frozen: Frozen, inputs: Mapping[str, Tensor], source: Mapping[str, Tensor], target: Mapping[str, Tensor], maps: Maps
) -> tuple[float, dict[str, float]]:
    """Residual ratio W2(steered, target) / W2(source, target), overall and per layer.

    Overall concatenates every layer's neurons. `inputs`, `source` and `target` are the
    evaluation samples: never the ones the maps were fitted on.
    """
    steered = frozen.pooled(inputs, maps)
    per_layer = {n: residual_ratio(steered[n], source[n], target[n]) for n in target}
    cat = lambda acts: torch.cat([acts[n] for n in target], dim=-1)  # noqa: E731
    return residual_ratio(cat(steered), cat(source), cat(target)), per_layer


METHOD_FITS = {"linear-act", "lineas", "mean-shift"}


def fit_method(
    method: str,
    frozen: Frozen,
    inputs: Mapping[str, Tensor],
    source: Mapping[str, Tensor],
    target: Mapping[str, Tensor],
    lineas: LineasConfig | None = None,
    incremental: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[Maps, float, dict]:
    """Fit one concept with `method`; returns maps, fit seconds and method-specific info."""
    start = time.perf_counter()
    info: dict = {}
    if method == "mean-shift":
        maps = fit_mean_shift_maps(source, target)
    elif method == "linear-act":
        maps = fit_linear_act_incremental(frozen, inputs, target) if incremental else fit_linear_act_maps(source, target)
        info["incremental"] = incremental
    elif method == "lineas":
        config = lineas or LineasConfig()
        maps, history = fit_lineas(frozen, inputs, target, config, on_step)
        info |= {"steps": config.steps, "lr": config.lr, "optimizer": config.optimizer, "l1": config.l1,
                 "group": config.group, "loss_first": history[0], "loss_last": history[-1]}
    else:
        raise HTError(f"unknown method {method!r}; use one of {', '.join(sorted(METHOD_FITS))}")
    return _cpu(maps), time.perf_counter() - start, info
