"""`ht serve` against hostile and careless clients (issue 23): every case gets a 4xx JSON error
naming the field, fast and before heavy work, or is handled (a disconnect cancels the request's
pending images); the command line refuses the same mistakes in one line."""

import base64
import io
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image, ImageFile
from serving import hanging_up, hyper_checkpoint, served
from typer.testing import CliRunner

from htcli.cli import app
from htcli.generate.compose import parse_weighted
from htcli.generate.source_maps import Steerer
from htcli.serve.cache import MapCache

TIMEOUT = 60.0
SEED_LIMIT = 2**63


@pytest.fixture(scope="module")
def steerer(tiny, tmp_path_factory):
    spec, pipe = tiny
    return Steerer(spec, pipe=pipe, hyper=hyper_checkpoint(tmp_path_factory.mktemp("hyper")))


@pytest.fixture(scope="module")
def server(steerer):
    with served(steerer, batch_window_ms=5, max_image_pixels=300 * 300, max_request_pixels=400 * 300,
                max_body_bytes=2**20) as (service, url):
        yield service, url


@pytest.fixture
def decodes(monkeypatch):
    """Counts pixel decodes of images (headers are read without one)."""
    calls = []
    original = ImageFile.ImageFile.load

    def load(image):
        calls.append(image.size)
        return original(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return calls


def _encoded(image: Image.Image, kind: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind)
    return buffer.getvalue()


def _png(size, seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return _encoded(Image.fromarray(pixels), "PNG")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _refused(reply: httpx.Response, status: int, field: str | None) -> dict:
    assert reply.status_code == status, reply.text
    error = reply.json()
    assert set(error) == {"error", "field"} and error["field"] == field and error["error"], error
    return error


def _alive(url: str) -> None:
    assert httpx.get(url + "/v1/health", timeout=TIMEOUT).json()["status"] == "ok"


BLANK_4096 = _encoded(Image.new("RGB", (4096, 4096)), "PNG")  # ~50 KB of PNG, 50 MB of pixels
BLANK_1024 = _encoded(Image.new("RGB", (1024, 1024)), "PNG")  # ~3 KB

HOSTILE = [  # (id, request keyword arguments, status, field)
    ("17 big images", dict(json={"prompt": "x", "reference_images": [_b64(BLANK_1024)] * 17}), 400, "reference_images"),
    ("one huge image", dict(json={"prompt": "x", "reference_images": [_b64(BLANK_4096)]}), 413, "reference_images"),
    ("pixels per request", dict(json={"prompt": "x", "reference_images": [_b64(_png((250, 250), i)) for i in range(2)]}),
     413, "reference_images"),
    ("sources before decoding", dict(json={"prompt": "x", "concepts": ["art deco"] * 16,
                                           "reference_images": [_b64(_png((8, 8)))]}), 400, "concepts"),
    ("BMP", dict(json={"prompt": "x", "reference_images": [_b64(_encoded(Image.new("RGB", (8, 8)), "BMP"))]}), 400,
     "reference_images"),
    ("EPS", dict(data={"prompt": "x"}, files=[("reference_images", ("a.eps", _encoded(Image.new("RGB", (8, 8)), "EPS"),
                                                                   "application/postscript"))]), 400, "reference_images"),
    ("GIF", dict(json={"prompt": "x", "reference_images": [_b64(_encoded(Image.new("RGB", (8, 8)), "GIF"))]}), 400,
     "reference_images"),
    ("regex layers", dict(json={"prompt": "x", "concepts": ["art deco"], "layers": ["re:(.|.)*!"]}), 400, "layers"),
    ("regex concept layers", dict(json={"prompt": "x", "concepts": ["art deco@re:(.|.|.)*!"]}), 400, "concepts"),
    ("glob matching nothing", dict(json={"prompt": "x", "concepts": ["art deco"], "layers": ["nothing.*"]}), 400,
     "layers"),
    ("long concept", dict(json={"prompt": "x", "concepts": ["y" * 3_000_000]}), 413, None),  # over the body cap
    ("long concept under the body cap", dict(json={"prompt": "x", "concepts": ["y" * 201]}), 422, "concepts"),
    ("long concept object", dict(json={"prompt": "x", "concepts": [{"name": "y" * 201}]}), 422, "concepts"),
    ("long concept in a form", dict(data={"prompt": "x", "concepts": "y" * 201}), 422, "concepts"),
    ("long pattern", dict(json={"prompt": "x", "concepts": ["art deco"], "layers": ["*" * 201]}), 422, "layers"),
    ("long method", dict(json={"prompt": "x", "concepts": ["art deco"], "method": "m" * 100_000}), 422, "method"),
    ("long upload name", dict(json={"prompt": "x", "interventions": [{"data": _b64(b"x"), "name": "n" * 256}]}), 422,
     "interventions"),
    ("long upload file name", dict(data={"prompt": "x"}, files=[("interventions", ("n" * 256, b"x", "application/x"))]),
     400, "interventions"),
    ("seed -1", dict(json={"prompt": "x", "concepts": ["art deco"], "seed": -1}), 422, "seed"),
    ("seed 2**70", dict(json={"prompt": "x", "concepts": ["art deco"], "seed": 2**70}), 422, "seed"),
    ("seed -1 in a form", dict(data={"prompt": "x", "concepts": "art deco", "seed": "-1"}), 422, "seed"),
    ("weight 1e6", dict(json={"prompt": "x", "concepts": ["art deco:1e6"]}), 400, "concepts"),
    ("weight object 1e6", dict(json={"prompt": "x", "concepts": [{"name": "art deco", "weight": 1e6}]}), 400, "concepts"),
    ("deep nesting", dict(content=b'{"prompt": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
                          headers={"content-type": "application/json"}), 413, None),  # counted before parsing
    ("deep nesting below the count", dict(content=b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                                          headers={"content-type": "application/json"}), 400, None),
    ("deep nesting in a field", dict(content=b'{"prompt": "x", "concepts": ' + b"[" * 500 + b"]" * 500 + b"}",
                                     headers={"content-type": "application/json"}), 422, "concepts"),
]


@pytest.mark.parametrize("kwargs,status,field", [case[1:] for case in HOSTILE], ids=[case[0] for case in HOSTILE])
def test_hostile_bodies_get_4xx_json_naming_the_field(server, decodes, kwargs, status, field):
    _, url = server
    for path in ("/v1/generate", "/v1/intervention"):
        _refused(httpx.post(url + path, timeout=TIMEOUT, **kwargs), status, field)
    assert decodes == []  # refused on headers and counts: not one pixel decoded
    _alive(url)


def test_images_within_every_bound_are_decoded_and_used(server, decodes):
    _, url = server
    images = [_b64(_png((200, 200), 1)), _b64(_encoded(Image.new("RGB", (100, 100), "red"), "JPEG")),
              _b64(_encoded(Image.new("RGB", (40, 40), "blue"), "WEBP"))]
    reply = httpx.post(url + "/v1/generate", json={"prompt": "a bridge", "reference_images": images}, timeout=TIMEOUT)
    assert reply.status_code == 200, reply.text
    assert set(decodes) == {(40, 40), (100, 100), (200, 200)}


def test_every_seed_of_a_request_is_below_2_63(server):
    _, url = server
    body = {"prompt": "x", "concepts": ["art deco"], "seed": SEED_LIMIT - 2, "num_images": 2}
    assert httpx.post(url + "/v1/generate", json=body, timeout=TIMEOUT).status_code == 200  # the last seed 2**63 - 1
    error = _refused(httpx.post(url + "/v1/generate", json=body | {"num_images": 3}, timeout=TIMEOUT), 400, "seed")
    assert "2**63" in error["error"]


def test_weights_are_bounded_and_a_suffix_after_whitespace_belongs_to_the_name():
    assert parse_weighted("Apollo: 13") == ("Apollo: 13", 1.0)
    assert parse_weighted("art deco: -1.5") == ("art deco: -1.5", 1.0)
    assert parse_weighted("  art deco:-1.5 ") == ("art deco", -1.5)
    assert parse_weighted("art deco:2") == ("art deco", 2.0)
    from htcli.errors import HTError

    with pytest.raises(HTError, match="from -2 to 2"):
        parse_weighted("art deco:1e6")


def test_apollo_13_is_one_concept_over_http(server):
    _, url = server
    reply = httpx.post(url + "/v1/generate", json={"prompt": "x", "concepts": ["Apollo: 13"]}, timeout=TIMEOUT)
    assert reply.status_code == 200, reply.text
    assert reply.json()["images"][0]["metadata"]["sources"] == [{"concept": "Apollo: 13", "weight": 1.0}]


@pytest.mark.parametrize("headers,status,field", [
    ({"host": "evil.example"}, 400, "Host"),
    ({"host": "evil.example:8000"}, 400, "Host"),
    ({"origin": "http://evil.example"}, 403, "Origin"),
    ({"origin": "null"}, 403, "Origin"),
    ({"sec-fetch-site": "cross-site"}, 403, "Sec-Fetch-Site"),
    ({"sec-fetch-site": "same-site"}, 403, "Sec-Fetch-Site"),
])
def test_foreign_hosts_and_cross_origin_posts_are_refused(server, headers, status, field):
    _, url = server
    # A simple form post (no preflight) as another site's page would send it.
    _refused(httpx.post(url + "/v1/generate", data={"prompt": "x", "concepts": "art deco"}, headers=headers,
                        timeout=TIMEOUT), status, field)
    if field == "Host":
        _refused(httpx.get(url + "/v1/health", headers=headers, timeout=TIMEOUT), status, field)


def test_same_origin_and_non_browser_posts_pass(server):
    _, url = server
    body = {"prompt": "x", "concepts": ["art deco"]}
    for headers in ({}, {"origin": url}, {"sec-fetch-site": "same-origin"}, {"sec-fetch-site": "none"},
                    {"host": "localhost:1234", "origin": "http://localhost:1234"}):
        assert httpx.post(url + "/v1/generate", json=body, headers=headers, timeout=TIMEOUT).status_code == 200, headers


def test_allowed_host_extends_the_loopback_names(steerer):
    with served(steerer, allowed_hosts=("ht.example",)) as (_, url):
        assert httpx.get(url + "/v1/health", headers={"host": "ht.example"}, timeout=TIMEOUT).status_code == 200
        assert httpx.get(url + "/v1/health", headers={"host": "localhost"}, timeout=TIMEOUT).status_code == 200
        _refused(httpx.get(url + "/v1/health", headers={"host": "other.example"}, timeout=TIMEOUT), 400, "Host")


def test_405_keeps_allow(server):
    _, url = server
    reply = httpx.request("TRACE", url + "/", timeout=TIMEOUT)
    assert reply.status_code == 405 and reply.headers["allow"] == "GET" and reply.json()["field"] is None
    reply = httpx.get(url + "/v1/generate", timeout=TIMEOUT)
    assert reply.status_code == 405 and reply.headers["allow"] == "POST"


def test_streamed_body_without_content_length_is_cut_at_the_limit(server):
    _, url = server
    sent = []

    def chunks():
        for _ in range(64):  # 4 MiB offered in 64 KiB chunks, to a server that takes 1 MiB
            sent.append(1)
            yield b" " * 65536

    try:
        reply = httpx.post(url + "/v1/generate", content=chunks(), headers={"content-type": "application/json"},
                           timeout=TIMEOUT)
    except httpx.HTTPError:  # the server may answer and close before the client has sent everything
        pytest.fail("the server closed the connection without answering 413")
    assert "content-length" not in reply.request.headers and reply.request.headers["transfer-encoding"] == "chunked"
    _refused(reply, 413, None)
    _alive(url)


def test_a_client_that_disconnects_cancels_its_pending_images(steerer):
    with served(steerer, batch_window_ms=1500, max_batch=16) as (service, url):
        body = b'{"prompt": "x", "concepts": ["art deco"], "num_images": 4}'
        with hanging_up(url, body, lambda: service.batcher.pending >= 4, TIMEOUT):
            assert service.batcher.pending == 4
        deadline = time.monotonic() + TIMEOUT
        while service.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        assert service.in_flight == 0  # its queue slot is free at once
        time.sleep(2.0)  # past the batch window: a pending image would have been generated by now
        health = httpx.get(url + "/v1/health", timeout=TIMEOUT).json()
        assert health["batching"]["images"] == 0 and health["batching"]["cancelled"] == 4
        again = httpx.post(url + "/v1/generate", json={"prompt": "x", "concepts": ["art deco"]}, timeout=TIMEOUT)
        assert again.status_code == 200 and again.json()["images"][0]["batch_size"] == 1


def test_map_cache_is_bounded_in_bytes_as_well_as_entries():
    cache = MapCache(capacity=10, max_bytes=1000)
    cache.put("a", ({"l": (np.zeros(50, np.float32), np.zeros(50, np.float32))}, None))  # 400 bytes
    cache.put("b", ({"l": (np.zeros(50, np.float32), np.zeros(50, np.float32))}, None))
    assert len(cache) == 2 and cache.stats()["bytes"] == 800
    cache.put("c", ({"l": (np.zeros(50, np.float32), np.zeros(50, np.float32))}, None))
    assert len(cache) == 2 and cache.get("a") is None and cache.stats()["bytes"] == 800
    cache.put("huge", ({"l": (np.zeros(500, np.float32), np.zeros(500, np.float32))}, None))  # over the bound alone
    assert cache.get("huge") is None and len(cache) == 2


def test_many_requests_decoding_at_once_share_one_pixel_budget(server):
    service, _ = server
    budget = service.pixels
    with budget.held(budget.capacity):
        with pytest.raises(Exception, match="busy") as refused:
            with budget.held(1):
                pass
    assert getattr(refused.value, "status", None) == 429
    with budget.held(budget.capacity):  # released: all of it again
        pass


CLI_CASES = [
    (["steer", "x", "-c", "art deco", "--model", "tiny", "--seed", "-1"], "--seed"),
    (["steer", "x", "-c", "art deco", "--model", "tiny", "--seed", str(2**70)], "--seed"),
    (["steer", "x", "-c", "art deco", "--model", "tiny", "--strength", "1e30"], "--strength"),
    (["steer", "x", "-c", "art deco:1e6", "--model", "tiny"], "art deco"),
    (["serve", "--model", "tiny", "--port", "99999"], "--port"),
    (["serve", "--model", "tiny", "--max-strength", "5"], "--max-strength"),
    (["serve", "--model", "tiny", "--replicas", "0", "--port", "8123"], "--replicas"),
    (["serve", "--model", "tiny", "--replicas", "2", "--port", "0"], "--port"),
]


@pytest.mark.parametrize("args,named", CLI_CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in CLI_CASES])
def test_command_line_refuses_the_same_mistakes_in_one_line(args, named, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and named in lines[0], result.output
    assert not (tmp_path / "runs").exists()


def test_concurrent_bad_requests_leave_the_server_answering(server):
    _, url = server
    bodies = [case[1] for case in HOSTILE[:10]] * 2
    replies = [None] * len(bodies)

    def send(i):
        replies[i] = httpx.post(url + "/v1/generate", timeout=TIMEOUT, **bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert all(r is not None and 400 <= r.status_code < 500 for r in replies)
    _alive(url)
