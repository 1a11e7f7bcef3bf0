"""`ht build-dataset` on the tiny world: contents, resume after kill -9, torchrun, bad input."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from htcli.cli import app
from htcli.data.dataset import ActivationDataset

runner = CliRunner()
SMALL = ["--samples", "4", "--eval-samples", "4", "--batch-size", "4"]


def _build(out, *args):
    return runner.invoke(app, ["build-dataset", "--model", "tiny", "--out", str(out), *SMALL, *args])


def _files(root: Path) -> dict[str, object]:
    """Every file's content: tensors (as bytes) and metadata for safetensors, else the bytes.
    (safetensors does not fix the order of its metadata keys, so raw bytes may differ.)"""
    from safetensors import safe_open

    contents = {}
    for path in sorted(root.rglob("*")):
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                tensors = {k: f.get_tensor(k).numpy().tobytes() for k in sorted(f.keys())}
                contents[str(path.relative_to(root))] = (f.metadata(), tensors)
        elif path.is_file():
            contents[str(path.relative_to(root))] = path.read_bytes()
    return contents


def test_end_to_end_library_and_free_text_concepts(tmp_path):
    out = tmp_path / "data"
    result = _build(out, "--concept", "art deco", "--concept", "ukiyo-e", "--concept", "made of glittering candy")
    assert result.exit_code == 0, result.output
    assert "3 concepts" in result.stdout and "s per concept" in result.stdout  # the result, on stdout
    data = ActivationDataset(out)
    assert data.manifest["complete"]
    names = data.names()
    assert len(names) == 3 and "made of glittering candy" in names
    assert {c["split"] for c in data.manifest["concepts"]} <= {"train", "test", "free"}
    targets = data.targets(names[:2])
    layers = data.layers
    assert list(targets) == list(layers) and len(layers) == 8
    for layer, width in layers.items():
        assert targets[layer].shape == (2, 4, width) and targets[layer].dtype == torch.float32
    assert data.targets(names[:1], part="eval")[next(iter(layers))].shape == (1, 4, 64)
    emb = data.embeddings(names)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    inputs = data.source_inputs("fit")
    assert inputs.rows["args.0"].shape == (4, 4, 16, 16) and inputs.rows["kwargs.encoder_hidden_states"].shape[-1] == 384
    source = data.source_activations("fit")
    # Prompts and seeds for fitting and evaluation are disjoint.
    s = data.settings
    assert not set(s.fit_prompts) & set(s.eval_prompts) and not set(s.fit_seeds) & set(s.eval_seeds)
    # The concept moved the activations (the text encoder is real, the concept prompt differs).
    layer = s.layers[-1]
    assert (targets[layer][0] - source[layer]).abs().mean() > 1e-3


def test_rerun_skips_finished_concepts_and_other_settings_are_refused(tmp_path):
    out = tmp_path / "data"
    assert _build(out, "--concept", "art deco").exit_code == 0
    again = _build(out, "--concept", "art deco", "--concept", "cubism")
    assert again.exit_code == 0 and "1 built, 1 already there" in again.output
    assert len(ActivationDataset(out).names()) == 2
    other = _build(out, "--concept", "art deco", "--seed", "1", "--eval-samples", "5")
    assert other.exit_code == 1 and "other settings" in other.output
    # The message names what differs, and only that.
    assert "--seed 1 (saved 0)" in other.output and "--eval-samples 5 (saved 4)" in other.output
    assert "--samples " not in other.output and "model tiny" not in other.output and "--batch-size" not in other.output
    replaced = _build(out, "--concept", "art deco", "--seed", "1", "--overwrite")
    assert replaced.exit_code == 0 and len(ActivationDataset(out).names()) == 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "nope"], "unknown model"),
        (["--layers", "transformer_blocks.*.norm7"], "matches no module"),
        (["--concept", "  "], "empty concept name"),
        (["--samples", "1"], "--samples must be at least 2"),
    ],
)
def test_bad_input_is_one_line_error(tmp_path, args, message):
    result = runner.invoke(app, ["build-dataset", "--model", "tiny", "--out", str(tmp_path / "d"), *args])
    assert result.exit_code == 1
    assert message in result.output and result.output.count("Error:") == 1
    assert not (tmp_path / "d").exists()


def test_out_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("keep me")
    for extra in ([], ["--dry-run"]):
        result = runner.invoke(app, ["build-dataset", "--model", "tiny", "--out", str(target), *extra])
        assert result.exit_code == 1 and "is a file, not a folder" in result.output and result.output.count("Error:") == 1
    assert target.read_text() == "keep me"


def test_dry_run_on_a_real_model_downloads_nothing(tmp_path):
    result = runner.invoke(app, ["build-dataset", "--model", "pixart", "--out", str(tmp_path / "d"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "64,512 neurons" in result.stdout and "concepts: 776" in result.stdout  # the plan is the result
    assert not (tmp_path / "d").exists()


def test_flags_are_single_and_split_is_a_choice(tmp_path):
    no_flag = runner.invoke(app, ["build-dataset", "--model", "tiny", "--out", str(tmp_path / "d"), "--no-overwrite"])
    assert no_flag.exit_code == 2 and "No such option" in no_flag.output
    help_text = runner.invoke(app, ["build-dataset", "-h"]).output
    assert "--split [train|test|all]" in help_text and "--dry-run " in help_text and "--no-dry-run" not in help_text
    typo = runner.invoke(app, ["build-dataset", "--model", "tiny", "--out", str(tmp_path / "d"), "--split", "tset"])
    assert typo.exit_code == 2 and "'tset' is not one of" in typo.output
    assert not (tmp_path / "d").exists()


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "htcli", "build-dataset", "--model", "tiny", *args]


RESUME = ["--limit-concepts", "8", *SMALL]


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tmp_path):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    subprocess.run(_cli("--out", str(reference), *RESUME), check=True, env=env, capture_output=True)

    out = tmp_path / "resumed"
    process = subprocess.Popen(_cli("--out", str(out), *RESUME), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "concepts").glob("*.safetensors"))) < 2:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_at_kill = len(list((out / "concepts").glob("*.safetensors")))
    assert 2 <= done_at_kill < 8, "the kill must land mid-build for this test to mean anything"
    assert not ActivationDataset(out).manifest["complete"]

    resumed = subprocess.run(_cli("--out", str(out), *RESUME), check=True, env=env, capture_output=True, text=True)
    assert f"({8 - done_at_kill} built, {done_at_kill} already there)" in resumed.stdout
    assert not list(out.rglob("*.tmp"))
    assert _files(out) == _files(reference)


@pytest.mark.slow
def test_torchrun_two_processes_equals_single_process(tmp_path):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["--limit-concepts", "5", *SMALL]
    single = tmp_path / "single"
    subprocess.run(_cli("--out", str(single), *args), check=True, env=env, capture_output=True)
    sharded = tmp_path / "sharded"
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "htcli", "build-dataset", "--model", "tiny", "--out", str(sharded), *args]
    result = subprocess.run(run, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _files(sharded) == _files(single)
