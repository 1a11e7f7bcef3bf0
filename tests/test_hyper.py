"""The hypernetwork: identity at init, training, checkpoints, resume, export (DDP: test_distributed.py)."""

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
import torch
from conftest import build_tiny_dataset
from typer.testing import CliRunner

from htcli.cli import app
from htcli.data.concepts import load_library
from htcli.errors import HTError
from htcli.methods.hypernetwork import (
    HyperCheckpoint,
    HyperConfig,
    build_hypernetwork,
    load_checkpoint,
    parameter_count,
)
from htcli.models.interventions import load_intervention

runner = CliRunner()
LAYERS = (("a", 3), ("b", 5))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_tiny_dataset(tmp_path_factory.mktemp("hyper") / "data", train=6, test=2)


TRAIN = ["--steps", "8", "--concepts-per-step", "2", "--eval-every", "4", "--hidden", "32",
         "--rank", "4", "--val-fraction", "0.2", "--lr", "1e-2", "--prior", "none"]  # --samples: the dataset's 8


@pytest.mark.parametrize("rank", [None, 2])
def test_identity_at_initialisation(rank):
    config = HyperConfig(embed_dim=7, layers=LAYERS, hidden=16, rank=rank)
    maps = build_hypernetwork(config)(torch.randn(4, 7))
    for name, width in LAYERS:
        omega, beta = maps[name]
        assert omega.shape == beta.shape == (4, width)
        assert torch.equal(omega, torch.ones(4, width)) and torch.equal(beta, torch.zeros(4, width))


def test_low_rank_head_is_small():
    pixart = tuple((f"transformer_blocks.{i}.norm{j}", 1152) for i in range(28) for j in (1, 2))
    dense = parameter_count(HyperConfig(embed_dim=768, layers=pixart, hidden=512, rank=None, prior="none"))
    low = parameter_count(HyperConfig(embed_dim=768, layers=pixart, hidden=512, rank=64, prior="none"))
    assert dense > 66e6 and low < 12e6
    # The linear prior's path: embedding -> rank 128 -> every output (2 * 64,512), with a bias.
    with_prior = parameter_count(HyperConfig(embed_dim=768, layers=pixart, hidden=512, rank=64, prior="linear"))
    assert with_prior - low == 768 * 128 + 128 * 2 * 64512 + 2 * 64512


def test_checkpoint_round_trip_and_strict_loading(tmp_path):
    config = HyperConfig(embed_dim=7, layers=LAYERS, hidden=16, rank=2)
    network = build_hypernetwork(config)
    torch.nn.init.normal_(network.head.up[0].weight)
    gap = (torch.randn(7), torch.randn(7))
    HyperCheckpoint(network, config, "tiny", "minilm", gap, {"step": 3}).save(tmp_path / "h.safetensors")
    loaded = load_checkpoint(tmp_path / "h.safetensors")
    e = torch.randn(2, 7)
    for name in ("a", "b"):
        torch.testing.assert_close(loaded.maps(e)[name], network(e)[name])
    assert loaded.config == config and loaded.info == {"step": 3} and torch.equal(loaded.gap[0], gap[0])
    # A checkpoint whose weights do not fit its config is refused, not half-loaded.
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "h.safetensors"))
    with safe_open(str(tmp_path / "h.safetensors"), "pt") as f:
        meta = f.metadata()
    del tensors["net.head.up.1.weight"]
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(HTError, match="missing"):
        load_checkpoint(tmp_path / "bad.safetensors")


LONGER = ["--steps", "30", "--eval-every", "10", "--concepts-per-step", "4"]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "hyper"
    result = runner.invoke(app, ["train-hyper", "--data", str(data.root), "--out", str(out), *TRAIN, *LONGER])
    assert result.exit_code == 0, result.output
    return out


def _train_residuals(data, out) -> list[float]:
    from htcli.core.hooks import resolve_layers
    from htcli.data.forward import Frozen
    from htcli.evaluation.residuals import residuals
    from htcli.methods.predict import Predictor
    from htcli.models import get_model, load_denoiser

    checkpoint = load_checkpoint(out / "hyper.safetensors")
    predictor = Predictor.load(out / "hyper.safetensors")
    library = load_library()
    spec = get_model("tiny")
    model = load_denoiser(spec)
    frozen = Frozen(spec, model, resolve_layers(model, data.settings.layers))
    inputs, source = data.source_inputs("eval"), data.source_activations("eval")
    ratios = []
    for name in data.names("train"):
        if name not in checkpoint.info["val_concepts"]:
            maps = predictor.maps([library.resolve(name)])[0]  # embedded as training embedded it
            target = {k: v[0] for k, v in data.targets([name], "eval").items()}
            ratios.append(residuals(frozen, inputs, source, target, maps)[0])
    return ratios


def test_train_loss_decreases_history_and_export(data, trained, tmp_path):
    out = trained
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == [10, 20, 30]
    assert history[-1]["loss"] < history[0]["loss"]
    # Five training concepts are too few to generalise: the held-out residual is only reported.
    assert all(math.isfinite(h["test_residual"]) and h["test_residual"] > 0 for h in history)
    # On the training concepts' evaluation samples, identity maps (no training) score 1 and
    # 30 steps reach about 0.85.
    train = statistics.fmean(_train_residuals(data, out))
    assert train < 0.92
    # The history logs the same train-concept residual (all 5 here: fewer than its probe of 32).
    assert history[-1]["train_residual"] == pytest.approx(train, rel=1e-5)
    header = "step,loss,lr,train_residual,val_residual,test_residual,seconds"
    assert (out / "history.csv").read_text().startswith(header)
    again = runner.invoke(app, ["train-hyper", "--data", str(data.root), "--out", str(out), *TRAIN])
    assert again.exit_code == 1 and "--resume" in again.output

    exported = tmp_path / "x.safetensors"
    result = runner.invoke(app, ["hyper", "export", "--hyper", str(out), "--concept", "a city made of glass", "--out", str(exported)])
    assert result.exit_code == 0, result.output
    intervention = load_intervention(exported, model="tiny", widths=data.layers)
    assert intervention.method == "hypertransport" and intervention.concept == "a city made of glass"
    assert any(not torch.equal(o, torch.ones_like(o)) for o, _ in intervention.maps.values())
    assert f"wrote {exported}" in result.stdout  # the result, on stdout
    missing = runner.invoke(app, ["hyper", "export", "--hyper", str(tmp_path / "none"), "--concept", "x", "--out", str(exported)])
    assert missing.exit_code == 1 and "ht train-hyper" in missing.output
    again = runner.invoke(app, ["hyper", "export", "--hyper", str(out), "--concept", "noir", "--out", str(exported)])
    assert again.exit_code == 0 and load_intervention(exported).concept == "noir"  # an intervention file is replaced


def test_export_refuses_to_overwrite_what_is_not_an_intervention(trained, tmp_path, monkeypatch):
    import htcli.methods.predict

    monkeypatch.setattr(htcli.methods.predict.Predictor, "load", _refuse_to_load)
    readme, folder, other = tmp_path / "README.md", tmp_path / "folder", tmp_path / "weights.safetensors"
    readme.write_text("keep me")
    folder.mkdir()
    other.write_bytes(b"not an intervention")
    for out, message in ((readme, "should end in .safetensors"), (folder, "is a folder"),
                         (other, "exists and is not an ht intervention file; refusing to overwrite it")):
        result = runner.invoke(app, ["hyper", "export", "--hyper", str(trained), "--concept", "x", "--out", str(out)])
        assert result.exit_code == 1 and result.output.count("Error:") == 1, result.output
        assert message in result.output
    assert readme.read_text() == "keep me" and other.read_bytes() == b"not an intervention"
    assert list(folder.iterdir()) == []


def test_samples_default_to_what_the_dataset_has(data, trained, tmp_path):
    assert load_checkpoint(trained / "hyper.safetensors").info["config"]["samples"] == 8
    too_many = runner.invoke(app, ["train-hyper", "--data", str(data.root), "--out", str(tmp_path / "h"), *TRAIN,
                                   "--samples", "9"])
    assert too_many.exit_code == 1 and too_many.output.count("Error:") == 1
    assert "--samples 9 exceeds the dataset's 8 fitting samples" in too_many.output
    assert not (tmp_path / "h").exists()


def test_resume_with_other_settings_is_refused(data, trained):
    before = (trained / "hyper.safetensors").read_bytes()
    other = runner.invoke(app, ["train-hyper", "--data", str(data.root), "--out", str(trained), *TRAIN, *LONGER,
                                "--steps", "40", "--lr", "5e-3", "--resume"])
    assert other.exit_code == 1 and other.output.count("Error:") == 1
    assert "--steps 40 (saved 30)" in other.output and "--lr 0.005 (saved 0.01)" in other.output
    assert "--eval-every" not in other.output and "--micro-batch" not in other.output
    assert (trained / "hyper.safetensors").read_bytes() == before
    # The same settings resume (here: nothing left to do, so nothing loads or trains); --micro-batch
    # only changes memory.
    with pytest.MonkeyPatch.context() as patched:
        _no_model(patched)
        same = runner.invoke(app, ["train-hyper", "--data", str(data.root), "--out", str(trained), *TRAIN, *LONGER,
                                   "--micro-batch", "4", "--resume"])
    assert same.exit_code == 0, same.output
    assert "already finished (30 steps): nothing to train" in " ".join(same.stderr.split())
    assert "training mlp" not in same.output
    assert "30 steps" in same.stdout and "already finished" in same.stdout and "held-out residual" in same.stdout
    assert (trained / "hyper.safetensors").read_bytes() == before


def test_settings_are_named_by_their_parameters():
    from htcli.methods.train_config import TrainConfig, training_differences

    hyper = HyperConfig(embed_dim=7, layers=LAYERS, hidden=16, rank=None)
    saved = HyperConfig(embed_dim=7, layers=LAYERS, hidden=16, rank=4)
    config = TrainConfig(weight_decay=0.02, eval_every=7, dtype="bfloat16")
    saved_train = {**TrainConfig().__dict__, "weight_decay": 0.01}
    differ = training_differences(saved, saved_train, hyper, config)
    # --dtype only changes rounding (a run may resume on another device): not a difference.
    assert differ == ["rank=0 (saved 4)", "weight_decay=0.02 (saved 0.01)", "eval_every=7 (saved 250)"]


def _refuse_to_load(*args, **kwargs):
    raise AssertionError("weights were loaded before the input was checked")


def _no_model(monkeypatch):
    """Make loading the denoiser fail loudly: the checks under test must come before it."""
    import htcli.models

    monkeypatch.setattr(htcli.models, "load_denoiser", _refuse_to_load)


def test_bad_out_and_calibration_are_refused_before_the_model_loads(data, tmp_path, monkeypatch):
    _no_model(monkeypatch)
    readme = tmp_path / "README.md"
    readme.write_text("keep me")
    bad_out = runner.invoke(app, ["train-hyper", "--data", str(data.root), "--out", str(readme), *TRAIN])
    assert bad_out.exit_code == 1 and bad_out.output.count("Error:") == 1, bad_out.output
    assert "is a file, not a folder" in bad_out.output and readme.read_text() == "keep me"

    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    text_only = runner.invoke(app, ["train-hyper", "--data", str(data.root), "--out", str(tmp_path / "h"), *TRAIN,
                                    "--calibration-images", str(images)])
    assert text_only.exit_code == 1 and text_only.output.count("Error:") == 1, text_only.output
    assert "needs a concept encoder with an image tower" in text_only.output and "minilm" in text_only.output
    assert not (tmp_path / "h").exists()
    nothing = runner.invoke(app, ["train-hyper", "--data", str(data.root), "--out", str(tmp_path / "h"), *TRAIN, "--resume"])
    assert nothing.exit_code == 1 and "nothing to resume" in nothing.output


def test_flags_are_single_flags():
    help_text = " ".join(runner.invoke(app, ["train-hyper", "-h"]).output.split())
    for flag in ("--resume", "--overwrite", "--grad-checkpointing"):
        assert f"{flag} " in help_text and f"--no-{flag[2:]}" not in help_text
    assert runner.invoke(app, ["train-hyper", "--no-resume"]).exit_code == 2


def test_without_test_concepts_training_says_there_are_none(data, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data.root, root)
    manifest = json.loads((root / "manifest.json").read_text())
    for concept in manifest["concepts"]:
        concept["split"] = "train"
    (root / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["train-hyper", "--data", str(root), "--out", str(tmp_path / "h"), *TRAIN, "--steps", "2",
                                 "--eval-every", "2"])
    assert result.exit_code == 0, result.output
    assert "no held-out test concepts" in result.output and "nan" not in result.output
    history = (tmp_path / "h" / "history.json").read_text()
    assert "NaN" not in history and json.loads(history)[-1]["test_residual"] is None


def _train(data, out, *extra):
    return [sys.executable, "-m", "htcli", "train-hyper", "--data", str(data.root), "--out", str(out), *TRAIN, *extra]


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(data, tmp_path):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["--steps", "40", "--eval-every", "5"]
    reference = tmp_path / "reference"
    subprocess.run(_train(data, reference, *args), check=True, env=env, capture_output=True)

    out = tmp_path / "resumed"
    process = subprocess.Popen(_train(data, out, *args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "history.json").exists():
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    steps_done = json.loads((out / "history.json").read_text())[-1]["step"]
    assert steps_done < 40, "the kill must land mid-run for this test to mean anything"
    subprocess.run(_train(data, out, *args, "--resume"), check=True, env=env, capture_output=True)
    ours, theirs = load_checkpoint(out / "hyper.safetensors"), load_checkpoint(reference / "hyper.safetensors")
    for (name, a), (_, b) in zip(ours.network.state_dict().items(), theirs.network.state_dict().items()):
        assert torch.equal(a, b), name
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(json.loads((out / "history.json").read_text())) == strip(json.loads((reference / "history.json").read_text()))


def test_micro_batched_gradient_equals_one_pass(data):
    from htcli.core.hooks import resolve_layers
    from htcli.data.forward import Frozen
    from htcli.methods.train_config import TrainConfig
    from htcli.methods.training import Trainer
    from htcli.models import get_model, load_denoiser

    spec = get_model("tiny")
    model = load_denoiser(spec)
    frozen = Frozen(spec, model, resolve_layers(model, data.settings.layers))
    hyper = HyperConfig(embed_dim=384, layers=tuple(data.layers.items()), hidden=16, rank=4)
    grads = []
    for micro_batch in (0, 3):
        config = TrainConfig(steps=1, concepts_per_step=3, samples=8, val_fraction=0, micro_batch=micro_batch, l1=1e-4)
        trainer = Trainer(frozen, data, hyper, config, data.root / "unused", "tiny")
        for p in trainer.network.head.up.parameters():  # leave the identity so every path carries gradient
            torch.nn.init.normal_(p, std=0.1)
        trainer.network.zero_grad()
        trainer.accumulate(trainer.train[:3])
        grads.append([p.grad.clone() for p in trainer.network.parameters()])
    for one, micro in zip(*grads):
        torch.testing.assert_close(one, micro, atol=1e-7, rtol=1e-4)


def test_checkpoint_averaging_publishes_the_mean_of_the_last_steps_and_resumes_from_its_own(data, tmp_path):
    from htcli.core.hooks import resolve_layers
    from htcli.data.forward import Frozen
    from htcli.methods.train_config import TrainConfig
    from htcli.methods.training import Trainer
    from htcli.models import get_model, load_denoiser

    spec = get_model("tiny")
    model = load_denoiser(spec)
    frozen = Frozen(spec, model, resolve_layers(model, data.settings.layers))
    hyper = HyperConfig(embed_dim=384, layers=tuple(data.layers.items()), hidden=16, rank=4)
    config = TrainConfig(steps=4, concepts_per_step=2, samples=4, val_fraction=0.2, average=0.5, eval_every=4, lr=1e-2)
    trainer = Trainer(frozen, data, hyper, config, tmp_path / "run", "tiny")
    after = []
    for _ in range(4):
        trainer.train_step()
        after.append({k: v.clone() for k, v in trainer.network.state_dict().items()})
    mean = {k: (after[2][k] + after[3][k]) / 2 for k in after[3]}  # the last half: steps 3 and 4
    (tmp_path / "run").mkdir()
    trainer.save()
    for key, value in load_checkpoint(tmp_path / "run" / "hyper.safetensors").network.state_dict().items():
        torch.testing.assert_close(value, mean[key])
    assert any(not torch.equal(mean[k], after[3][k]) for k in mean)  # the average is not the last weights
    for key, value in trainer.network.state_dict().items():  # training goes on from its own weights
        assert torch.equal(value, after[3][key])
    resumed = Trainer(frozen, data, hyper, config, tmp_path / "run", "tiny")
    resumed.resume()
    assert resumed.average_count == 2 and all(torch.equal(resumed.averaged[k], trainer.averaged[k]) for k in mean)
    for key, value in resumed.network.state_dict().items():
        assert torch.equal(value, after[3][key])


def test_calibration_images_with_an_image_encoder_store_the_gap(tmp_path):
    from PIL import Image

    library = load_library()
    names = [c.name for c in library.targets("train")[:3]]
    data = tmp_path / "data"
    built = runner.invoke(app, ["build-dataset", "-m", "tiny", "-o", str(data), "--encoder", "open_clip:ht-tiny-clip",
                                *[arg for name in names for arg in ("--concept", name)],
                                "--samples", "4", "--eval-samples", "4", "--batch-size", "4"])
    assert built.exit_code == 0, built.output
    images = tmp_path / "images"
    images.mkdir()
    for k in range(2):
        Image.new("RGB", (16, 16), (100 * k, 50, 200)).save(images / f"{k}.png")
    train = ["train-hyper", "--data", str(data), "--out", str(tmp_path / "h"), "--steps", "2", "--eval-every", "2",
             "--concepts-per-step", "1", "--hidden", "8", "--rank", "2", "--val-fraction", "0"]
    result = runner.invoke(app, [*train, "--calibration-images", str(images)])
    assert result.exit_code == 0, result.output
    gap = load_checkpoint(tmp_path / "h" / "hyper.safetensors").gap
    assert gap is not None and gap[0].shape == (32,)
    # The text side: the training concepts as predictions embed them (the checkpoint's rule).
    from htcli.methods.predict import Predictor

    predictor = Predictor.load(tmp_path / "h" / "hyper.safetensors")
    embedded = predictor.embed_concepts([library.resolve(name) for name in predictor.training_concepts.names])
    torch.testing.assert_close(gap[1], embedded.mean(0))
    # A finished run resumed with other calibration images: nothing is trained, the gap is re-estimated.
    for k in range(2):
        Image.new("RGB", (16, 16), (0, 255 - 100 * k, 0)).save(images / f"{k}.png")
    weights = load_checkpoint(tmp_path / "h" / "hyper.safetensors").network.state_dict()
    again = runner.invoke(app, [*train, "--resume", "--calibration-images", str(images)])
    assert again.exit_code == 0, again.output
    assert "already finished" in again.stdout
    recalibrated = load_checkpoint(tmp_path / "h" / "hyper.safetensors")
    assert not torch.equal(recalibrated.gap[0], gap[0]) and torch.equal(recalibrated.gap[1], gap[1])
    for name, tensor in recalibrated.network.state_dict().items():
        assert torch.equal(tensor, weights[name]), name


def test_tiny_falls_back_to_the_shipped_hypernetwork_only_without_a_run_or_a_path(tmp_path, monkeypatch):
    from htcli.methods.predict import resolve_checkpoint, shipped_checkpoint

    monkeypatch.setenv("HT_RUNS", str(tmp_path / "runs"))
    shipped = shipped_checkpoint("tiny")
    assert shipped is not None and shipped.parent.name == "weights"
    assert resolve_checkpoint(None, "tiny") == shipped
    checkpoint = load_checkpoint(shipped)  # a real checkpoint for tiny, with its training concepts and threshold
    assert checkpoint.model == "tiny" and checkpoint.training_concepts.threshold is not None
    # A run of one's own wins; an explicit path never falls back; other models have none shipped.
    own = tmp_path / "runs" / "tiny" / "hyper" / "hyper.safetensors"
    own.parent.mkdir(parents=True)
    own.write_bytes(shipped.read_bytes())
    assert resolve_checkpoint(None, "tiny") == own
    with pytest.raises(HTError, match="no hypernetwork at"):
        resolve_checkpoint(tmp_path / "elsewhere", "tiny")
    assert shipped_checkpoint("tiny-sdxl") is None
    with pytest.raises(HTError, match="no hypernetwork at"):
        resolve_checkpoint(None, "tiny-sdxl")


def test_zero_steps_scores_the_network_as_it_starts(data, tmp_path):
    """`--steps 0`: no optimisation; the history's one row scores the prior alone."""
    rows = {}
    for prior in ("none", "linear"):
        out = tmp_path / prior
        result = runner.invoke(app, ["train-hyper", "--data", str(data.root), "--out", str(out), *TRAIN, "--steps", "0",
                                     "--prior", prior])
        assert result.exit_code == 0, result.output
        (rows[prior],) = json.loads((out / "history.json").read_text())
        assert rows[prior]["step"] == 0 and rows[prior]["loss"] is None
    # The identity changes nothing (up to the float16 the dataset stores the source in); the ridge
    # regression of the training concepts' maps moves them.
    assert rows["none"]["train_residual"] == pytest.approx(1.0, abs=1e-3)
    assert rows["none"]["val_residual"] == pytest.approx(1.0, abs=1e-3)
    assert rows["linear"]["train_residual"] < 0.9
    result = runner.invoke(app, ["train-hyper", "--data", str(data.root), "--out", str(tmp_path / "x"), "--steps", "-1"])
    assert result.exit_code == 1 and "--steps must be 0" in result.output
