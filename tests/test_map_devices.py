"""One device for maps: every source's maps meet on the device the pipeline runs on.

On a GPU the hypernetwork predicts on CUDA while intervention files load on the CPU; composing
them (`combine`) or batching them (`stack_maps`) across devices fails. With one GPU out of
reach, the meta device stands in for CUDA: the hypernetwork and the pipeline's denoiser live
there, the files on the CPU. Also here: `--refine` fits through `--model-path`'s weights, and
a dataset hooked at other layers than the hypernetwork is one line.
"""

import base64
import json
import threading

import httpx
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from htcli.cli import app
from htcli.core.files import file_digest
from htcli.data.concepts import load_library
from htcli.generate.source_maps import Steerer
from htcli.generate.steer import SteerRequest, steer
from htcli.methods.hypernetwork import load_checkpoint
from htcli.methods.predict import Predictor, shipped_checkpoint
from htcli.models import build_meta_denoiser, get_model
from htcli.models.encoders import get_encoder
from htcli.models.interventions import Intervention
from htcli.models.plan import make_plan

runner = CliRunner()
CONCEPT = "art deco"


class MetaPipeline:
    """Stands in for a pipeline whose denoiser is on another device than the CPU: `tiny`'s
    denoiser on the meta device; a call returns blank images (nothing is computed)."""

    def __init__(self, spec) -> None:
        self.transformer = build_meta_denoiser(spec)
        self.calls = 0

    def __call__(self, prompt, *, generator, **kwargs):
        self.calls += 1
        return type("Output", (), {"images": [Image.new("RGB", (8, 8)) for _ in generator]})()


def _predictor(device: str) -> Predictor:
    """The shipped `tiny` hypernetwork on `device` (its MiniLM encoder on the CPU)."""
    path = shipped_checkpoint("tiny")
    return Predictor(load_checkpoint(path, device), get_encoder("minilm"), path, file_digest(path))


@pytest.fixture(scope="module")
def intervention_file(tmp_path_factory):
    """A `tiny` intervention file: its maps load on the CPU."""
    layers = make_plan(get_model("tiny")).layers
    maps = {layer.name: (torch.full((layer.width,), 1.1), torch.full((layer.width,), 0.1)) for layer in layers}
    path = tmp_path_factory.mktemp("file") / "mine.safetensors"
    Intervention(maps, "tiny", "lineas", "mine").save(path)
    return path


def _devices(maps) -> set[str]:
    return {t.device.type for pair in maps.values() for t in pair}


@pytest.mark.parametrize("each", [False, True])
def test_a_concept_predicted_on_the_pipelines_device_composes_with_a_file(intervention_file, each):
    """The hypernetwork and the denoiser on the stand-in device, the file on the CPU: composing
    (and `--each`'s mixed batch) used to fail with 'Tensor on device cpu is not on the expected
    device meta'."""
    spec = get_model("tiny")
    pipe = MetaPipeline(spec)
    steerer = Steerer(spec, pipe=pipe, predictor=_predictor("meta"), device="meta")
    steered = steer(steerer, SteerRequest("a lighthouse", concepts=[CONCEPT], interventions=[str(intervention_file)],
                                          strengths=[0.5], each=each))
    assert pipe.calls == 1 and len(steered.images) == (2 if each else 1)
    if not each:
        assert _devices(steered.maps) == {"meta"}


def test_maps_meet_on_the_pipelines_device_whatever_the_hypernetworks(intervention_file):
    """Hypernetwork on the CPU, pipeline on the stand-in device: the composed maps are on the
    pipeline's device."""
    spec = get_model("tiny")
    steerer = Steerer(spec, pipe=MetaPipeline(spec), predictor=_predictor("cpu"), device="meta")
    steered = steer(steerer, SteerRequest("a lighthouse", concepts=[CONCEPT], interventions=[str(intervention_file)]))
    assert _devices(steered.maps) == {"meta"}


def test_a_server_batch_mixes_a_concept_request_with_a_file_request(intervention_file):
    """Two requests in one pipeline call of `ht serve`: one steered by a concept (maps predicted
    on the stand-in device), one by an uploaded intervention file (read on the CPU). Both used
    to fail with a 500."""
    from serving import served

    spec = get_model("tiny")
    steerer = Steerer(spec, pipe=MetaPipeline(spec), predictor=_predictor("meta"), device="meta")
    upload = base64.b64encode(intervention_file.read_bytes()).decode()
    bodies = [{"prompt": "a lighthouse", "concepts": [CONCEPT]}, {"prompt": "a harbour", "interventions": [upload]}]
    replies = [None, None]
    with served(steerer, batch_window_ms=3000, max_batch=2) as (service, url):
        def post(index: int) -> None:
            replies[index] = httpx.post(f"{url}/v1/generate", json=bodies[index], timeout=60)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [reply.status_code for reply in replies] == [200, 200], [reply.text for reply in replies]
        assert service.batcher.batches == 1 and service.batcher.largest == 2  # one call, both requests


def test_refine_fits_through_the_model_path_weights(tiny_flux, tmp_path):
    """`--refine` loads its denoiser from `--model-path`, as the pipeline does: FLUX from a local
    folder (here a saved `tiny-flux` pipeline under the `flux-schnell` spec) offline, never the Hub's."""
    spec, pipe = tiny_flux
    pipe.save_pretrained(tmp_path)
    steerer = Steerer(get_model("flux-schnell"), model_path=str(tmp_path), device="cpu")
    frozen = steerer.refiner.frozen(["transformer_blocks.0"])
    expected = pipe.transformer.state_dict()
    assert frozen.model.config.num_layers == 2
    for key, tensor in frozen.model.state_dict().items():
        assert torch.equal(tensor.float(), expected[key].float()), key


def test_model_path_reaches_every_command_that_loads_a_denoiser(tmp_path, monkeypatch):
    """`fit-linear-baselines`, `train-hyper` and `hyper export --refine` take --model-path and
    load their denoiser from it."""
    from conftest import build_tiny_dataset

    import htcli.models

    data = build_tiny_dataset(tmp_path / "data", train=2, test=1, samples=2, eval_samples=2)
    asked = []
    real = htcli.models.load_denoiser

    def recording(spec, device="cpu", dtype=None, model_path=None):
        asked.append(model_path)
        return real(spec, device, dtype, model_path)

    monkeypatch.setattr(htcli.models, "load_denoiser", recording)
    folder = str(tmp_path / "pipeline")
    hyper = tmp_path / "hyper"
    concept = data.names("test")[0]
    for args in (["fit-linear-baselines", "--method", "lineas", "--steps", "1", "--data", str(data.root), "--out",
                  str(tmp_path / "b")],
                 ["train-hyper", "--data", str(data.root), "--out", str(hyper), "--steps", "1", "--hidden", "8",
                  "--rank", "2", "--concepts-per-step", "1"],
                 ["hyper", "export", "--hyper", str(hyper), "--concept", concept, "--refine", "1", "--data",
                  str(data.root), "--out", str(tmp_path / "x.safetensors")]):
        result = runner.invoke(app, [*args, "--model-path", folder])
        assert result.exit_code == 0, result.output
        assert asked[-1] == folder, args[0]


def test_refine_with_a_dataset_of_other_layers_is_one_line(tmp_path):
    """A dataset built on part of the hypernetwork's layers used to end in a KeyError."""
    name = load_library().targets("test")[0].name
    data = tmp_path / "data"
    built = runner.invoke(app, ["build-dataset", "-m", "tiny", "-o", str(data), "-c", name, "--samples", "2",
                                "--eval-samples", "2", "--layers", "transformer_blocks.*.norm2"])
    assert built.exit_code == 0, built.output
    result = runner.invoke(app, ["steer", "a lighthouse", "-m", "tiny", "--hyper", str(shipped_checkpoint("tiny")),
                                 "-c", name, "--refine", "2", "--data", str(data), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)  # one line, not a KeyError
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("Error: --refine fits the hypernetwork's layers") and "lacks 4 of its 8 layers" in message
    assert not (tmp_path / "out").exists()
    assert json.loads((data / "manifest.json").read_text())["settings"]["layers"][0] == "transformer_blocks.0.norm2"
    exported = runner.invoke(app, ["hyper", "export", "-m", "tiny", "--hyper", str(shipped_checkpoint("tiny")), "-c", name,
                                   "--refine", "2", "--data", str(data), "-o", str(tmp_path / "maps.safetensors")])
    assert exported.exit_code == 1 and isinstance(exported.exception, SystemExit)  # the same refusal
    assert exported.output.strip().splitlines()[-1] == message and not (tmp_path / "maps.safetensors").exists()
