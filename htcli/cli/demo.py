"""`ht demo`: the whole pipeline on the offline tiny model, with a report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markdown import Markdown

from htcli.cli.app import app
from htcli.cli.output import console, steps


@app.command("demo")
def demo_command(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder. Default: runs/tiny/demo.")] = None,
    test_concepts: Annotated[int, typer.Option(help="Held-out concepts to compare on.")] = 6,
    lineas_steps: Annotated[int, typer.Option(help="LinEAS steps per held-out concept.")] = 120,
    retrain: Annotated[bool, typer.Option("--retrain", help="Train a small hypernetwork here instead of using the shipped one (minutes).")] = False,
    train_concepts: Annotated[int, typer.Option(help="With --retrain: training concepts (a tenth validate).")] = 60,
    train_steps: Annotated[int, typer.Option(help="With --retrain: hypernetwork training steps.")] = 300,
    seed: Annotated[int, typer.Option(help="Seed for concept choice, prompts and noise.")] = 0,
) -> None:
    """Run the whole method offline on `tiny` and write a report (under 2 minutes on 2 CPU cores).

    Builds a dataset of held-out concepts, fits mean shift, Linear-AcT and LinEAS on them,
    predicts their maps with the hypernetwork shipped for `tiny` (trained on other concepts;
    --retrain trains one here instead), compares them in activation space, and steers a prompt
    with a strength sweep. `tiny` has random weights: its images are noise.

    Example: ht demo
    """
    from htcli.core.runtime import run_path
    from htcli.demo import DemoConfig, run_demo

    folder = out or run_path("tiny", "demo")
    config = DemoConfig(test_concepts=test_concepts, lineas_steps=lineas_steps, retrain=retrain,
                        train_concepts=train_concepts, train_steps=train_steps, seed=seed)
    with steps("demo", 5) as progress:
        run_demo(folder, config, progress=lambda done, total, what: progress.update(done, total, what))
    report = (folder / "report.md").read_text(encoding="utf-8")
    if console.is_terminal:
        console.print(Markdown(report))
    else:  # a log file gets the report's own text: nothing cut at 80 columns, the image line as written
        typer.echo(report.rstrip("\n"))
    console.print(f"[green]report[/] {folder / 'report.md'} (plot: residuals.png, sweep: sweep.png, numbers: summary.json)")
