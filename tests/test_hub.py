"""The Hub, both ways, offline: the folders `ht hub push` uploads and their cards, and loading by
repo id from a Hub cache laid out here with HF_HUB_OFFLINE=1 (the layout huggingface_hub writes)."""

import re
import shutil

import datasets
import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import constants
from typer.testing import CliRunner

import htcli as ht
import htcli.models
from htcli.cli import app
from htcli.errors import HTError
from htcli.methods.hypernetwork import HyperCheckpoint, HyperConfig, build_hypernetwork
from htcli.models import get_model
from htcli.models.plan import make_plan
from htcli.models.tiny import WEIGHTS_DIR
from htcli.publish import stage

runner = CliRunner()
SHIPPED = WEIGHTS_DIR / "tiny_hyper.safetensors"


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _card_code(folder) -> str:
    """The python block of the card in `folder`, as a reader would copy it."""
    blocks = re.findall(r"^```python\n(.*?)^```", (folder / "README.md").read_text(), re.S | re.M)
    assert len(blocks) == 1
    return blocks[0]


def _maps(spec_id, seed=0) -> ht.Intervention:
    g = torch.Generator().manual_seed(seed)
    layers = make_plan(get_model(spec_id)).layers[:2]
    maps = {layer.name: (1 + 0.1 * torch.randn(layer.width, generator=g), torch.randn(layer.width, generator=g))
            for layer in layers}
    return ht.Intervention(maps, spec_id, "lineas", "art deco", info={"steps": 1000, "residual": 0.52})


def test_hypernetwork_folder_round_trip_and_card(tmp_path):
    kind, folder = stage(SHIPPED, tmp_path / "up", repo_id="me/tiny-ht")
    assert kind == "hypernetwork"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    front = _front_matter((folder / "README.md").read_text())
    assert front["library_name"] == "htcli" and front["license"] == "apache-2.0" and "hypertransport" in front["tags"]
    assert "base_model" not in front  # tiny has random weights: no Hub base model to name
    card = (folder / "README.md").read_text()
    shipped = ht.HyperTransport.from_pretrained(SHIPPED).predictor.checkpoint
    assert f"trained on {len(shipped.training_concepts.names)} concepts" in card
    assert f"| held-out test concepts | {shipped.info['test_residual']:.3f} |" in card
    assert "ht build-dataset --model tiny --out runs/tiny/search-data --extra-concepts EXTRA.txt" in card
    train = shipped.info["config"]
    assert "ht train-hyper --model tiny --data runs/tiny/search-data " in card and f"--steps {train['steps']} " in card
    assert 'from_pretrained("me/tiny-ht")' in card

    saved = ht.HyperTransport.from_pretrained(model="tiny")
    reloaded = ht.HyperTransport.from_pretrained(folder)  # the Hub layout, from a local folder
    again = ht.HyperTransport.from_pretrained(saved.save_pretrained(tmp_path / "saved"))
    for other in (reloaded, again):
        a, b = saved.intervention("art deco"), other.intervention("art deco")
        assert all(torch.equal(a.maps[k][i], b.maps[k][i]) for k in a.maps for i in (0, 1))
        assert other.training_concepts == saved.training_concepts and len(other.training_concepts) > 1000


def test_the_card_names_a_real_base_model_and_its_licence(tmp_path):
    layers = tuple((layer.name, layer.width) for layer in make_plan(get_model("pixart")).layers)
    config = HyperConfig(embed_dim=768, layers=layers, hidden=8, rank=2)
    checkpoint = tmp_path / "pixart" / "hyper.safetensors"
    checkpoint.parent.mkdir()
    HyperCheckpoint(build_hypernetwork(config), config, "pixart", "open_clip:ViT-L-14/openai").save(checkpoint)
    _, folder = stage(checkpoint.parent, tmp_path / "up")
    front = _front_matter((folder / "README.md").read_text())
    assert front["base_model"] == "amd/Nitro-1-PixArt" and front["base_model_relation"] == "adapter"
    assert front["license"] == "openrail++" and "pixart" in front["tags"]
    assert "No held-out results were recorded" in (folder / "README.md").read_text()

    file = _maps("dmd2").save(tmp_path / "art-deco.safetensors")
    kind, folder = stage(file, tmp_path / "intervention", repo_id="me/styles")
    assert kind == "intervention" and sorted(p.name for p in folder.iterdir()) == ["README.md", "art-deco.safetensors"]
    card = (folder / "README.md").read_text()
    front = _front_matter(card)
    assert front["base_model"] == "tianweiy/DMD2" and front["license"] == "cc-by-nc-sa-4.0"
    assert 'ht.Intervention.from_pretrained("me/styles", weight_name="art-deco.safetensors")' in card and "0.520" in card
    assert front["library_version"] == ht.__version__ and front["pipeline_tag"] == "text-to-image"
    assert 'pipe = ht.load_pipeline("dmd2")' in card and "num_inference_steps=4, timesteps=[999, 749, 499, 249]" in card


def test_loading_by_repo_id_from_the_hub_cache_offline(hub_cache, tmp_path):
    _, folder = stage(SHIPPED, tmp_path / "up")
    hub_cache("me/tiny-ht", {p.name: p for p in folder.iterdir()})
    hyper = ht.HyperTransport.from_pretrained("me/tiny-ht")
    assert hyper.model == "tiny" and hyper.predictor.path.name == "model.safetensors"
    assert str(hyper.predictor.path).startswith(constants.HF_HUB_CACHE)
    elsewhere = tmp_path / "moved-cache"  # cache_dir=, as diffusers takes it
    (tmp_path / "hub-cache").rename(elsewhere)
    hyper = ht.HyperTransport.from_pretrained("me/tiny-ht", revision="main", cache_dir=elsewhere)
    assert str(hyper.predictor.path).startswith(str(elsewhere))
    elsewhere.rename(tmp_path / "hub-cache")

    first, second = _maps("tiny"), _maps("tiny", seed=1)
    paths = [first.save(tmp_path / "a.safetensors"), second.save(tmp_path / "b.safetensors")]
    hub_cache("me/styles", {"art/a.safetensors": paths[0], "art/b.safetensors": paths[1]})
    hub_cache("me/one", {"only.safetensors": paths[1]})
    for loaded, expected in ((ht.Intervention.load("me/styles", weight_name="a.safetensors", subfolder="art"), first),
                             (ht.Intervention.load("me/styles/art/b.safetensors"), second),
                             (ht.Intervention.load("me/one"), second)):  # a repo's one file
        assert all(torch.equal(loaded.maps[k][0], expected.maps[k][0]) for k in expected.maps)
    with pytest.raises(HTError, match=r"me/styles: no such local file or folder, and Hub repo me/styles holds 2 "
                                      r"safetensors files \(art/a.safetensors, art/b.safetensors\); name one as "
                                      r"me/styles/FILE"):
        ht.Intervention.load("me/styles")

    at_main = ht.Intervention.from_pretrained("me/styles", "b.safetensors", "art", revision="main", local_files_only=True)
    assert at_main.layers == second.layers
    with pytest.raises(HTError, match="names revision 'v1' but revision='main' was given"):
        ht.Intervention.load("me/styles@v1/art/b.safetensors", revision="main")
    with pytest.raises(HTError, match=r"b.safetensors in Hub repo me/styles folder art at revision 'v1' not in the Hub "
                                      r"cache \(HF_HUB_OFFLINE is set"):
        ht.Intervention.load("me/styles@v1/art/b.safetensors")
    for reference in ("me/styles@main/art/a.safetensors", "me/styles@main/art/a.safetensors:0.5@transformer_blocks.0.*"):
        steered = runner.invoke(app, ["steer", "a cat", "-m", "tiny", "-i", reference, "--out", str(tmp_path / "s")])
        assert steered.exit_code == 0, steered.output  # the revision's '@' is not a layer pattern's
        shutil.rmtree(tmp_path / "s")
    steered = runner.invoke(app, ["steer", "a cat", "-m", "tiny", "-i", "me/styles@v1/art/a.safetensors"])
    assert steered.exit_code == 1 and "in Hub repo me/styles folder art at revision 'v1' not in the Hub cache" \
        in steered.output, steered.output
    inspected = runner.invoke(app, ["inspect", "me/styles@main/art/a.safetensors", "--json"])
    assert inspected.exit_code == 0 and '"concept": "art deco"' in inspected.output
    exported = runner.invoke(app, ["hyper", "export", "--model", "tiny", "--hyper", "me/tiny-ht@main", "-c", "art deco",
                                   "--out", str(tmp_path / "x.safetensors")])
    assert exported.exit_code == 0, exported.output


def test_the_cards_code_runs_as_written(hub_cache, tmp_path, monkeypatch):
    """The usage code of the hypernetwork and intervention cards staged for `tiny`, run as a reader
    pastes it, its repo ids answered by a Hub cache: a pipeline steered with the model's own
    call arguments (a tiny pipeline called without them fails: "Invalid sample size")."""
    _, hyper_folder = stage(SHIPPED, tmp_path / "hyper", repo_id="me/tiny-ht")
    hub_cache("me/tiny-ht", {p.name: p for p in hyper_folder.iterdir()})
    intervention = ht.HyperTransport.from_pretrained(SHIPPED).intervention("ukiyo-e")
    saved = intervention.save_pretrained(tmp_path / "maps", repo_id="me/styles", weight_name="ukiyo-e.safetensors")
    assert sorted(p.name for p in saved.iterdir()) == ["README.md", "ukiyo-e.safetensors"]
    hub_cache("me/styles", {p.name: p for p in saved.iterdir()})
    monkeypatch.chdir(tmp_path)
    for folder, steered in ((hyper_folder, "art_deco"), (saved, "maps")):
        code = _card_code(folder)
        assert 'pipe = ht.load_pipeline("tiny")' in code and "num_inference_steps=1, timesteps=[400]" in code
        namespace = {}
        exec(compile(code, str(folder / "README.md"), "exec"), namespace)
        assert namespace["image"].size == (128, 128) and (tmp_path / "steered.png").is_file()
        assert isinstance(namespace[steered], ht.Intervention) and namespace[steered].model == "tiny"
        (tmp_path / "steered.png").unlink()
    assert namespace["maps"].concept == intervention.concept


@pytest.mark.parametrize("reference,kwargs,message", [
    ("me/absent", {}, r"no intervention file at me/absent: no such local file or folder, and Hub repo me/absent is "
                      r"not in the Hub cache \(HF_HUB_OFFLINE is set"),
    ("me/styles", {"weight_name": "c.safetensors"}, "no intervention file at me/styles: no such local file or folder, "
                                                    "and c.safetensors in Hub repo me/styles not in the Hub cache"),
    ("me/styles/art/c.safetensors", {}, "c.safetensors in Hub repo me/styles folder art not in the Hub cache"),
    ("no-slash.safetensors", {}, "no such file or folder"),
    ("me/styles", {"subfolder": "/etc", "weight_name": "passwd"}, "subfolder '/etc' must be a relative path"),
    ("me/styles/../../x.safetensors", {}, r"me/styles/../../x.safetensors: the path in the repo '../../x.safetensors' "
                                          r"must be a relative path"),
])
def test_a_missing_hub_reference_is_one_line_naming_it(hub_cache, tmp_path, reference, kwargs, message):
    hub_cache("me/styles", {"art/a.safetensors": _maps("tiny").save(tmp_path / "a.safetensors")})
    with pytest.raises(HTError, match=message) as raised:
        ht.Intervention.load(reference, **kwargs)
    assert "\n" not in str(raised.value)
    if not kwargs:  # the command line takes the reference alone
        cli = runner.invoke(app, ["steer", "a cat", "--model", "tiny", "-i", reference])
        assert cli.exit_code == 1 and cli.output.startswith("Error: ") and reference in cli.output, cli.output
        assert cli.output.count("\n") == 1
    hyper = runner.invoke(app, ["serve", "--model", "tiny", "--hyper", "me/absent-hyper"])
    assert hyper.exit_code == 1 and "no hypernetwork at me/absent-hyper: no such local file or folder, and " \
        "model.safetensors or hyper.safetensors in Hub repo me/absent-hyper not in the Hub cache" in hyper.output


def test_push_uploads_the_staged_folder_with_one_call(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, repo_type, folder_path, commit_message):
        files = sorted(p.relative_to(folder_path).as_posix() for p in folder_path.rglob("*") if p.is_file())
        calls.append(("upload_folder", repo_id, repo_type, files))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    result = runner.invoke(app, ["hub", "push", str(SHIPPED), "me/tiny-ht", "--private"])
    assert result.exit_code == 0, result.output
    assert calls == [("create_repo", "me/tiny-ht", {"repo_type": "model", "private": True, "exist_ok": True}),
                     ("upload_folder", "me/tiny-ht", "model", ["README.md", "config.json", "model.safetensors"])]
    calls.clear()
    assert _maps("tiny").push_to_hub("me/styles", weight_name="deco.safetensors") == "https://huggingface.co/me/styles"
    assert calls == [("create_repo", "me/styles", {"repo_type": "model", "private": False, "exist_ok": True}),
                     ("upload_folder", "me/styles", "model", ["README.md", "deco.safetensors"])]
    bad = runner.invoke(app, ["hub", "push", str(SHIPPED), "not a repo"])
    assert bad.exit_code == 1 and "is not a Hub repo id" in bad.output
    weird = runner.invoke(app, ["hub", "push", str(tmp_path), "me/x"])
    assert weird.exit_code == 1 and "is not something ht shares" in weird.output


def test_an_evaluation_run_becomes_an_image_dataset(tmp_path, tiny, monkeypatch, hub_cache):
    monkeypatch.setattr(htcli.models, "load_pipeline", lambda *a, **k: tiny[1])
    run = tmp_path / "run"
    made = runner.invoke(app, ["evaluate", "-m", "tiny", "-c", "art deco", "--prompts", "1", "--seeds", "2",
                               "--methods", "prompt", "--out", str(run)])
    assert made.exit_code == 0, made.output
    staged = runner.invoke(app, ["hub", "stage", str(run), str(tmp_path / "up"), "--repo-id", "me/tiny-eval"])
    assert staged.exit_code == 0 and staged.output.startswith("dataset: 7 files"), staged.output
    folder = tmp_path / "up"
    front = _front_matter((folder / "README.md").read_text())
    assert front["task_categories"] == ["text-to-image"] and front["configs"][0]["data_files"][0]["split"] == "train"
    # `load_dataset` on the folder reads its card's configs, as it would from the Hub repo.
    loaded = datasets.load_dataset(str(folder), split="train", cache_dir=str(tmp_path / "cache"))
    stray = run / "images" / "stray.png"  # a file the index does not list is not part of the dataset
    stray.write_bytes((folder / loaded[0]["image"].filename.split(str(folder) + "/")[1]).read_bytes())
    restaged = runner.invoke(app, ["hub", "stage", str(run), str(tmp_path / "up2")])
    assert restaged.exit_code == 0 and not (tmp_path / "up2" / "images" / "stray.png").exists()
    bad_id = runner.invoke(app, ["hub", "stage", str(run), str(tmp_path / "up3"), "--repo-id", 'a"b/c'])
    assert bad_id.exit_code == 1 and "is not a Hub repo id" in bad_id.output
    assert len(loaded) == 4 and sorted(set(loaded["method"])) == ["none", "prompt"]
    # The card's code as written, the repo in the Hub cache (offline) as a download leaves it.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    hub_cache("me/tiny-eval", {str(p.relative_to(folder)): p for p in folder.rglob("*") if p.is_file()}, "dataset")
    code = _card_code(folder)
    assert 'snapshot_download("me/tiny-eval", repo_type="dataset")' in code
    namespace = {}
    exec(code, namespace)
    assert len(namespace["images"]) == 4 and sorted(set(namespace["images"]["method"])) == ["none", "prompt"]
    row = loaded[0]
    assert row["concept"] == "Art Deco" and np.asarray(row["image"]).shape[-1] == 3
    again = runner.invoke(app, ["hub", "stage", str(run), str(folder)])
    assert again.exit_code == 1 and "is not an empty folder" in again.output


def test_one_version_everywhere(tmp_path):
    """`ht --version`, `htcli.__version__`, the installed package's metadata and the cards'
    `library_version` agree (pyproject.toml reads the version from htcli/__init__.py)."""
    from importlib.metadata import version

    _, folder = stage(SHIPPED, tmp_path / "up")
    cli = runner.invoke(app, ["--version"])
    assert cli.output == f"ht {ht.__version__}\n" and version("htcli") == ht.__version__
    assert _front_matter((folder / "README.md").read_text())["library_version"] == ht.__version__
