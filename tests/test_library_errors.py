"""A library that speaks Python: its errors name parameters (`layers=`), never the CLI's flags,
and are ValueErrors; the CLI shows the same mistakes with its options (`--layers`)."""

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

import htcli as ht
from htcli.cli import app
from htcli.cli.messages import cli_words
from htcli.core.hooks import module_width, resolve_layers
from htcli.core.strength import DEFAULT_STRENGTH, MAX_STRENGTH, check_strength, parse_strengths
from htcli.generate.steer import SteerRequest, parse_steer_steps
from htcli.models import denoiser

PACKAGE = Path(ht.__file__).parent
FLAG = re.compile(r"--[a-z]")


def _flag_raises() -> list[str]:
    """Every `raise` outside htcli/cli whose message text holds a string naming a flag."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None and any(
                    isinstance(c, ast.Constant) and isinstance(c.value, str) and FLAG.search(c.value)
                    for c in ast.walk(node.exc)):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    return found


def test_no_library_raise_names_a_cli_flag():
    assert _flag_raises() == []


def _intervention(spec, pipe) -> ht.Intervention:
    maps = {name: (torch.ones(module_width(m)), torch.zeros(module_width(m)))
            for name, m in resolve_layers(denoiser(pipe, spec), spec.hook_patterns).items()}
    return ht.Intervention(maps, spec.id, "lineas", "identity")


def _mistakes(spec, pipe, tmp_path):
    """Calls through the Python API that must fail: (what, call)."""
    iv = _intervention(spec, pipe)
    return [
        ("layers", lambda: ht.apply(pipe, iv, layers=["nothing.like.this"])),
        ("strength", lambda: ht.apply(pipe, iv, strength=7)),
        ("strength", lambda: ht.apply(pipe, iv, strength="0.5")),
        ("path", lambda: iv.save(tmp_path / "x.pt")),
        ("num_images", lambda: SteerRequest("a cat", concepts=["art deco"], num_images=0).check()),
        ("seed", lambda: SteerRequest("a cat", concepts=["art deco"], seed=-1).check()),
        ("method", lambda: SteerRequest("a cat", concepts=["art deco"], method="magic").check()),
        ("each", lambda: SteerRequest("a cat", concepts=["art deco"], each=True, method="prompt").check()),
        ("data", lambda: SteerRequest("a cat", concepts=["art deco"], data=tmp_path).check()),
        ("steer_steps", lambda: parse_steer_steps("9", 2)),
        ("strength", lambda: parse_strengths("0.5,x")),
        ("hyper", lambda: ht.HyperTransport.from_pretrained(tmp_path / "no-such-run", model="tiny")),
        ("resolution", lambda: ht.get_model("tiny").at_resolution(100)),
    ]


def test_provoked_library_errors_name_parameters_and_are_value_errors(tiny, tmp_path):
    spec, pipe = tiny
    for what, call in _mistakes(spec, pipe, tmp_path):
        with pytest.raises(ValueError) as error:
            call()
        message = str(error.value)
        assert isinstance(error.value, ht.HTError) and "--" not in message, message
        assert f"{what}=" in message or what in message, (what, message)
        assert "\n" not in message


def test_the_cli_names_its_options_for_the_same_mistakes(tmp_path):
    root = typer.main.get_command(app)
    steer = root.commands["steer"]
    assert cli_words("layers=['x'] matches none", steer) == "--layers ['x'] matches none"
    assert cli_words("steer_steps='9' is past the last step", steer) == "--steer-steps 9 is past the last step"
    assert cli_words("layers='*.norm1' matches none", steer) == "--layers '*.norm1' matches none"
    assert (cli_words("nothing to steer with: give concepts=, reference_images= or interventions=", steer)
            == "nothing to steer with: give --concept, --reference-image or --intervention")
    assert cli_words("pass overwrite=True", root.commands["train-hyper"], root) == "pass --overwrite"
    assert cli_words("steps= must be positive", root.commands["train-hyper"], root) == "--steps must be positive"
    assert cli_words("ht.apply(x=1) and --strength=-1 stay", steer) == "ht.apply(x=1) and --strength=-1 stay"
    runner = CliRunner()
    for args, named in [(["--num-images", "0"], "--num-images must be at least 1"),
                        (["--seed", "-1"], "--seed must be from 0"),
                        (["--strength", "7"], "--strength takes a finite number"),
                        (["--layers", "nothing.like.this"], "--layers nothing.like.this matches none"),
                        (["--steer-steps", "9"], "--steer-steps 9 is past"),
                        (["--each", "--method", "prompt"], "--each needs --method hypertransport")]:
        result = runner.invoke(app, ["steer", "a cat", "-c", "art deco", "--model", "tiny",
                                     "--out", str(tmp_path / "o"), *args])
        assert result.exit_code == 1 and named in result.output, (args, result.output)


def test_strength_takes_any_real_number_once():
    for value in (0.5, 1, np.float32(0.5), np.int64(1), torch.tensor(0.5), torch.tensor([0.5])):
        assert check_strength(value) == pytest.approx(float(value))
    for bad in (True, "0.5", None, float("nan"), MAX_STRENGTH + 0.1, torch.ones(2), 1j):
        with pytest.raises(ValueError, match="strength= takes a finite number"):
            check_strength(bad)
    assert SteerRequest("a cat").strength_values == [DEFAULT_STRENGTH]
    with pytest.warns(UserWarning, match="strength 1.5 extrapolates"):
        check_strength(1.5, warn=True)


def test_interventions_print_in_one_short_line(tiny):
    spec, pipe = tiny
    text = repr(_intervention(spec, pipe))
    assert "\n" not in text and "tensor" not in text and len(text) < 200 and "'tiny'" in text


def _public_members(obj) -> list[tuple[str, object]]:
    """`obj` itself, and for a class its public methods and properties defined in htcli."""
    members = [(obj.__name__, obj)]
    if isinstance(obj, type) and not issubclass(obj, BaseException):
        for name, member in vars(obj).items():
            if not name.startswith("_") or name == "__repr__":
                members.append((f"{obj.__name__}.{name}", getattr(member, "__func__", getattr(member, "fget", member))))
    return members


def test_every_public_name_has_a_docstring_and_type_hints():
    import inspect

    missing = []
    for export in sorted(set(ht.__all__) - {"__version__"}):
        for name, member in _public_members(getattr(ht, export)):
            if not callable(member) and not isinstance(member, type):
                continue  # a dataclass field's default
            if not inspect.getdoc(member):
                missing.append(f"{name}: no docstring")
            if isinstance(member, type) or not inspect.isfunction(member):
                continue
            signature = inspect.signature(member)
            untyped = [p for p in signature.parameters.values() if p.name not in ("self", "cls")
                       and p.annotation is inspect.Parameter.empty]
            if untyped or signature.return_annotation is inspect.Signature.empty:
                missing.append(f"{name}: untyped {[p.name for p in untyped] or 'return'}")
    assert missing == []
    assert (PACKAGE / "py.typed").is_file()


def test_an_intervention_for_another_model_is_refused_by_name_unless_forced(tiny):
    spec, pipe = tiny
    own = _intervention(spec, pipe)
    other = ht.Intervention(own.maps, "pixart", "lineas", "pixart's")  # tiny's layers and widths: it fits
    with pytest.raises(ValueError, match="made for model 'pixart', and this pipeline's PixArtTransformer2DModel is "
                                         "'tiny'; pass force=True"):
        ht.apply(pipe, other)
    with ht.apply(pipe, other, force=True) as handle:
        assert handle.attached
    with ht.apply(pipe, own) as handle:
        assert handle.attached


def test_steps_take_ints_and_ranges_and_refuse_bools_and_floats(tiny):
    spec, pipe = tiny
    iv = _intervention(spec, pipe)
    for good in (0, range(0, 1), {0}):
        with ht.apply(pipe, iv, steps=good) as handle:
            assert handle.attached
    for bad in (True, 0.5, "0", [0.5], -1):
        with pytest.raises(ValueError, match=r"^steps= takes denoising step numbers from 0 \(an int, a range or a set"):
            ht.apply(pipe, iv, steps=bad)
