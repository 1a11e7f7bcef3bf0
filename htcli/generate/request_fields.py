"""The fields of a steering request, declared once: type, default, bounds and help.

`SteerRequest` takes its defaults from here and checks its values with `RequestField.check`;
the server's pydantic `Body` (`htcli.serve.parse`) and its form schema (`htcli.serve.schema`)
are built from `RequestField.pydantic` and `RequestField.form_schema`; `ht steer`'s options take
their defaults, bounds and help from here. tests/test_request_fields.py holds them to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field

from htcli.core.strength import DEFAULT_STRENGTH, MAX_STRENGTH
from htcli.errors import HTError

SEED_LIMIT = 2**63  # seeds are 0 <= seed < 2**63: what torch.Generator.manual_seed takes and initial_seed gives back
METHODS = ("hypertransport", "prompt")
MAX_TEXT_CHARS = 200  # a concept (with its :WEIGHT@LAYERS) or a layer pattern
MAX_PATTERNS = 16  # layer patterns in `layers`

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array"}


@dataclass(frozen=True)
class RequestField:
    """One field of a steering request: its Python name (the server's field, the CLI's option
    `--name` with dashes), value type, default, help and bounds."""

    name: str
    type: type  # str, int, float, bool, or list (of text)
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None  # inclusive
    max_length: int | None = None  # characters of a str, items of a list
    choices: tuple[str, ...] = ()

    def check(self, value: Any) -> None:
        """HTError naming the parameter unless `value` (not None) is within the bounds and choices."""
        if value is None:
            return
        if self.choices and value not in self.choices:
            raise HTError(f"{self.name}= must be {' or '.join(self.choices)}, got {value!r:.60}")
        low = self.minimum is not None and value < self.minimum
        high = self.maximum is not None and value > self.maximum
        if low or high:
            bounds = (f"from {self.minimum:g} to {self.maximum:g}" if self.minimum is not None and self.maximum is not None
                      else f"at least {self.minimum:g}" if self.minimum is not None else f"at most {self.maximum:g}")
            raise HTError(f"{self.name}= must be {bounds}, got {value!r:.60}")

    def pydantic(self) -> Any:
        """The pydantic `Field` of the server's JSON body: default, bounds, length and description."""
        bounds = {"ge": self.minimum, "le": self.maximum} if self.type in (int, float) else {}
        return Field(self.default, description=self.help, max_length=self.max_length,
                     **{key: value for key, value in bounds.items() if value is not None})

    def form_schema(self) -> dict:
        """The JSON schema of the field in a form (text; numbers as their type, sweeps as text)."""
        schema: dict[str, Any] = {"type": _JSON_TYPES[self.type], "description": self.help}
        if self.type is list:
            schema["items"] = {"type": "string", "maxLength": MAX_TEXT_CHARS}
            if self.max_length is not None:
                schema["maxItems"] = self.max_length
        elif self.max_length is not None:
            schema["maxLength"] = self.max_length
        if self.minimum is not None and self.type is not str:
            schema["minimum"] = self.minimum
        if self.maximum is not None and self.type is not str:
            schema["maximum"] = self.maximum
        return schema


FIELDS = {field.name: field for field in (
    RequestField("prompt", str, "", "What to generate."),
    RequestField("concepts", list, [], "Concept text, optionally weighted and limited to some layers: 'art deco', "
                 "'art deco:0.6', 'art deco:-0.5' (away from it), 'art deco:0.6@transformer_blocks.[0-9].*'."),
    RequestField("strength", str, None, "Strength, or a sweep '0,0.25,0.5,0.75,1' (one image per value); "
                 f"negative values steer away (towards the inverse map). Default: {DEFAULT_STRENGTH:g}.",
                 minimum=-MAX_STRENGTH, maximum=MAX_STRENGTH),
    RequestField("seed", int, 0, "Seed of the first image; image k uses seed + k.", minimum=0, maximum=SEED_LIMIT - 1),
    RequestField("num_images", int, 1, "Images per strength (one batch).", minimum=1),
    RequestField("method", str, "hypertransport", "hypertransport (steer activations) or prompt (apply the "
                 "concept's template to the prompt).", max_length=32, choices=METHODS),
    RequestField("steer_steps", str, "all", "Denoising steps to steer, 0-based: all, a step '2', or a window "
                 "START:STOP like '0:1' (first step only), '1:' or ':2'.", max_length=32),
    RequestField("layers", list, [], "Steer only the intervention's layers matching these patterns (glob, or regex "
                 "as 're:...'), e.g. 'transformer_blocks.[0-9].*'; any of them. Default: all.", max_length=MAX_PATTERNS),
    RequestField("gap_correction", bool, True, "Move reference-image embeddings into the text region with the "
                 "checkpoint's modality-gap means (off: use them raw)."),
    RequestField("refine", int, None, "N LinEAS steps warm-started from the hypernetwork's prediction of each "
                 "concept, on its fitting samples (method lineas-refine<N>).", minimum=1),
)}
