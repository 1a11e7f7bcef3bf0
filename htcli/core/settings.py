"""What differs between the settings saved beside a result and those of a rerun, said once.

A dataset, baseline fits and a hypernetwork run each save their settings; a rerun into the same
folder (or `resume=True`) with other settings is refused with the list this module writes:
'samples=8 (saved 16)', each setting named by the parameter that sets it (the CLI shows its
option: '--samples 8 (saved 16)').
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


def plain(value: Any) -> Any:
    """Tuples as lists, recursively: JSON-loaded settings compare equal to in-memory ones."""
    return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def settings_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                         shown: Callable[[str, Any], Any] = lambda name, value: value) -> list[str]:
    """'name=value (saved old)' for each setting of `current` whose value differs from `saved`'s
    (a setting `saved` lacks was saved as None), each value as `shown(name, value)` says."""
    return [f"{name}={shown(name, value)} (saved {shown(name, saved.get(name))})" for name, value in current.items()
            if plain(saved.get(name)) != plain(value)]
