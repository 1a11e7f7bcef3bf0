"""Benchmark: `ht serve` on `tiny`, 16 concurrent clients, dynamic batching on vs off, in one run,
then the batched server's honest latency while a hostile client sends it the worst bodies.

Run: python -m bench.serve [--clients 16] [--requests 3] [--window-ms 50] [--replicas N]
One loaded model is served twice over loopback: with --max-batch 1 (each request its own
pipeline call, as `ht steer` would), and batching up to --clients images within --window-ms.
In each round every client sends one request at once, steering towards its own library concept
(seeds vary), from a client process of its own; rounds alternate between the two servers,
after one unmeasured warm-up round each (which also fills the map caches). Then --requests more
rounds go to the batched server while another process sends the bodies of
issue 23 (uploads past every bound, a regex layer pattern, a 3 MB concept, deeply nested JSON,
bad seeds, a cross-origin post, a body over 16 MiB) back to back, each refused, and beside them the
clients of issue 31 (silent connections, half headers, stalled bodies, 64 MB of headers, hang-ups,
a JSON body of 1.3 million keys, a JPEG of 2000 scans, a 15 MB form, a refine flood). The peak
growth of the server's resident memory over the hostile phase is measured (this process: the
clients are processes of their own). With --replicas N both
servers are Ray Serve applications of N replicas each (local Ray, CPU replicas), else threads of
this process. Bounded: --requests rounds per phase, none started after --limit-s. The
hypernetwork is the one shipped for tiny. Last line:
batched_vs_sequential=<throughput ratio> p95_ms=<honest p95 under the hostile mix> p95_ms_quiet=<batched
p95 without it> p95_ms_sequential=<ms> hostile_requests=<count> peak_rss_growth_mb=<MiB>
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import threading
import time
from contextlib import ExitStack

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.common import quiet  # noqa: E402

PROMPTS = ["a lighthouse on a cliff", "a red barn in a field", "a city street at night", "a bowl of fruit"]


def _steerer():
    from htcli.generate.source_maps import Steerer
    from htcli.methods.predict import shipped_checkpoint
    from htcli.models import get_model

    return Steerer(get_model("tiny"), hyper=shipped_checkpoint("tiny"))


def _round(url: str, concepts: list[str], k: int) -> tuple[list[float], float, list[int]]:
    """Every client (one per concept) sends one request at once: their latencies (ms), the
    round's wall-clock seconds and the size of the batch each image was made in."""
    import httpx

    latencies: list[float] = []
    failures: list[str] = []
    batches: list[int] = []

    def client(index: int) -> None:
        body = {"prompt": PROMPTS[index % len(PROMPTS)], "concepts": [concepts[index]], "seed": 100 * index + k}
        sent = time.perf_counter()
        reply = httpx.post(url + "/v1/generate", json=body, timeout=600)
        if reply.status_code != 200:
            failures.append(reply.text)
        else:
            batches.extend(image["batch_size"] for image in reply.json()["images"])
        latencies.append((time.perf_counter() - sent) * 1e3)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(concepts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit(f"{len(failures)} requests failed, e.g. {failures[0]}")
    return latencies, time.perf_counter() - start, batches


def _hostile_bodies() -> list[dict]:
    """httpx keyword arguments of the worst requests of issue 23 (each is refused 4xx), JSON
    encoded once here so that the client's own work does not take the server's CPU."""
    import base64
    import io
    import json

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4096, 4096)).save(buffer, "PNG")
    huge = base64.b64encode(buffer.getvalue()).decode()
    nested = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    json_type = {"content-type": "application/json"}
    bodies = [{"prompt": "x", "reference_images": [huge] * 20}, {"prompt": "x", "reference_images": [huge] * 4},
              {"prompt": "x", "concepts": ["art deco"], "layers": ["re:(.|.|.)*!"]},
              {"prompt": "x", "concepts": ["art deco@re:(.|.)*!"]}, {"prompt": "x", "concepts": ["y" * 3_000_000], "num_images": 4},
              {"prompt": "x", "concepts": ["art deco"], "seed": -1}, {"prompt": "x", "concepts": ["art deco"], "seed": 2**70},
              {"prompt": "x", "concepts": ["art deco:1e6"]}]
    return [dict(content=json.dumps(body).encode(), headers=json_type) for body in bodies] + [
        dict(content=nested, headers=json_type),
        dict(data={"prompt": "x", "concepts": "art deco"}, headers={"origin": "http://evil.example"}),
        dict(content=b" " * (2**24 + 1), headers=json_type),  # over 16 MiB: refused on its Content-Length
    ]


def jpeg_bomb(scans: int, size: int = 1024) -> bytes:
    """A progressive JPEG of one flat colour whose smallest scan is repeated `scans` times: ~17
    bytes a scan, each one another pass over every block when decoded (2000 scans: ~4 s)."""
    import io
    import re

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (120, 80, 200)).save(buffer, "JPEG", progressive=True, quality=90)
    data = buffer.getvalue()
    starts = [m.start() for m in re.finditer(b"\xff\xda", data)] + [len(data) - 2]
    smallest = min((data[a:b] for a, b in zip(starts[1:], starts[2:])), key=len)
    return data[:-2] + smallest * scans + b"\xff\xd9"


def _connection_attacks(url: str, stop, deadline: float) -> int:
    """The connection-level clients of issue 31, in turn until `stop`: silent connections, half
    headers, stalled bodies, 64 MB of headers, hang-ups mid-body, a 15 MB JSON body of 1.3 million
    keys, a JPEG of 2000 scans, a 15 MB form, a refine flood. How many attacks were made."""
    import base64
    import json
    import socket

    import httpx

    host, port = url.removeprefix("http://").split("/")[0].split(":")
    head = b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    keys = b"{" + b",".join(b'"k%d":1' % i for i in range(1_300_000)) + b"}"
    bomb = json.dumps({"prompt": "x", "reference_images": [base64.b64encode(jpeg_bomb(2000)).decode()]}).encode()
    flood = json.dumps({"prompt": "x", "concepts": [f"style {i}" for i in range(16)], "refine": 50}).encode()
    posts = [(keys, "application/json"), (bomb, "application/json"), (flood, "application/json"),
             (b"prompt=" + b"%41" * 5_000_000, "application/x-www-form-urlencoded")]
    made = 0
    while not stop.is_set() and time.monotonic() < deadline:
        held = [socket.create_connection((host, int(port))) for _ in range(90)]
        try:
            for sock in held[50:70]:
                sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: 127.0")  # half headers
            for sock in held[70:]:
                sock.sendall(head + b"Content-Length: 1000\r\n\r\n{")  # a stalled body
            with socket.create_connection((host, int(port))) as sock:  # 64 MB of headers
                try:
                    sock.sendall(head + b"X-Big: ")
                    for _ in range(64):
                        sock.sendall(b"a" * 2**20)
                except OSError:  # refused and closed early, as it should be
                    pass
            for _ in range(10):  # hang-ups mid-body
                with socket.create_connection((host, int(port))) as sock:
                    sock.sendall(head + b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
            for content, kind in posts:
                try:
                    reply = httpx.post(url + "/v1/generate", content=content, headers={"content-type": kind}, timeout=60)
                except httpx.HTTPError:
                    continue
                if not 400 <= reply.status_code < 500:
                    raise SystemExit(f"a hostile body got {reply.status_code}: {reply.text[:200]}")
            made += 9
            time.sleep(1.0)
        finally:
            for sock in held:
                sock.close()
    return made


def _hostile(url: str, stop, limit_s: float) -> int:
    """Send `_hostile_bodies` in turn, back to back, until `stop` is set (or `limit_s`): how many
    were sent. Anything but a 4xx is an error."""
    import httpx

    bodies = _hostile_bodies()
    sent, wrong = 0, []
    deadline = time.monotonic() + limit_s
    with httpx.Client(timeout=60) as client:
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                reply = client.post(url + "/v1/generate", **bodies[sent % len(bodies)])
                if not 400 <= reply.status_code < 500:
                    wrong.append(f"{reply.status_code}: {reply.text[:200]}")
            except httpx.HTTPError:  # the server may close a connection whose body it refused early
                pass
            sent += 1
    if wrong:
        raise SystemExit(f"{len(wrong)} hostile requests were not refused 4xx, e.g. {wrong[0]}")
    return sent


def _p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) > 1 else values[0]


def _hostile_process(url: str, stop, sent, limit_s: float) -> None:
    """Issue 23's bodies and, in a thread beside them, issue 31's connection-level clients."""
    attacks = [0]
    thread = threading.Thread(target=lambda: attacks.__setitem__(0, _connection_attacks(url, stop, time.monotonic() + limit_s)))
    thread.start()
    sent.value = _hostile(url, stop, limit_s)
    thread.join()
    sent.value += attacks[0]


def _rss_mb(key: str) -> float:
    """This process's resident memory (VmRSS) or its peak (VmHWM), in MiB (Linux)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key + ":")) / 1024


def _served(args, stack: ExitStack, modes: dict[str, int]) -> dict[str, str]:
    """Base URLs of one server per mode (max_batch): threads of this process, or Ray Serve
    applications of --replicas replicas each."""
    from htcli.serve.service import Limits

    def limits(max_batch: int) -> Limits:
        return Limits(max_batch=max_batch, batch_window_ms=args.window_ms, max_queue=2 * args.clients, max_refine=50)

    if args.replicas is None:
        from htcli.serve.app import running
        from htcli.serve.service import Service

        steerer, urls = _steerer(), {}
        for mode, max_batch in modes.items():
            service = Service(steerer, limits(max_batch))
            stack.callback(service.close)
            urls[mode] = stack.enter_context(running(service))
        return urls
    import socket

    import ray
    from ray import serve

    from htcli.methods.predict import shipped_checkpoint
    from htcli.serve.replicas import application, replica_options

    # Each replica asks for one logical CPU; both servers' replicas share this machine's cores.
    ray.init(num_cpus=len(modes) * args.replicas, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}})
    stack.callback(ray.shutdown)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    stack.callback(serve.shutdown)
    for mode, max_batch in modes.items():
        options = replica_options("tiny", shipped_checkpoint("tiny"), None, "cpu", limits(max_batch), ())
        serve.run(application(options, args.replicas, 0), name=mode, route_prefix=f"/{mode}")
    return {mode: f"http://127.0.0.1:{port}/{mode}" for mode in modes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=3, help="measured rounds: requests per client and server")
    parser.add_argument("--window-ms", type=float, default=50.0)
    parser.add_argument("--replicas", type=int, default=None, help="serve on Ray Serve with this many replicas per server")
    parser.add_argument("--limit-s", type=float, default=300.0, help="no round starts after this long")
    args = parser.parse_args()
    quiet()
    from htcli.data.concepts import load_library

    concepts = [c.name for c in load_library().targets("train")[: args.clients]]
    modes = {"sequential": 1, "batched": args.clients}  # max_batch
    latencies: dict[str, list[float]] = {mode: [] for mode in [*modes, "hostile"]}
    batches: dict[str, list[int]] = {mode: [] for mode in latencies}
    seconds = dict.fromkeys(latencies, 0.0)
    spawn = multiprocessing.get_context("spawn")
    with ExitStack() as stack:
        urls = _served(args, stack, modes)
        # The clients run in a process of their own, as real clients would: not in the server's.
        clients = stack.enter_context(spawn.Pool(1))
        for mode in modes:
            clients.apply(_round, (urls[mode], concepts, 0))  # warm-up: every concept's maps cached
        started = time.perf_counter()

        def measure(mode: str, url: str, k: int) -> None:
            done, took, sizes = clients.apply(_round, (url, concepts, k))
            latencies[mode] += done
            seconds[mode] += took
            batches[mode] += sizes

        # Rounds alternate between the two servers (one model: they never run at once), so that
        # other load on the machine hits both alike.
        for k in range(1, 1 + args.requests):
            if time.perf_counter() - started > args.limit_s:
                break
            for mode in modes:
                measure(mode, urls[mode], k)
        # The hostile mix: the batched server's honest rounds while another process sends the worst bodies.
        with open("/proc/self/clear_refs", "w") as refs:  # the peak RSS from here: the hostile mix's
            refs.write("5")
        rss_before = _rss_mb("VmRSS")
        stop, sent = spawn.Event(), spawn.Value("i", 0)
        hostile = spawn.Process(target=_hostile_process, args=(urls["batched"], stop, sent, 2 * args.limit_s))
        hostile.start()
        time.sleep(1.0)  # let it get going
        for k in range(1 + args.requests, 1 + 2 * args.requests):
            measure("hostile", urls["batched"], k)
        stop.set()
        hostile.join(120)
        if hostile.exitcode != 0:
            raise SystemExit(f"the hostile client failed (exit code {hostile.exitcode})")
        rss_growth = _rss_mb("VmHWM") - rss_before
    results = {}
    for mode in latencies:
        results[mode] = (len(latencies[mode]) / seconds[mode], _p95(latencies[mode]))
        print(f"{mode}: {len(latencies[mode])} requests in {seconds[mode]:.1f} s ({results[mode][0]:.2f} req/s), "
              f"latency median {statistics.median(latencies[mode]):.0f} ms, p95 {results[mode][1]:.0f} ms; "
              f"mean batch per image {statistics.mean(batches[mode]):.1f}, largest batch {max(batches[mode])}", flush=True)
    print(f"hostile client: {sent.value} requests and connection attacks, all refused 4xx (or closed)")
    ratio = results["batched"][0] / results["sequential"][0]
    print(f"batched_vs_sequential={ratio:.2f} p95_ms={results['hostile'][1]:.0f} p95_ms_quiet={results['batched'][1]:.0f} "
          f"p95_ms_sequential={results['sequential'][1]:.0f} hostile_requests={sent.value} "
          f"peak_rss_growth_mb={rss_growth:.0f}")


if __name__ == "__main__":
    main()
