"""Per-concept baselines: Linear-AcT, LinEAS and mean shift, fitted from a cached dataset.

All three produce per-layer (omega, beta) maps. Linear-AcT and mean shift are closed forms
on pooled activations (`htcli.core.transport`); Linear-AcT can also be fitted incrementally, layer
by layer on activations already steered upstream. LinEAS optimises all layers jointly, end to
end through the frozen denoiser, with the W2 loss at every hooked layer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from htcli.core.transport import (
    Maps,
    fit_linear_act,
    fit_mean_shift,
    prox_sparse_group_lasso,
)
from htcli.data.forward import Frozen
from htcli.errors import HTError
from htcli.methods.objective import w2_backward
from htcli.models.call import DenoiserCall


@dataclass
class LineasConfig:
    steps: int = 1000
    lr: float = 1e-2
    optimizer: str = "adam"
    l1: float = 0.0
    group: float = 0.0
    seed: int = 0
    micro_batch: int | None = None  # samples per backward pass; None: what fits in memory; 0: all N at once

    def __post_init__(self) -> None:
        if self.micro_batch is not None and self.micro_batch < 0:
            raise HTError(f"--micro-batch must be 0 (off) or positive, got {self.micro_batch}")
        if self.steps < 1:
            raise HTError(f"--steps must be positive, got {self.steps}")
        if not self.lr > 0:
            raise HTError(f"--lr must be positive, got {self.lr}")
        if self.optimizer not in ("adam", "sgd"):
            raise HTError(f"--optimizer must be adam or sgd, got {self.optimizer!r}")
        if self.l1 < 0 or self.group < 0:
            raise HTError("--l1 and --group must be non-negative")


def _cpu(maps: Maps) -> Maps:
    return {name: (o.detach().float().cpu(), b.detach().float().cpu()) for name, (o, b) in maps.items()}


def fit_mean_shift_maps(source: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> Maps:
    return {name: fit_mean_shift(source[name], target[name]) for name in target}


def fit_linear_act_maps(source: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> Maps:
    """Linear-AcT with every layer estimated independently on the unsteered source."""
    return {name: fit_linear_act(source[name], target[name]) for name in target}


def fit_linear_act_incremental(frozen: Frozen, inputs: DenoiserCall, target: Mapping[str, Tensor]) -> Maps:
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


def check_init(init: Maps, target: Mapping[str, Tensor]) -> None:
    """A warm start must hold a (D,) omega and beta for every layer being fitted."""
    for name, t in target.items():
        if name not in init:
            raise HTError(f"the initial maps have no layer {name!r}; they were made for other layers")
        if any(tuple(x.shape) != (t.shape[-1],) for x in init[name]):
            raise HTError(f"the initial maps of layer {name!r} are not ({t.shape[-1]},) vectors")


def fit_lineas(
    frozen: Frozen,
    inputs: DenoiserCall,
    target: Mapping[str, Tensor],
    config: LineasConfig,
    on_step: Callable[[int, float], None] | None = None,
    init: Maps | None = None,
) -> tuple[Maps, list[float]]:
    """LinEAS: all layers' maps optimised jointly through the frozen model.

    Each step runs the N source samples with the current maps, takes the W2 loss at every
    hooked layer against the (pre-sorted) targets, averages over layers and steps the maps;
    the sparse-group-lasso prox follows each step. Cosine learning-rate schedule. The maps
    start at the identity, or at `init` (a warm start, e.g. HyperTransport's prediction).
    """
    device = frozen.model.device
    torch.manual_seed(config.seed)
    if init is None:
        delta = {n: torch.zeros(t.shape[-1], device=device, requires_grad=True) for n, t in target.items()}
        beta = {n: torch.zeros(t.shape[-1], device=device, requires_grad=True) for n, t in target.items()}
    else:
        check_init(init, target)
        # omega - 1 is exact for omega in [0.5, 2] (Sterbenz), so step 0 runs the given maps bit for bit.
        delta = {n: (init[n][0].float() - 1).to(device).requires_grad_() for n in target}
        beta = {n: init[n][1].float().to(device).clone().requires_grad_() for n in target}
    params = [*delta.values(), *beta.values()]
    optimizer = (
        torch.optim.Adam(params, lr=config.lr) if config.optimizer == "adam" else torch.optim.SGD(params, lr=config.lr, momentum=0.9)
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
    sorted_target = {n: torch.sort(t.float().to(device), dim=0).values for n, t in target.items()}
    history = []
    for step in range(config.steps):
        optimizer.zero_grad(set_to_none=True)
        shared = lambda rows: {n: (1 + delta[n], beta[n]) for n in target}  # noqa: E731
        loss = w2_backward(frozen, inputs, shared, {n: t[None] for n, t in sorted_target.items()}, 1, config.micro_batch)
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


METHOD_FITS = {"linear-act", "lineas", "mean-shift"}


def fit_method(
    method: str,
    frozen: Frozen,
    inputs: DenoiserCall,
    source: Mapping[str, Tensor],
    target: Mapping[str, Tensor],
    lineas: LineasConfig | None = None,
    incremental: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    init: Maps | None = None,
) -> tuple[Maps, float, dict]:
    """Fit one concept with `method`; returns maps, fit seconds and method-specific info.
    `init`: LinEAS's starting maps (default the identity)."""
    if init is not None and method != "lineas":
        raise HTError(f"only LinEAS starts from given maps, not {method}")
    start = time.perf_counter()
    info: dict = {}
    if method == "mean-shift":
        maps = fit_mean_shift_maps(source, target)
    elif method == "linear-act":
        maps = fit_linear_act_incremental(frozen, inputs, target) if incremental else fit_linear_act_maps(source, target)
        info["incremental"] = incremental
    elif method == "lineas":
        config = lineas or LineasConfig()
        maps, history = fit_lineas(frozen, inputs, target, config, on_step, init)
        info |= {"steps": config.steps, "lr": config.lr, "optimizer": config.optimizer, "l1": config.l1,
                 "group": config.group, "loss_first": history[0], "loss_last": history[-1]}
    else:
        raise HTError(f"unknown method {method!r}; use one of {', '.join(sorted(METHOD_FITS))}")
    return _cpu(maps), time.perf_counter() - start, info
