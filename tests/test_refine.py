"""`--refine N`: LinEAS warm-started from HyperTransport's prediction (library, three commands, errors)."""

import json

import pytest
import torch
from conftest import build_tiny_dataset
from typer.testing import CliRunner

from htcli.cli import app
from htcli.data.concepts import load_library, slugify
from htcli.errors import HTError
from htcli.evaluation.residuals import residuals
from htcli.methods.baselines import LineasConfig, fit_lineas
from htcli.methods.predict import Predictor
from htcli.methods.refine import refine_maps
from htcli.models.interventions import load_intervention

runner = CliRunner()
TRAIN = ["--steps", "8", "--concepts-per-step", "2", "--eval-every", "4", "--hidden", "32",
         "--rank", "4", "--val-fraction", "0.2", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_tiny_dataset(tmp_path_factory.mktemp("refine") / "data", train=4, test=1)


@pytest.fixture(scope="module")
def hyper(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("refine-hyper") / "hyper"
    result = runner.invoke(app, ["train-hyper", "--data", str(data.root), "--out", str(out), *TRAIN])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def frozen(data):
    from htcli.core.hooks import resolve_layers
    from htcli.data.forward import Frozen
    from htcli.models import get_model, load_denoiser

    spec = get_model("tiny")
    model = load_denoiser(spec)
    return Frozen(spec, model, resolve_layers(model, data.settings.layers))


@pytest.fixture(scope="module")
def predictor(hyper):
    return Predictor.load(hyper / "hyper.safetensors", model="tiny")


@pytest.fixture(scope="module")
def concept(data):
    return load_library().resolve(data.names("test")[0])


def _fit_samples(data, name):
    inputs = data.source_inputs("fit")
    return inputs, {k: v[0] for k, v in data.targets([name], "fit").items()}


def test_refine_starts_at_the_prediction(data, frozen, predictor, concept):
    from htcli.methods.objective import _w2

    predicted = predictor.maps([concept])[0]
    # The warm start is the prediction bit for bit: omega -> omega - 1 -> 1 + (omega - 1) is exact.
    assert all(torch.equal(1 + (omega - 1), omega) for omega, _ in predicted.values())
    inputs, target = _fit_samples(data, concept.name)
    _, history = fit_lineas(frozen, inputs, target, LineasConfig(steps=1), init=predicted)
    sorted_target = {n: torch.sort(t, dim=0).values[None] for n, t in target.items()}  # (1, N, D)
    predicted_loss = _w2(frozen.pooled(inputs, predicted), sorted_target, 1).item()
    identity_loss = _w2(frozen.pooled(inputs), sorted_target, 1).item()
    assert history[0] == pytest.approx(predicted_loss, rel=1e-6) and history[0] != pytest.approx(identity_loss)


def test_identity_init_is_bit_identical_to_no_init(data, frozen):
    name = data.names("train")[0]
    inputs, target = _fit_samples(data, name)
    config = LineasConfig(steps=4, l1=1e-4, group=1e-4)
    maps, history = fit_lineas(frozen, inputs, target, config)
    identity = {n: (torch.ones(t.shape[-1]), torch.zeros(t.shape[-1])) for n, t in target.items()}
    again, history_again = fit_lineas(frozen, inputs, target, config, init=identity)
    assert history == history_again
    assert all(torch.equal(maps[n][i], again[n][i]) for n in maps for i in (0, 1))
    with pytest.raises(HTError, match="no layer"):
        fit_lineas(frozen, inputs, target, config, init={})


def test_refine_lowers_the_held_out_residual(data, frozen, predictor, concept):
    maps, info = refine_maps(predictor, frozen, concept, data, 20)
    eval_target = {k: v[0] for k, v in data.targets([concept.name], "eval").items()}
    after = residuals(frozen, data.source_inputs("eval"), data.source_activations("eval"), eval_target, maps)[0]
    print(f"residual {info['residual_before']:.4f} -> {after:.4f}, {info['seconds']:.2f} s")
    assert info["residual_after"] == after < info["residual_before"]
    assert info["refine"] == info["steps"] == 20 and info["loss_last"] < info["loss_first"]
    assert info["checkpoint_sha256"] == predictor.digest and info["seconds"] > 0


def test_fit_linear_baselines_refine(data, hyper, tmp_path):
    args = ["fit-linear-baselines", "--data", str(data.root), "--method", "lineas", "--refine", "3", "--hyper", str(hyper),
            "--out", str(tmp_path), "--concept", data.names("test")[0]]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "lineas-refine3"
    summary = json.loads((folder / "summary.json").read_text())
    assert json.loads(result.stdout)["method"] == summary["method"] == "lineas-refine3"
    digest = Predictor.load(hyper / "hyper.safetensors").digest
    assert summary["settings"]["lineas"].items() >= {"steps": 3, "refine": 3, "hyper": digest}.items()
    row = next(iter(summary["concepts"].values()))
    assert load_intervention(folder / row["file"]).method == "lineas-refine3" and 0 < row["residual"] < 1
    # Fits from another checkpoint are not mixed into the folder.
    summary["settings"]["lineas"]["hyper"] = "0" * 16
    (folder / "summary.json").write_text(json.dumps(summary))
    other = runner.invoke(app, args)
    assert other.exit_code == 1 and f"--hyper {digest} (saved {'0' * 16})" in other.output


def test_hyper_export_refine(data, hyper, concept, tmp_path):
    out = tmp_path / "refined.safetensors"
    result = runner.invoke(app, ["hyper", "export", "--hyper", str(hyper), "--data", str(data.root), "--concept",
                                 concept.name, "--out", str(out), "--refine", "3"])
    assert result.exit_code == 0, result.output
    written = load_intervention(out, model="tiny", widths=data.layers)
    assert written.method == "lineas-refine3" and written.info["refine"] == 3
    assert written.info["residual_after"] < written.info["residual_before"]
    assert "refined with 3 LinEAS steps" in result.stdout


def test_steer_refine(data, hyper, concept, frozen, predictor, tiny, tmp_path):
    from htcli.generate.save import save_steered
    from htcli.generate.steer import SteerRequest, steer
    from htcli.generate.source_maps import Steerer

    spec, pipe = tiny
    steerer = Steerer(spec, pipe=pipe, hyper=hyper)
    steered = steer(steerer, SteerRequest("a lighthouse", concepts=[concept.name], strengths=[1], refine=3, data=data.root))
    expected, _ = refine_maps(predictor, frozen, concept, data, 3, evaluate=False)
    assert all(torch.equal(steered.maps[n][i], expected[n][i]) for n in expected for i in (0, 1))
    (png,) = save_steered(steered, tmp_path / "out")
    assert json.loads(png.with_suffix(".json").read_text())["refine"] == 3
    # The command takes the option.
    result = runner.invoke(app, ["steer", "a lighthouse", "--model", "tiny", "--hyper", str(hyper), "--concept",
                                 concept.name, "--refine", "2", "--data", str(data.root), "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    (sidecar,) = (tmp_path / "cli").glob("*.json")
    assert json.loads(sidecar.read_text())["refine"] == 2


def _refuse_to_load(*args, **kwargs):
    raise AssertionError("a model was loaded before the input was checked")


def test_bad_input_is_refused_before_anything_loads(data, hyper, tmp_path, monkeypatch):
    import htcli.models

    monkeypatch.setattr(htcli.models, "load_denoiser", _refuse_to_load)
    monkeypatch.setattr(htcli.models, "load_pipeline", _refuse_to_load)
    monkeypatch.setattr(Predictor, "load", _refuse_to_load)
    built = data.names("test")[0]
    fit = ["fit-linear-baselines", "--data", str(data.root), "--out", str(tmp_path / "b"), "--concept", built]
    export = ["hyper", "export", "--hyper", str(hyper), "--out", str(tmp_path / "x.safetensors")]
    steer = ["steer", "a lighthouse", "--model", "tiny", "--hyper", str(hyper), "--out", str(tmp_path / "s")]
    cases = [
        ([*fit, "--method", "lineas", "--refine", "0", "--hyper", str(hyper)], "--refine takes a number of LinEAS steps"),
        ([*fit, "--method", "mean-shift", "--refine", "5", "--hyper", str(hyper)], "use it with --method lineas"),
        ([*fit, "--method", "lineas", "--refine", "5", "--steps", "9"], "drop --steps"),
        ([*fit, "--method", "lineas", "--hyper", str(hyper)], "--hyper is only used with --refine"),
        ([*fit, "--method", "lineas", "--refine", "5", "--hyper", str(tmp_path / "none")], "no hypernetwork at"),
        ([*export, "--concept", built, "--refine", "0", "--data", str(data.root)], "--refine takes"),
        ([*export, "--concept", built, "--data", str(data.root)], "--data is only used with --refine"),
        ([*export, "--concept", built, "--refine", "5", "--data", str(tmp_path)], "is not an ht dataset"),
        ([*steer, "--concept", built, "--refine", "-1", "--data", str(data.root)], "--refine takes"),
        ([*steer, "--concept", built, "--refine", "5", "--data", str(data.root), "--method", "prompt"], "--concept sources"),
        ([*steer, "--concept", built, "--data", str(data.root)], "--data is only used with --refine"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and result.output.count("Error:") == 1, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)


# --- Any concept text: targets captured on the fly -------------------------------------------


def test_captured_targets_are_the_datasets_and_refine_alike(data, hyper, predictor, frozen, tiny, tmp_path,
                                                            monkeypatch):
    """Captured on a dataset's fitting samples, a concept's targets are the ones the dataset stores
    (up to the float16 it stores them in), and refining on them gives the dataset's refined maps."""
    from htcli.generate.source_maps import Steerer

    monkeypatch.setenv("HT_RUNS", str(tmp_path / "runs"))
    spec, pipe = tiny
    refiner = Steerer(spec, pipe=pipe, hyper=hyper).refiner
    concept = load_library().resolve(data.names("train")[0])
    captured = refiner.captured(data, predictor)
    assert captured.root == tmp_path / "runs" / "tiny" / "refine-cache" / data.settings.digest()
    assert captured.ensure([concept]) == [concept.name] and captured.ensure([concept]) == []  # then cached
    # One file, the concept's: the source inputs are the dataset's own, read from it, never recomputed.
    assert [f.name.startswith(slugify(concept.name)) for f in captured.root.iterdir()] == [True]
    got, want = captured.targets([concept.name]), data.targets([concept.name], "fit")
    for layer in data.settings.layers:
        torch.testing.assert_close(got[layer], want[layer], rtol=2e-3, atol=2e-3)  # float16 storage, batch rounding
    from_capture, _ = refine_maps(predictor, frozen, concept, captured, 3, evaluate=False)
    from_dataset, _ = refine_maps(predictor, frozen, concept, data, 3, evaluate=False)
    for layer in from_dataset:
        torch.testing.assert_close(from_capture[layer][1], from_dataset[layer][1], rtol=1e-2, atol=1e-3)


def test_steer_refines_free_text_without_a_dataset(hyper, tiny, tmp_path, monkeypatch):
    """No dataset anywhere: the default fitting samples are captured once, then reused."""
    import htcli.models

    monkeypatch.setenv("HT_RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(htcli.models, "load_pipeline", lambda *a, **k: tiny[1])
    args = ["steer", "a lighthouse", "--model", "tiny", "--hyper", str(hyper), "--concept", "a city made of glass",
            "--refine", "3", "--strength", "1"]
    first = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    cache = tmp_path / "runs" / "tiny" / "refine-cache"
    files = sorted(cache.rglob("*.safetensors"))
    assert [f.name for f in files][-1] == "source.safetensors" and len(files) == 2
    stamps = [f.stat().st_mtime_ns for f in files]
    second = runner.invoke(app, [*args, "--out", str(tmp_path / "b")])
    assert second.exit_code == 0 and [f.stat().st_mtime_ns for f in sorted(cache.rglob("*.safetensors"))] == stamps
    (one,), (two,) = (sorted((tmp_path / d).glob("0*.png")) for d in "ab")
    assert one.read_bytes() == two.read_bytes()  # the same targets, the same refined maps
    sidecar = json.loads(one.with_suffix(".json").read_text())
    assert sidecar["refine"] == 3 and sidecar["sources"][0]["concept"] == "a city made of glass"
    exported = runner.invoke(app, ["hyper", "export", "--model", "tiny", "--hyper", str(hyper), "--concept",
                                   "a city made of glass", "--refine", "2", "--out", str(tmp_path / "x.safetensors")])
    assert exported.exit_code == 0 and "captured targets" in exported.output, exported.output
    assert load_intervention(tmp_path / "x.safetensors").method == "lineas-refine2"


def test_serve_refines_within_its_limit(hyper, tiny, tmp_path, monkeypatch):
    import httpx
    from serving import served

    from htcli.generate.source_maps import Steerer

    monkeypatch.setenv("HT_RUNS", str(tmp_path / "runs"))
    spec, pipe = tiny
    body = {"prompt": "a lighthouse", "concepts": ["a city made of glass"], "refine": 2, "strength": 1}
    with served(Steerer(spec, pipe=pipe, hyper=hyper)) as (_, url):
        off = httpx.post(f"{url}/v1/generate", json=body, timeout=60)
    assert off.status_code == 400 and off.json()["field"] == "refine" and "--max-refine" in off.json()["error"]
    with served(Steerer(spec, pipe=pipe, hyper=hyper), max_refine=3) as (_, url):
        ok = httpx.post(f"{url}/v1/generate", json=body, timeout=120)
        too_many = httpx.post(f"{url}/v1/generate", json=body | {"refine": 4}, timeout=60)
        no_concept = httpx.post(f"{url}/v1/generate", json={"prompt": "x", "refine": 2, "interventions": []}, timeout=60)
    assert ok.status_code == 200, ok.text
    assert ok.json()["images"][0]["metadata"]["refine"] == 2
    assert too_many.status_code == 400 and too_many.json()["field"] == "refine"
    assert no_concept.status_code == 400


def test_damaged_cache_files_are_captured_again_and_the_cache_is_bounded(data, hyper, predictor, tiny, tmp_path,
                                                                          monkeypatch):
    from htcli.core.files import read_tensors, save_tensors
    from htcli.generate.source_maps import Steerer

    monkeypatch.setenv("HT_RUNS", str(tmp_path / "runs"))
    spec, pipe = tiny
    refiner = Steerer(spec, pipe=pipe, hyper=hyper).refiner
    refiner.max_cached = 2
    library = load_library()
    first, second, third = (library.resolve(text) for text in ("glass city", "paper city", "ice city"))
    captured = refiner.captured(None, predictor)  # no dataset: the default fitting samples
    assert len(captured.source_inputs()) == 32  # recorded once, kept beside the targets
    assert captured.ensure([first]) == ["glass city"]
    (path,) = [p for p in captured.root.glob("*.safetensors") if p.name != "source.safetensors"]
    good = captured.targets(["glass city"])
    path.write_bytes(path.read_bytes()[:-50])  # truncated
    assert captured.ensure([first]) == ["glass city"]  # captured again, not an error
    tensors, meta = read_tensors(path, "x")
    save_tensors(path, {"wrong": tensors[next(iter(tensors))]}, meta)  # whole, but not what it should hold
    assert captured.ensure([first]) == ["glass city"]
    assert all(torch.equal(captured.targets(["glass city"])[k], good[k]) for k in good)
    captured.ensure([second])
    captured.ensure([third])  # a third concept: the oldest file goes
    kept = sorted(p.name.split("-")[0] for p in captured.root.glob("*.safetensors") if p.name != "source.safetensors")
    assert kept == ["ice", "paper"] and (captured.root / "source.safetensors").is_file()
    assert captured.ensure([first, second, third]) == ["glass city"]  # all three kept while this call needs them


def test_other_weights_capture_into_their_own_cache(predictor, tmp_path, monkeypatch):
    """Targets captured through `--model-path` weights are never reused for the spec's own weights."""
    from htcli.methods.refine import Refiner
    from htcli.models import get_model

    monkeypatch.setenv("HT_RUNS", str(tmp_path / "runs"))
    spec, library = get_model("tiny"), load_library()
    own = Refiner(spec, lambda: None, lambda: library).captured(None, predictor)
    local = Refiner(spec, lambda: None, lambda: library, model_path=str(tmp_path / "weights")).captured(None, predictor)
    assert own.settings == local.settings and own.root != local.root
    assert local.root.name.startswith(own.root.name + "-")
    monkeypatch.setenv("HT_MODEL_PATH", str(tmp_path / "weights"))  # the same weights, named by the variable
    assert Refiner(spec, lambda: None, lambda: library).captured(None, predictor).root == local.root
