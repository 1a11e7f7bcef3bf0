"""ht's hooks in diffusers' hook registry: steering (`apply_steering`, `remove_steering`) and
observing layer outputs (`observe`, the capture behind dataset building, fitting and training).

In the style of diffusers' own hooks (`diffusers.hooks.first_block_cache`): a config
(`htcli.core.steering.SteeringConfig`), `ModelHook` subclasses, and an `apply_*` function; the
hooks show in `module._diffusers_hook` under stable names and come off by name:

    apply_steering(pipe.transformer, SteeringConfig(maps, strength=0.6, steps=range(0, 2)))
    image = pipe(prompt).images[0]             # steered
    remove_steering(pipe.transformer)          # exactly the unsteered denoiser again

A steering named NAME (default "ht_steering") is a `SteeringRootHook` named NAME on the denoiser
itself, which holds the config and the denoising step of the running call, and a `SteeringHook`
named NAME on each steered layer, which reads both and steers the layer's output.

The step: with `read_step` (`htcli.generate.apply` passes the pipeline's `scheduler.step_index`,
which `scheduler.set_timesteps` resets at the start of every pipeline call), read as each call
of the denoiser starts. Without it, counted from the denoiser's `timestep` argument: a call with a
lower timestep than the previous call's is the next step, an equal one the same step (guidance
run as two calls), a higher one the first step of a new pipeline call; `reset_state` (run by
diffusers when a pipeline call ends, and by `HookRegistry.reset_stateful_hooks`) starts over.

Order: hooks on one module run in the order they were attached. Steering must sit inside hooks
that may skip a module's computation (caches such as FirstBlockCache replace a block's forward):
attach steering first; attaching it to a layer that already has such a hook is refused.

This module imports diffusers; `htcli.core.hooks` and `htcli.generate.apply` import it when
they attach, so that the CLI starts without diffusers.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import Tensor, nn

from htcli.core.steering import SteeringConfig, layer_output, replace_activation
from htcli.errors import HTError

STEERING = "ht_steering"  # the default name of a steering
OBSERVE = "ht_observe"  # the name of the hooks `observe` attaches


class SteeringRootHook(ModelHook):
    """On the denoiser: the steering's config, and the denoising step of the running call."""

    _is_stateful = True

    def __init__(self, config: SteeringConfig, read_step: Callable[[], int] | None = None) -> None:
        super().__init__()
        self.config, self.read_step = config, read_step
        self.sources: object = None  # what the config was composed from (`htcli.generate.adapters`); never read here
        self.step, self._timestep = -1, None
        self._timestep_index: int | None = None  # position of `timestep` among the forward's arguments

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        parameters = list(inspect.signature(module.forward).parameters)
        self._timestep_index = parameters.index("timestep") if "timestep" in parameters else None
        return module

    @torch.compiler.disable  # Python state, read once per call of the denoiser
    def pre_forward(self, module: nn.Module, *args, **kwargs) -> tuple[tuple, dict]:
        if self.config.steps is not None:
            self.step = self.read_step() if self.read_step is not None else self._counted_step(args, kwargs)
        return args, kwargs

    def _counted_step(self, args: tuple, kwargs: dict) -> int:
        timestep = kwargs.get("timestep")
        if timestep is None and self._timestep_index is not None and len(args) > self._timestep_index:
            timestep = args[self._timestep_index]
        if timestep is None:  # no timestep to read: every call is a step
            return self.step + 1
        value = float(timestep.flatten()[0]) if isinstance(timestep, Tensor) else float(timestep)
        previous, self._timestep = self._timestep, value
        if previous is None or value > previous:
            return 0
        return self.step + (value < previous)

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.step, self._timestep = -1, None
        return module

    def __repr__(self) -> str:
        return f"SteeringRootHook({self.config!r})"


class SteeringHook(ModelHook):
    """On a steered layer: its output steered by the root's config during the steps it steers."""

    def __init__(self, root: SteeringRootHook, name: str) -> None:
        super().__init__()
        self.root, self.name = root, name

    def post_forward(self, module: nn.Module, output: object) -> object:
        config = self.root.config
        if not config.acts_at(self.name, self.root.step):
            return output
        return replace_activation(module, output, config.steer(self.name, layer_output(module, output)))


class ObserveHook(ModelHook):
    """Calls `fn(module, output)` after the module's forward; the output passes unchanged."""

    def __init__(self, fn: Callable[[nn.Module, object], None]) -> None:
        super().__init__()
        self.fn = fn

    def post_forward(self, module: nn.Module, output: object) -> object:
        self.fn(module, output)
        return output


def free_name(module: nn.Module, name: str) -> str:
    """`name`, or the first of `name.1`, `name.2`, ... that no hook on `module` has."""
    taken, suffix = _registry_names(module), 0
    while (candidate := name if suffix == 0 else f"{name}.{suffix}") in taken:
        suffix += 1
    return candidate


def remove_hook(module: nn.Module, name: str) -> None:
    """Take the hook `name` off `module` alone, keeping the hooks attached after it working.

    diffusers' `HookRegistry.remove_hook` hands the removed hook's inner forward to the next
    hook's `forward`; a next hook with `new_forward` (a cache) calls `original_forward` instead,
    which would still run the removed hook, and its own `new_forward` would be dropped.
    Rewired here as `register_hook` wires it."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or name not in registry.hooks:
        return
    index = registry._hook_order.index(name)
    reference = registry._fn_refs[index]
    inner = reference.original_forward or reference.forward
    following = registry.hooks[registry._hook_order[index + 1]] if index + 1 < len(registry._hook_order) else None
    registry.remove_hook(name, recurse=False)
    if following is not None and following.fn_ref.original_forward is not None:
        following.fn_ref.original_forward = inner
        following.fn_ref.forward = functools.update_wrapper(
            functools.partial(following.new_forward, registry._module_ref), following.new_forward)


def _skipping_hooks(module: nn.Module) -> list[str]:
    """Hooks on `module` that replace its forward (and so may skip it): caches."""
    registry = getattr(module, "_diffusers_hook", None)
    return [name for name, hook in registry.hooks.items() if hasattr(hook, "new_forward")] if registry else []


def apply_steering(denoiser: nn.Module, config: SteeringConfig, name: str = STEERING,
                   read_step: Callable[[], int] | None = None) -> SteeringRootHook:
    """Steer `denoiser`'s layers by `config` until `remove_steering(denoiser, name)`.

    The maps move once to the device of `denoiser`'s parameters (float32), and follow it if it
    moves later. `read_step`: the denoising step of the call that is starting (see the module
    docstring); only read when `config.steps` limits the steps. Returns the root hook, whose
    `config` may be replaced between calls (`update_steering` when the layers change)."""
    registry = HookRegistry.check_if_exists_or_initialize(denoiser)
    if name in registry.hooks:
        raise HTError(f"a steering named {name!r} is already attached; remove_steering(denoiser, {name!r}) first")
    root = SteeringRootHook(config, read_step)  # `update_steering` puts its maps on the denoiser's device
    registry.register_hook(root, name)
    try:
        update_steering(denoiser, config, name)
    except Exception:
        remove_steering(denoiser, name)
        raise
    return root


def update_steering(denoiser: nn.Module, config: SteeringConfig, name: str = STEERING) -> None:
    """Replace the config of the steering `name`: hooks come off layers it no longer steers and
    go on the layers it newly steers (in the denoiser's registration order)."""
    root = steering(denoiser, name)
    if root is None:
        raise HTError(f"no steering named {name!r} on this {type(denoiser).__name__}: apply_steering first")
    modules = dict(denoiser.named_modules())
    missing = [layer for layer in config.steered if layer not in modules or not layer]
    if missing:
        raise HTError(f"the maps steer layers {type(denoiser).__name__} does not have: {', '.join(missing[:5])}")
    for layer in config.steered:
        if name not in _registry_names(modules[layer]) and _skipping_hooks(modules[layer]):
            raise HTError(f"{layer} already has hooks that may skip it ({', '.join(_skipping_hooks(modules[layer]))}): "
                          "attach steering before enabling a cache")
    wanted = set(config.steered)
    for layer, module in modules.items():
        if layer and layer not in wanted and name in _registry_names(module):
            remove_hook(module, name)
    root.config = _on_device(denoiser, config)
    for layer in config.steered:
        if name not in _registry_names(modules[layer]):
            HookRegistry.check_if_exists_or_initialize(modules[layer]).register_hook(SteeringHook(root, layer), name)


def _registry_names(module: nn.Module) -> set[str]:
    registry = getattr(module, "_diffusers_hook", None)
    return set(registry.hooks) if registry is not None else set()


def _on_device(denoiser: nn.Module, config: SteeringConfig) -> SteeringConfig:
    """`config` with its tensors on `denoiser`'s device, in float32 (our own copy either way)."""
    parameter = next(denoiser.parameters(), None)
    return config.to(parameter.device) if parameter is not None else config.to("cpu")


def steering(denoiser: nn.Module, name: str = STEERING) -> SteeringRootHook | None:
    """The root hook of the steering `name` on `denoiser`, or None."""
    registry = getattr(denoiser, "_diffusers_hook", None)
    hook = registry.get_hook(name) if registry is not None else None
    return hook if isinstance(hook, SteeringRootHook) else None


def steering_names(denoiser: nn.Module) -> list[str]:
    """The names of the steerings attached to `denoiser`, in the order they were attached."""
    registry = getattr(denoiser, "_diffusers_hook", None)
    return [n for n, hook in registry.hooks.items() if isinstance(hook, SteeringRootHook)] if registry else []


def remove_steering(denoiser: nn.Module, name: str = STEERING) -> None:
    """Take the steering `name` off `denoiser` and all its layers (nothing attached: nothing to do)."""
    for _, module in denoiser.named_modules():
        remove_hook(module, name)


def observe(module: nn.Module, fn: Callable[[nn.Module, object], None], name: str = OBSERVE) -> Callable[[], None]:
    """Call `fn(module, output)` after every forward of `module` (after the hooks attached before
    it, steering included); returns the function that takes the hook off."""
    name = free_name(module, name)
    HookRegistry.check_if_exists_or_initialize(module).register_hook(ObserveHook(fn), name)
    return lambda: remove_hook(module, name)
