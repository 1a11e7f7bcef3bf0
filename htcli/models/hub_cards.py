"""Hub model cards and uploads: the front matter every card carries, the usage code that runs
as written, and the one `huggingface_hub` upload of a staged folder.

Front matter: `library_name: htcli`, `library_version`, `pipeline_tag: text-to-image`, the base
model's licence, tags, and for a real model `base_model` (the diffusion model's Hub repo) with
`base_model_relation: adapter`. The usage code builds the model's pipeline
(`ht.load_pipeline`) and calls it with the arguments the model samples with (its steps, schedule,
guidance and resolution: `ModelSpec.pipeline_kwargs`), written out as values.
`htcli.publish` writes the folders; `ht.Intervention.save_pretrained` writes an intervention's.
"""

from __future__ import annotations

import json
import shlex
import textwrap
from pathlib import Path
from typing import Any

from htcli import __version__
from htcli.errors import HTError
from htcli.models.spec import get_model

CARD = "README.md"
PROMPT = "a lighthouse on a cliff"
TAGS = ["ht", "hypertransport", "activation-steering", "optimal-transport", "diffusers", "text-to-image"]


def front_matter(model: str, dataset: bool = False, **extra: Any) -> dict:
    """A card's metadata for an artifact made for the model spec `model`."""
    spec = get_model(model)
    data = {"license": spec.hub_license, "tags": TAGS + [spec.family, model]}
    if not dataset:  # a dataset card names its model in the text
        data |= {"library_name": "htcli", "library_version": __version__, "pipeline_tag": "text-to-image"}
        if spec.base_model:
            data |= {"base_model": spec.base_model, "base_model_relation": "adapter"}
    return data | extra


def card(front: dict, body: str, dataset: bool = False) -> str:
    """README.md text: the YAML front matter (checked by huggingface_hub's card data) and the body."""
    from huggingface_hub import DatasetCardData, ModelCardData

    data = DatasetCardData(**front) if dataset else ModelCardData(**front)
    return f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n"


def base_line(model: str) -> str:
    """The base model in a sentence: its description, Hub weights and licence."""
    spec = get_model(model)
    if spec.base_model:
        return f"`{model}` ({spec.description}; weights `{spec.base_model}`, licence: {spec.licence})"
    return f"`{model}` ({spec.description}; not on the Hub: for tests and demos)"


def steered_call(model: str, load: str, steer: str) -> str:
    """Python that builds `model`'s pipeline, runs `load` (which defines the maps as `steer`
    names them) and generates one steered image with the model's own sampling arguments."""
    spec = get_model(model)
    arguments = ", ".join(f"{name}={value!r}" for name, value in spec.pipeline_kwargs().items())
    call = "\n".join(textwrap.wrap(f'image = pipe("{PROMPT}", {arguments}).images[0]', width=100,
                                   subsequent_indent=" " * len("image = pipe("), break_long_words=False,
                                   break_on_hyphens=False))
    noise = "  # tiny has random weights: the image is noise" if not spec.base_model else ""
    return f"""import htcli as ht

pipe = ht.load_pipeline({json.dumps(model)}){noise}
{load}
with ht.apply(pipe, {steer}, strength=0.6):
{textwrap.indent(call, "    ")}
image.save("steered.png")"""


def intervention_card(intervention: Any, file_name: str, repo_id: str) -> str:
    """The model card of an intervention file `file_name` (an `ht.Intervention`'s maps) in `repo_id`."""
    model = intervention.model
    steps = intervention.info.get("steps")
    fit = f" ({steps} steps)" if steps else ""
    residual = intervention.info.get("residual")
    result = (f"Held-out residual ratio on its evaluation samples: {residual:.3f}."
              if isinstance(residual, (int, float)) else "")
    load = f"maps = ht.Intervention.from_pretrained({json.dumps(repo_id)}, weight_name={json.dumps(file_name)})"
    body = f"""
# `{intervention.concept}`: an ht intervention for `{model}`

Per-neuron affine maps, method `{intervention.method}`{fit}, for {len(intervention.maps)} layers
({sum(intervention.widths.values()):,} neurons) of {base_line(model)}. {result}

## Use

```python
{steered_call(model, load, "maps")}
```

or `ht steer "{PROMPT}" --model {model} -i {shlex.quote(f"{repo_id}/{file_name}")}`.
"""
    return card(front_matter(model), body)


def check_repo_id(repo_id: str) -> None:
    """HTError unless `repo_id` is a Hub repo id, user/name."""
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as error:
        raise HTError(f"{repo_id!r} is not a Hub repo id (user/name): {error}") from None
    if repo_id.count("/") != 1:
        raise HTError(f"{repo_id!r} is not a Hub repo id: write user/name")


def upload(folder: Path, repo_id: str, kind: str, private: bool = False, token: str | None = None) -> str:
    """Upload the staged `folder` to the Hub repo `repo_id` (a dataset repo for an evaluation run,
    else a model repo), creating it if need be, in one commit; returns the repo's URL."""
    from huggingface_hub import HfApi

    repo_type = "dataset" if kind == "dataset" else "model"
    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, repo_type=repo_type, folder_path=folder,
                      commit_message=f"Upload {kind} with ht {__version__}")
    return str(url)
