"""A steering request's fields are declared once (`htcli.generate.request_fields`): SteerRequest's
defaults and checks, the server's JSON and form schemas and `ht steer`'s options agree with it."""

import dataclasses

import pytest
import typer

from htcli.cli import app
from htcli.errors import HTError
from htcli.generate.request_fields import FIELDS
from htcli.generate.steer import SteerRequest
from htcli.serve.parse import Body
from htcli.serve.schema import _FORM_FIELDS

# SteerRequest's name where it differs (a sweep of strengths), and the option's Python name in `ht steer`.
REQUEST_NAMES = {"strength": "strengths"}
CLI_NAMES = {"concepts": "concept", "gap_correction": "no_gap_correction"}


def test_steer_request_takes_its_defaults_and_bounds_from_the_declaration():
    defaults = {f.name: f.default for f in dataclasses.fields(SteerRequest)}
    for name, field in FIELDS.items():
        if field.type is not list and name != "prompt":
            assert defaults[REQUEST_NAMES.get(name, name)] == field.default, name
    assert FIELDS["method"].choices == ("hypertransport", "prompt")
    for name, bad in (("num_images", 0), ("method", "magic")):
        with pytest.raises(HTError, match=f"^{name}= must be"):
            SteerRequest("a cat", **{name: bad}).check()


def test_the_servers_schemas_derive_from_the_declaration():
    body = Body.model_json_schema()["properties"]
    for name, field in FIELDS.items():
        described = body[name]
        assert described["description"] == field.help and described.get("default") == field.default, name
        plain = next((option for option in described.get("anyOf", []) if option.get("type") != "null"), described)
        if field.type in (int, float):
            assert (plain.get("minimum"), plain.get("maximum")) == (field.minimum, field.maximum), name
        if field.max_length is not None:
            assert field.max_length in (plain.get("maxLength"), plain.get("maxItems")), name
        assert _FORM_FIELDS[name] == field.form_schema()
    assert set(_FORM_FIELDS) == set(FIELDS)


def test_ht_steer_takes_defaults_and_help_from_the_declaration():
    steer = typer.main.get_command(app).commands["steer"]
    options = {param.name: param for param in steer.params}
    for name, field in FIELDS.items():
        if name == "prompt":
            continue
        option = options[CLI_NAMES.get(name, name)]
        if name not in CLI_NAMES and field.type is not list:
            default = getattr(option.default, "value", option.default)
            assert default == field.default, name
        if name != "gap_correction":  # the CLI's switch says the opposite: --no-gap-correction
            assert option.help.startswith(field.help), name
