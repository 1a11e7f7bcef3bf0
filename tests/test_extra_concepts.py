"""Users' own training concepts: `--extra-concepts FILE` on build-dataset and train-hyper, never
a held-out test concept under another spelling."""

import json

import pytest
from conftest import build_tiny_dataset
from typer.testing import CliRunner

from htcli.cli import app
from htcli.data.concepts import load_library, read_concept_names
from htcli.errors import HTError

runner = CliRunner()
OWN = ["neon watercolor cats", "a rainy tram window"]


def _disguised(name: str) -> str:
    """The same concept, spelt otherwise: upper case, an accent, doubled spaces."""
    accented = name.replace("e", "é", 1) if "e" in name else name.replace("a", "á", 1)
    return "  " + accented.upper().replace(" ", "  ") + " "


def test_held_out_concepts_are_matched_however_spelt():
    library = load_library()
    test_concept = library.targets("test")[0]
    assert library.held_out_match(_disguised(test_concept.name)) == test_concept
    with_alias = next(c for c in library.targets("test") if c.aliases)
    assert library.held_out_match(with_alias.aliases[0].upper()) == with_alias
    assert library.held_out_match(library.targets("train")[0].name) is None
    assert library.held_out_match(OWN[0]) is None
    with pytest.raises(HTError, match="held-out test concept"):
        library.extra_training([OWN[0], _disguised(test_concept.name)])


def test_concept_files_are_read_one_name_per_line(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("# my styles\nneon watercolor cats\n\n  a  rainy tram window  # seen in Lisbon\nneon watercolor cats\n")
    assert read_concept_names(path) == OWN
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(HTError, match="names no concept"):
        read_concept_names(tmp_path / "empty.txt")
    with pytest.raises(HTError, match="is not a file"):
        read_concept_names(tmp_path / "none.txt")


@pytest.fixture(scope="module")
def data_with_extras(tmp_path_factory):
    root = tmp_path_factory.mktemp("extra")
    extras = root / "mine.txt"
    extras.write_text("\n".join(OWN))
    data = build_tiny_dataset(root / "data", train=3, test=1, samples=4, eval_samples=4)
    result = runner.invoke(app, ["build-dataset", "-m", "tiny", "-o", str(data.root), "--extra-concepts", str(extras),
                                 "--samples", "4", "--eval-samples", "4", "--batch-size", "8",
                                 *[arg for name in data.names() for arg in ("--concept", name)]])
    assert result.exit_code == 0, result.output
    return data.root, extras


def test_build_dataset_adds_extra_concepts_and_refuses_test_ones(data_with_extras, tmp_path):
    root, _ = data_with_extras
    manifest = json.loads((root / "manifest.json").read_text())
    assert {c["name"]: c["split"] for c in manifest["concepts"] if c["name"] in OWN} == {name: "free" for name in OWN}

    leak = tmp_path / "leak.txt"
    leak.write_text(OWN[0] + "\n" + _disguised(load_library().targets("test")[0].name))
    result = runner.invoke(app, ["build-dataset", "-m", "tiny", "-o", str(tmp_path / "d"), "--extra-concepts", str(leak)])
    assert result.exit_code == 1 and result.output.count("Error:") == 1 and "held-out test concept" in result.output
    assert not (tmp_path / "d").exists()


def test_train_hyper_trains_on_the_extra_concepts(data_with_extras, tmp_path):
    root, extras = data_with_extras
    args = ["train-hyper", "--data", str(root), "--steps", "2", "--concepts-per-step", "2", "--eval-every", "2",
            "--hidden", "16", "--rank", "2", "--val-fraction", "0"]
    plain = runner.invoke(app, [*args, "--out", str(tmp_path / "plain")])
    mine = runner.invoke(app, [*args, "--out", str(tmp_path / "mine"), "--extra-concepts", str(extras)])
    assert plain.exit_code == 0 and mine.exit_code == 0, plain.output + mine.output
    info = lambda name: json.loads((tmp_path / name / "history.json").read_text())  # noqa: E731
    assert info("plain") and info("mine")
    from htcli.methods.hypernetwork import load_checkpoint

    plain_info = load_checkpoint(tmp_path / "plain" / "hyper.safetensors").info
    mine_info = load_checkpoint(tmp_path / "mine" / "hyper.safetensors").info
    assert mine_info["train_concepts"] == plain_info["train_concepts"] + len(OWN)
    assert tuple(mine_info["config"]["extra_concepts"]) == tuple(OWN)

    missing = tmp_path / "missing.txt"
    missing.write_text("a concept nobody built")
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "x"), "--extra-concepts", str(missing)])
    assert result.exit_code == 1 and "`ht build-dataset` (--extra-concepts FILE" in result.output
    leak = tmp_path / "leak.txt"
    leak.write_text(_disguised(load_library().targets("test")[0].name))
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "y"), "--extra-concepts", str(leak)])
    assert result.exit_code == 1 and "held-out test concept" in result.output
