"""Shared by the `ht serve` tests: a tiny hypernetwork with an image tower, and a service served on loopback."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from htcli.generate.source_maps import Steerer
from htcli.methods.hypernetwork import HyperCheckpoint, HyperConfig, TrainingConcepts, build_hypernetwork
from htcli.models import get_model
from htcli.models.plan import make_plan
from htcli.serve.app import running
from htcli.serve.service import Limits, Service


def hyper_checkpoint(folder: Path, training_concepts: bool = False) -> Path:
    """A `tiny` hypernetwork on the tiny random CLIP (text and images, 32-d), with random,
    non-identity heads so that steering visibly changes images, and a stored modality gap; with
    `training_concepts`, three named training concepts at random embeddings and an
    out-of-distribution threshold (0.99) that every other concept falls below."""
    layers = tuple((layer.name, layer.width) for layer in make_plan(get_model("tiny")).layers)
    config = HyperConfig(embed_dim=32, layers=layers, hidden=16, rank=4, embedding="phrase", prior="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        network = build_hypernetwork(config)
        for up in network.head.up:
            torch.nn.init.normal_(up.weight, std=0.5)
        gap = (torch.randn(32) * 0.1, torch.randn(32) * 0.1)
        known = TrainingConcepts(["Bauhaus", "Cubism", "Baroque"], torch.randn(3, 32), 0.99) if training_concepts else None
    folder.mkdir(parents=True, exist_ok=True)
    HyperCheckpoint(network, config, "tiny", "open_clip:ht-tiny-clip", gap,
                    training_concepts=known).save(folder / "hyper.safetensors")
    return folder


@contextmanager
def served(steerer: Steerer, allowed_hosts=(), **limits) -> Iterator[tuple[Service, str]]:
    """A `Service` with these `Limits`, served on 127.0.0.1 at a free port: (service, base URL)."""
    service = Service(steerer, Limits(**limits))
    try:
        with running(service, allowed_hosts=allowed_hosts) as url:
            yield service, url
    finally:
        service.close()
