"""Shared by the `ht serve` tests: a tiny hypernetwork with an image tower, and a service served on loopback."""

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from htcli.generate.source_maps import Steerer
from htcli.methods.hypernetwork import HyperCheckpoint, HyperConfig, TrainingConcepts, build_hypernetwork
from htcli.models import get_model
from htcli.models.plan import make_plan
from htcli.serve.app import running
from htcli.serve.service import Limits, Service


def hyper_checkpoint(folder: Path, training_concepts: bool = False, text_only: bool = False) -> Path:
    """A `tiny` hypernetwork on the tiny random CLIP (text and images, 32-d), with random,
    non-identity heads so that steering visibly changes images, and a stored modality gap; with
    `training_concepts`, three named training concepts at random embeddings and an
    out-of-distribution threshold (0.99) that every other concept falls below; with `text_only`,
    on MiniLM (384-d, no image tower, no gap) instead."""
    layers = tuple((layer.name, layer.width) for layer in make_plan(get_model("tiny")).layers)
    dim = 384 if text_only else 32
    config = HyperConfig(embed_dim=dim, layers=layers, hidden=16, rank=4, embedding="phrase", prior="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        network = build_hypernetwork(config)
        for up in network.head.up:
            torch.nn.init.normal_(up.weight, std=0.5)
        gap = None if text_only else (torch.randn(dim) * 0.1, torch.randn(dim) * 0.1)
        known = TrainingConcepts(["Bauhaus", "Cubism", "Baroque"], torch.randn(3, dim), 0.99) if training_concepts else None
    folder.mkdir(parents=True, exist_ok=True)
    HyperCheckpoint(network, config, "tiny", "minilm" if text_only else "open_clip:ht-tiny-clip", gap,
                    training_concepts=known).save(folder / "hyper.safetensors")
    return folder


@contextmanager
def ht_serve(*options: str, start_s: float = 180.0, new_session: bool = False
             ) -> Iterator[tuple[subprocess.Popen, str, list[str]]]:
    """`ht serve --port 0 OPTIONS...` in a subprocess on 127.0.0.1: (process, base URL, its output
    lines so far, growing while it runs). Stopped (SIGTERM, then SIGKILL) on exit. `new_session`:
    in a process group of its own, as a service manager starts it."""
    command = [sys.executable, "-m", "htcli", "serve", "--port", "0", *options]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=os.environ | {"OMP_NUM_THREADS": "1"}, start_new_session=new_session)
    lines: list[str] = []
    found = threading.Event()
    threading.Thread(target=lambda: [lines.append(line) or (" at http://" in line and found.set())
                                     for line in process.stdout], daemon=True).start()
    try:
        deadline = time.monotonic() + start_s
        while not found.wait(0.2):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ht serve did not start (exit {process.returncode}):\n{''.join(lines)}")
        url = re.search(r"at (http://127\.0\.0\.1:\d+)/", "".join(lines)).group(1)
        yield process, url, lines
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def hanging_up(url: str, body: bytes, waiting: Callable[[], bool], timeout_s: float = 60.0) -> Iterator[None]:
    """A raw POST /v1/generate of `body` whose connection stays open until `waiting()` is true
    (polled, at most `timeout_s`), then the `with` block, then the client hangs up."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + timeout_s
        while not waiting() and time.monotonic() < deadline:
            time.sleep(0.01)
        yield


@contextmanager
def served(steerer: Steerer, allowed_hosts=(), **limits) -> Iterator[tuple[Service, str]]:
    """A `Service` with these `Limits`, served on 127.0.0.1 at a free port: (service, base URL)."""
    service = Service(steerer, Limits(**limits))
    try:
        with running(service, allowed_hosts=allowed_hosts) as url:
            yield service, url
    finally:
        service.close()
