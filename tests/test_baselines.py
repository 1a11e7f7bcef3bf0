"""Per-concept baselines on the tiny world, and intervention files."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import generate
from typer.testing import CliRunner

from htcli.cli import app
from htcli.core.hooks import hooked, resolve_layers
from htcli.core.steering import SteeringConfig
from htcli.core.transport import w2_loss
from htcli.data.dataset import ActivationDataset
from htcli.data.forward import Frozen
from htcli.errors import HTError
from htcli.evaluation.residuals import residuals
from htcli.methods.baselines import (
    LineasConfig,
    fit_linear_act_incremental,
    fit_lineas,
    fit_method,
)
from htcli.methods.fitting import fit_baselines
from htcli.models import denoiser, load_denoiser
from htcli.models.interventions import Intervention, load_intervention

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("baselines") / "data"
    result = runner.invoke(app, ["build-dataset", "-m", "tiny", "-o", str(out), "--limit-concepts", "3",
                                 "--samples", "16", "--eval-samples", "32"])
    assert result.exit_code == 0, result.output
    return ActivationDataset(out)


@pytest.fixture(scope="module")
def frozen(data):
    from htcli.models import get_model

    spec = get_model("tiny")
    model = load_denoiser(spec)
    return Frozen(spec, model, resolve_layers(model, data.settings.layers))


def _concept(data):
    name = data.names()[0]
    return name, {k: v[0] for k, v in data.targets([name], "fit").items()}


def test_linear_act_equals_an_independent_numpy_closed_form(data, frozen):
    name, target = _concept(data)
    source = data.source_activations("fit")
    maps, _, _ = fit_method("linear-act", frozen, data.source_inputs("fit"), source, target)
    for layer in data.settings.layers:
        xs = np.sort(source[layer].numpy().astype(np.float64), axis=0)
        ys = np.sort(target[layer].numpy().astype(np.float64), axis=0)
        slopes, intercepts = [], []
        for j in range(xs.shape[1]):
            if np.ptp(xs[:, j]) == 0:
                slopes.append(1.0), intercepts.append(ys[:, j].mean() - xs[:, j].mean())
                continue
            slope, intercept = np.polyfit(xs[:, j], ys[:, j], 1)
            slopes.append(slope), intercepts.append(intercept)
        omega, beta = maps[layer]
        np.testing.assert_allclose(omega.numpy(), slopes, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(beta.numpy(), intercepts, rtol=1e-3, atol=1e-4)


def test_incremental_linear_act_first_layer_matches_independent_fit(data, frozen):
    name, target = _concept(data)
    inputs = data.source_inputs("fit")
    unsteered = frozen.pooled(inputs)  # float32 (the dataset stores float16)
    independent, _, _ = fit_method("linear-act", frozen, inputs, unsteered, target)
    incremental = fit_linear_act_incremental(frozen, inputs, target)
    order = frozen.execution_order(inputs)
    torch.testing.assert_close(incremental[order[0]], independent[order[0]])
    assert set(incremental) == set(independent)
    # Later layers see upstream maps, so they are fitted on other activations.
    assert not torch.allclose(incremental[order[-1]][1], independent[order[-1]][1])


def test_lineas_loss_decreases_and_beats_linear_act_end_to_end(data, frozen):
    name, target = _concept(data)
    inputs, source = data.source_inputs("fit"), data.source_activations("fit")
    lineas, history = fit_lineas(frozen, inputs, target, LineasConfig(steps=150, lr=1e-2))
    assert history[-1] < 0.7 * history[0]
    linear_act, _, _ = fit_method("linear-act", frozen, inputs, source, target)
    r_lineas, _ = residuals(frozen, inputs, source, target, lineas)
    r_linear_act, _ = residuals(frozen, inputs, source, target, linear_act)
    assert r_lineas < r_linear_act < 1.0


def test_lineas_sparsity_shrinks_the_support(data, frozen):
    name, target = _concept(data)
    inputs = data.source_inputs("fit")
    support = lambda maps: Intervention(maps, "tiny", "lineas", name).support()  # noqa: E731
    # l1 is in units of the loss gradient: probe the gradient at the identity to pick one.
    omega = {n: torch.ones(t.shape[-1], requires_grad=True) for n, t in target.items()}
    with frozen.graph(inputs, {n: (omega[n], torch.zeros_like(omega[n])) for n in target}) as pooled:
        torch.stack([w2_loss(pooled[n], target[n]) for n in target]).mean().backward()
    typical = torch.cat([o.grad.abs() for o in omega.values()]).median().item()
    dense, _ = fit_lineas(frozen, inputs, target, LineasConfig(steps=30))
    sparse, _ = fit_lineas(frozen, inputs, target, LineasConfig(steps=30, l1=typical))
    very_sparse, _ = fit_lineas(frozen, inputs, target, LineasConfig(steps=30, l1=10 * typical))
    assert support(dense) > 0.95
    assert 0 < support(very_sparse) < support(sparse) < 0.8 * support(dense)
    grouped, _ = fit_lineas(frozen, inputs, target, LineasConfig(steps=30, group=1e3 * typical))
    assert support(grouped) == 0  # every layer shrunk back to the identity


@pytest.mark.parametrize("method", ["mean-shift", "linear-act", "lineas"])
def test_cli_fit_round_trip_and_identical_steering_after_reload(data, tmp_path, method, tiny):
    result = runner.invoke(app, ["fit-linear-baselines", "--data", str(data.root), "--method", method, "--split", "all",
                                 "--out", str(tmp_path), "--steps", "5", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert set(report["concepts"]) == set(data.names())
    row = next(iter(report["concepts"].values()))
    # Identity maps (or maps that are ignored) score 1; every method here reaches 0.45-0.7.
    assert all(0 < r["residual"] < 0.8 for r in report["concepts"].values())
    assert row["fit_seconds"] >= 0 and len(row["residual_per_layer"]) == 8
    summary = json.loads((tmp_path / method / "summary.json").read_text())
    assert set(summary["concepts"]) == set(data.names())

    path = tmp_path / method / row["file"]
    loaded = load_intervention(path, model="tiny", widths=data.layers)
    assert loaded.method == method and loaded.model == "tiny"
    spec, pipe = tiny
    layers = resolve_layers(denoiser(pipe, spec), list(loaded.maps))
    with hooked(denoiser(pipe, spec), layers, steering=SteeringConfig(loaded.maps)):
        first = generate(spec, pipe, "a red barn in a field")
    reloaded = load_intervention(path, model="tiny", widths=data.layers)
    with hooked(denoiser(pipe, spec), layers, steering=SteeringConfig(reloaded.maps)):
        second = generate(spec, pipe, "a red barn in a field")
    assert torch.equal(first, second)
    inspected = runner.invoke(app, ["inspect", str(path), "--json"])
    assert inspected.exit_code == 0 and json.loads(inspected.output)["method"] == method


def _saved(tmp_path, **changes):
    maps = {"transformer_blocks.0.norm1": (torch.ones(64), torch.zeros(64)), "transformer_blocks.1.norm2": (torch.full((64,), 1.5), torch.ones(64))}
    maps |= changes.pop("maps", {})
    intervention = Intervention(maps, changes.pop("model", "tiny"), "mean-shift", "art deco")
    path = tmp_path / "i.safetensors"
    intervention.save(path)
    return path


WIDTHS = {f"transformer_blocks.{i}.norm{j}": 64 for i in range(4) for j in (1, 2)}


def test_bad_intervention_files(tmp_path):
    assert load_intervention(_saved(tmp_path), "tiny", WIDTHS).concept == "art deco"
    with pytest.raises(HTError, match="made for model 'pixart', not 'tiny'"):
        load_intervention(_saved(tmp_path, model="pixart"), "tiny", WIDTHS)
    with pytest.raises(HTError, match="does not have"):
        load_intervention(_saved(tmp_path, maps={"transformer_blocks.9.norm1": (torch.ones(64), torch.zeros(64))}), "tiny", WIDTHS)
    with pytest.raises(HTError, match="width 32 in the file but 64"):
        load_intervention(_saved(tmp_path, maps={"transformer_blocks.0.norm1": (torch.ones(32), torch.zeros(32))}), "tiny", WIDTHS)
    with pytest.raises(HTError, match="NaN or inf"):
        load_intervention(_saved(tmp_path, maps={"transformer_blocks.0.norm1": (torch.full((64,), math.inf), torch.zeros(64))}), "tiny", WIDTHS)
    with pytest.raises(HTError, match="NaN or inf"):
        load_intervention(_saved(tmp_path, maps={"transformer_blocks.0.norm1": (torch.ones(64), torch.full((64,), math.nan))}))
    path = _saved(tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(HTError, match="truncated or corrupt"):
        load_intervention(path)
    with pytest.raises(HTError, match="does not exist"):
        load_intervention(tmp_path / "missing.safetensors")
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.ones(2)}, str(other))
    with pytest.raises(HTError, match="not an ht intervention file"):
        load_intervention(other)


def test_cli_bad_input(tmp_path, data):
    path = _saved(tmp_path)
    path.write_bytes(path.read_bytes()[:50])
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 1 and result.output.count("Error:") == 1
    no_data = runner.invoke(app, ["fit-linear-baselines", "--method", "lineas", "--data", str(tmp_path / "nope")])
    assert no_data.exit_code == 1 and "ht build-dataset" in no_data.output
    # --method and --optimizer are choices: help lists them, a typo is a one-line usage error.
    bad_method = runner.invoke(app, ["fit-linear-baselines", "--method", "pca", "--data", str(data.root), "--out", str(tmp_path)])
    assert bad_method.exit_code == 2 and "'pca' is not one of 'linear-act', 'lineas', 'mean-shift'" in bad_method.output
    bad_optimizer = runner.invoke(app, ["fit-linear-baselines", "--method", "lineas", "--optimizer", "adamw",
                                        "--data", str(data.root), "--out", str(tmp_path)])
    assert bad_optimizer.exit_code == 2 and "'adamw' is not one of 'adam', 'sgd'" in bad_optimizer.output
    help_text = runner.invoke(app, ["fit-linear-baselines", "-h"]).output
    assert "--method [linear-act|lineas|mean-shift]" in help_text and "--optimizer [adam|sgd]" in help_text
    assert "--split [train|test|all]" in help_text and "--no-incremental" not in help_text
    assert not list(tmp_path.glob("*/summary.json"))
    bad_lr = runner.invoke(app, ["fit-linear-baselines", "--method", "lineas", "--lr", "0", "--data", str(data.root)])
    assert bad_lr.exit_code == 1 and "--lr" in bad_lr.output


def test_micro_batched_lineas_matches_one_pass(data, frozen):
    name, target = _concept(data)
    inputs = data.source_inputs("fit")
    one, h1 = fit_lineas(frozen, inputs, target, LineasConfig(steps=5))
    micro, h2 = fit_lineas(frozen, inputs, target, LineasConfig(steps=5, micro_batch=5))
    assert h1 == pytest.approx(h2, rel=1e-5)
    for layer in one:
        torch.testing.assert_close(one[layer][0], micro[layer][0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(one[layer][1], micro[layer][1], atol=1e-6, rtol=1e-5)


def _strict(text: str):
    """Parse JSON, refusing Infinity and NaN (which strict JSON readers reject)."""
    def refuse(constant):
        raise ValueError(f"non-finite {constant} in JSON")
    return json.loads(text, parse_constant=refuse)


def _copy(data, tmp_path, edit_manifest=None):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(data.root, root)
    if edit_manifest:
        manifest = json.loads((root / "manifest.json").read_text())
        edit_manifest(manifest)
        (root / "manifest.json").write_text(json.dumps(manifest))
    return ActivationDataset(root)


def test_fit_baselines_saves_every_concept_and_resumes(data, frozen, tmp_path, monkeypatch):
    import htcli.methods.fitting as fitting

    names = data.names()
    first = fit_baselines("mean-shift", frozen, data, names, out=tmp_path)
    summary_path = tmp_path / "mean-shift" / "summary.json"
    summary = _strict(summary_path.read_text())
    assert set(summary["concepts"]) == set(names)
    assert all((tmp_path / "mean-shift" / row["file"]).exists() for row in summary["concepts"].values())
    assert all(0 < r < 0.8 for r in first.residuals)

    # An interrupted run (one concept missing from the summary) refits that concept only.
    del summary["concepts"][names[1]]
    summary_path.write_text(json.dumps(summary))
    calls = []
    real = fitting.fit_method
    monkeypatch.setattr(fitting, "fit_method", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    again = fit_baselines("mean-shift", frozen, data, names, out=tmp_path)
    assert calls == ["mean-shift"] and again.residuals == pytest.approx(first.residuals, abs=1e-6)
    # Other settings (fewer fitting samples) are never mixed with the saved fits: refused, and
    # with overwrite the old fits go and every concept is refitted.
    calls.clear()
    with pytest.raises(HTError, match=r"other settings \(samples=8 \(saved 16\)\)"):
        fit_baselines("mean-shift", frozen, data, names, samples=8, out=tmp_path)
    assert calls == [] and _strict(summary_path.read_text())["settings"]["samples"] == 16
    fewer = fit_baselines("mean-shift", frozen, data, names[:2], samples=8, out=tmp_path, overwrite=True)
    assert len(calls) == 2 and fewer.residuals != pytest.approx(first.residuals[:2], abs=1e-6)
    assert _strict(summary_path.read_text())["settings"]["samples"] == 8
    # The third concept's old file went with the old settings: nothing stale is left to evaluate.
    assert len(list((tmp_path / "mean-shift").glob("*.safetensors"))) == 2


def test_no_concepts_of_a_split_says_how_to_choose(data, tmp_path):
    only_train = _copy(data, tmp_path, lambda m: [c.update(split="train") for c in m["concepts"]])
    result = runner.invoke(app, ["fit-linear-baselines", "--method", "mean-shift", "--data", str(only_train.root),
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and result.output.count("Error:") == 1
    assert "no concepts of split 'test'" in result.output and "--split train" in result.output
    assert "--concept" in result.output and not (tmp_path / "out").exists()


def test_unchanged_concept_gives_strict_json_with_null_residual(data, tmp_path):
    """A concept whose evaluation targets equal the source has W2(source, target) = 0, so any
    change makes the ratio infinite: summary.json and --json hold null, never Infinity."""
    from safetensors.torch import load_file, save_file

    copy = _copy(data, tmp_path)
    name = copy.names()[0]
    path = copy.root / "concepts" / f"{copy.manifest['concepts'][0]['slug']}.safetensors"
    assert copy.manifest["concepts"][0]["name"] == name
    tensors = load_file(str(path))
    source = load_file(str(copy.root / "source.safetensors"))
    for layer in copy.settings.layers:
        tensors[f"eval.{layer}"] = source[f"act.eval.{layer}"]
    save_file(tensors, str(path), metadata={"settings_digest": copy.manifest["settings_digest"]})
    result = runner.invoke(app, ["fit-linear-baselines", "--method", "mean-shift", "--data", str(copy.root), "--concept",
                                 name, "--out", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    row = _strict(result.output[result.output.index("{"):])["concepts"][name]
    assert row["residual"] is None
    assert _strict((tmp_path / "out" / "mean-shift" / "summary.json").read_text())["concepts"][name]["residual"] is None


def _no_model(monkeypatch):
    """Make loading the denoiser fail loudly: the checks under test must come before it."""
    import htcli.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(htcli.models, "load_denoiser", refuse)


def test_out_that_is_a_file_is_refused_before_the_model_loads(data, tmp_path, monkeypatch):
    _no_model(monkeypatch)
    readme = tmp_path / "README.md"
    readme.write_text("keep me")
    result = runner.invoke(app, ["fit-linear-baselines", "--method", "mean-shift", "--data", str(data.root),
                                 "--split", "all", "--out", str(readme)])
    assert result.exit_code == 1 and result.output.count("Error:") == 1, result.output
    assert "is a file, not a folder" in result.output and readme.read_text() == "keep me"


def test_other_settings_are_refused_and_overwrite_removes_the_old_fits(data, tmp_path, monkeypatch):
    fit = ["fit-linear-baselines", "--method", "lineas", "--steps", "2", "--data", str(data.root), "--out", str(tmp_path)]
    assert runner.invoke(app, [*fit, "--split", "all"]).exit_code == 0
    folder = tmp_path / "lineas"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert len(before) == len(data.names()) + 1  # one file per concept and summary.json
    with monkeypatch.context() as patched:
        _no_model(patched)
        other = runner.invoke(app, [*fit, "--concept", data.names()[0], "--samples", "8", "--lr", "0.1"])
    assert other.exit_code == 1 and other.output.count("Error:") == 1, other.output
    assert "--samples 8 (saved 16)" in other.output and "--lr 0.1 (saved 0.01)" in other.output
    assert "--steps" not in other.output and "--overwrite" in other.output
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    replaced = runner.invoke(app, [*fit, "--concept", data.names()[0], "--samples", "8", "--lr", "0.1", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    summary = _strict((folder / "summary.json").read_text())
    assert list(summary["concepts"]) == [data.names()[0]] and summary["settings"]["samples"] == 8
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [summary["concepts"][data.names()[0]]["file"]]


def test_diverging_lineas_is_reported(data, tmp_path):
    name = data.names()[0]
    result = runner.invoke(app, ["fit-linear-baselines", "--method", "lineas", "--lr", "1e6", "--steps", "5", "--concept",
                                 name, "--data", str(data.root), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    warning = " ".join(result.stderr.split())
    assert f"warning: the lineas loss rose during the fit (diverged) on 1 of 1 concepts: {name}" in warning
    assert "lower --lr" in warning
    row = _strict((tmp_path / "lineas" / "summary.json").read_text())["concepts"][name]
    assert row["diverged"] is True and row["loss_last"] > row["loss_first"]
    calm = runner.invoke(app, ["fit-linear-baselines", "--method", "lineas", "--steps", "5", "--concept", name,
                               "--data", str(data.root), "--out", str(tmp_path / "calm")])
    assert calm.exit_code == 0 and "warning" not in calm.output
    assert _strict((tmp_path / "calm" / "lineas" / "summary.json").read_text())["concepts"][name]["diverged"] is False


def test_baseline_run_summarises_its_rows():
    from pathlib import Path

    from htcli.methods.fitting import BaselineRun

    rows = {"a": {"residual": 0.5, "fit_seconds": 1.0}, "b": {"residual": None, "fit_seconds": 3.0},
            "c": {"residual": 0.7, "fit_seconds": 2.0, "diverged": True}}
    run = BaselineRun("lineas", "tiny", Path("x"), rows)
    assert run.mean_residual == pytest.approx(0.6) and run.median_fit_seconds == 2.0 and run.diverged == ["c"]
    assert BaselineRun("lineas", "tiny", Path("x"), {"b": rows["b"]}).mean_residual is None


def test_baseline_folders_are_found_by_one_rule(tmp_path):
    """`ht evaluate` (find_baselines) and `ht score` (baseline_summaries) agree on what a
    baseline method is: a folder with the summary.json of fit-linear-baselines."""
    from htcli.evaluation.residuals import baseline_summaries
    from htcli.evaluation.runs import find_baselines

    root = tmp_path / "baselines"
    for method in ("lineas", "mean-shift"):
        (root / method).mkdir(parents=True)
        (root / method / "summary.json").write_text("{}")
        (root / method / "art-deco.safetensors").write_bytes(b"")
    (root / "exported").mkdir()  # intervention files without a summary: not a baseline method
    (root / "exported" / "noir.safetensors").write_bytes(b"")
    expected = [root / "lineas", root / "mean-shift"]
    assert list(find_baselines([root]).values()) == expected
    assert [p.parent for p in baseline_summaries([root])] == expected
    assert list(find_baselines([root / "lineas"]).values()) == [root / "lineas"]
    assert [p.parent for p in baseline_summaries([root / "lineas"])] == [root / "lineas"]
    for finder in (find_baselines, baseline_summaries):
        with pytest.raises(HTError, match="no baselines in"):
            finder([root / "exported"])
        with pytest.raises(HTError, match="not a directory"):
            finder([tmp_path / "missing"])
