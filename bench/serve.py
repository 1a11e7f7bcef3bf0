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


def _round(url: str, concepts: list[str], k: int) -> tuple[list[float], float, list[int]]:
    """Every client (one per concept) sends one request at once: their latencies (ms), the
    round's wall-clock seconds and the size of the batch each image was made in."""
    import httpx

    latencies: list[float] = []
    failures: list[str] = []
    batches: list[int] = []
    # One connection pool for all (as a real client keeps one): a client made per request would
    # spend ~25 ms of CPU on its TLS context, on the cores the server is measured on.
    session = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=len(concepts)))

    def client(index: int) -> None:
        body = {"prompt": PROMPTS[index % len(PROMPTS)], "concepts": [concepts[index]], "seed": 100 * index + k}
        sent = time.perf_counter()
        reply = session.post(url + "/v1/generate", json=body)
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
    session.close()
    if failures:
        raise SystemExit(f"{len(failures)} requests failed, e.g. {failures[0]}")
    return latencies, time.perf_counter() - start, batches


def _post(body: bytes, kind: str = "application/json", headers: bytes = b"") -> bytes:
    """The bytes of one whole POST /v1/generate that closes its connection when answered."""
    return (b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: %s\r\n"
            b"Content-Length: %d\r\n%s\r\n" % (kind.encode(), len(body), headers)) + body


def _hostile_bodies() -> list[bytes]:
    """The worst requests of issue 23, each refused 4xx, as whole requests built once here: the
    client's own work (JSON encoding, HTTP framing) would take the CPU the server is measured on."""
    import base64
    import io
    import json
    import urllib.parse

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4096, 4096)).save(buffer, "PNG")
    huge = base64.b64encode(buffer.getvalue()).decode()
    bodies = [{"prompt": "x", "reference_images": [huge] * 20}, {"prompt": "x", "reference_images": [huge] * 4},
              {"prompt": "x", "concepts": ["art deco"], "layers": ["re:(.|.|.)*!"]},
              {"prompt": "x", "concepts": ["art deco@re:(.|.)*!"]}, {"prompt": "x", "concepts": ["y" * 3_000_000], "num_images": 4},
              {"prompt": "x", "concepts": ["art deco"], "seed": -1}, {"prompt": "x", "concepts": ["art deco"], "seed": 2**70},
              {"prompt": "x", "concepts": ["art deco:1e6"]}]
    form = urllib.parse.urlencode({"prompt": "x", "concepts": "art deco"}).encode()
    return [_post(json.dumps(body).encode()) for body in bodies] + [
        _post(b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        _post(form, "application/x-www-form-urlencoded", b"Origin: http://evil.example\r\n"),
        _post(b" " * (2**24 + 1)),  # over 16 MiB: refused on its Content-Length
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


def _connection_bodies() -> list[bytes]:
    """Issue 31's hostile requests: a 15 MB JSON body of 1.3 million keys, a JPEG of 2000 scans,
    a refine flood, a 15 MB form."""
    import base64
    import json

    keys = b"{" + b",".join(b'"k%d":1' % i for i in range(1_300_000)) + b"}"
    bomb = json.dumps({"prompt": "x", "reference_images": [base64.b64encode(jpeg_bomb(2000)).decode()]}).encode()
    flood = json.dumps({"prompt": "x", "concepts": [f"style {i}" for i in range(16)], "refine": 50}).encode()
    return [_post(keys), _post(bomb), _post(flood),
            _post(b"prompt=" + b"%41" * 5_000_000, "application/x-www-form-urlencoded")]


def _exchange(address: tuple[str, int], request: bytes) -> int | None:
    """Send one whole request on a connection of its own: the answer's status, None when the
    server closed the connection without one (as it may once it has refused a body early)."""
    import socket

    with socket.create_connection(address, timeout=60) as sock:
        try:
            sock.sendall(request)
            head = sock.recv(64)
        except OSError:
            return None
    return int(head[9:12]) if head.startswith(b"HTTP/1.1 ") and head[9:12].isdigit() else None


def _refused(status: int | None) -> None:
    if status is not None and not 400 <= status < 500:
        raise SystemExit(f"a hostile request got {status}")


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    return host, int(port)


def _connection_attacks(url: str, posts: list[bytes], stop, deadline: float) -> int:
    """The connection-level clients of issue 31, in turn until `stop`: silent connections, half
    headers, stalled bodies, 64 MB of headers, hang-ups mid-body and `posts`. How many attacks were made."""
    import socket

    address = _address(url)
    head = b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    made = 0
    while not stop.is_set() and time.monotonic() < deadline:
        held = [socket.create_connection(address) for _ in range(90)]
        try:
            for sock in held[50:70]:
                sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: 127.0")  # half headers
            for sock in held[70:]:
                sock.sendall(head + b"Content-Length: 1000\r\n\r\n{")  # a stalled body
            with socket.create_connection(address) as sock:  # 64 MB of headers
                try:
                    sock.sendall(head + b"X-Big: ")
                    for _ in range(64):
                        sock.sendall(b"a" * 2**20)
                except OSError:  # refused and closed early, as it should be
                    pass
            for _ in range(10):  # hang-ups mid-body
                with socket.create_connection(address) as sock:
                    sock.sendall(head + b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
            for request in posts:
                _refused(_exchange(address, request))
            made += 9
            time.sleep(1.0)
        finally:
            for sock in held:
                sock.close()
    return made


def _hostile(url: str, bodies: list[bytes], stop, deadline: float) -> int:
    """Send `bodies` in turn, back to back, until `stop` is set (or `deadline`): how many were
    sent. Anything but a 4xx (or a connection closed after an early refusal) is an error."""
    address, sent = _address(url), 0
    while not stop.is_set() and time.monotonic() < deadline:
        _refused(_exchange(address, bodies[sent % len(bodies)]))
        sent += 1
    return sent


def _p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) > 1 else values[0]


def _hostile_process(url: str, ready, stop, sent, limit_s: float) -> None:
    """Issue 23's bodies and, in a thread beside them, issue 31's connection-level clients, all
    built before `ready` is set: an attacker prepares its requests elsewhere, before it attacks."""
    bodies, posts = _hostile_bodies(), _connection_bodies()
    ready.set()
    deadline = time.monotonic() + limit_s
    attacks = [0]
    thread = threading.Thread(target=lambda: attacks.__setitem__(0, _connection_attacks(url, posts, stop, deadline)))
    thread.start()
    sent.value = _hostile(url, bodies, stop, deadline)
    thread.join()
    sent.value += attacks[0]


def _rss_mb(pid: int | str, key: str) -> float:
    """A process's resident memory (VmRSS) or its peak (VmHWM), in MiB (Linux)."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key + ":")) / 1024


def _served(args, stack: ExitStack, modes: dict[str, int]) -> tuple[dict[str, str], dict[str, list]]:
    """Base URLs of one server per mode (max_batch), and the processes each one runs in: as `ht
    serve` runs, the HTTP side in threads of this process (at its lower priority) and the model
    in a process of its own; or Ray Serve applications of --replicas replicas each."""
    from htcli.methods.predict import shipped_checkpoint
    from htcli.serve.service import Limits

    def limits(max_batch: int) -> Limits:
        return Limits(max_batch=max_batch, batch_window_ms=args.window_ms, max_queue=2 * args.clients, max_refine=50)

    if args.replicas is None:
        from htcli.serve.app import FRONT_NICENESS, running
        from htcli.serve.model_process import ProcessEngine

        urls, pids = {}, {}
        for mode, max_batch in modes.items():
            engine = ProcessEngine(dict(model="tiny", hyper=shipped_checkpoint("tiny")), limits(max_batch))
            stack.callback(engine.close)
            urls[mode] = stack.enter_context(running(engine, niceness=FRONT_NICENESS))
            pids[mode] = ["self", engine.process.pid]
        return urls, pids
    import socket

    import ray
    from ray import serve

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
    return {mode: f"http://127.0.0.1:{port}/{mode}" for mode in modes}, {mode: ["self"] for mode in modes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=6, help="measured rounds: requests per client and server")
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
        urls, pids = _served(args, stack, modes)
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
        for pid in pids["batched"]:  # the peak RSS from here: the hostile mix's
            with open(f"/proc/{pid}/clear_refs", "w") as refs:
                refs.write("5")
        rss_before = sum(_rss_mb(pid, "VmRSS") for pid in pids["batched"])
        ready, stop, sent = spawn.Event(), spawn.Event(), spawn.Value("i", 0)
        hostile = spawn.Process(target=_hostile_process, args=(urls["batched"], ready, stop, sent, 2 * args.limit_s))
        hostile.start()
        if not ready.wait(120):
            raise SystemExit("the hostile client did not get ready within 120 s")
        time.sleep(1.0)  # let it get going
        for k in range(1 + args.requests, 1 + 2 * args.requests):
            measure("hostile", urls["batched"], k)
        stop.set()
        hostile.join(120)
        if hostile.exitcode != 0:
            raise SystemExit(f"the hostile client failed (exit code {hostile.exitcode})")
        rss_growth = sum(_rss_mb(pid, "VmHWM") for pid in pids["batched"]) - rss_before
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
