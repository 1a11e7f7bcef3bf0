"""`evaluate`: choose the methods and concepts of an evaluation run, then generate what it lacks.

Methods are `prompt`, `hypertransport` (a `Predictor` on the model's checkpoint) and every
baseline folder found (`--baselines`, default runs/<model>/baselines). With baselines, only
the concepts every baseline has fitted are evaluated, so the methods are compared on the
same concepts; `limit_concepts` then takes a seeded sample of those.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

from htcli.core.files import check_output_dir
from htcli.data.concepts import Concept
from htcli.data.dataset import check_limit
from htcli.errors import HTError
from htcli.evaluation.runs import (
    EvalRun,
    Method,
    Progress,
    default_out,
    eval_seeds,
    find_baselines,
    latest_run,
    run_evaluation,
    select_prompts,
)
from htcli.evaluation.stats import plural

BUILT_IN = ("prompt", "hypertransport")
RANDOM_NOTE = "{model} has random weights: its images are noise, so CLIP and VLM scores test the pipeline, not steering"


def parse_methods(wanted: str | Sequence[str] | None, found: Sequence[str]) -> list[str]:
    """The methods asked for (comma-separated or a list), checked against those available;
    None means all of them. `none` is accepted and dropped: it is always generated."""
    known = [*BUILT_IN, *found]
    if wanted is None:
        return known
    names = [m.strip() for m in (wanted.split(",") if isinstance(wanted, str) else wanted) if m.strip()]
    for name in names:
        if name not in known and name != "none":
            raise HTError(f"unknown method {name!r} for methods=; available here: {', '.join(known)} "
                          "(baselines come from baselines= folders)")
    if not names:
        raise HTError("methods= is empty; name at least one of " + ", ".join(known))
    return [n for n in dict.fromkeys(names) if n != "none"]


def build_methods(names: Sequence[str], baselines: dict[str, Path], model: str, hyper: Path | None,
                  device: str = "cpu") -> list[Method]:
    """Method objects for `names`; the hypernetwork is loaded (and checked against `model`) only if asked."""
    from htcli.methods.predict import Predictor, resolve_checkpoint

    methods = []
    for name in names:
        if name == "prompt":
            methods.append(Method("prompt", "prompt"))
        elif name == "hypertransport":
            path = resolve_checkpoint(hyper, model)
            methods.append(Method("hypertransport", "hypertransport", path, Predictor.load(path, model=model, device=device)))
        else:
            methods.append(Method(name, "baseline", baselines[name]))
    return methods


def covered_concepts(concepts: Sequence[Concept], methods: Sequence[Method], explicit: bool) -> list[Concept]:
    """The concepts every baseline has a file for. With `explicit` (the user named the concepts)
    a missing file is an error, not a silent drop."""
    kept = list(concepts)
    for method in methods:
        if method.kind != "baseline":
            continue
        missing = [c for c in kept if not method.file(c).is_file()]
        if missing and explicit:
            raise HTError(f"baseline {method.name!r} has no file for {missing[0].name!r} in {method.source}; fit it with "
                          f"`ht fit-linear-baselines` (method={method.name!r}, concept={missing[0].name!r})")
        kept = [c for c in kept if c not in missing]
    return kept


def evaluate(
    model: str | None = None,
    *,
    hyper: Path | None = None,
    baselines: Sequence[Path] | None = None,
    concepts: Sequence[str] = (),
    split: str = "test",
    limit_concepts: int | None = None,
    prompts: int = 4,
    seeds: int = 2,
    seed: int = 0,
    strengths: str | Sequence[float] = "0.5,1",
    methods: str | Sequence[str] | None = None,
    out: Path | None = None,
    resume: bool = False,
    model_path: str | None = None,
    device: str | None = None,
    progress: Progress | None = None,
    warn: Callable[[str], None] | None = None,
    note: Callable[[str], None] | None = None,
) -> dict:
    """Generate concepts x prompts x seeds with every chosen method (same seeds) into a run folder.

    Every input is checked before anything heavy loads; an existing run (`out`, or the latest
    with `resume`) gets only the images it lacks. Returns counts, the run folder, the concepts,
    prompts, seeds and methods used. `warn` hears about strengths above 1; `note` which concepts
    every baseline covers, when baselines narrow the split.
    """
    from htcli.core.runtime import resolve_device, run_path
    from htcli.core.strength import check_strength, extrapolation_notes, parse_strengths
    from htcli.data.concepts import load_library
    from htcli.data.dataset import select_concepts
    from htcli.models import get_model, load_pipeline

    say, tell = warn or (lambda text: None), note or (lambda text: None)
    # 1. Every input checked before loading anything heavy.
    spec = get_model(model)
    strength_list = parse_strengths(strengths) if isinstance(strengths, str) else [check_strength(s) for s in strengths]
    for text in extrapolation_notes(strength_list):
        say(text)
    if out is not None and resume:
        raise HTError("give out= (an existing run continues) or resume=True (the latest run), not both")
    if out is not None:
        check_output_dir(out)
    check_limit(limit_concepts)
    library = load_library()
    chosen = select_concepts(library, split, concepts)
    prompt_list, seed_list = select_prompts(library, prompts, seed), eval_seeds(seed, seeds)
    default_baselines = run_path(spec.id, "baselines")
    folders = list(baselines or ([default_baselines] if default_baselines.is_dir() else []))
    found = find_baselines(folders)
    names = parse_methods(methods, list(found))
    torch_device = resolve_device(device)
    root = latest_run(spec.id) if resume else out or default_out(spec.id)
    run = EvalRun.open_or_create(root, spec.id)  # another model's run, or a folder of other files, is refused here

    # 2. The methods, and the concepts every baseline has fitted (a paired comparison).
    chosen_methods = build_methods(names, found, spec.id, hyper, str(torch_device))
    chosen = covered_concepts(chosen, chosen_methods, explicit=bool(concepts))
    if not chosen:
        raise HTError(f"no concepts to evaluate: the baselines in {', '.join(map(str, folders))} fit none of the "
                      f"{split} concepts; pass concept= or methods= without them")
    if limit_concepts is not None and not concepts:  # a seeded sample of what every method covers
        chosen = sorted(random.Random(seed).sample(chosen, min(limit_concepts, len(chosen))), key=lambda c: c.name.lower())
    if any(m.kind == "baseline" for m in chosen_methods) and not concepts:
        which = "" if split == "all" else f"{split} "
        tell(f"evaluating {plural(len(chosen), which + 'concept')} that every baseline has fitted")

    # 3. Generate what the run lacks.
    before = len(run.records)
    summary = run_evaluation(spec, run, chosen, prompt_list, seed_list, strength_list, chosen_methods,
                             lambda: load_pipeline(spec, model_path=model_path, device=torch_device), progress)
    return summary | {"model": spec.id, "already_there": before, "concept_names": [c.name for c in chosen],
                      "prompts": prompt_list, "seeds": seed_list,
                      "note": RANDOM_NOTE.format(model=spec.id) if spec.offline else None}
