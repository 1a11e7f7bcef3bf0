"""Out of distribution: every prediction names its nearest training concepts, and `ht steer`
warns below the threshold calibrated on the validation concepts."""

import json

import pytest
import torch
from conftest import build_tiny_dataset
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from htcli.cli import app
from htcli.data.concepts import load_library
from htcli.errors import HTError
from htcli.methods.hypernetwork import (
    OOD_QUANTILE,
    HyperCheckpoint,
    HyperConfig,
    TrainingConcepts,
    build_hypernetwork,
    load_checkpoint,
    ood_threshold,
)
from htcli.methods.predict import Predictor

runner = CliRunner()
FAR_OFF = "zxqv 1234 lorem"
# 8 training-split concepts, 3 of them held aside for validation: 5 training concepts.
TRAIN = ["--steps", "2", "--concepts-per-step", "2", "--eval-every", "2", "--hidden", "16", "--rank", "2",
         "--val-fraction", "0.375"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_tiny_dataset(tmp_path_factory.mktemp("ood") / "data", train=8, test=0, samples=4, eval_samples=4)


@pytest.fixture(scope="module")
def hyper(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ood") / "hyper"
    result = runner.invoke(app, ["train-hyper", "--data", str(data.root), "--out", str(out), *TRAIN])
    assert result.exit_code == 0, result.output
    return out / "hyper.safetensors"


@pytest.fixture(scope="module")
def old_hyper(hyper, tmp_path_factory):
    """The same checkpoint as an older ht wrote it: no training concepts, no threshold."""
    with safe_open(str(hyper), "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys() if not key.startswith("concepts.")}
        meta = {k: v for k, v in f.metadata().items() if k not in ("training_concepts", "ood_threshold")}
    path = tmp_path_factory.mktemp("old") / "hyper.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


def _steer(tmp_path, hyper, *args):
    out = tmp_path / "images"
    result = runner.invoke(app, ["steer", "--model", "tiny", "a red barn", "--hyper", str(hyper), "--out", str(out),
                                 *args])
    assert result.exit_code == 0, result.output
    return result, json.loads(next(out.glob("*.json")).read_text())


def test_checkpoint_stores_training_concepts_and_calibrated_threshold(data, hyper):
    checkpoint = load_checkpoint(hyper)
    concepts = checkpoint.training_concepts
    val = checkpoint.info["val_concepts"]
    train = [name for name in data.names("train") if name not in val]
    assert len(val) == 3 and sorted(concepts.names) == sorted(train)
    torch.testing.assert_close(concepts.embeddings, data.embeddings(concepts.names), rtol=0, atol=0)
    # The rule by hand: each validation concept's cosine to its nearest training concept, 5th percentile.
    train_e, val_e = data.embeddings(train), data.embeddings(val)
    best = [max(torch.cosine_similarity(v, t, dim=0).item() for t in train_e) for v in val_e]
    lo, mid, _ = sorted(best)
    assert concepts.threshold == pytest.approx(lo + 2 * OOD_QUANTILE * (mid - lo), abs=1e-6)
    assert lo <= concepts.threshold < mid
    # Loaded and saved again (as `calibrate_gap` does), it keeps them.
    checkpoint.save(hyper.parent / "again.safetensors")
    again = load_checkpoint(hyper.parent / "again.safetensors").training_concepts
    assert again.names == concepts.names and again.threshold == concepts.threshold
    assert torch.equal(again.embeddings, concepts.embeddings)


def test_no_validation_concepts_no_threshold(tmp_path):
    config = HyperConfig(embed_dim=4, layers=(("a", 3),), hidden=8, rank=2)
    train = torch.eye(4)[:2]
    assert ood_threshold(train[:0], train) is None
    concepts = TrainingConcepts(["x", "y"], train, ood_threshold(train[:0], train))
    checkpoint = HyperCheckpoint(build_hypernetwork(config), config, "tiny", "minilm", training_concepts=concepts)
    checkpoint.save(tmp_path / "h.safetensors")
    loaded = load_checkpoint(tmp_path / "h.safetensors").training_concepts
    assert loaded.names == ["x", "y"] and loaded.threshold is None and loaded.is_ood(-1.0) is None
    info = {"nearest_training_concepts": [{"name": "x", "similarity": -1.0}], "ood": None, "ood_threshold": None}
    assert "no out-of-distribution threshold" in Predictor.neighbour_note("q", info)


def test_training_concept_is_its_own_nearest_neighbour(hyper):
    predictor = Predictor.load(hyper, model="tiny")
    name = predictor.training_concepts.names[0]
    phrase = load_library().resolve(name).phrase
    predicted = predictor.maps([phrase, FAR_OFF])
    assert len(predicted) == 2  # `maps` still returns the maps; the neighbours are on the side
    (best, similarity), *others = predictor.last_neighbours[0]
    assert best == name and similarity == pytest.approx(1.0, abs=1e-5) and len(others) == 2
    assert all(s <= similarity for _, s in others)
    assert predictor.nearest(predictor.encoder.encode_text([phrase]), k=1) == [[(name, pytest.approx(1.0, abs=1e-5))]]
    far = predictor.neighbour_info(1)
    assert far["ood"] is True and far["ood_threshold"] == predictor.training_concepts.threshold
    assert far["nearest_training_concepts"][0]["similarity"] < far["ood_threshold"]
    assert predictor.neighbour_info(0)["ood"] is False


def test_steer_warns_for_a_far_off_concept_only(hyper, tmp_path):
    result, sidecar = _steer(tmp_path / "far", hyper, "-c", FAR_OFF)
    assert f"'{FAR_OFF}' is out of distribution" in result.output
    assert f"nearest training concepts of '{FAR_OFF}':" in result.stdout
    assert sidecar["ood"] is True and len(sidecar["nearest_training_concepts"]) == 3
    assert sidecar["ood_threshold"] == load_checkpoint(hyper).training_concepts.threshold
    assert sidecar["nearest_training_concepts"][0]["similarity"] < sidecar["ood_threshold"]

    name = load_checkpoint(hyper).training_concepts.names[0]
    result, sidecar = _steer(tmp_path / "near", hyper, "-c", name)
    assert "out of distribution" not in result.output
    assert f"nearest training concepts of '{name}': {name} 1.000" in result.stdout
    assert sidecar["ood"] is False
    best = {"source": name, "name": name, "similarity": pytest.approx(1.0, abs=1e-5)}
    assert sidecar["nearest_training_concepts"][0] == best

    # With --each, each image says whether its own source is out of distribution.
    out = tmp_path / "each"
    result = runner.invoke(app, ["steer", "--model", "tiny", "a red barn", "--hyper", str(hyper), "--out", str(out),
                                 "-c", name, "-c", FAR_OFF, "--each"])
    assert result.exit_code == 0, result.output
    sidecars = {s["source"]: s for s in (json.loads(p.read_text()) for p in out.glob("*.json"))}
    assert sidecars[name]["ood"] is False and sidecars[FAR_OFF]["ood"] is True


def test_export_records_neighbours(hyper, tmp_path):
    from htcli.models.interventions import load_intervention

    out = tmp_path / "far.safetensors"
    result = runner.invoke(app, ["hyper", "export", "--hyper", str(hyper), "--concept", FAR_OFF, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "is out of distribution" in result.output and "nearest training concepts of" in result.stdout
    info = load_intervention(out).info
    assert info["ood"] is True and len(info["nearest_training_concepts"]) == 3


def test_old_checkpoint_still_steers_and_exports_with_a_note(old_hyper, tmp_path):
    assert load_checkpoint(old_hyper).training_concepts is None
    with pytest.raises(HTError, match="stores no training concepts"):
        Predictor.load(old_hyper).nearest(torch.ones(1, 384))
    result, sidecar = _steer(tmp_path, old_hyper, "-c", FAR_OFF)
    assert "stores no training concepts" in result.output and "nearest training concepts of" not in result.output
    assert sidecar["nearest_training_concepts"] == [] and sidecar["ood"] is None
    out = tmp_path / "old.safetensors"
    result = runner.invoke(app, ["hyper", "export", "--hyper", str(old_hyper), "--concept", FAR_OFF, "--out", str(out)])
    assert result.exit_code == 0 and "stores no training concepts" in result.output, result.output
