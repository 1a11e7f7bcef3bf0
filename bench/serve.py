"""Benchmark: `ht serve` on `tiny`, 16 concurrent clients, dynamic batching on vs off, in one run.

Run: python -m bench.serve [--clients 16] [--requests 3] [--window-ms 50]
One loaded model is served twice over loopback: with --max-batch 1 (each request its own
pipeline call, as `ht steer` would), and batching up to --clients images within --window-ms.
In each round every client sends one request at once, steering towards its own library concept
(seeds vary), from a client process of its own; rounds alternate between the two servers,
after one unmeasured warm-up round each (which also fills the map caches). Bounded: --requests
rounds, none started after --limit-s. The hypernetwork is the one shipped for tiny. Last line:
batched_vs_sequential=<throughput ratio> p95_ms_batched=<ms> p95_ms_sequential=<ms>
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
    from htcli.generate.steer import Steerer
    from htcli.methods.predict import shipped_checkpoint
    from htcli.models import get_model

    return Steerer(get_model("tiny"), hyper=shipped_checkpoint("tiny"))


def _round(url: str, concepts: list[str], k: int) -> tuple[list[float], float]:
    """Every client (one per concept) sends one request at once: their latencies (ms) and the
    round's wall-clock seconds."""
    import httpx

    latencies: list[float] = []
    failures: list[str] = []

    def client(index: int) -> None:
        body = {"prompt": PROMPTS[index % len(PROMPTS)], "concepts": [concepts[index]], "seed": 100 * index + k}
        sent = time.perf_counter()
        reply = httpx.post(url + "/v1/generate", json=body, timeout=600)
        if reply.status_code != 200:
            failures.append(reply.text)
        latencies.append((time.perf_counter() - sent) * 1e3)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(concepts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit(f"{len(failures)} requests failed, e.g. {failures[0]}")
    return latencies, time.perf_counter() - start


def _p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=3, help="measured rounds: requests per client and server")
    parser.add_argument("--window-ms", type=float, default=50.0)
    parser.add_argument("--limit-s", type=float, default=300.0, help="no round starts after this long")
    args = parser.parse_args()
    quiet()
    from htcli.data.concepts import load_library
    from htcli.serve.app import running
    from htcli.serve.service import Limits, Service

    concepts = [c.name for c in load_library().targets("train")[: args.clients]]
    modes = {"sequential": 1, "batched": args.clients}  # max_batch
    latencies: dict[str, list[float]] = {mode: [] for mode in modes}
    seconds = dict.fromkeys(modes, 0.0)
    with ExitStack() as stack:
        steerer = _steerer()
        services, urls = {}, {}
        for mode, max_batch in modes.items():
            services[mode] = Service(steerer, Limits(max_batch=max_batch, batch_window_ms=args.window_ms,
                                                     max_queue=2 * args.clients))
            stack.callback(services[mode].close)
            urls[mode] = stack.enter_context(running(services[mode]))
        # The clients run in a process of their own, as real clients would: not in the server's.
        clients = stack.enter_context(multiprocessing.get_context("spawn").Pool(1))
        for mode in modes:
            clients.apply(_round, (urls[mode], concepts, 0))  # warm-up: every concept's maps cached
        counted = {mode: (services[mode].batcher.batches, services[mode].batcher.generated) for mode in modes}
        started = time.perf_counter()
        # Rounds alternate between the two servers (one model: they never run at once), so that
        # other load on the machine hits both alike.
        for k in range(1, 1 + args.requests):
            if time.perf_counter() - started > args.limit_s:
                break
            for mode in modes:
                done, took = clients.apply(_round, (urls[mode], concepts, k))
                latencies[mode] += done
                seconds[mode] += took
        results = {}
        for mode, service in services.items():
            batches = service.batcher.batches - counted[mode][0]
            images = service.batcher.generated - counted[mode][1]
            results[mode] = (len(latencies[mode]) / seconds[mode], _p95(latencies[mode]))
            print(f"{mode}: {len(latencies[mode])} requests in {seconds[mode]:.1f} s ({results[mode][0]:.2f} req/s), "
                  f"latency median {statistics.median(latencies[mode]):.0f} ms, p95 {results[mode][1]:.0f} ms; "
                  f"{batches} pipeline calls, mean batch {images / max(batches, 1):.1f}, "
                  f"largest batch {service.batcher.largest}", flush=True)
    ratio = results["batched"][0] / results["sequential"][0]
    print(f"batched_vs_sequential={ratio:.2f} p95_ms_batched={results['batched'][1]:.0f} "
          f"p95_ms_sequential={results['sequential'][1]:.0f}")


if __name__ == "__main__":
    main()
