"""`ht steer`: strengths, sweeps, composition, reference images, files, bad input."""

import json

import numpy as np
import pytest
import torch
from conftest import generate
from PIL import Image
from typer.testing import CliRunner

from htcli.cli import app
from htcli.core.interventions import Intervention, load_intervention
from htcli.core.transport import at_strength
from htcli.errors import HTError
from htcli.generate.steer import combine, parse_strengths, parse_weighted
from htcli.methods.hypernetwork import HyperCheckpoint, HyperConfig, build_hypernetwork
from htcli.models import get_model
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


def _steer(*args):
    return runner.invoke(app, ["steer", "--model", "tiny", *args])


def _png(path):
    return np.asarray(Image.open(path))


def test_sweep_writes_images_grid_sidecars_and_strength_zero_is_unsteered(hyper, tmp_path, tiny):
    result = _steer("a lighthouse on a cliff", "-c", "art deco", "--strength", "0,0.5,1", "--hyper", str(hyper),
                    "--out", str(tmp_path), "--seed", "7")
    assert result.exit_code == 0, result.output
    pngs = sorted(tmp_path.glob("0*.png"))
    assert len(pngs) == 3 and (tmp_path / "grid.png").exists()
    sidecar = json.loads(pngs[1].with_suffix(".json").read_text())
    assert sidecar["strength"] == 0.5 and sidecar["seed"] == 7 and sidecar["model"] == "tiny"
    assert sidecar["sources"] == [{"concept": "Art Deco", "weight": 1.0}] and len(sidecar["checkpoint_sha256"]) == 16
    assert "ms" in result.output and str(tmp_path) in result.output
    spec, pipe = tiny
    plain = generate(spec, pipe, "a lighthouse on a cliff", seed=7)
    plain_png = (plain[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    assert np.array_equal(_png(pngs[0]), plain_png)  # strength 0: bit for bit
    assert not np.array_equal(_png(pngs[2]), plain_png)


def test_prompt_method_and_num_images(hyper, tmp_path):
    result = _steer("a red barn", "-c", "ukiyo-e", "--method", "prompt", "--num-images", "2", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    sidecars = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("0*.json"))]
    assert [s["seed"] for s in sidecars] == [0, 1]
    assert sidecars[0]["prompt"] != "a red barn" and "ukiyo-e" in sidecars[0]["prompt"].lower()


def test_composition_semantics():
    a = {"l": (torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.0]))}
    b = {"l": (torch.tensor([0.5, 3.0]), torch.tensor([0.0, -2.0]))}
    # One source at weight w is that map at strength w.
    omega, beta = combine([(a, 0.6)])["l"]
    expected = at_strength(*a["l"], 0.6)
    torch.testing.assert_close(omega, expected[0]) and torch.testing.assert_close(beta, expected[1])
    # Weight 0 drops a source exactly; order does not matter; displacements add.
    assert all(torch.equal(x, y) for x, y in zip(combine([(a, 1.0), (b, 0.0)])["l"], a["l"]))
    ab, ba = combine([(a, 1.0), (b, 0.5)])["l"], combine([(b, 0.5), (a, 1.0)])["l"]
    assert all(torch.equal(x, y) for x, y in zip(ab, ba))
    torch.testing.assert_close(ab[0], torch.tensor([2.0 - 0.25, 1.0 + 1.0]))
    torch.testing.assert_close(ab[1], torch.tensor([1.0, -1.0]))
    assert parse_weighted("art deco:0.6") == ("art deco", 0.6)
    assert parse_weighted("time: the river") == ("time: the river", 1.0)
    assert parse_strengths("0,0.25,1") == [0.0, 0.25, 1.0]
    with pytest.raises(HTError):
        parse_strengths("0.5,high")


def test_each_mixes_concepts_in_one_batch_and_export(hyper, tmp_path):
    result = _steer("a teapot", "-c", "art deco", "-c", "ukiyo-e", "--each", "--hyper", str(hyper), "--out", str(tmp_path / "each"))
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "each").glob("0*.png"))) == 2
    exported = tmp_path / "used.safetensors"
    result = _steer("a teapot", "-c", "art deco:0.5", "-c", "ukiyo-e", "--hyper", str(hyper), "--out", str(tmp_path / "c"),
                    "--export", str(exported))
    assert result.exit_code == 0, result.output
    used = load_intervention(exported, "tiny")
    # The exported file steers exactly like the composition did.
    again = _steer("a teapot", "-i", str(exported), "--out", str(tmp_path / "file"))
    assert again.exit_code == 0, again.output
    assert np.array_equal(_png(next((tmp_path / "c").glob("0*.png"))), _png(next((tmp_path / "file").glob("0*.png"))))
    assert used.method == "hypertransport"


def test_reference_image_through_a_tiny_open_clip(tmp_path):
    hyper = _checkpoint(tmp_path, encoder="open_clip:ht-tiny-clip", embed_dim=32, gap=(torch.randn(32) * 0.1, torch.randn(32) * 0.1))
    image = tmp_path / "ref.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(image)
    corrected = _steer("a bridge", "-r", str(image), "--hyper", str(hyper), "--out", str(tmp_path / "a"), "--strength", "1")
    raw = _steer("a bridge", "-r", str(image), "--hyper", str(hyper), "--out", str(tmp_path / "b"), "--strength", "1",
                 "--no-gap-correction")
    assert corrected.exit_code == 0 and raw.exit_code == 0, corrected.output + raw.output
    a, b = (_png(next((tmp_path / d).glob("0*.png"))) for d in "ab")
    assert not np.array_equal(a, b)  # the gap correction changes the embedding, hence the maps


@pytest.mark.parametrize(
    "args,message",
    [
        (["-r", "missing.png"], "does not exist"),
        (["-r", "{bad}"], "cannot read reference image"),
        (["-c", "art deco", "--strength", "strong"], "--strength takes numbers"),
        (["-i", "{pixart_file}"], "made for model 'pixart'"),
        (["-c", "art deco", "--method", "prompt", "-r", "{bad}"], "cannot read"),
        ([], "nothing to steer with"),
        (["-r", "{png}"], "needs an image encoder"),
    ],
)
def test_bad_input_is_one_line_error(hyper, tmp_path, args, message):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    png = tmp_path / "ok.png"
    Image.new("RGB", (8, 8)).save(png)
    pixart_file = tmp_path / "pixart.safetensors"
    Intervention({"transformer_blocks.0.norm1": (torch.ones(1152), torch.zeros(1152))}, "pixart", "lineas", "x").save(pixart_file)
    args = [a.format(bad=bad, png=png, pixart_file=pixart_file) for a in args]
    result = _steer("a cat", "--hyper", str(hyper), "--out", str(tmp_path / "o"), *args)
    assert result.exit_code == 1, result.output
    assert message in result.output and result.output.count("Error:") == 1
    assert not (tmp_path / "o").exists()


def test_default_model_offline_points_to_tiny(tmp_path, monkeypatch):
    monkeypatch.delenv("HT_MODEL", raising=False)
    monkeypatch.setenv("HT_RUNS", str(tmp_path))
    result = runner.invoke(app, ["steer", "a cat", "-c", "art deco"])
    assert result.exit_code == 1 and "--model tiny" in result.output
