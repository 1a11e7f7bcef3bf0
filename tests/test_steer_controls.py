"""Steering controls: a negative strength or weight is the reverse transport (towards the inverse
map), and `--layers` / a source's `@LAYERS` choose where an intervention acts."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_steer import _checkpoint
from typer.testing import CliRunner

from htcli.cli import app
from htcli.core.hooks import Steering, hooked, module_width, resolve_layers
from htcli.core.transport import (
    OMEGA_MIN,
    apply_affine,
    at_strength,
    inverse_map,
    residual_ratio,
)
from htcli.data.concepts import load_library
from htcli.data.forward import Frozen, pooled_activations
from htcli.models.record import record_call
from htcli.errors import HTError
from htcli.generate.compose import (
    combine,
    layer_summary,
    resolve_sources,
    select_layers,
    split_layers,
)
from htcli.generate.steer import SteerRequest, steer
from htcli.generate.source_maps import Steerer
from htcli.methods.baselines import fit_linear_act_maps
from htcli.models import denoiser, get_model
from htcli.models.interventions import Intervention, load_intervention

runner = CliRunner()
TINY_LAYERS = [f"transformer_blocks.{i}.norm{k}" for i in range(4) for k in (1, 2)]
FIRST_HALF = "transformer_blocks.[01].*"


@pytest.fixture(scope="module")
def hyper(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("hyper"))


def _map(width, seed=0):
    """A random map with omega in [0.5, 1.5): well clear of 0, so its inverse is exact."""
    g = torch.Generator().manual_seed(seed)
    return 0.5 + torch.rand(width, generator=g), torch.randn(width, generator=g)


# --- Negative strength: the reverse transport ------------------------------------------------


def test_negative_strength_interpolates_towards_the_inverse_map_and_undoes_the_forward_one():
    omega, beta = _map(6)
    omega[0] = -1.5  # a sign flip is invertible too
    z = torch.randn(3, 5, 6)
    torch.testing.assert_close(at_strength(omega, beta, -1.0), inverse_map(omega, beta))
    torch.testing.assert_close(inverse_map(omega, beta), (1 / omega, -beta / omega))
    # Strength -1 followed by +1 (and +1 followed by -1) is the identity.
    torch.testing.assert_close(apply_affine(apply_affine(z, omega, beta, -1.0), omega, beta, 1.0), z)
    torch.testing.assert_close(apply_affine(apply_affine(z, omega, beta, 1.0), omega, beta, -1.0), z)
    # -0.5 goes half way to the inverse map, not along the forward map extrapolated backwards.
    scale, shift = at_strength(omega, beta, -0.5)
    torch.testing.assert_close(scale, 1 + 0.5 * (1 / omega - 1))
    torch.testing.assert_close(shift, -0.5 * beta / omega)
    # Positive strengths are exactly as before; 0 and -0.0 are the activation itself.
    assert torch.equal(at_strength(omega, beta, 0.6)[0], 1 + 0.6 * (omega - 1))
    assert apply_affine(z, omega, beta, -0.0) is z


def test_per_sample_strengths_may_mix_signs_in_one_batch():
    z = torch.randn(4, 3, 5)  # (B, T, D)
    strengths = torch.tensor([[-1.0], [0.0], [0.5], [-0.25]])  # (B, 1)
    shared = _map(5)
    per_sample = (torch.stack([_map(5, s)[0] for s in range(4)]), torch.stack([_map(5, s)[1] for s in range(4)]))
    for omega, beta in (shared, per_sample):
        out = apply_affine(z, omega, beta, strengths)
        for i, strength in enumerate(strengths[:, 0].tolist()):
            row = (omega[i], beta[i]) if omega.ndim == 2 else (omega, beta)
            torch.testing.assert_close(out[i], apply_affine(z[i], *row, strength))
        assert torch.equal(out[1], z[1])


def test_omega_near_zero_is_inverted_with_a_capped_gain():
    omega = torch.tensor([0.0, 0.05, -0.05, -1e-8, 0.2, -2.0])
    beta = torch.ones(6)
    cap = 1 / OMEGA_MIN
    inverse_omega, inverse_beta = inverse_map(omega, beta)
    torch.testing.assert_close(inverse_omega, torch.tensor([cap, cap, -cap, -cap, 5.0, -0.5]))
    torch.testing.assert_close(inverse_beta, -inverse_omega)
    # Gradients stay finite through mixed-sign strengths even at omega = 0 (training never sees NaN).
    omega.requires_grad_()
    scale, shift = at_strength(omega, beta, torch.tensor([[1.0], [-1.0]]))
    (scale.sum() + shift.sum()).backward()
    assert torch.isfinite(omega.grad).all()


def test_negative_weights_compose_by_the_same_rule():
    a = {"l": _map(4)}
    # One source at a negative weight is the reverse transport at that strength...
    torch.testing.assert_close(combine([(a, -0.5)])["l"], at_strength(*a["l"], -0.5))
    # ...so reversing a reversed source gives the source back.
    torch.testing.assert_close(at_strength(*combine([(a, -1.0)])["l"], -1.0), a["l"])
    # Displacements add: a pure shift at +1 and -1 cancels exactly.
    shift = {"l": (torch.ones(4), torch.randn(4))}
    omega, beta = combine([(shift, 1.0), (shift, -1.0)])["l"]
    assert torch.equal(omega, torch.ones(4)) and torch.equal(beta, torch.zeros(4))


def test_reverse_then_forward_at_one_layer_of_tiny_is_the_identity(tiny):
    spec, pipe = tiny
    model = denoiser(pipe, spec)
    layers = resolve_layers(model, spec.hook_patterns)
    name = "transformer_blocks.1.norm2"
    maps = {name: _map(module_width(layers[name]))}
    inputs = record_call(pipe, spec, ["a lighthouse on a cliff", "a red barn"], [0, 1])
    with torch.no_grad():
        plain = pooled_activations(model, layers, inputs)
        away = pooled_activations(model, layers, inputs, Steering(maps, -1.0))
        # Hooks on one module run in registration order: the outer -1, then the inner +1.
        with hooked(model, {name: layers[name]}, steering=Steering(maps, -1.0)):
            both = pooled_activations(model, layers, inputs, Steering(maps, 1.0))
    for layer in layers:
        torch.testing.assert_close(both[layer], plain[layer], atol=1e-4, rtol=1e-4)
    assert (away[name] - plain[name]).abs().max() > 0.1 and (away["transformer_blocks.3.norm2"] - plain[
        "transformer_blocks.3.norm2"]).abs().max() > 1e-3  # the reverse map alone does act, downstream too


def test_reverse_strength_moves_a_concepts_targets_towards_its_sources(tiny):
    spec, pipe = tiny
    model = denoiser(pipe, spec)
    frozen = Frozen(spec, model, resolve_layers(model, spec.hook_patterns))
    library = load_library()
    concept, prompts, n = library.resolve("art deco"), library.source_prompts(), 16

    def inputs(texts, seeds):
        return record_call(pipe, spec, list(texts), seeds)

    def cat(acts):  # (N, sum of D) over every hooked layer
        return torch.cat(list(acts.values()), dim=-1)

    fit, fit_seeds = prompts[:n], list(range(n))
    maps = fit_linear_act_maps(frozen.pooled(inputs(fit, fit_seeds)),
                               frozen.pooled(inputs([concept.apply(p) for p in fit], fit_seeds)))
    held_out, seeds = prompts[n:2 * n], list(range(100, 100 + n))  # other prompts and seeds
    source = cat(frozen.pooled(inputs(held_out, seeds)))
    target_inputs = inputs([concept.apply(p) for p in held_out], seeds)
    target = cat(frozen.pooled(target_inputs))

    def residual(strength):  # W2(targets steered at `strength`, sources) / W2(targets, sources)
        steered = frozen.pooled(target_inputs, {name: at_strength(o, b, strength) for name, (o, b) in maps.items()})
        return residual_ratio(cat(steered), target, source)

    away, half, towards = residual(-1.0), residual(-0.5), residual(0.5)
    # Measured with 16 samples: 0.60 at -1, 0.74 at -0.5, 1.30 at +0.5 (further into the concept).
    assert away < 0.8 and away < half < 1 < towards


# --- Where it acts: --layers and @LAYERS --------------------------------------------------------


def test_layer_summary_names_the_layers_compactly():
    pixart = [f"transformer_blocks.{i}.norm{k}" for i in range(28) for k in (1, 2)]
    assert layer_summary(pixart) == "transformer_blocks.{0..27}.norm1, transformer_blocks.{0..27}.norm2"
    sdxl = [f"down_blocks.1.attentions.0.transformer_blocks.{i}.norm1" for i in (0, 1)]
    sdxl.append("mid_block.attentions.0.transformer_blocks.0.norm1")
    assert layer_summary(sdxl) == ("down_blocks.1.attentions.0.transformer_blocks.{0..1}.norm1, "
                                   "mid_block.attentions.0.transformer_blocks.0.norm1")
    assert layer_summary(["a.3.x", "a.5.x", "a.6.x", "conv_in", "b.7"]) == "a.{3,5..6}.x, conv_in, b.7"


def test_sources_parse_weight_and_layers(tmp_path):
    assert split_layers("art deco:0.6@transformer_blocks.1[0-3].*") == ("art deco:0.6", "transformer_blocks.1[0-3].*")
    assert split_layers("time @ the river") == ("time @ the river", None)  # spaces inside the suffix: text
    assert split_layers("art deco @ *.norm1 ") == ("art deco ", "*.norm1")  # spaces around it are not
    assert split_layers("art deco") == ("art deco", None)
    file = tmp_path / "maps.safetensors"
    at_file = tmp_path / "a@b.safetensors"
    for path in (file, at_file):
        identity = {name: (torch.ones(64), torch.zeros(64)) for name in TINY_LAYERS}
        Intervention(identity, "tiny", "lineas", "x").save(path)
    sources = resolve_sources(
        get_model("tiny"),
        concepts=[f"art deco:0.6@{FIRST_HALF}", ("ukiyo-e", -0.5, r"re:.*\.norm2"), "art deco", "time @ the river"],
        interventions=[f"{file}:-1@*.norm1", str(at_file)],
    )
    assert [w for _, w in sources.concepts] == [0.6, -0.5, 1.0, 1.0]
    assert sources.layers == [FIRST_HALF, r"re:.*\.norm2", None, None, "*.norm1", None]
    assert [(w, path) for _, w, path in sources.files] == [(-1.0, str(file)), (1.0, str(at_file))]
    described = sources.describe()
    assert described[0] == {"concept": "Art Deco", "weight": 0.6, "layers": FIRST_HALF}
    assert described[2] == {"concept": "Art Deco", "weight": 1.0}  # no key without a restriction
    for bad, message in [("art deco@re:(", "bad layer regex"), ("art deco@", "the layer pattern is empty"),
                         (("art deco", 1.0, "re:["), "bad layer regex"),
                         (("art deco", 1.0, "*", 2), r"is \(text, weight\)")]:
        with pytest.raises(HTError, match=message):
            resolve_sources(get_model("tiny"), concepts=[bad])


def test_select_layers_intersects_and_names_the_known_layers():
    file_layers = [n for n in TINY_LAYERS if n.endswith("norm2")]
    kept = select_layers([TINY_LAYERS, TINY_LAYERS, file_layers], [None, "*.norm1", None], [FIRST_HALF],
                         ["a", "b", "f"])
    assert kept == [TINY_LAYERS[:4], ["transformer_blocks.0.norm1", "transformer_blocks.1.norm1"],
                    ["transformer_blocks.0.norm2", "transformer_blocks.1.norm2"]]
    assert select_layers([TINY_LAYERS], [None], [], ["a"]) == [TINY_LAYERS]
    known = "transformer_blocks.{0..3}.norm1, transformer_blocks.{0..3}.norm2"
    with pytest.raises(HTError) as error:
        select_layers([TINY_LAYERS], [None], ["transformer_blocks.9.*"], ["a"])
    assert str(error.value) == f"--layers 'transformer_blocks.9.*' matches none of the intervention's layers: {known}"
    with pytest.raises(HTError, match="layer pattern '\\*.norm3' of 'a' matches none of its layers"):
        select_layers([TINY_LAYERS], ["*.norm3"], [], ["a"])
    with pytest.raises(HTError, match="--layers \\*.norm1 matches none of the layers 'f' acts on"):
        select_layers([TINY_LAYERS, file_layers], [None, None], ["*.norm1"], ["a", "f"])


def _steer(*args):
    return runner.invoke(app, ["steer", "a teapot", "--model", "tiny", *args])


def _pngs(folder):
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("0*.png"))]


def test_layers_restrict_the_intervention_and_are_recorded(hyper, tmp_path):
    common = ["--hyper", str(hyper), "--strength=-1,0,1"]
    everywhere = _steer("-c", "art deco", *common, "--out", str(tmp_path / "all"))
    first = _steer("-c", "art deco", *common, "--layers", FIRST_HALF, "--out", str(tmp_path / "first"),
                   "--export", str(tmp_path / "first.safetensors"))
    halves = _steer("-c", f"art deco@{FIRST_HALF}", "-c", "art deco@transformer_blocks.[23].*", *common,
                    "--out", str(tmp_path / "halves"))
    for result in (everywhere, first, halves):
        assert result.exit_code == 0, result.output
    sidecars = [json.loads(p.read_text()) for p in sorted((tmp_path / "first").glob("0*.json"))]
    assert [s["strength"] for s in sidecars] == [-1, 0, 1] and sidecars[0]["layers"] == [FIRST_HALF]
    assert sidecars[0]["steered_layers"] == TINY_LAYERS[:4]
    assert sidecars[0]["sources"] == [{"concept": "Art Deco", "weight": 1.0}]
    assert list(load_intervention(tmp_path / "first.safetensors", "tiny").maps) == TINY_LAYERS[:4]
    plain = json.loads(next((tmp_path / "all").glob("0*.json")).read_text())
    assert plain["layers"] is None and plain["steered_layers"] == TINY_LAYERS
    halves_meta = json.loads(next((tmp_path / "halves").glob("0*.json")).read_text())
    assert [s["layers"] for s in halves_meta["sources"]] == [FIRST_HALF, "transformer_blocks.[23].*"]
    every, cut, split = (_pngs(tmp_path / d) for d in ("all", "first", "halves"))
    # A concept split into two disjoint layer groups at weight 1 each is the concept, up to the float
    # rounding of predicting it twice in one batch (observed: maps within 2e-7, mean pixel difference 1e-4).
    assert all(np.abs(a.astype(float) - b).mean() < 0.05 for a, b in zip(every, split))
    assert np.array_equal(cut[1], every[1])  # strength 0: unhooked
    assert not np.array_equal(cut[0], every[0]) and not np.array_equal(cut[2], every[2])
    assert not np.array_equal(every[0], every[2])  # -1 and +1 differ


def test_each_source_acts_on_its_own_layers_in_one_mixed_batch(hyper, tiny):
    spec, pipe = tiny
    steerer = Steerer(spec, pipe=pipe, hyper=hyper)
    sources = [("art deco", 1.0, FIRST_HALF), ("ukiyo-e", -1.0, "*.norm2")]
    each = steer(steerer, SteerRequest("a teapot", concepts=sources, strengths=[1], each=True))
    assert [i.metadata["steered_layers"] for i in each.images] == [
        TINY_LAYERS[:4], [n for n in TINY_LAYERS if n.endswith("norm2")]]
    alone = [steer(steerer, SteerRequest("a teapot", concepts=[s], strengths=[1])).images[0] for s in sources]
    mixed, single = [np.asarray(i.image, float) for i in each.images], [np.asarray(i.image, float) for i in alone]
    # A sample whose source lacks a layer gets the identity there (observed: equal to the last bit on CPU).
    assert np.abs(mixed[0] - single[0]).mean() < 0.05 and np.abs(mixed[1] - single[1]).mean() < 0.05
    assert np.abs(mixed[0] - single[1]).mean() > 0.2


def test_reverse_transport_notes_neurons_it_cannot_invert_exactly(tiny, tmp_path):
    spec, pipe = tiny
    maps = {name: (torch.ones(64), torch.zeros(64)) for name in TINY_LAYERS}
    maps[TINY_LAYERS[5]][0][:3] = 0.02  # three nearly collapsed neurons
    file = tmp_path / "collapsing.safetensors"
    Intervention(maps, "tiny", "lineas", "x").save(file)
    steerer = Steerer(spec, pipe=pipe)

    def notes(intervention, strengths):
        request = SteerRequest("a red barn", interventions=[intervention], strengths=strengths)
        return " ".join(steer(steerer, request).notes)

    message = f"reverse transport: 3 neuron(s) have |omega| < {OMEGA_MIN:g}"
    assert message in notes(str(file), [-1]) and message in notes(f"{file}:-1", [1])
    assert "reverse transport" not in notes(str(file), [0.5, 1]) and "inverse transport" in notes(str(file), [-2])


@pytest.mark.parametrize(
    "args,message",
    [
        (["-c", "art deco", "--layers", "transformer_blocks.9.*"],
         "matches none of the intervention's layers: transformer_blocks.{0..3}.norm1, transformer_blocks.{0..3}.norm2"),
        (["-c", "art deco", "--layers", "re:(("], "bad layer regex"),
        (["-c", "art deco@re:(("], "bad layer regex"),
        (["-c", "art deco@*.norm3"], "layer pattern '*.norm3' of 'Art Deco' matches none of its layers"),
        (["-c", "art deco@*.norm1", "--layers", "*.norm2"], "matches none of the layers 'Art Deco' acts on"),
    ],
)
def test_bad_layers_are_one_line_errors_before_the_pipeline_loads(hyper, tmp_path, monkeypatch, args, message):
    monkeypatch.setattr("htcli.models.load_pipeline", lambda *a, **k: pytest.fail("the pipeline loaded first"))
    monkeypatch.setattr("htcli.methods.predict.Predictor.maps", lambda *a, **k: pytest.fail("predicted first"))
    result = _steer("--hyper", str(hyper), "--out", str(tmp_path / "o"), *args)
    assert result.exit_code == 1 and message in result.output and result.output.count("Error:") == 1, result.output
    assert not (tmp_path / "o").exists()
