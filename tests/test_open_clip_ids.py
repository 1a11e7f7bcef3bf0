"""open_clip ids get the activation their weights were trained with (QuickGELU for OpenAI's).

No weights can be downloaded here: models are built on the meta device with the pretrained
weights skipped, which is enough, since the activation comes from the request, not the weights.
"""

import inspect
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from torch import nn

import htcli.evaluation.clip
import htcli.models.encoders
from htcli.evaluation.score import clip_section
from htcli.models.encoders import get_encoder, open_clip_request


def build_on_meta(request: dict) -> nn.Module:
    """The model `request` asks open_clip for, without its pretrained weights, on the meta device."""
    with torch.device("meta"):
        return open_clip.create_model(**{**request, "pretrained": None}, device="meta")


def tower_activations(model: nn.Module) -> list[str]:
    """Class names of every GELU-like activation in the image (`visual`) and text (`transformer`) towers."""
    towers = [model.visual, model.transformer]
    return [type(m).__name__ for tower in towers for m in tower.modules() if isinstance(m, (nn.GELU, QuickGELU))]


@pytest.mark.parametrize("arch", ["ViT-L-14", "ViT-B-32", "ViT-B-32-quickgelu"])
def test_openai_weights_get_quick_gelu_in_both_towers(arch):
    request = open_clip_request(arch, "openai")
    assert request["model_name"] == arch and request["pretrained"] == "openai"  # the id is not rewritten
    activations = tower_activations(build_on_meta(request))
    assert activations and set(activations) == {"QuickGELU"}


@pytest.mark.parametrize(("arch", "pretrained"), [("ViT-B-32", "laion2b_s34b_b79k"), ("ViT-B-32", None)])
def test_gelu_weights_and_random_weights_keep_gelu(arch, pretrained):
    activations = tower_activations(build_on_meta(open_clip_request(arch, pretrained)))
    assert activations and set(activations) == {"GELU"}


@pytest.fixture
def requests_to_open_clip(monkeypatch) -> Iterator[list[dict]]:
    """Every call to open_clip.create_model_and_transforms, as bound arguments; each builds its
    model on the meta device (the weights are skipped, and the Hub is never asked about them)."""
    requests: list[dict] = []
    signature = inspect.signature(open_clip.create_model_and_transforms)

    def create_model_and_transforms(*args, **kwargs):
        request = dict(signature.bind(*args, **kwargs).arguments)
        requests.append(request)
        return build_on_meta(request), None, None

    monkeypatch.setattr(open_clip, "create_model_and_transforms", create_model_and_transforms)
    monkeypatch.setattr(htcli.models.encoders, "_require_clip_weights", lambda arch, pretrained: None)
    get_encoder.cache_clear()
    yield requests
    get_encoder.cache_clear()  # no meta encoder stays cached for other tests


def test_concept_encoder_asks_open_clip_for_quick_gelu(requests_to_open_clip):
    encoder = get_encoder("open_clip:ViT-L-14/openai", "meta")
    assert requests_to_open_clip == [{"model_name": "ViT-L-14", "pretrained": "openai", "force_quick_gelu": True}]
    assert encoder.id == "open_clip:ViT-L-14/openai"  # the id datasets record stays as written
    assert set(tower_activations(encoder.model)) == {"QuickGELU"}


def test_clip_judge_asks_open_clip_for_quick_gelu(requests_to_open_clip, monkeypatch, tmp_path: Path):
    # The judge's default CLIP for a real model; the scoring itself is cut short, returning the encoder.
    monkeypatch.setattr(htcli.evaluation.clip, "clip_judge", lambda encoder, *args: encoder)
    run = SimpleNamespace(model="pixart", root=tmp_path, records=[])
    encoder = clip_section(run, None, None, seed=0, device="meta", progress=None, warn=pytest.fail)
    assert requests_to_open_clip == [{"model_name": "ViT-L-14", "pretrained": "openai", "force_quick_gelu": True}]
    assert encoder.id == "open_clip:ViT-L-14/openai"  # scores.json names the CLIP as before
    assert set(tower_activations(encoder.model)) == {"QuickGELU"}
