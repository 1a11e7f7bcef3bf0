"""What a dataset is built with: its seeded, disjoint fitting and evaluation prompts and seeds
(`make_settings`), and whether a folder already holds one built otherwise (`check_existing`),
each difference named by the parameter that sets it (`dataset_differences`)."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from torch import nn

from htcli.core.files import check_output_dir, read_json
from htcli.core.settings import settings_differences
from htcli.data.concepts import ConceptLibrary
from htcli.data.dataset import FORMAT, DatasetSettings
from htcli.errors import HTError
from htcli.models import ModelSpec


def split_prompts(prompts: Sequence[str], samples: int, eval_samples: int, seed: int) -> tuple[list[str], list[str]]:
    """Disjoint fitting and evaluation prompts from a seeded shuffle (cycled if too few)."""
    if samples < 2:
        raise HTError(f"samples= must be at least 2 (W2 compares distributions), got {samples}")
    if eval_samples < 2:
        raise HTError(f"eval_samples= must be at least 2, got {eval_samples}")
    order = list(prompts)
    random.Random(seed).shuffle(order)
    if len(order) < 2:
        raise HTError("need at least 2 source prompts")
    n_fit = min(samples, len(order) // 2)  # keep prompts disjoint even for huge sample counts
    fit_pool, eval_pool = order[:n_fit], order[n_fit:]
    fit = [fit_pool[i % len(fit_pool)] for i in range(samples)]
    evaluation = [eval_pool[i % len(eval_pool)] for i in range(eval_samples)]
    return fit, evaluation


def make_seeds(seed: int, samples: int, eval_samples: int) -> tuple[list[int], list[int]]:
    base = seed * 1_000_000
    return list(range(base, base + samples)), list(range(base + 500_000, base + 500_000 + eval_samples))


def make_settings(
    spec: ModelSpec, library: ConceptLibrary, layers: Mapping[str, nn.Module], samples: int, eval_samples: int,
    seed: int, encoder: str | None = None, batch_size: int = DatasetSettings.batch_size,
) -> DatasetSettings:
    """Settings for `spec` hooked at `layers`: seeded disjoint fit/eval prompts and seeds, the
    spec's weights (random or real) and its resolution when it is not the model's own."""
    from htcli.core.hooks import module_width

    if batch_size < 1:
        raise HTError(f"batch_size= must be positive, got {batch_size}")
    fit_prompts, eval_prompts = split_prompts(library.source_prompts(), samples, eval_samples, seed)
    fit_seeds, eval_seeds = make_seeds(seed, samples, eval_samples)
    return DatasetSettings(
        model=spec.id,
        layers=tuple(layers),
        widths=tuple(module_width(m) for m in layers.values()),
        encoder=encoder or spec.concept_encoder,
        fit_prompts=tuple(fit_prompts),
        eval_prompts=tuple(eval_prompts),
        fit_seeds=tuple(fit_seeds),
        eval_seeds=tuple(eval_seeds),
        storage_dtype=spec.dataset_dtype,
        batch_size=batch_size,
        random_weights=spec.random_weights,
        resolution=spec.resolution_asked,
    )


def check_existing(out: Path, settings: DatasetSettings, overwrite: bool) -> None:
    """Refuse to mix a dataset built with other settings into `out`, unless overwriting."""
    check_output_dir(out)
    manifest = out / "manifest.json"
    if not manifest.exists():
        return
    existing = read_json(manifest)
    current = existing.get("format") == FORMAT
    if current and existing.get("settings_digest") == settings.digest():
        return
    if not overwrite and not current:
        raise HTError(f"{out} holds a dataset of an older format ({existing.get('format')}); "
                      "pass overwrite=True to rebuild it, or choose another out=")
    if not overwrite:
        differ = dataset_differences(existing.get("settings") or {}, settings)
        raise HTError(
            f"{out} holds a dataset built with other settings ({', '.join(differ)}); "
            "choose another out= or pass overwrite=True"
        )
    for path in (out / "concepts").glob("*.safetensors"):
        path.unlink()
    (out / "source.safetensors").unlink(missing_ok=True)
    manifest.unlink()


def _seed_of(seeds: Sequence[int]) -> int | None:
    """The --seed behind a dataset's fitting seeds (see `make_seeds`)."""
    return seeds[0] // 1_000_000 if seeds else None


def _comparable(settings: Mapping) -> dict:
    """A dataset's settings as the parameters that set them, for `settings_differences`."""
    fit, evaluation = settings.get("fit_seeds") or (), settings.get("eval_seeds") or ()
    return {"model": settings.get("model"), "layers": tuple(settings.get("layers") or ()),
            "widths": tuple(settings.get("widths") or ()), "encoder": settings.get("encoder"), "samples": len(fit),
            "eval_samples": len(evaluation), "seed": _seed_of(fit), "batch_size": settings.get("batch_size"),
            "storage_dtype": settings.get("storage_dtype"), "random_weights": bool(settings.get("random_weights")),
            "resolution": settings.get("resolution") or "the model's"}


def _shown(name: str, value) -> object:
    """Long settings by their size: 'layers=16 layers (saved 8 layers)'."""
    if name == "layers":
        return f"{len(value or ())} layers"
    if name == "widths":
        return f"{sum(value or ())} neurons"
    return value


def dataset_differences(saved: Mapping, settings: DatasetSettings) -> list[str]:
    """What differs between a saved dataset's settings and `settings`, each named by the parameter
    that sets it ('samples=4 (saved 8)'; `htcli.core.settings`)."""
    current = asdict(settings)
    differ = settings_differences(_comparable(saved), _comparable(current), _shown)
    if not differ and any(list(current[key]) != list(saved.get(key) or ()) for key in ("fit_prompts", "eval_prompts")):
        differ.append("the source prompts (the concept library's source prompts changed)")
    return differ or ["settings saved by another version of ht"]
