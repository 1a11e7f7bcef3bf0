"""`ht serve`: the HTTP API against `ht steer`'s results, dynamic batching (each image equals its
request served alone), limits and bad requests, the map cache, the command.

Tolerance: a sample's image may differ from the same sample generated in a batch of another size
by one level in a few PNG values (CPU kernels re-associate sums by batch size; ~1e-6 in float).
Steering with another sample's maps moves far more pixels, by more (checked below)."""

import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from serving import hyper_checkpoint, served
from typer.testing import CliRunner

from htcli.cli import app
from htcli.core.strength import DEFAULT_STRENGTH
from htcli.generate.batch import Sample, generate_batch
from htcli.generate.compose import combine
from htcli.generate.source_maps import Steerer
from htcli.generate.steer import SteerRequest, steer
from htcli.methods.predict import shipped_checkpoint
from htcli.models.interventions import load_intervention
from htcli.serve.cache import CachedPredictor, MapCache

TIMEOUT = 60.0


@pytest.fixture(scope="module")
def steerer(tiny, tmp_path_factory):
    spec, pipe = tiny
    return Steerer(spec, pipe=pipe, hyper=hyper_checkpoint(tmp_path_factory.mktemp("hyper")))


@pytest.fixture(scope="module")
def server(steerer):
    with served(steerer, batch_window_ms=5, max_image_pixels=300 * 300, max_body_bytes=2**20) as (service, url):
        yield service, url


def _post(url, path, **kwargs):
    return httpx.post(url + path, timeout=TIMEOUT, **kwargs)


def _pixels(item) -> np.ndarray:
    """The image of one /v1/generate result (or a PIL image) as int16 values."""
    image = Image.open(io.BytesIO(base64.b64decode(item["png"]))) if isinstance(item, dict) else item
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _close(served_image: np.ndarray, alone: np.ndarray) -> None:
    diff = np.abs(served_image - alone)
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


def _png_bytes(size, seed=0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_health_concepts_and_page(server, steerer):
    service, url = server
    assert url.startswith("http://127.0.0.1:")  # loopback unless told otherwise
    health = httpx.get(url + "/v1/health", timeout=TIMEOUT).json()
    assert health["status"] == "ok" and health["model"] == "tiny" and health["device"] == "cpu"
    assert health["hypernetwork_sha256"] == steerer.predictor.digest and health["queue"] == 0
    assert health["encoder"] == "open_clip:ht-tiny-clip" and health["limits"]["max_image_pixels"] == 300 * 300
    assert health["defaults"] == {"strength": DEFAULT_STRENGTH}  # the page's slider starts at the policy's default
    concepts = httpx.get(url + "/v1/concepts", timeout=TIMEOUT).json()["concepts"]
    names = {c["name"] for c in concepts}
    assert "Art Deco" in names and {c["held_out"] for c in concepts} == {True, False}
    page = httpx.get(url + "/", timeout=TIMEOUT)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ('id="prompt"', 'id="strength" type="range"', 'id="reference" type="file"', 'id="seed"', "/v1/generate"):
        assert element in page.text


def test_generate_equals_ht_steer_with_its_sidecar_metadata(server, steerer):
    _, url = server
    body = {"prompt": "a lighthouse on a cliff", "concepts": ["art deco:0.6", {"name": "ukiyo-e", "weight": 0.3}],
            "strength": [0, 0.5, 1], "seed": 7, "num_images": 2}
    reply = _post(url, "/v1/generate", json=body)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    alone = steer(steerer, SteerRequest("a lighthouse on a cliff", concepts=["art deco:0.6", ("ukiyo-e", 0.3)],
                                        strengths=[0, 0.5, 1], seed=7, num_images=2))
    assert [i["label"] for i in data["images"]] == [i.label for i in alone.images]
    assert data["columns"] == alone.columns == 3 and data["notes"] == alone.notes
    for item, expected in zip(data["images"], alone.images):
        timing = {"intervention_ms"}
        assert {k: v for k, v in item["metadata"].items() if k not in timing} == \
               {k: v for k, v in expected.metadata.items() if k not in timing}
        assert json.loads(Image.open(io.BytesIO(base64.b64decode(item["png"]))).text["ht"]) == item["metadata"]
        _close(_pixels(item), _pixels(expected.image))
    strength0, strength1 = _pixels(data["images"][0]), _pixels(data["images"][2])
    assert np.abs(strength0 - strength1).mean() > 1  # steering shows
    assert data["timings"]["maps_ms"] >= 0 and data["timings"]["generate_ms"] > 0


def test_each_sources_out_of_distribution_flag_is_the_predictors(tiny):
    """The shipped tiny network decides by its calibrated score: 'gouache' is in distribution
    although its nearest training concept is below the older nearest-similarity threshold."""
    spec, pipe = tiny
    shipped = Steerer(spec, pipe=pipe, hyper=shipped_checkpoint("tiny"))
    with served(shipped, batch_window_ms=5) as (_, url):
        reply = _post(url, "/v1/generate", json={"prompt": "a bowl of fruit", "concepts": ["gouache", "zxqv 1234 lorem"]})
    assert reply.status_code == 200, reply.text
    alone = steer(shipped, SteerRequest("a bowl of fruit", concepts=["gouache", "zxqv 1234 lorem"]))
    assert [(s["source"], s["ood"]) for s in reply.json()["sources"]] == [(r["source"], r["ood"]) for r in alone.neighbours]
    assert [s["ood"] for s in reply.json()["sources"]] == [False, True]


def test_concurrent_requests_share_one_batch_and_each_equals_it_served_alone(steerer):
    # Same prompt and seed, different maps: a sample steered with another's maps would show.
    requests = [SteerRequest("a red barn", concepts=["art deco"], strengths=[1.0], seed=3),
                SteerRequest("a red barn", concepts=["ukiyo-e:0.7", "film noir:0.5"], strengths=[-0.8], seed=3),
                SteerRequest("a red barn", concepts=["impressionism"], method="prompt", seed=3),
                SteerRequest("a red barn", concepts=["pixel art"], strengths=[1.5], seed=3)]
    bodies = [{"prompt": r.prompt, "concepts": list(r.concepts), "strength": r.strengths, "seed": r.seed,
               "method": r.method} for r in requests]
    replies = [None] * len(bodies)
    # The batch closes when its 4th image arrives, long before the window would.
    with served(steerer, batch_window_ms=20_000, max_batch=4) as (service, url):

        def send(i):
            replies[i] = _post(url, "/v1/generate", json=bodies[i])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
        health = httpx.get(url + "/v1/health", timeout=TIMEOUT).json()
    assert all(r is not None and r.status_code == 200 for r in replies), [r and r.text for r in replies]
    assert health["batching"]["batches"] == 1 and health["batching"]["largest_batch"] == 4
    served_images = [_pixels(r.json()["images"][0]) for r in replies]
    assert all(r.json()["images"][0]["batch_size"] == 4 for r in replies)
    alone = [_pixels(steer(steerer, request).images[0].image) for request in requests]
    for i, image in enumerate(served_images):
        _close(image, alone[i])
        for j in range(len(alone)):
            if j != i:  # another request's maps: far from the tolerance
                assert np.abs(image - alone[j]).mean() > 0.5


def test_one_batch_identity_leaves_unsteered_samples_bit_exact(tiny, steerer):
    spec, pipe = tiny
    maps = steer(steerer, SteerRequest("x", concepts=["art deco"])).maps
    steered, plain = Sample("a teapot", 1, maps, 1.0, None), Sample("a kettle", 2, None, 0.0, None)
    mixed = generate_batch(spec, pipe, [steered, plain])
    unhooked = generate_batch(spec, pipe, [Sample("a teapot", 1, None, 0.0, None), plain])
    assert np.array_equal(_pixels(mixed[1]), _pixels(unhooked[1]))  # identity at strength 0: exact
    assert not np.array_equal(_pixels(mixed[0]), _pixels(unhooked[0]))
    partial = {name: pair for name, pair in maps.items() if name.startswith("transformer_blocks.0.")}
    both = generate_batch(spec, pipe, [Sample("a teapot", 1, partial, 1.0, None), steered])
    assert not np.array_equal(_pixels(both[0]), _pixels(both[1]))  # a layer a sample lacks is left alone
    _close(_pixels(both[1]), _pixels(mixed[0]))


def test_map_cache_is_a_bounded_lru_and_predicts_each_phrase_alone(steerer):
    cache = MapCache(2)
    cache.put("a", 1), cache.put("b", 2)
    assert cache.get("a") == 1  # now b is the least recently used
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("c") == 3 and len(cache) == 2
    assert cache.stats() | {"max_bytes": None} == {"entries": 2, "capacity": 2, "bytes": 0, "max_bytes": None, "hits": 2,
                                                   "misses": 1}
    nothing = MapCache(0)
    nothing.put("a", 1)
    assert nothing.get("a") is None and len(nothing) == 0

    predictor = CachedPredictor.wrap(steerer.predictor, MapCache(1))
    first = predictor.maps(["in the style of Art Deco"])[0]
    again = predictor.maps(["in the style of Art Deco"])[0]
    reference = steerer.predictor.maps(["in the style of Art Deco"])[0]
    assert predictor.cache.stats()["hits"] == 1 and predictor.cache.stats()["misses"] == 1
    for layer, (omega, beta) in reference.items():
        assert torch.equal(first[layer][0], omega) and torch.equal(again[layer][1], beta)
    predictor.maps(["as ukiyo-e"])  # evicts Art Deco
    assert predictor.cache.get(predictor.key("in the style of Art Deco")) is None
    image = Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8))
    assert len(predictor.maps(["as ukiyo-e"], [image])) == 2 and len(predictor.cache) == 1  # images are not cached


def test_repeated_concepts_hit_the_servers_cache(server):
    service, url = server
    before = service.cache.stats()
    for seed in (0, 1):
        assert _post(url, "/v1/generate", json={"prompt": "a cat", "concepts": ["bauhaus"], "seed": seed}).status_code == 200
    after = service.cache.stats()
    assert after["misses"] - before["misses"] <= 1 and after["hits"] - before["hits"] >= 1


def test_reference_image_upload_as_a_file_and_as_base64(server):
    _, url = server
    png = _png_bytes((40, 40))
    as_file = _post(url, "/v1/generate", data={"prompt": "a bridge", "strength": "0.5,1"},
                    files=[("reference_images", ("ref.png", png, "image/png"))])
    as_json = _post(url, "/v1/generate", json={"prompt": "a bridge", "strength": [0.5, 1],
                                                "reference_images": [base64.b64encode(png).decode()]})
    assert as_file.status_code == as_json.status_code == 200, as_file.text + as_json.text
    for a, b in zip(as_file.json()["images"], as_json.json()["images"]):
        assert a["metadata"]["sources"][0]["weight"] == 1.0 and "reference_images" in a["metadata"]["sources"][0]
        _close(_pixels(a), _pixels(b))


def test_layers_and_negative_strengths_steer_as_ht_steer_does(server, steerer):
    """The steering controls of `ht steer` through the server: `layers`, a source's `@LAYERS`
    and a negative strength give ht steer's metadata and images."""
    _, url = server
    body = {"prompt": "a red barn", "concepts": ["art deco:0.8@*.norm2"], "layers": ["transformer_blocks.[01].*"],
            "strength": [-1, 1], "seed": 3}
    reply = _post(url, "/v1/generate", json=body)
    assert reply.status_code == 200, reply.text
    images = reply.json()["images"]
    alone = steer(steerer, SteerRequest("a red barn", concepts=["art deco:0.8@*.norm2"], strengths=[-1, 1], seed=3,
                                        layers=["transformer_blocks.[01].*"]))
    assert images[0]["metadata"]["steered_layers"] == ["transformer_blocks.0.norm2", "transformer_blocks.1.norm2"]
    assert images[0]["metadata"]["layers"] == ["transformer_blocks.[01].*"]
    for item, expected in zip(images, alone.images):
        assert item["metadata"]["strength"] == expected.metadata["strength"]
        _close(_pixels(item), _pixels(expected.image))
    assert np.abs(_pixels(images[0]) - _pixels(images[1])).mean() > 0  # away and towards differ


BAD = [  # (request keyword arguments, status, field)
    (dict(json={"prompt": "  ", "concepts": ["art deco"]}), 400, "prompt"),
    (dict(json={"prompt": "x" * 1001, "concepts": ["art deco"]}), 400, "prompt"),
    (dict(content=b'{"prompt": "x", "concepts": ["art deco"], "strength": NaN}',
          headers={"content-type": "application/json"}), 422, "strength"),
    (dict(json={"prompt": "x", "concepts": ["art deco"], "strength": 50}), 400, "strength"),
    (dict(content=b'{"prompt": "x", "concepts": ["art deco"], "strength": [0.5, Infinity]}',
          headers={"content-type": "application/json"}), 422, "strength"),
    (dict(data={"prompt": "x", "concepts": "art deco", "strength": "0,abc"}), 400, "strength"),
    (dict(json={"prompt": "x", "concepts": ["art deco"], "num_images": 100}), 400, "num_images"),
    (dict(json={"prompt": "x", "concepts": ["art deco"], "num_images": 6, "strength": [0, 1, 2]}), 400, "num_images"),
    (dict(json={"prompt": "x", "concepts": ["art deco:o.5"]}), 400, "concepts"),
    (dict(json={"prompt": "x", "concepts": [{"name": "art deco", "weight": "a"}]}), 422, "concepts"),
    (dict(json={"prompt": "x"}), 400, "concepts"),
    (dict(json={"prompt": "x", "concept": ["art deco"]}), 422, "concept"),
    (dict(json={"prompt": "x", "concepts": ["art deco"], "method": "paint"}), 400, "method"),
    (dict(json={"prompt": "x", "concepts": ["art deco"], "steer_steps": "5"}), 400, "steer_steps"),
    (dict(json={"prompt": "x", "concepts": ["art deco"], "layers": ["re:("]}), 400, "layers"),
    (dict(json={"prompt": "x", "concepts": ["art deco"], "layers": "transformer_blocks.0.*"}), 422, "layers"),
    (dict(json={"prompt": "x", "reference_images": ["not base64!"]}), 400, "reference_images"),
    (dict(data={"prompt": "x"}, files=[("reference_images", ("a.png", b"not an image", "image/png"))]), 400,
     "reference_images"),
    (dict(data={"prompt": "x"}, files=[("reference_images", ("big.png", _png_bytes((301, 300)), "image/png"))]), 413,
     "reference_images"),
    (dict(data={"prompt": "x", "reference_images": "ref.png"}), 400, "reference_images"),
    (dict(json={"prompt": "x", "interventions": [base64.b64encode(b"not safetensors").decode()]}), 400, "interventions"),
    (dict(json={"prompt": "x", "concepts": ["art deco"], "method": "prompt",
                "reference_images": [base64.b64encode(_png_bytes((8, 8))).decode()]}), 400, None),
    (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, None),
    (dict(content=b"[1, 2]", headers={"content-type": "application/json"}), 400, None),
    (dict(content=b"prompt=x", headers={"content-type": "text/plain"}), 415, None),
    (dict(content=b"x" * (2**20 + 1), headers={"content-type": "application/json"}), 413, None),
]


@pytest.mark.parametrize("kwargs,status,field", BAD, ids=[f"{i}-{f}" for i, (_, _, f) in enumerate(BAD)])
def test_bad_requests_get_4xx_json_naming_the_field(server, kwargs, status, field):
    _, url = server
    reply = _post(url, "/v1/generate", **kwargs)
    assert reply.status_code == status, reply.text
    error = reply.json()
    assert set(error) == {"error", "field"} and error["field"] == field and error["error"]
    assert "/tmp" not in error["error"] and "ht-serve-" not in error["error"]  # uploads are not named by our paths
    assert httpx.get(url + "/v1/health", timeout=TIMEOUT).json()["status"] == "ok"  # alive


def test_paths_a_client_sends_are_never_opened(server, tmp_path):
    _, url = server
    image = tmp_path / "ref.png"
    image.write_bytes(_png_bytes((40, 40)))
    for field in ("reference_images", "interventions"):
        reply = _post(url, "/v1/generate", json={"prompt": "x", field: [str(image)]})
        assert reply.status_code == 400 and reply.json()["field"] == field  # decoded as data, never read from disk


def test_full_queue_answers_429(steerer):
    with served(steerer, max_queue=1, batch_window_ms=3000) as (service, url):
        first = {}
        thread = threading.Thread(target=lambda: first.setdefault("reply", _post(
            url, "/v1/generate", json={"prompt": "x", "concepts": ["art deco"]})))
        thread.start()
        deadline = time.monotonic() + TIMEOUT
        while service.in_flight < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        busy = _post(url, "/v1/generate", json={"prompt": "y", "concepts": ["art deco"]})
        thread.join(TIMEOUT)
    assert busy.status_code == 429 and busy.json()["field"] is None and busy.headers["retry-after"] == "1"
    assert first["reply"].status_code == 200


def test_intervention_endpoint_writes_what_ht_inspect_reads(server, steerer, tmp_path):
    _, url = server
    reply = _post(url, "/v1/intervention", json={"concepts": ["art deco:0.6", "ukiyo-e"]})
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/octet-stream"
    path = tmp_path / "composed.safetensors"
    path.write_bytes(reply.content)
    loaded = load_intervention(path, "tiny")
    expected = steer(steerer, SteerRequest("x", concepts=["art deco:0.6", "ukiyo-e"])).maps
    for layer, (omega, beta) in expected.items():
        torch.testing.assert_close(loaded.maps[layer][0], omega)
        torch.testing.assert_close(loaded.maps[layer][1], beta)
    inspected = CliRunner().invoke(app, ["inspect", str(path)])
    assert inspected.exit_code == 0 and "Art Deco; ukiyo-e" in inspected.output

    upload = {"data": base64.b64encode(reply.content).decode(), "weight": 0.5, "name": "mine.safetensors"}
    again = _post(url, "/v1/intervention", json={"interventions": [upload]})
    assert again.status_code == 200, again.text
    (tmp_path / "half.safetensors").write_bytes(again.content)
    half = load_intervention(tmp_path / "half.safetensors", "tiny")
    for layer, (omega, beta) in combine([(loaded.maps, 0.5)]).items():
        torch.testing.assert_close(half.maps[layer][0], omega)
    assert half.info["sources"] == [{"intervention": "mine.safetensors", "weight": 0.5}]
    generated = _post(url, "/v1/generate", json={"prompt": "a cat", "interventions": [upload]})
    assert generated.status_code == 200 and generated.json()["images"][0]["metadata"]["sources"] == half.info["sources"]
    prompt_method = _post(url, "/v1/intervention", json={"concepts": ["art deco"], "method": "prompt"})
    assert prompt_method.status_code == 400 and prompt_method.json()["field"] == "method"


def test_command_refuses_bad_limits_and_missing_hypernetwork_in_one_line(tmp_path):
    runner = CliRunner()
    bad = runner.invoke(app, ["serve", "--model", "tiny", "--max-batch", "0"])
    assert bad.exit_code == 1 and "Error: --max-batch must be a number >= 1, got 0" in bad.output
    missing = runner.invoke(app, ["serve", "--model", "tiny", "--hyper", str(tmp_path / "none")])
    assert missing.exit_code == 1 and "no hypernetwork at" in missing.output and "Traceback" not in missing.output
    assert "[default: 127.0.0.1]" in runner.invoke(app, ["serve", "-h"], terminal_width=200).output
