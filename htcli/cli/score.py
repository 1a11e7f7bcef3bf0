"""`ht evaluate` and `ht score`: generate an evaluation run across methods, then judge it."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from htcli.cli.app import app
from htcli.cli.options import (
    DataOption,
    DatasetSplit,
    DeviceOption,
    HyperOption,
    JsonOption,
    LimitConceptsOption,
    ModelOption,
    ModelPathOption,
    RandomWeightsOption,
    SeedOption,
    SplitOption,
)
from htcli.cli.output import console, err, note, print_table, steps, warn
from htcli.core.files import dumps_json
from htcli.evaluation.score import JUDGES
from htcli.evaluation.stats import plural
from htcli.evaluation.vlm import BACKENDS

Judge = Enum("Judge", {name: name for name in JUDGES}, type=str)  # clip | vlm | transport
Backend = Enum("Backend", {name: name for name in BACKENDS}, type=str)  # transformers | openai

BaselinesOption = Annotated[
    list[Path] | None,
    typer.Option("--baselines", help="Baselines folder (runs/<model>/baselines, or one method's folder); repeatable. "
                 "Default: runs/<model>/baselines if it exists."),
]


@app.command("evaluate")
def evaluate_command(
    model: ModelOption = None,
    hyper: HyperOption = None,
    baselines: BaselinesOption = None,
    concept: Annotated[list[str] | None, typer.Option("--concept", "-c", help="Evaluate this concept; repeatable.")] = None,
    split: SplitOption = DatasetSplit.test,
    limit_concepts: LimitConceptsOption = None,
    prompts: Annotated[int, typer.Option("--prompts", help="Source prompts per concept.")] = 4,
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds per prompt (the same for every method).")] = 2,
    seed: SeedOption = 0,
    strength: Annotated[str, typer.Option(help="Strengths of the steering methods, e.g. '0.5,1'. The unsteered image "
                                          "(strength 0) is always made.")] = "0.5,1",
    methods: Annotated[
        str | None, typer.Option("--methods", help="Several methods in one comma-separated value, e.g. "
                                 "'prompt,hypertransport,lineas': prompt, hypertransport and baseline folder names. "
                                 "Default: all found.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run folder (an existing run continues). "
                                               "Default: runs/<model>/eval/<time>.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the model's most recent run instead of starting one.")
    ] = False,
    model_path: ModelPathOption = None,
    random_weights: RandomWeightsOption = False,
    device: DeviceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Generate concepts x prompts x seeds with every method, same seeds, for `ht score`.

    Methods: prompt (template applied, no hooks), hypertransport (maps from the checkpoint) and
    every baseline folder. Images, index.json and metadata.jsonl (for `datasets`) go into the
    run folder; rerunning on it makes only the images it lacks.

    Example: ht evaluate --model tiny --limit-concepts 2 --prompts 2 --seeds 2 --strength 0.5,1
    """
    from htcli.evaluation.evaluate import evaluate

    with steps("evaluate") as progress:
        summary = evaluate(model, hyper=hyper, baselines=baselines, concepts=concept or (), split=split.value,
                           limit_concepts=limit_concepts, prompts=prompts, seeds=seeds, seed=seed, strengths=strength,
                           methods=methods, out=out, resume=resume, model_path=model_path, device=device,
                           progress=lambda done, total, what: progress.update(done, total, what), warn=warn,
                           note=note)
    if as_json:
        typer.echo(dumps_json(summary))
        return
    if summary["note"]:
        note(summary["note"])
    counts = " x ".join(plural(n, noun) for n, noun in ((summary["concepts"], "concept"),
                                                        (len(summary["prompts"]), "prompt"), (len(summary["seeds"]), "seed")))
    console.print(f"[green]{plural(summary['generated'], 'image')} generated[/] ({summary['already_there']} already there) "
                  f"for {counts}, methods {', '.join(summary['methods'])}: {summary['run']}", highlight=False)
    console.print(f"next: ht score --judge clip --run {summary['run']}", highlight=False, markup=False)


@app.command("score")
def score_command(
    judge: Annotated[
        Judge, typer.Option("--judge", help="clip (CLIP scores), vlm (pairwise verdicts) or transport (activation space).")
    ] = Judge.clip,
    run: Annotated[Path | None, typer.Option("--run", help="Evaluation run folder. Default: the model's most recent.")] = None,
    model: ModelOption = None,
    clip_model: Annotated[str | None, typer.Option(help="open_clip architecture. Default: ViT-L-14 (openai weights); "
                                                      "ht-tiny-clip for an offline model such as tiny.")] = None,
    clip_pretrained: Annotated[
        str | None, typer.Option(help="open_clip pretrained tag; none with --clip-model = random weights.")
    ] = None,
    pair: Annotated[str, typer.Option(help="VLM: the two methods to compare, 'A,B'.")] = "hypertransport,prompt",
    backend: Annotated[
        Backend | None, typer.Option(help="VLM backend. Default: openai with --endpoint, else transformers.")
    ] = None,
    vlm_model: Annotated[str | None, typer.Option(help="VLM id (Hub id, or the endpoint's model name).")] = None,
    endpoint: Annotated[str | None, typer.Option(help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1.")] = None,
    timeout: Annotated[float, typer.Option(help="VLM: seconds to wait for each endpoint answer.")] = 120.0,
    data: DataOption = None,
    hyper: HyperOption = None,
    baselines: BaselinesOption = None,
    split: Annotated[
        DatasetSplit, typer.Option("--split", help="Transport: dataset concepts to judge, test (held out), train or all.")
    ] = DatasetSplit.test,
    limit_concepts: LimitConceptsOption = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap intervals and of --limit-concepts.")] = 0,
    random_weights: RandomWeightsOption = False,
    device: DeviceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Judge steering: CLIP scores or pairwise VLM verdicts of an evaluation run, or the W2 residual.

    Writes scores.json, report.md and PNG plots into the run folder and prints a table.

    Example: ht score --judge clip --model tiny
    """
    from htcli.evaluation.report import TABLES
    from htcli.evaluation.score import score

    with steps(f"score {judge.value}") as progress:
        scored = score(judge.value, run=run, model=model, clip_model=clip_model, clip_pretrained=clip_pretrained, pair=pair,
                       backend=backend and backend.value, vlm_model=vlm_model, endpoint=endpoint, timeout=timeout,
                       data=data, hyper=hyper, baselines=baselines, split=split.value, limit_concepts=limit_concepts, seed=seed, device=device,
                       progress=lambda done, total, what: progress.update(done, total, what), say=err.print, warn=warn)
    if as_json:
        typer.echo(dumps_json(scored.section))
        return
    print_table(TABLES[judge.value](scored.section))
    if scored.note:
        note(scored.note)
    console.print(f"report: {', '.join(str(p) for p in scored.files)}")
