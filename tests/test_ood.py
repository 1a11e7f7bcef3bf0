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
from htcli.methods.ood import CUES, OODCalibration, token_cues
from htcli.methods.ood import OOD_QUANTILE as OOD_CUE_QUANTILE
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
    # The embeddings the trainer used are the ones every command predicts from (one rule).
    predictor = Predictor.load(hyper)
    library = load_library()
    embed = lambda names: predictor.embed_concepts([library.resolve(name) for name in names])  # noqa: E731
    torch.testing.assert_close(concepts.embeddings, embed(concepts.names), rtol=0, atol=1e-6)
    # The rule by hand: each validation concept's cosine to its nearest training concept, 5th percentile.
    train_e, val_e = embed(train), embed(val)
    best = [max(torch.cosine_similarity(v, t, dim=0).item() for t in train_e) for v in val_e]
    lo, mid, _ = sorted(best)
    assert concepts.threshold == pytest.approx(lo + 2 * OOD_QUANTILE * (mid - lo), abs=1e-5)
    assert lo <= concepts.threshold < mid
    # The out-of-distribution calibration: the training concepts' bare names, their cues, and a
    # threshold at OOD_CUE_QUANTILE of the validation concepts' scores.
    ood = checkpoint.ood
    torch.testing.assert_close(ood.names, predictor.encoder.encode_text(concepts.names), rtol=0, atol=1e-6)
    scores = sorted(ood.scores(predictor.encoder, val)["score"])
    assert ood.threshold == pytest.approx(scores[0] + 2 * OOD_CUE_QUANTILE * (scores[1] - scores[0]), abs=1e-6)
    # Loaded and saved again (as `calibrate_gap` does), it keeps them.
    checkpoint.save(hyper.parent / "again.safetensors")
    loaded = load_checkpoint(hyper.parent / "again.safetensors")
    again = loaded.training_concepts
    assert again.names == concepts.names and again.threshold == concepts.threshold
    assert torch.equal(again.embeddings, concepts.embeddings)
    assert loaded.ood.threshold == ood.threshold and torch.equal(loaded.ood.reference, ood.reference)


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
    prediction = predictor.predict([load_library().resolve(name), FAR_OFF])
    assert len(prediction.maps) == 2 and prediction.ms > 0
    near, far = prediction.neighbours
    best, *others = near["nearest_training_concepts"]
    assert best == {"name": name, "similarity": pytest.approx(1.0, abs=1e-5)} and len(others) == 2
    assert all(o["similarity"] <= best["similarity"] for o in others)
    assert near["ood"] is False and near["ood_score"] >= near["ood_threshold"]
    # Read from the bare text, not the templated phrase: its similarity to the nearest training name.
    bare = (predictor.encoder.encode_text([FAR_OFF]) @ predictor.checkpoint.ood.names.T).max().item()
    assert far["ood_cues"]["similarity"] == pytest.approx(bare, abs=1e-5)
    assert far["nearest_training_concepts"][0]["similarity"] == pytest.approx(bare, abs=1e-5) and far["ood"] is True
    assert far["ood_threshold"] == predictor.checkpoint.ood.threshold and far["ood_score"] < far["ood_threshold"]
    assert set(far["ood_cues"]) == set(CUES) and far["ood_weakest_cue"] in CUES


def test_steer_warns_for_a_far_off_concept_only(hyper, tmp_path):
    result, sidecar = _steer(tmp_path / "far", hyper, "-c", FAR_OFF)
    assert f"'{FAR_OFF}' is out of distribution" in result.output
    assert f"nearest training concepts of '{FAR_OFF}':" in result.stdout
    assert sidecar["ood"] is True and len(sidecar["nearest_training_concepts"]) == 3
    assert sidecar["ood_threshold"] == load_checkpoint(hyper).ood.threshold

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


@pytest.fixture(scope="module")
def pre_cue_hyper(hyper, tmp_path_factory):
    """The checkpoint as ht wrote it before the out-of-distribution cues: training concepts and
    their nearest-concept threshold, no calibration."""
    with safe_open(str(hyper), "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys() if not key.startswith("ood.")}
        meta = {k: v for k, v in f.metadata().items() if k != "ood"}
    path = tmp_path_factory.mktemp("pre-cue") / "hyper.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


def test_checkpoint_without_calibration_keeps_the_nearest_concept_rule(pre_cue_hyper):
    predictor = Predictor.load(pre_cue_hyper)
    assert predictor.checkpoint.ood is None
    (info,) = predictor.predict([FAR_OFF]).neighbours
    similarity = predictor.nearest(predictor.embed_concepts([FAR_OFF]), 1)[0][0][1]
    assert info["nearest_training_concepts"][0]["similarity"] == pytest.approx(similarity)
    threshold = predictor.training_concepts.threshold
    assert info["ood_threshold"] == threshold and info["ood"] == (similarity < threshold) and "ood_score" not in info
    if info["ood"]:
        assert "below the hypernetwork's threshold" in Predictor.neighbour_note(FAR_OFF, info)


def test_token_cues_of_both_tokenizer_kinds():
    import open_clip

    from htcli.models.encoders import get_encoder

    bert = get_encoder("minilm").tokenizer  # WordPiece, with an unknown token
    cues = token_cues(bert, ["oil painting", "\U0001F600", "zxqv"])
    assert cues[0].tolist() == [1.0, pytest.approx(5.5)]  # "oil", "painting": (3 + 8) / 2 characters a token
    assert cues[1].tolist() == [0.0, 0.0]  # one [UNK]
    pieces = bert.tokenize("zxqv")
    assert cues[2].tolist() == [1.0, pytest.approx(4 / len(pieces))] and len(pieces) > 1  # "z", "##x", ...
    clip = open_clip.get_tokenizer("ViT-B-32")  # byte-level BPE: every byte is known, "</w>" ends a word
    assert token_cues(clip, ["oil painting"])[0].tolist() == [1.0, pytest.approx(5.5)]


def test_score_is_the_weakest_cue_percentile(tmp_path):
    from htcli.models.encoders import get_encoder

    encoder = get_encoder("minilm")
    train = ["oil painting", "watercolor", "art deco", "film noir", "cyberpunk city", "ukiyo-e", "baroque",
             "pixel art", "charcoal drawing", "impressionism"]
    validation = ["gouache", "art nouveau", "synthwave"]
    calibration = OODCalibration.fit(encoder, train, validation)
    # The reference: each training concept's cues, its similarity taken to the *other* training concepts.
    names = encoder.encode_text(train)
    similarity = names @ names.T
    similarity.fill_diagonal_(-1)
    torch.testing.assert_close(calibration.reference[:, 0], similarity.max(-1).values)
    texts = ["acrylic painting", "\U0001F600\U0001F525", "qzxv kjhq"]
    found = calibration.scores(encoder, texts)
    for cues, ranks, score in zip(found["cues"], found["percentiles"], found["score"]):
        by_hand = [sum(r <= c for r in calibration.reference[:, k].tolist()) / len(train) for k, c in enumerate(cues)]
        assert ranks == pytest.approx(by_hand) and score == pytest.approx(min(by_hand))
    records = calibration.record(encoder, texts)
    assert records[1]["ood"] is True and records[1]["ood_weakest_cue"] == "known_tokens"  # emoji: unknown tokens
    assert records[2]["ood"] is True and records[0]["ood"] is False
    assert "does not know its characters" in Predictor.neighbour_note(
        texts[1], {**records[1], "nearest_training_concepts": [{"name": "x", "similarity": 0.1}]})
    # Stored and read back; a calibration of other cues is refused in one line.
    tensors, metadata = calibration.tensors(), calibration.metadata()
    loaded = OODCalibration.load(tensors, metadata)
    assert loaded.threshold == calibration.threshold and torch.equal(loaded.reference, calibration.reference)
    other = {"ood": metadata["ood"].replace("token_length", "word_count")}
    with pytest.raises(HTError, match="other cues"):
        OODCalibration.load(tensors, other)
    assert OODCalibration.fit(encoder, train, []) is None  # no validation concepts: no threshold to set


def test_a_training_concepts_own_name_is_never_out_of_distribution():
    """The shipped tiny hypernetwork: every training concept, by its own name (any case), is in
    distribution, whatever its cues say ('ukiyo-e' splits into short fragments)."""
    import htcli as ht

    hyper = ht.HyperTransport.from_pretrained(model="tiny")
    names = hyper.training_concepts
    records = hyper.predictor.neighbours(names + [name.upper() for name in names[:50]])
    assert [name for name, record in zip(names, records) if record["ood"] is not False] == []
    ukiyo = hyper.intervention("ukiyo-e")
    assert ukiyo.ood is False and not any("out of distribution" in note for note in ukiyo.info["notes"])
    assert ukiyo.nearest[0]["name"] == "ukiyo-e"
    assert hyper.intervention(FAR_OFF).ood is True  # the rule still flags text unlike any concept
    assert repr(hyper).startswith("HyperTransport(model='tiny'") and "\n" not in repr(hyper)
