"""The strength policy, once: its default, its bounds, when it extrapolates, and what counts as a number.

A strength (and a source's weight) s scales a transport map: 0 is the unsteered model, 1 the
fitted transport, -1 its inverse; |s| > 1 extrapolates beyond what was fitted, which works but
is worth a note, and |s| > MAX_STRENGTH makes images fall apart, so it is refused. `ht steer`,
`ht serve`, `ht.apply` and source weights ("art deco:0.6") all read these.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence

import torch

from htcli.errors import HTError

DEFAULT_STRENGTH = 0.6  # what `ht steer`, `ht serve` and `ht.apply` steer at when no strength is given
MAX_STRENGTH = 2.0  # |strength| and |weight| at most this: beyond 1 a map extrapolates, far beyond it breaks


def real_number(value: object) -> float | None:
    """`value` as a float if it is a real number (a Python or numpy int or float, or a one-element
    real tensor); None for anything else, a bool included."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            return None
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def check_strength(value: object, name: str = "strength", warn: bool = False) -> float:
    """`value` as a float if it is a finite real number from -MAX_STRENGTH to MAX_STRENGTH, else an
    HTError naming the parameter `name`. With `warn`, a value beyond 1 in size warns (in the
    caller's caller) that it extrapolates."""
    number = real_number(value)
    if number is None or not math.isfinite(number) or abs(number) > MAX_STRENGTH:
        raise HTError(f"{name}= takes a finite number from -{MAX_STRENGTH:g} to {MAX_STRENGTH:g}, got {value!r:.60}")
    for note in extrapolation_notes([number]) if warn else ():
        warnings.warn(note, stacklevel=3)
    return number


def parse_strengths(text: str, name: str = "strength") -> list[float]:
    """`"0.6"` or a sweep `"0,0.25,0.5"` (the command line's and a form's spelling), each value checked."""
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise HTError(f"{name}= takes numbers separated by commas, got {text!r}") from None
        values.append(check_strength(value, name))
    return values


def extrapolation_notes(strengths: Sequence[float | None]) -> list[str]:
    """A note for the largest strength beyond 1 and the smallest beyond -1, if any."""
    values = [s for s in strengths if s is not None]
    notes = []
    if values and max(values) > 1:
        notes.append(f"strength {max(values):g} extrapolates beyond the fitted transport")
    if values and min(values) < -1:
        notes.append(f"strength {min(values):g} extrapolates beyond the inverse transport")
    return notes
