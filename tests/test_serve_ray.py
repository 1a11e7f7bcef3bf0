"""`ht serve` on Ray Serve (htcli.serve.replicas): a local Ray instance with 2 CPU replicas of
`tiny`, on 127.0.0.1. Concurrent requests are answered by both replicas, and each image equals
the single-process server's for the same request, bit for bit (pixel bytes: the PNG's metadata
carries timings). Ray starts in a few seconds and each replica loads its own pipeline."""

import base64
import io
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from serving import hyper_checkpoint, served

from htcli.generate.source_maps import Steerer

ray = pytest.importorskip("ray", reason="needs the ray extra: pip install -e '.[ray]'")
pytestmark = pytest.mark.slow
TIMEOUT = 120.0
CONCEPTS = ["art deco", "ukiyo-e", "film noir", "pixel art", "impressionism", "bauhaus", "cubism", "baroque"]


def _free_port() -> int:
    """A free port outside the ranges Ray's own processes take while it starts (workers: 10002 to
    19999; the rest: the kernel's ephemeral ports, 32768 and up), so that none takes it first."""
    for port in random.Random().sample(range(20000, 32000), 50):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port between 20000 and 32000")


@pytest.fixture(scope="module")
def hyper(tmp_path_factory):
    return hyper_checkpoint(tmp_path_factory.mktemp("hyper"))


@pytest.fixture(scope="module")
def ray_replicas(hyper):
    """Two replicas behind Ray's proxy on 127.0.0.1, served by `serve_replicas` (what `ht serve
    --replicas 2` runs) from a thread: the base URL. Ray shuts down in the finalizer."""
    from htcli.serve.replicas import replica_options, serve_replicas
    from htcli.serve.service import Limits

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
             object_store_memory=80 * 2**20, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}})
    ready, stop, failed = threading.Event(), threading.Event(), []
    options = replica_options("tiny", hyper, None, "cpu", Limits(max_batch=1), ())

    def run() -> None:
        try:
            serve_replicas(options, 2, "127.0.0.1", port, on_ready=lambda url: ready.set(), stop=stop.is_set)
        except Exception as error:  # reported by the fixture, not lost in the thread
            failed.append(error)
            ready.set()

    port = _free_port()
    thread = threading.Thread(target=run, name="ray-serve", daemon=True)
    try:
        thread.start()
        assert ready.wait(TIMEOUT) and not failed, failed
        yield f"http://127.0.0.1:{port}"
    finally:
        stop.set()
        thread.join(TIMEOUT)
        ray.shutdown()


def _pixels(reply: httpx.Response) -> list[bytes]:
    return [Image.open(io.BytesIO(base64.b64decode(i["png"]))).convert("RGB").tobytes() for i in reply.json()["images"]]


def test_two_replicas_answer_concurrent_requests_as_one_process_would(ray_replicas, hyper, tiny):
    bodies = [{"prompt": "a red barn", "concepts": [concept], "seed": i, "strength": [0.5, 1]}
              for i, concept in enumerate(CONCEPTS)]
    replies = [None] * len(bodies)

    def send(i):
        replies[i] = httpx.post(ray_replicas + "/v1/generate", json=bodies[i], timeout=TIMEOUT)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert all(r is not None and r.status_code == 200 for r in replies), [r and r.text[:300] for r in replies]
    answered = {r.headers["x-ht-replica"] for r in replies}
    assert len(answered) == 2, answered  # both replicas took requests
    health = httpx.get(ray_replicas + "/v1/health", timeout=TIMEOUT).json()
    assert health["replica"] in answered and health["model"] == "tiny"

    spec, pipe = tiny
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # as each replica computes (Ray gives it one CPU): the same kernels, the same bits
    try:
        with served(Steerer(spec, pipe=pipe, hyper=hyper), max_batch=1) as (_, url):
            alone = [httpx.post(url + "/v1/generate", json=body, timeout=TIMEOUT) for body in bodies]
    finally:
        torch.set_num_threads(threads_before)
    for reply, reference in zip(replies, alone):
        assert reference.status_code == 200
        assert _pixels(reply) == _pixels(reference)  # bit for bit
        assert [i["metadata"]["sources"] for i in reply.json()["images"]] == \
               [i["metadata"]["sources"] for i in reference.json()["images"]]
    refused = httpx.post(ray_replicas + "/v1/generate", json={"prompt": "x", "concepts": ["art deco"], "seed": -1},
                         timeout=TIMEOUT)
    assert refused.status_code == 422 and refused.json()["field"] == "seed"  # the same checks on every replica


def test_a_replica_killed_under_load_loses_no_request(ray_replicas):
    """Every request in flight when one replica dies is answered: 200 (retried on the other
    replica), or a JSON 503 with Retry-After; never Ray's plain-text 500."""
    replies: list = []

    def send(i: int) -> None:
        body = {"prompt": "a red barn", "concepts": [CONCEPTS[i % len(CONCEPTS)]], "seed": i, "strength": [0.5, 1]}
        try:
            replies.append(httpx.post(ray_replicas + "/v1/generate", json=body, timeout=TIMEOUT))
        except httpx.HTTPError as error:
            replies.append(error)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(24)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # requests in flight on both replicas
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA::ht-serve#ht-serve" in a["name"]]
    assert len(replicas) == 2, replicas
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    for thread in threads:
        thread.join(TIMEOUT)
    assert len(replies) == 24 and all(isinstance(r, httpx.Response) for r in replies), replies
    print("after a replica was killed:", sorted(r.status_code for r in replies))  # pytest -s
    for reply in replies:
        assert reply.status_code in (200, 503), (reply.status_code, reply.text[:300])
        if reply.status_code == 503:
            assert reply.json()["error"] and reply.headers["retry-after"] == "1"
    assert sum(r.status_code == 200 for r in replies) >= 12, [r.status_code for r in replies]


def _marked(marker: str) -> list[int]:
    """Processes whose environment holds `marker` (Ray's processes inherit the environment)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:  # gone, or not ours
            continue
    return found


def test_sigterm_stops_every_process_ht_serve_replicas_started(hyper):
    marker = f"HT_TEST_MARK={uuid.uuid4().hex}"
    port = _free_port()
    command = [sys.executable, "-m", "htcli", "serve", "--model", "tiny", "--hyper", str(hyper), "--device", "cpu",
               "--replicas", "1", "--port", str(port)]
    key, value = marker.split("=")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=os.environ | {"OMP_NUM_THREADS": "1", key: value})
    lines: list[str] = []
    threading.Thread(target=lambda: [lines.append(line) for line in process.stdout], daemon=True).start()
    try:
        deadline = time.monotonic() + TIMEOUT
        while not any("serving tiny" in line for line in lines):
            assert process.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.5)
        started = _marked(marker)
        assert len(started) > 3, started  # the command, Ray's GCS, raylet, agents, the replica...
        process.send_signal(signal.SIGTERM)
        process.wait(TIMEOUT)
        assert process.returncode == 128 + signal.SIGTERM, (process.returncode, "".join(lines)[-2000:])  # not killed
        deadline = time.monotonic() + 30
        while _marked(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _marked(marker) == [], [Path(f"/proc/{pid}/cmdline").read_bytes()[:100] for pid in _marked(marker)]
    finally:
        for pid in _marked(marker):
            os.kill(pid, signal.SIGKILL)


def test_the_front_retries_once_then_answers_json_503():
    """`HtFront` with replicas that die on every call: two calls, then a JSON 503 with Retry-After;
    one that dies once: the retry's answer."""
    import asyncio

    from ray.exceptions import RayActorError

    from htcli.serve.replicas import HtFront

    class Replicas:  # what the front calls: `replicas.answer.remote(scope, body)`
        def __init__(self, deaths: int) -> None:
            self.deaths, self.calls = deaths, 0
            self.answer = self

        async def remote(self, scope: dict, body: bytes) -> tuple[int, list, bytes]:
            self.calls += 1
            if self.calls <= self.deaths:
                raise RayActorError()
            return 200, [(b"content-type", b"application/json")], body

    async def post(replicas: Replicas) -> httpx.Response:
        front = HtFront.func_or_class.__mro__[1]  # the class itself, under Ray's ingress wrapper
        app = front(replicas, {}).__serve_build_asgi_app__()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
            return await client.post("/v1/generate", json={"prompt": "x"})

    dead, once = Replicas(deaths=2), Replicas(deaths=1)
    refused, retried = asyncio.run(post(dead)), asyncio.run(post(once))
    assert dead.calls == 2 and refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
    assert set(refused.json()) == {"error", "field"} and refused.json()["error"]
    assert once.calls == 2 and retried.status_code == 200 and retried.json() == {"prompt": "x"}
