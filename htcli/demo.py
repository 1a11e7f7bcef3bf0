"""The whole method on the offline `tiny` world, in under 2 minutes on 2 CPU cores.

Builds a small dataset of held-out test concepts, fits the per-concept baselines on them,
predicts their maps with the hypernetwork shipped with the package (trained on the library's
training concepts and `concepts/extra_training.txt`, never on these; docs/results.md has the
command that reproduces it), evaluates everything on the held-out concepts' evaluation samples,
steers one prompt with a strength sweep, and writes a report. `retrain` trains a small
hypernetwork here instead, on a sample of training concepts (minutes). `tiny` has random
weights: its images are noise, and the comparison is made in activation space (residual ratio
of the W2 distance).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from htcli.core.files import atomic_path, write_json
from htcli.core.hooks import resolve_layers
from htcli.core.runtime import Progress
from htcli.data.build import Builder, build_dataset
from htcli.data.build_settings import check_existing, make_settings
from htcli.data.concepts import load_library
from htcli.data.dataset import ActivationDataset
from htcli.data.forward import Frozen
from htcli.errors import HTError
from htcli.evaluation.plots import plot_residuals
from htcli.evaluation.report import TRANSPORT_HEAD, markdown_table, transport_rows
from htcli.evaluation.residuals import capture_seconds, compare, evaluate_hyper
from htcli.generate.save import grid, noise_banner
from htcli.generate.steer import generate, weights_kind
from htcli.methods.baselines import LineasConfig
from htcli.methods.fitting import fit_baselines
from htcli.methods.hypernetwork import HyperConfig
from htcli.methods.predict import Predictor, resolve_checkpoint, shipped_checkpoint
from htcli.methods.train_config import TrainConfig
from htcli.methods.training import Trainer
from htcli.models import denoiser, get_model, load_pipeline
from htcli.models.encoders import get_encoder
from htcli.models.torch_pair import check_torch_pair

SWEEP_PROMPT = "a lighthouse on a cliff"


@dataclass
class DemoConfig:
    """How big the demo is: concepts, samples per concept, optimisation steps, and its seed."""

    test_concepts: int = 6  # held out: every method is compared on these
    samples: int = 32  # fitting samples per concept (the shipped hypernetwork was trained with 32)
    eval_samples: int = 32  # evaluation samples per concept (other prompts and seeds)
    lineas_steps: int = 120
    retrain: bool = False  # train a hypernetwork here instead of using the shipped one
    train_concepts: int = 60  # with retrain: the hypernetwork's (a tenth of them kept for validation)
    train_steps: int = 300  # with retrain
    seed: int = 0

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if name not in ("seed", "retrain") and value < (2 if "samples" in name else 1):
                least = "at least 2" if "samples" in name else "positive"
                raise HTError(f"{name}= must be {least}, got {value}")


def used_settings(config: DemoConfig) -> dict[str, Any]:
    """The settings this run used: the training ones only with `retrain`."""
    return {name: value for name, value in vars(config).items() if config.retrain or not name.startswith("train_")}


def run_demo(out: Path, config: DemoConfig | None = None, progress: Progress | None = None) -> dict:
    """Run the five steps into `out` and write summary.json, report.md, residuals.png and sweep.png.
    `progress(step, 5, what)` hears each step as it starts. Returns the summary."""
    config = config or DemoConfig()
    check_torch_pair()  # before the first progress line: a newcomer's most likely failure
    say = (lambda step, text: progress(step, 5, text)) if progress else (lambda step, text: None)
    started = time.perf_counter()
    spec = get_model("tiny")
    shipped = None if config.retrain else shipped_checkpoint(spec.id)
    if not config.retrain and shipped is None:
        raise HTError("this installation has no shipped tiny hypernetwork; train one with retrain=True (`ht demo`)")
    library = load_library()
    rng = random.Random(config.seed)
    train = rng.sample(library.targets("train"), config.train_concepts) if config.retrain else []
    test = rng.sample(library.targets("test"), config.test_concepts)

    # 1. Dataset: paired fitting samples, disjoint evaluation samples.
    say(0, f"building a dataset: {len(train)} training + {len(test)} held-out concepts" if train
        else f"building a dataset of {len(test)} held-out concepts")
    pipe = load_pipeline(spec)
    layers = resolve_layers(denoiser(pipe, spec), spec.hook_patterns)
    settings = make_settings(spec, library, layers, config.samples, config.eval_samples, config.seed)
    builder = Builder(spec, pipe, layers, settings, get_encoder(spec.concept_encoder))
    check_existing(out / "data", settings, overwrite=True)  # a rerun with other settings starts afresh
    build_dataset(builder, library, train + test, out / "data")
    data = ActivationDataset(out / "data")
    frozen = Frozen.load(spec, settings.layers, "cpu")
    # What each baseline pays before it can fit: the concept's target activations, from its text.
    capture = capture_seconds(builder, test)

    # 2. Per-concept baselines on the held-out concepts.
    say(1, f"fitting mean shift, Linear-AcT and LinEAS ({config.lineas_steps} steps) per held-out concept")
    names = [c.name for c in test]
    lineas = LineasConfig(steps=config.lineas_steps, seed=config.seed)
    baselines = [fit_baselines(m, frozen, data, names, lineas=lineas, out=out / "baselines", overwrite=True)
                 for m in ("mean-shift", "linear-act", "lineas")]

    # 3. The hypernetwork: the shipped one, or one trained here on training concepts only.
    if shipped is not None:
        say(2, "loading the shipped tiny hypernetwork")
        predictor = Predictor.load(shipped, model=spec.id)
    else:
        predictor = train_here(frozen, data, config, out / "hyper", spec.id, lambda text: say(2, text))
    info = predictor.checkpoint.info

    # 4. Held-out comparison.
    say(3, "comparing on the held-out concepts' evaluation samples")
    ht = evaluate_hyper(predictor, library, frozen, data, names)
    rows = compare(ht, baselines, config.seed, capture)

    # 5. A strength sweep with the hypernetwork, for one held-out concept.
    say(4, f"steering {SWEEP_PROMPT!r} towards {test[0].name!r} with a strength sweep")
    maps = predictor.maps([test[0]])[0]
    images = generate(spec, pipe, SWEEP_PROMPT, maps, [0.0, 0.25, 0.5, 0.75, 1.0], [config.seed])
    with atomic_path(out / "sweep.png") as tmp:
        grid([g.image for g in images], [g.label.split(",")[0] for g in images], columns=len(images),
             banner=noise_banner(weights_kind(spec), spec.id)).save(tmp, format="PNG")

    summary = {
        "rows": rows,
        "per_concept": {r.method: dict(zip(names, r.residuals)) for r in [*baselines, ht]},
        "test_concepts": names,
        "hypernetwork": "trained here" if shipped is None else "shipped",
        "checkpoint_sha256": predictor.digest,
        "fit_concepts": info["train_concepts"],
        "val_concepts": len(info["val_concepts"]),
        "train_steps": info["step"],
        "train_seconds": info["train_seconds"],
        "seconds": time.perf_counter() - started,
        "config": used_settings(config),
    }
    summary["findings"] = findings(rows, summary["train_seconds"])
    write_json(out / "summary.json", summary)
    write_report(out, summary)
    say(5, "done")
    return summary


def train_here(frozen: Frozen, data: ActivationDataset, config: DemoConfig, out: Path, model: str,
               say: Callable[[str], None]) -> Predictor:
    """A small hypernetwork trained on the dataset's training concepts (a tenth kept for validation)."""
    hyper = HyperConfig(embed_dim=int(data.embeddings(data.names()[:1]).shape[-1]), layers=tuple(data.layers.items()),
                        hidden=256, rank=16)
    train_config = TrainConfig(steps=config.train_steps, samples=config.samples, eval_every=config.train_steps,
                               val_fraction=0.1, seed=config.seed, lr=2e-3)
    trainer = Trainer(frozen, data, hyper, train_config, out, model)
    say(f"training the hypernetwork ({config.train_steps} steps) on {training_text(len(trainer.train), len(trainer.val))}")
    trainer.fit()
    return Predictor.load(resolve_checkpoint(out, model), model=model)


def training_text(fit: int, val: int) -> str:
    """One wording of the training set, for the progress line and the report alike."""
    return f"{fit + val} training concepts ({fit} to fit, {val} for validation)"


def findings(rows: Sequence[Mapping[str, Any]], train_seconds: float) -> list[str]:
    """The report's conclusions, each derived from the numbers (so a bad run reads as one). Times
    are from the concept's text: a baseline's include capturing its target activations."""
    by = {r["method"]: r for r in rows}
    ht = by["hypertransport"]
    ht_res, ht_s = ht["residual_mean"], ht["seconds_total"]
    best = min((r for r in rows if r["method"] not in ("none", "hypertransport")), key=lambda r: r["residual_mean"])
    out = []
    if ht_res < 1:
        out.append(f"HyperTransport lowers the held-out residual ratio to {ht_res:.3f} (no steering: 1.000).")
    else:
        out.append(f"HyperTransport does not beat no steering on the held-out concepts: its residual ratio is "
                   f"{ht_res:.3f}, no steering's 1.000.")
    if ht_res <= best["residual_mean"]:
        out.append(f"It matches or beats every per-concept baseline (the best, {best['method']}, reaches "
                   f"{best['residual_mean']:.3f}).")
    else:
        out.append(f"The best method here is {best['method']} ({best['residual_mean']:.3f}), fitted per concept; "
                   f"HyperTransport's is {ht_res / best['residual_mean']:.2f}x as large.")
    lineas = by["lineas"]
    lineas_s = lineas["seconds_total"]
    faster = ht_s < lineas_s
    out.append(f"Predicting a concept's maps from its text takes {ht_s * 1e3:.1f} ms, "
               + (f"{lineas_s / ht_s:,.0f}x faster than" if faster else "no faster than")
               + f" LinEAS from the text ({lineas_s:.2f} s: {lineas['capture_seconds']:.2f} s to capture the concept's "
               f"target activations, {lineas['seconds_median']:.2f} s to fit).")
    cheapest = min((r for r in rows if r["method"] not in ("none", "hypertransport")), key=lambda r: r["seconds_total"])
    out.append(f"The cheapest baseline, {cheapest['method']}, fits in {cheapest['seconds_median'] * 1e3:.2f} ms but "
               f"needs the captured targets too: {cheapest['seconds_total'] * 1e3:.0f} ms from the text, "
               f"{cheapest['times_ht']:.1f}x HyperTransport's time.")
    if ht_res >= 1:
        out.append(f"Training ({train_seconds:.0f} s) does not pay for itself here: the predicted maps do not beat no steering.")
    elif not faster:
        out.append(f"Training ({train_seconds:.0f} s) does not pay for itself here: predicting is not faster than fitting.")
    else:
        concepts = math.ceil(train_seconds / (lineas_s - ht_s))
        quality = ("" if ht_res <= lineas["residual_mean"]
                   else f", at {ht_res / lineas['residual_mean']:.2f}x LinEAS's residual ratio")
        out.append(f"In time, training ({train_seconds:.0f} s) is paid back after {concepts} new concepts{quality}.")
    return out


def hyper_text(summary: Mapping[str, Any]) -> str:
    """Which hypernetwork the report is about, with the first digits of its file's digest."""
    where = "the shipped tiny hypernetwork" if summary["hypernetwork"] == "shipped" else "trained by this demo"
    return f"{where}, sha256 {summary['checkpoint_sha256'][:12]}"


def write_report(out: Path, summary: Mapping[str, Any]) -> None:
    """report.md (the comparison table and the findings) and residuals.png."""
    names = summary["test_concepts"]
    lines = [
        "# ht demo: HyperTransport on the offline tiny world",
        "",
        "`tiny` is a 4-block PixArt-Sigma with **random weights** conditioned on the real all-MiniLM-L6-v2",
        "encoder: its images are noise, so the comparison is made in activation space. Residual ratio =",
        "W2(steered source, target) / W2(source, target) on evaluation samples (other prompts and seeds than",
        "the fit); 1 = no change, 0 = the target. Lower is better. Mean [95% bootstrap interval] over concepts.",
        "",
        f"Held-out concepts ({len(names)}): {', '.join(names)}.",
        (f"HyperTransport ({hyper_text(summary)}) was trained on "
         f"{training_text(summary['fit_concepts'], summary['val_concepts'])}, none of them held out, "
         f"in {summary['train_steps']} steps ({summary['train_seconds']:.0f} s on the machine that trained it)."),
        "",
        markdown_table(TRANSPORT_HEAD, transport_rows(summary["rows"])),
        "",
        *(f"- {line}" for line in summary["findings"]),
        *([] if summary["hypernetwork"] == "shipped" else [
            "- `--retrain` trains on few concepts for a few hundred steps; held-out quality grows with the",
            "  number of training concepts (the shipped hypernetwork was trained on many more).",
        ]),
        f"- Whole demo: {summary['seconds']:.0f} s. Strength sweep: `sweep.png` (noise images: random weights).",
        "",
        "![residuals](residuals.png)",
        "",
    ]
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")
    plot_residuals(summary["rows"], out / "residuals.png", f"Demo: held-out residual ratio on {len(names)} concepts")
