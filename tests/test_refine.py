"""`--refine N`: LinEAS warm-started from HyperTransport's prediction (library, three commands, errors)."""

import json

import pytest
import torch
from conftest import build_tiny_dataset
from typer.testing import CliRunner

from htcli.cli import app
from htcli.data.concepts import load_library
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
    from htcli.generate.steer import Steerer, SteerRequest, steer

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
        ([*export, "--concept", "a city made of glass", "--refine", "5", "--data", str(data.root)],
         "add it with `ht build-dataset --concept 'a city made of glass'`"),
        ([*export, "--concept", built, "--data", str(data.root)], "--data is only used with --refine"),
        ([*export, "--concept", built, "--refine", "5", "--data", str(tmp_path)], "is not an ht dataset"),
        ([*steer, "--concept", "a city made of glass", "--refine", "5", "--data", str(data.root)], "ht build-dataset"),
        ([*steer, "--concept", built, "--refine", "-1", "--data", str(data.root)], "--refine takes"),
        ([*steer, "--concept", built, "--refine", "5", "--data", str(data.root), "--method", "prompt"], "--concept sources"),
        ([*steer, "--concept", built, "--data", str(data.root)], "--data is only used with --refine"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and result.output.count("Error:") == 1, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)
