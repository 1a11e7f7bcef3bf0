"""`score`: run one judge (clip, vlm or transport) and write scores.json, report.md and plots.

The CLIP and VLM judges read an evaluation run's images (`--run`, else the model's most
recent run). The transport judge needs no images: it compares methods in activation space on
a dataset's concepts, and its section joins `--run`, else the model's most recent run, else
runs/<model>/eval/transport/.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from htcli.errors import HTError
from htcli.evaluation.evaluate import RANDOM_NOTE
from htcli.evaluation.runs import LATEST, EvalRun, Progress, latest_run

JUDGES = ("clip", "vlm", "transport")


@dataclass
class Scored:
    """What `score` did: the judge's section and the files it (re)wrote."""

    judge: str
    root: Path  # the run folder the report is in
    model: str
    section: dict[str, Any]
    files: list[Path]  # what this call wrote: scores.json, report.md and the judge's plot
    note: str | None  # said when the model has random weights


def open_run(run: Path | None, model: str | None, say: Callable[[str], None]) -> EvalRun:
    """The run to score: `run`, else the model's most recent run (said out loud)."""
    from htcli.models import default_model_name

    if run is None:
        name = model or default_model_name()
        run = latest_run(name)
        say(f"scoring the most recent evaluation run of {name}: {run}")
    opened = EvalRun.open(run)
    if not opened.records:
        raise HTError(f"the evaluation run {run} holds no images yet; run `ht evaluate` (out={str(run)!r})")
    return opened


def parse_pair(pair: str) -> tuple[str, str]:
    a, sep, b = pair.partition(",")
    a, b = a.strip(), b.strip()
    if not sep or not a or not b or "," in b or a == b:
        raise HTError(f"pair= takes two different methods 'A,B', e.g. hypertransport,prompt; got {pair!r}")
    return a, b


def clip_section(run: EvalRun, clip_model: str | None, clip_pretrained: str | None, seed: int, device: str,
                 progress: Progress | None, warn: Callable[[str], None]) -> dict:
    """The CLIP judge on `run`; with no `clip_model`, ViT-L-14/openai, or the shipped tiny CLIP
    for an offline model (whose images are noise anyway)."""
    from htcli.evaluation.clip import (
        DEFAULT_CLIP,
        check_clip_arch,
        clip_encoder_id,
        clip_judge,
    )
    from htcli.models import get_model
    from htcli.models.encoders import TINY_CLIP, get_encoder

    if clip_model is None and get_model(run.model).offline:
        clip_model = TINY_CLIP
    check_clip_arch(clip_model or DEFAULT_CLIP[0])
    if clip_model not in (None, TINY_CLIP) and not clip_pretrained:
        warn(f"clip_model={clip_model!r} without clip_pretrained= has random weights")
    encoder = get_encoder(clip_encoder_id(clip_model, clip_pretrained), device)
    return clip_judge(encoder, run.root, run.records, seed, progress)


def vlm_section(run: EvalRun, pair: str, backend: str | None, vlm_model: str | None, endpoint: str | None,
                timeout: float, seed: int, device: str, progress: Progress | None) -> dict:
    """The pairwise VLM judge on `run`; a bad pair fails before any model loads."""
    from htcli.evaluation.vlm import make_backend, pair_items, vlm_judge

    a, b = parse_pair(pair)
    pair_items(run.records, a, b)
    ask = make_backend(backend, vlm_model, endpoint, device, timeout)
    return vlm_judge(run.records, a, b, ask, run.root, seed, progress)


def transport_section(model: str | None, data: Path | None, hyper: Path | None, baselines: Sequence[Path] | None,
                      split: str, limit_concepts: int | None, seed: int, device: str,
                      progress: Progress | None) -> tuple[str, dict]:
    """(model id, the transport section) on the dataset's concepts every baseline has fitted."""
    from htcli.core.runtime import run_path
    from htcli.data.concepts import load_library
    from htcli.data.dataset import ActivationDataset, resolve_dataset
    from htcli.data.forward import Frozen
    from htcli.evaluation.residuals import transport_concepts, transport_judge
    from htcli.methods.predict import Predictor, resolve_checkpoint
    from htcli.models import default_model_name

    dataset = ActivationDataset(resolve_dataset(data, model or default_model_name()))
    spec = dataset.spec()  # built on the weights asked for: random or real
    model_id = spec.id
    predictor = Predictor.load(resolve_checkpoint(hyper, model_id), model=model_id, device=device)
    default = run_path(model_id, "baselines")
    folders = list(baselines) if baselines else ([default] if default.is_dir() else [])
    names = transport_concepts(dataset, split, folders, limit_concepts, seed)
    frozen = Frozen.load(spec, dataset.settings.layers, device)
    return model_id, transport_judge(predictor, load_library(), frozen, dataset, names, folders, seed, progress)


def transport_root(run: Path | None, model: str) -> Path:
    """Where the transport section goes: `run`, else the model's latest run, else its own folder."""
    from htcli.core.runtime import run_path

    if run is not None:
        return EvalRun.open(run).root
    if (run_path(model, "eval") / LATEST).is_file():
        return latest_run(model)
    root = run_path(model, "eval") / "transport"
    root.mkdir(parents=True, exist_ok=True)
    return root


def score(
    judge: str = "clip",
    *,
    run: Path | None = None,
    model: str | None = None,
    clip_model: str | None = None,
    clip_pretrained: str | None = None,
    pair: str = "hypertransport,prompt",
    backend: str | None = None,
    vlm_model: str | None = None,
    endpoint: str | None = None,
    timeout: float = 120.0,
    data: Path | None = None,
    hyper: Path | None = None,
    baselines: Sequence[Path] | None = None,
    split: str = "test",
    limit_concepts: int | None = None,
    seed: int = 0,
    device: str | None = None,
    progress: Progress | None = None,
    say: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> Scored:
    """Run `judge`, put its section into the run's scores.json and regenerate report.md and plots.

    `say` hears which run is scored, `warn` about random CLIP weights; `progress(done, total,
    what)` follows the judge.
    """
    from htcli.core.runtime import resolve_device
    from htcli.evaluation.report import SCORES, update_scores, write_report
    from htcli.models import get_model

    say, warn = say or (lambda text: None), warn or (lambda text: None)
    if judge not in JUDGES:
        raise HTError(f"unknown judge={judge!r}; use {', '.join(JUDGES)}")
    torch_device = str(resolve_device(device))
    if judge == "transport":
        model_id, section = transport_section(model, data, hyper, baselines, split, limit_concepts, seed, torch_device,
                                              progress)
        root = transport_root(run, model_id)
    else:
        opened = open_run(run, model, say)
        root, model_id = opened.root, opened.model
        if judge == "clip":
            section = clip_section(opened, clip_model, clip_pretrained, seed, torch_device, progress, warn)
        else:
            section = vlm_section(opened, pair, backend, vlm_model, endpoint, timeout, seed, torch_device, progress)
    note = RANDOM_NOTE.format(model=model_id) if get_model(model_id).offline else None
    scores = update_scores(root, judge, section, {"run": str(root), "model": model_id} | ({"note": note} if note else {}))
    pair_key = ",".join(section["pair"]) if judge == "vlm" else None
    files = [root / SCORES, *write_report(root, scores, judge, pair_key)]
    return Scored(judge, root, model_id, section, files, note if judge != "transport" else None)
