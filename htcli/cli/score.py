"""`ht evaluate` and `ht score`: generate an evaluation run across methods, then judge it."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from htcli.cli import app
from htcli.cli.options import DataOption, DeviceOption, HyperOption, JsonOption, ModelOption, SeedOption
from htcli.errors import HTError

console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
JUDGES = ("clip", "vlm", "transport")
RANDOM_NOTE = "{model} has random weights: its images are noise, so CLIP and VLM scores test the pipeline, not steering"


def _bar(label: str) -> Progress:
    return Progress(TextColumn(f"[bold]{label}[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.description}"), console=err)


def _methods(wanted: str | None, found: dict[str, Path]) -> list[str]:
    known = ["prompt", "hypertransport", *found]
    if wanted is None:
        return known
    names = [m.strip() for m in wanted.split(",") if m.strip()]
    for name in names:
        if name not in known and name != "none":
            raise HTError(f"unknown method {name!r} for --methods; available here: {', '.join(known)} "
                          "(baselines come from --baselines folders)")
    if not names:
        raise HTError("--methods is empty; name at least one of " + ", ".join(known))
    return [n for n in dict.fromkeys(names) if n != "none"]  # `none` is always generated


@app.command("evaluate")
def evaluate_command(  # noqa: C901  (one linear script: check inputs, pick methods, generate)
    model: ModelOption = None,
    hyper: HyperOption = None,
    baselines: Annotated[
        Optional[list[Path]],
        typer.Option("--baselines", help="Baselines folder (runs/<model>/baselines, or one method's folder); repeatable. "
                     "Default: runs/<model>/baselines if it exists."),
    ] = None,
    concept: Annotated[Optional[list[str]], typer.Option("--concept", "-c", help="Evaluate this concept; repeatable.")] = None,
    split: Annotated[str, typer.Option(help="Library concepts when no --concept: test (held out), train or all.")] = "test",
    limit_concepts: Annotated[Optional[int], typer.Option(help="A seeded sample of this many concepts of the split.")] = None,
    prompts: Annotated[int, typer.Option("--prompts", help="Source prompts per concept.")] = 4,
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds per prompt (the same for every method).")] = 2,
    seed: SeedOption = 0,
    strength: Annotated[str, typer.Option(help="Strengths of the steering methods, e.g. '0.5,1'. The unsteered image "
                                          "(strength 0) is always made.")] = "0.5,1",
    methods: Annotated[
        Optional[str], typer.Option(help="Comma-separated: prompt, hypertransport, baseline folder names. Default: all found.")
    ] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder (an existing run continues). "
                                               "Default: runs/<model>/eval/<time>.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the model's most recent run instead of starting one.")] = False,
    model_path: Annotated[Optional[str], typer.Option(help="Local pipeline directory instead of the Hub.")] = None,
    device: DeviceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Generate concepts x prompts x seeds with every method, same seeds, for `ht score`.

    Methods: prompt (template applied, no hooks), hypertransport (maps from the checkpoint) and
    every baseline folder. Images and index.json go into the run folder; rerunning on it makes
    only the images it lacks.

    Example: ht evaluate --model tiny --limit-concepts 2 --prompts 2 --seeds 2 --strength 0.5,1
    """
    from htcli.core.runtime import resolve_device, run_path
    from htcli.data.concepts import load_library
    from htcli.data.dataset import select_concepts
    from htcli.evaluation.runs import (
        EvalRun,
        Method,
        default_out,
        eval_seeds,
        find_baselines,
        latest_run,
        run_evaluation,
        select_prompts,
    )
    from htcli.generate.steer import parse_strengths
    from htcli.methods.encoders import get_encoder
    from htcli.methods.hypernetwork import load_checkpoint
    from htcli.methods.predict import resolve_checkpoint
    from htcli.models import default_model_name, get_model, load_pipeline

    # 1. Check every input before loading anything heavy.
    spec = get_model(model or default_model_name())
    strengths = parse_strengths(strength)
    if any(s > 1 for s in strengths):
        err.print("[yellow]warning:[/] strength > 1 extrapolates beyond the fitted transport")
    if out is not None and resume:
        raise HTError("give --out (an existing run continues) or --resume (the latest run), not both")
    library = load_library()
    if limit_concepts is not None and limit_concepts < 1:
        raise HTError(f"--limit-concepts must be positive, got {limit_concepts}")
    chosen = select_concepts(library, split, concept or ())
    prompt_list, seed_list = select_prompts(library, prompts, seed), eval_seeds(seed, seeds)
    default_baselines = run_path(spec.id, "baselines")
    folders = baselines or ([default_baselines] if default_baselines.is_dir() else [])
    found = find_baselines(folders)
    wanted = _methods(methods, found)
    torch_device = resolve_device(device)

    # 2. The methods, and the concepts every baseline has fitted (a paired comparison).
    chosen_methods = []
    for name in wanted:
        if name == "prompt":
            chosen_methods.append(Method("prompt", "prompt"))
        elif name == "hypertransport":
            path = resolve_checkpoint(hyper, spec.id)
            checkpoint = load_checkpoint(path)
            if checkpoint.model != spec.id:
                raise HTError(f"{path} was trained for model {checkpoint.model!r}, not {spec.id!r}")
            chosen_methods.append(Method("hypertransport", "hypertransport", path, checkpoint, get_encoder(checkpoint.encoder)))
        else:
            method = Method(name, "baseline", found[name])
            missing = [c for c in chosen if not method.file(c).is_file()]
            if missing and concept:
                raise HTError(f"baseline {name!r} has no file for {missing[0].name!r} in {found[name]}; fit it with "
                              f"`ht fit-linear-baselines --method {name} --concept {missing[0].name!r}`")
            chosen = [c for c in chosen if c not in missing]
            chosen_methods.append(method)
    if not chosen:
        raise HTError(f"no concepts to evaluate: the baselines in {', '.join(map(str, folders))} fit none of the "
                      f"{split} concepts; pass --concept or --methods without them")
    if limit_concepts is not None and not concept:  # a seeded sample of what every method covers
        chosen = sorted(random.Random(seed).sample(chosen, min(limit_concepts, len(chosen))), key=lambda c: c.name.lower())
    if any(m.kind == "baseline" for m in chosen_methods) and not concept:
        err.print(f"evaluating {len(chosen)} {split} concept(s) that every baseline has fitted")

    # 3. Generate what the run lacks.
    root = latest_run(spec.id) if resume else out or default_out(spec.id)
    run = EvalRun.open_or_create(root, spec.id)
    before = len(run.records)
    with _bar("evaluate") as bar:
        task = bar.add_task("", total=None)

        def progress(done: int, total: int, description: str) -> None:
            bar.update(task, completed=done, total=total, description=description)

        summary = run_evaluation(spec, run, chosen, prompt_list, seed_list, strengths, chosen_methods,
                                 lambda: load_pipeline(spec, model_path=model_path, device=torch_device), progress)
    summary |= {"already_there": before, "concept_names": [c.name for c in chosen], "prompts": prompt_list, "seeds": seed_list}
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    if spec.offline:
        err.print(f"[yellow]note:[/] {RANDOM_NOTE.format(model=spec.id)}")
    console.print(f"[green]{summary['generated']} image(s) generated[/] ({before} already there) for {len(chosen)} concept(s) "
                  f"x {len(prompt_list)} prompt(s) x {len(seed_list)} seed(s), methods {', '.join(summary['methods'])}: "
                  f"{run.root}\nnext: ht score --judge clip --run {run.root}" + " --clip-model ht-tiny-clip" * spec.offline)


def _run_folder(run: Path | None, model: str | None):
    """The run to score: --run, else the default model's most recent run (said out loud)."""
    from htcli.evaluation.runs import EvalRun, latest_run
    from htcli.models import default_model_name

    if run is None:
        name = model or default_model_name()
        run = latest_run(name)
        err.print(f"scoring the most recent evaluation run of {name}: {run}")
    opened = EvalRun.open(run)
    if not opened.records:
        raise HTError(f"the evaluation run {run} holds no images yet; run `ht evaluate --out {run}`")
    return opened


@app.command("score")
def score_command(  # noqa: C901  (three judges behind one command, each a few lines)
    judge: Annotated[str, typer.Option("--judge", help="clip, vlm (pairwise) or transport (activation space).")] = "clip",
    run: Annotated[Optional[Path], typer.Option("--run", help="Evaluation run folder. Default: the model's most recent.")] = None,
    model: ModelOption = None,
    clip_model: Annotated[Optional[str], typer.Option(help="open_clip architecture. Default: ViT-L-14 (openai weights).")] = None,
    clip_pretrained: Annotated[
        Optional[str], typer.Option(help="open_clip pretrained tag; none with --clip-model = random weights.")
    ] = None,
    pair: Annotated[str, typer.Option(help="VLM: the two methods to compare, 'A,B'.")] = "hypertransport,prompt",
    backend: Annotated[
        Optional[str], typer.Option(help="VLM backend: transformers or openai. Default: openai with --endpoint.")
    ] = None,
    vlm_model: Annotated[Optional[str], typer.Option(help="VLM id (Hub id, or the endpoint's model name).")] = None,
    endpoint: Annotated[Optional[str], typer.Option(help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1.")] = None,
    timeout: Annotated[float, typer.Option(help="VLM: seconds to wait for each endpoint answer.")] = 120.0,
    data: DataOption = None,
    hyper: HyperOption = None,
    baselines: Annotated[Optional[Path], typer.Option(help="Transport: baselines folder. Default: runs/<model>/baselines.")] = None,
    split: Annotated[str, typer.Option(help="Transport: dataset concepts to judge, test (held out), train or all.")] = "test",
    limit: Annotated[Optional[int], typer.Option(help="Transport: only the first N concepts.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap intervals.")] = 0,
    device: DeviceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Judge steering: CLIP scores or pairwise VLM verdicts of an evaluation run, or the W2 residual.

    Writes scores.json, report.md and PNG plots into the run folder and prints a table.

    Example: ht score --judge clip --model tiny --clip-model ht-tiny-clip
    """
    from htcli.core.runtime import resolve_device
    from htcli.evaluation.report import clip_table, transport_table, update_scores, vlm_table, write_report
    from htcli.models import get_model

    if judge not in JUDGES:
        raise HTError(f"unknown --judge {judge!r}; use {', '.join(JUDGES)}")
    torch_device = resolve_device(device)
    if judge == "transport":
        root, spec_id, section = _transport(run, model, data, hyper, baselines, split, limit, seed, torch_device)
    else:
        opened = _run_folder(run, model)
        root, spec_id = opened.root, opened.model
        if judge == "clip":
            section = _clip(opened, clip_model, clip_pretrained, seed, torch_device)
        else:
            a, sep, b = pair.partition(",")
            if not sep or not a.strip() or not b.strip() or "," in b or a.strip() == b.strip():
                raise HTError(f"--pair takes two different methods 'A,B', e.g. hypertransport,prompt; got {pair!r}")
            section = _vlm(opened, a.strip(), b.strip(), backend, vlm_model, endpoint, timeout, seed, torch_device)
    offline = get_model(spec_id).offline
    header = {"run": str(root), "model": spec_id} | ({"note": RANDOM_NOTE.format(model=spec_id)} if offline else {})
    scores = update_scores(root, judge, section, header)
    written = write_report(root, scores)
    if as_json:
        typer.echo(json.dumps(section, indent=2))
        return
    console.print({"clip": clip_table, "vlm": vlm_table, "transport": transport_table}[judge](section))
    if offline and judge != "transport":
        err.print(f"[yellow]note:[/] {RANDOM_NOTE.format(model=spec_id)}")
    console.print(f"report: {', '.join(str(p) for p in [root / 'scores.json', *written])}")


def _clip(run, clip_model: str | None, clip_pretrained: str | None, seed: int, device) -> dict:
    from htcli.evaluation.clip import clip_encoder_id, clip_judge
    from htcli.methods.encoders import TINY_CLIP, get_encoder

    encoder_id = clip_encoder_id(clip_model, clip_pretrained)
    if clip_model is not None and not clip_pretrained and clip_model != TINY_CLIP:
        err.print(f"[yellow]warning:[/] --clip-model {clip_model} without --clip-pretrained has random weights")
    encoder = get_encoder(encoder_id, str(device))
    with _bar("clip") as bar:
        task = bar.add_task("", total=len({r["file"] for r in run.records}))
        return clip_judge(encoder, run.root, run.records, seed, progress=lambda n: bar.advance(task, n))


def _vlm(run, a: str, b: str, backend: str | None, vlm_model: str | None, endpoint: str | None, timeout: float,
         seed: int, device) -> dict:
    from htcli.evaluation.vlm import make_backend, pair_items, vlm_judge

    items = pair_items(run.records, a, b)  # bad pairs fail before a model loads
    ask = make_backend(backend, vlm_model, endpoint, str(device), timeout)
    with _bar("vlm") as bar:
        task = bar.add_task("", total=2 * len(items))
        return vlm_judge(run.records, a, b, ask, run.root, seed, progress=lambda: bar.advance(task))


def _transport(run, model, data, hyper, baselines, split, limit, seed, device) -> tuple[Path, str, dict]:
    from htcli.core.hooks import resolve_layers
    from htcli.core.runtime import run_path
    from htcli.data.concepts import load_library
    from htcli.data.dataset import ActivationDataset, resolve_dataset
    from htcli.data.forward import Frozen
    from htcli.evaluation.residuals import baseline_concepts, transport_judge
    from htcli.evaluation.runs import LATEST, EvalRun
    from htcli.methods.encoders import get_encoder
    from htcli.methods.hypernetwork import load_checkpoint
    from htcli.methods.predict import resolve_checkpoint
    from htcli.models import default_model_name, get_model, load_denoiser

    dataset = ActivationDataset(resolve_dataset(data, model or default_model_name()))
    spec = get_model(dataset.settings.model)
    checkpoint = load_checkpoint(resolve_checkpoint(hyper, spec.id))
    if checkpoint.model != spec.id:
        raise HTError(f"the hypernetwork was trained for {checkpoint.model!r}, the dataset is for {spec.id!r}")
    if split not in ("test", "train", "all"):
        raise HTError(f"--split must be test, train or all, got {split!r}")
    names = dataset.names(None if split == "all" else split)
    folder = baselines or run_path(spec.id, "baselines")
    for fitted in baseline_concepts(folder).values():  # keep the concepts every baseline has
        names = [n for n in names if n in fitted]
    names = names[:limit] if limit else names
    if not names:
        raise HTError(f"no {split} concepts to judge in {dataset.root} (and the baselines in {folder})")
    denoiser = load_denoiser(spec, device)
    frozen = Frozen(spec, denoiser, resolve_layers(denoiser, dataset.settings.layers))
    section = transport_judge(checkpoint, get_encoder(checkpoint.encoder, str(device)), load_library(), frozen, dataset,
                              names, folder, seed)
    # The report joins the run's other judges: --run, else the model's latest run, else its own folder.
    if run is not None:
        root = EvalRun.open(run).root
    elif (run_path(spec.id, "eval") / LATEST).is_file():
        from htcli.evaluation.runs import latest_run

        root = latest_run(spec.id)
    else:
        root = run_path(spec.id, "eval") / "transport"
        root.mkdir(parents=True, exist_ok=True)
    return root, spec.id, section
