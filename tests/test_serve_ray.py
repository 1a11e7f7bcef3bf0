"""`ht serve` on Ray Serve (htcli.serve.replicas): a local Ray instance with 2 CPU replicas of
`tiny`, on 127.0.0.1. Concurrent requests are answered by both replicas, and each image equals
the single-process server's for the same request, bit for bit (pixel bytes: the PNG's metadata
carries timings). Ray starts in a few seconds and each replica loads its own pipeline."""

import base64
import io
import random
import socket
import threading

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
