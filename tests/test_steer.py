"""`ht steer` and the steering library: strengths, sweeps, composition, reference images, files,
file names, bad input."""

import json

import numpy as np
import pytest
import torch
from conftest import generate
from PIL import Image
from typer.testing import CliRunner

from htcli.cli import app
from htcli.core.files import read_tensors, save_tensors
from htcli.core.hooks import module_width, resolve_layers
from htcli.core.strength import parse_strengths
from htcli.core.transport import at_strength
from htcli.errors import HTError
from htcli.generate import steer as steering
from htcli.generate.compose import combine, parse_weighted
from htcli.generate.save import CAPTION_PX, save_steered
from htcli.generate.source_maps import Steerer
from htcli.generate.steer import SteerRequest, parse_steer_steps, steer
from htcli.methods.hypernetwork import (
    HyperCheckpoint,
    HyperConfig,
    build_hypernetwork,
    load_checkpoint,
)
from htcli.models import denoiser, get_model
from htcli.models.interventions import Intervention, load_intervention
from htcli.models.plan import make_plan

runner = CliRunner()


def _checkpoint(path, encoder="minilm", embed_dim=384, gap=None):
    """A hypernetwork for `tiny` with random (non-identity) heads: steering visibly changes things."""
    layers = tuple((layer.name, layer.width) for layer in make_plan(get_model("tiny")).layers)
    config = HyperConfig(embed_dim=embed_dim, layers=layers, hidden=16, rank=4)
    torch.manual_seed(0)
    network = build_hypernetwork(config)
    for up in network.head.up:
        torch.nn.init.normal_(up.weight, std=0.3)
    HyperCheckpoint(network, config, "tiny", encoder, gap).save(path / "hyper.safetensors")
    return path


@pytest.fixture(scope="module")
def hyper(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("hyper"))


@pytest.fixture(scope="module")
def steerer(hyper, tiny):
    """The library entry point on the session's tiny pipeline (no reload per test)."""
    spec, pipe = tiny
    return Steerer(spec, pipe=pipe, hyper=hyper)


def _steer(*args):
    return runner.invoke(app, ["steer", "--model", "tiny", *args])


def _png(path):
    return np.asarray(Image.open(path))


def _pixels(image):
    return np.asarray(image, dtype=np.float64)


def test_sweep_writes_images_grid_sidecars_and_strength_zero_is_unsteered(hyper, tmp_path, tiny):
    result = _steer("a lighthouse on a cliff", "-c", "art deco", "--strength", "0,0.5,1", "--hyper", str(hyper),
                    "--out", str(tmp_path), "--seed", "7")
    assert result.exit_code == 0, result.output
    pngs = sorted(tmp_path.glob("0*.png"))
    assert [p.stem for p in pngs] == ["000-strength+0-seed7", "001-strength+0.5-seed7", "002-strength+1-seed7"]
    width, height = Image.open(pngs[0]).size
    grid = Image.open(tmp_path / "grid.png")
    assert grid.width == 3 * width and grid.height == height + 2 * CAPTION_PX  # one row, captions, the noise banner
    assert np.asarray(grid)[:CAPTION_PX].min() < 200  # "tiny has random weights: these images are noise" on top
    sidecar = json.loads(pngs[1].with_suffix(".json").read_text())
    assert sidecar["strength"] == 0.5 and sidecar["seed"] == 7 and sidecar["model"] == "tiny"
    assert sidecar["text"] == sidecar["prompt"] == "a lighthouse on a cliff" and sidecar["method"] == "hypertransport"
    assert sidecar["sources"] == [{"concept": "Art Deco", "weight": 1.0}] and len(sidecar["checkpoint_sha256"]) == 16
    assert sidecar["intervention_ms"] > 0 and sidecar["composition"] == "additive"
    assert sidecar["weights"] == "random" and "random_weights" not in sidecar  # tiny: a random test model
    assert "ms" in result.output and str(tmp_path) in result.output
    assert "steer: 3/3 (100%) strength 1" in result.output  # plain progress lines off a terminal
    spec, pipe = tiny
    plain = generate(spec, pipe, "a lighthouse on a cliff", seed=7)
    plain_png = (plain[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    assert np.array_equal(_png(pngs[0]), plain_png)  # strength 0: bit for bit
    assert not np.array_equal(_png(pngs[1]), plain_png) and not np.array_equal(_png(pngs[2]), _png(pngs[1]))


def test_negative_strengths_keep_their_sign_in_file_names(steerer, tmp_path):
    steered = steer(steerer, SteerRequest("a red barn", concepts=["art deco"], strengths=[-0.5, 0, 0.5]))
    written = save_steered(steered, tmp_path)
    assert [p.stem for p in written] == ["000-strength-0.5-seed0", "001-strength+0-seed0", "002-strength+0.5-seed0"]
    assert [json.loads(p.with_suffix(".json").read_text())["strength"] for p in written] == [-0.5, 0, 0.5]
    assert not np.array_equal(_png(written[0]), _png(written[2]))  # -0.5 and +0.5 are different images


def test_prompt_method_applies_the_template_and_hooks_nothing(tmp_path, tiny):
    result = _steer("a red barn", "-c", "ukiyo-e", "--method", "prompt", "--num-images", "2", "--strength", "0,1",
                    "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "note: --method prompt hooks nothing, so --strength does not apply" in result.output  # not a silent drop
    pngs = sorted(tmp_path.glob("0*.png"))
    sidecars = [json.loads(p.with_suffix(".json").read_text()) for p in pngs]
    assert [s["seed"] for s in sidecars] == [0, 1] and [s["strength"] for s in sidecars] == [None, None]
    text = sidecars[0]["text"]
    assert sidecars[0]["prompt"] == "a red barn" and text != "a red barn" and "ukiyo-e" in text.lower()
    spec, pipe = tiny
    plain = generate(spec, pipe, [text, text], seed=0)  # the templated text, unhooked, seeds 0 and 1
    for png, image in zip(pngs, plain):
        assert np.array_equal(_png(png), (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))


def test_composition_semantics():
    a = {"l": (torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.0]))}
    b = {"l": (torch.tensor([0.5, 3.0]), torch.tensor([0.0, -2.0]))}
    # One source at weight w is that map at strength w.
    omega, beta = combine([(a, 0.6)])["l"]
    expected = at_strength(*a["l"], 0.6)
    torch.testing.assert_close(omega, expected[0])
    torch.testing.assert_close(beta, expected[1])
    # Weight 0 drops a source exactly; order does not matter; displacements add.
    assert all(torch.equal(x, y) for x, y in zip(combine([(a, 1.0), (b, 0.0)])["l"], a["l"]))
    ab, ba = combine([(a, 1.0), (b, 0.5)])["l"], combine([(b, 0.5), (a, 1.0)])["l"]
    assert all(torch.equal(x, y) for x, y in zip(ab, ba))
    torch.testing.assert_close(ab[0], torch.tensor([2.0 - 0.25, 1.0 + 1.0]))
    torch.testing.assert_close(ab[1], torch.tensor([1.0, -1.0]))
    # Each source acts on its own layers (all of them, or those its @LAYERS keeps): the union is steered.
    union = combine([(a, 1.0), ({"m": b["l"]}, 0.5)])
    assert list(union) == ["l", "m"] and all(torch.equal(x, y) for x, y in zip(union["l"], a["l"]))
    torch.testing.assert_close(union["m"][0], at_strength(*b["l"], 0.5)[0])


def test_weights_and_strengths_parse_strictly():
    assert parse_weighted("art deco:0.6") == ("art deco", 0.6)
    assert parse_weighted("art deco:-1.5") == ("art deco", -1.5)
    assert parse_weighted("art deco: -1.5") == ("art deco: -1.5", 1.0)  # a suffix after whitespace is the name's
    assert parse_weighted("art deco") == ("art deco", 1.0)
    assert parse_weighted("Star Wars: A New Hope") == ("Star Wars: A New Hope", 1.0)
    assert parse_weighted("time: the river") == ("time: the river", 1.0)
    for typo in ("art deco:x", "art deco:o.6", "art deco:"):
        with pytest.raises(HTError, match="after the last ':' is not a number"):
            parse_weighted(typo)
    for unbounded in ("art deco:inf", "art deco:2.5", "art deco:-1e6"):
        with pytest.raises(HTError, match="from -2 to 2"):
            parse_weighted(unbounded)
    assert parse_strengths("0,0.25,1") == [0.0, 0.25, 1.0] and parse_strengths("-0.5") == [-0.5]
    for bad in ("0.5,high", "nan"):
        with pytest.raises(HTError):
            parse_strengths(bad)


def test_each_gives_every_source_its_own_map_in_one_batch(steerer):
    each = steer(steerer, SteerRequest("a teapot", concepts=["art deco:0.5", "ukiyo-e"], strengths=[1], each=True))
    assert [i.metadata["source"] for i in each.images] == ["Art Deco", "ukiyo-e"] and each.columns == 2
    assert each.maps is None and [i.metadata["composition"] for i in each.images] == ["each", "each"]
    # Sample i of the mixed batch looks like steering with source i alone (at its weight).
    alone = [steer(steerer, SteerRequest("a teapot", concepts=[c], strengths=[1])).images[0]
             for c in ("art deco:0.5", "ukiyo-e")]
    mixed, single = [_pixels(i.image) for i in each.images], [_pixels(i.image) for i in alone]
    # (Observed: equal to the last bit on CPU; steering with the other source moves pixels ~0.5 on average.)
    assert np.abs(mixed[0] - single[0]).mean() < 0.05 and np.abs(mixed[1] - single[1]).mean() < 0.05
    assert np.abs(mixed[0] - single[1]).mean() > 0.2 and np.abs(mixed[1] - single[0]).mean() > 0.2


def test_export_reproduces_the_composition(hyper, tmp_path):
    exported = tmp_path / "used.safetensors"
    result = _steer("a teapot", "-c", "art deco:0.5", "-c", "ukiyo-e", "--hyper", str(hyper), "--out", str(tmp_path / "c"),
                    "--export", str(exported))
    assert result.exit_code == 0, result.output
    used = load_intervention(exported, "tiny")
    assert used.method == "hypertransport" and used.concept == "Art Deco; ukiyo-e"
    assert used.info["sources"] == [{"concept": "Art Deco", "weight": 0.5}, {"concept": "ukiyo-e", "weight": 1.0}]
    # The exported file steers exactly like the composition did.
    again = _steer("a teapot", "-i", str(exported), "--out", str(tmp_path / "file"))
    assert again.exit_code == 0, again.output
    composed, from_file = (_png(next((tmp_path / d).glob("0*.png"))) for d in ("c", "file"))
    assert np.array_equal(composed, from_file)
    # An earlier ht intervention file may be replaced (other files never are: see below).
    replaced = _steer("a teapot", "-c", "ukiyo-e", "--hyper", str(hyper), "--out", str(tmp_path / "d"), "--export", str(exported))
    assert replaced.exit_code == 0, replaced.output
    assert load_intervention(exported, "tiny").concept == "ukiyo-e"


def test_reference_image_gap_correction_flag_and_note(tmp_path):
    hyper = _checkpoint(tmp_path, encoder="open_clip:ht-tiny-clip", embed_dim=32, gap=(torch.randn(32) * 0.1, torch.randn(32) * 0.1))
    image = tmp_path / "ref.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(image)
    corrected = _steer("a bridge", "-r", str(image), "--hyper", str(hyper), "--out", str(tmp_path / "a"), "--strength", "1")
    raw = _steer("a bridge", "-r", str(image), "--hyper", str(hyper), "--out", str(tmp_path / "b"), "--strength", "1",
                 "--no-gap-correction")
    assert corrected.exit_code == 0 and raw.exit_code == 0, corrected.output + raw.output
    a, b = (_png(next((tmp_path / d).glob("0*.png"))) for d in "ab")
    assert not np.array_equal(a, b)  # the gap correction changes the embedding, hence the maps
    assert "no modality gap" not in corrected.output
    sidecar = json.loads(next((tmp_path / "a").glob("0*.json")).read_text())
    assert sidecar["sources"] == [{"reference_images": [str(image)], "weight": 1.0}]
    _checkpoint(tmp_path / "a", encoder="open_clip:ht-tiny-clip", embed_dim=32)  # no gap stored
    gapless = _steer("a bridge", "-r", str(image), "--hyper", str(tmp_path / "a"), "--out", str(tmp_path / "c"))
    assert gapless.exit_code == 0 and "no modality gap" in gapless.output


def test_flags_are_single_and_methods_a_choice():
    result = runner.invoke(app, ["steer", "--help"], terminal_width=200)
    assert "--no-gap-correction " in result.output and "--gap-correction " not in result.output
    assert "--each " in result.output and "--no-each" not in result.output
    typo = _steer("a cat", "-c", "art deco", "--method", "painting")
    assert typo.exit_code == 2 and "'painting' is not one of 'hypertransport', 'prompt'" in typo.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["-r", "missing.png"], "does not exist"),
        (["-r", "{bad}"], "cannot read reference image"),
        (["-c", "art deco", "--strength", "strong"], "--strength takes numbers"),
        (["-c", "art deco:x"], "weight 'x' after the last ':' is not a number"),
        (["-i", "{pixart_file}"], "made for model 'pixart'"),
        (["-c", "art deco", "--method", "prompt", "-r", "{bad}"], "cannot use --reference-image"),
        (["-c", "art deco", "--num-images", "0"], "--num-images must be at least 1"),
        (["-c", "art deco", "-c", "ukiyo-e", "--each", "--export", "{tmp}/x.safetensors"], "--export needs one composed"),
        ([], "nothing to steer with"),
        (["-r", "{png}"], "need an image encoder"),
        (["-c", "art deco", "--steer-steps", "1:"], "--steer-steps 1: is past the model's last step"),
    ],
)
def test_bad_input_is_one_line_error_before_the_pipeline_loads(hyper, tmp_path, monkeypatch, args, message):
    monkeypatch.setattr("htcli.models.load_pipeline", lambda *a, **k: pytest.fail("the pipeline loaded before the check"))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    png = tmp_path / "ok.png"
    Image.new("RGB", (8, 8)).save(png)
    pixart_file = tmp_path / "pixart.safetensors"
    Intervention({"transformer_blocks.0.norm1": (torch.ones(1152), torch.zeros(1152))}, "pixart", "lineas", "x").save(pixart_file)
    args = [a.format(bad=bad, png=png, pixart_file=pixart_file, tmp=tmp_path) for a in args]
    result = _steer("a cat", "--hyper", str(hyper), "--out", str(tmp_path / "o"), *args)
    assert result.exit_code == 1, result.output
    assert message in result.output and result.output.count("Error:") == 1
    assert not (tmp_path / "o").exists() and not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize(
    "option,name,message",
    [("--out", "notes.txt", "is a file"), ("--export", "README.md", "should end in .safetensors"),
     ("--export", "weights.safetensors", "not an ht intervention file; refusing to overwrite")],
)
def test_outputs_that_are_other_files_are_refused_and_left_alone(hyper, tmp_path, monkeypatch, option, name, message):
    monkeypatch.setattr("htcli.models.load_pipeline", lambda *a, **k: pytest.fail("the pipeline loaded before the check"))
    existing = tmp_path / name
    existing.write_bytes(b"keep me")
    out = [] if option == "--out" else ["--out", str(tmp_path / "images")]
    result = _steer("a cat", "-c", "art deco", "--hyper", str(hyper), *out, option, str(existing))
    assert result.exit_code == 1 and message in result.output and result.output.count("Error:") == 1, result.output
    assert "Traceback" not in result.output and existing.read_bytes() == b"keep me"
    assert not (tmp_path / "images").exists()


def test_plain_progress_lines_have_single_spaces(capsys):
    from htcli.cli.output import steps

    with steps("steer", 2) as progress:
        progress.update(1, description="")
        progress.update(2, description="strength 0.5")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("steer: 1/2 (50%) [") and lines[1].startswith("steer: 2/2 (100%) strength 0.5 [")
    assert not any("  " in line for line in lines)


def test_default_model_offline_points_to_tiny(tmp_path, monkeypatch):
    monkeypatch.delenv("HT_MODEL", raising=False)
    monkeypatch.setenv("HT_RUNS", str(tmp_path))
    result = runner.invoke(app, ["steer", "a cat", "-c", "art deco"])
    assert result.exit_code == 1 and "--model tiny" in result.output


def test_steer_steps_parse_like_slices_within_the_model_steps():
    assert parse_steer_steps("all", 4) is None and parse_steer_steps("0:4", 4) is None and parse_steer_steps(":", 4) is None
    assert parse_steer_steps("0:1", 4) == range(0, 1) and parse_steer_steps(" 1:3 ", 4) == range(1, 3)
    assert parse_steer_steps("1:", 4) == range(1, 4) and parse_steer_steps(":2", 4) == range(0, 2)
    assert parse_steer_steps("2", 4) == range(2, 3) and parse_steer_steps("0", 1) is None
    for bad, message in [("5:", "past the model's last step: it denoises in 4 steps, 0 to 3"), ("4", "past"),
                         ("0:9", "past"), ("a:b", "takes 'all', a step N or a window START:STOP"), ("", "takes"),
                         ("1:2:3", "takes"), ("first", "takes"), ("-1", "steps count from 0"),
                         ("2:2", "empty window"), ("3:1", "empty window")]:
        with pytest.raises(HTError, match=message):
            parse_steer_steps(bad, 4)


def test_steer_steps_window_on_a_four_step_model(tiny_sdxl, tmp_path):
    spec, pipe = tiny_sdxl
    g = torch.Generator().manual_seed(0)
    maps = {name: (1 + 0.5 * torch.randn(module_width(m), generator=g), torch.randn(module_width(m), generator=g))
            for name, m in resolve_layers(denoiser(pipe, spec), spec.hook_patterns).items()}
    plain = _pixels(steering.generate(spec, pipe, "a teapot", None, [None], [0])[0].image)
    never = _pixels(steering.generate(spec, pipe, "a teapot", maps, [1.0], [0], range(4, 8))[0].image)
    assert np.array_equal(never, plain)  # hooked, but at steps the 4-step pipeline never reaches: unsteered
    file = tmp_path / "random.safetensors"
    Intervention(maps, spec.id, "lineas", "random").save(file)

    def steered(steps):
        request = SteerRequest("a teapot", interventions=[file], strengths=[1.0], steer_steps=steps)
        return steer(Steerer(spec, pipe=pipe), request).images[0]

    first, every = steered("0:1"), steered("all")
    assert first.metadata["steer_steps"] == "0:1" and every.metadata["steer_steps"] == "all"
    first, every = _pixels(first.image), _pixels(every.image)
    # Measured mean |difference| in 0-255 levels: 3.4 from unsteered, 0.19 from every step.
    assert np.abs(first - plain).mean() > 1 and np.abs(first - every).mean() > 0.05


def test_steer_steps_through_the_cli_is_recorded(hyper, steerer, tmp_path):
    result = _steer("a lighthouse", "-c", "art deco", "--hyper", str(hyper), "--out", str(tmp_path),
                    "--steer-steps", "0:1")
    assert result.exit_code == 0, result.output
    sidecar = json.loads(next(tmp_path.glob("0*.json")).read_text())
    assert sidecar["steer_steps"] == "0:1" and sidecar["strength"] == 0.6
    default = steer(steerer, SteerRequest("a lighthouse", concepts=["art deco"]))
    assert default.images[0].metadata["steer_steps"] == "all"
    # tiny denoises in one step, so 0:1 is every step: the same image as the default.
    assert np.array_equal(_png(next(tmp_path.glob("0*.png"))), np.asarray(default.images[0].image))


def test_hypernetwork_checkpoints_record_the_fitted_timestep(hyper, tmp_path):
    path = hyper / "hyper.safetensors"
    assert load_checkpoint(path).fitted_timestep == get_model("tiny").timesteps[0] == 400
    tensors, meta = read_tensors(path, "test")
    del meta["fitted_timestep"]  # a checkpoint written before the timestep was stored
    save_tensors(tmp_path / "old.safetensors", tensors, meta)
    assert load_checkpoint(tmp_path / "old.safetensors").fitted_timestep is None  # unknown, still loads
