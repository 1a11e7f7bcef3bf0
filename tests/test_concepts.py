"""The concept library: bundled data, validation of user files, the split, slugs and the CLI."""

from __future__ import annotations

import json
import re
import shutil
import unicodedata

import pytest
import yaml
from typer.testing import CliRunner

from htcli.cli import app
from htcli.data.concept_files import (
    CATEGORY_COUNTS,
    DEFAULT_TEMPLATE,
    SOURCE_CATEGORY,
    SPLIT_FILE,
)
from htcli.data.concepts import (
    FREE_TEXT_CATEGORY,
    TEST_SIZE,
    Concept,
    apportion,
    default_dir,
    load_library,
    make_split,
    slugify,
    validate_library,
)
from htcli.errors import HTError

runner = CliRunner()


@pytest.fixture(scope="module")
def library():
    return load_library()


def invoke(*args: str):
    return runner.invoke(app, ["concepts", *args])


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("Error:")]


# --- The bundled library ----------------------------------------------------------------------


def test_counts_match_the_paper(library):
    assert len(library) == 777
    assert len(library.targets()) == 776 == sum(CATEGORY_COUNTS.values())
    assert {c: len(library.targets(category=c)) for c in library.categories()} == CATEGORY_COUNTS
    assert library.source.category == SOURCE_CATEGORY
    assert library.source.apply("a cat") == "a cat"
    assert validate_library() == []


def test_split_is_stratified_in_proportion(library):
    test = library.targets("test")
    assert len(test) == TEST_SIZE
    assert len(library.targets("train")) == 776 - TEST_SIZE
    assert library.source not in test and library.split_of(library.source.name) is None
    for category, size in CATEGORY_COUNTS.items():
        held_out = len(library.targets("test", category))
        assert abs(held_out - TEST_SIZE * size / 776) < 1, category
    assert apportion(CATEGORY_COUNTS, TEST_SIZE) == {
        c: len(library.targets("test", c)) for c in CATEGORY_COUNTS
    }


def test_stored_split_is_the_one_its_seed_gives(library):
    stored = yaml.safe_load((default_dir() / SPLIT_FILE).read_text(encoding="utf-8"))
    assert stored["test_size"] == TEST_SIZE and stored["seed"] == library.split_seed
    assert make_split(library.targets(), stored["seed"], TEST_SIZE) == stored["test"]
    assert make_split(library.targets(), stored["seed"] + 1, TEST_SIZE) != stored["test"]


def test_split_command_regenerates_the_file_identically(tmp_path, monkeypatch):
    copy = tmp_path / "library"
    shutil.copytree(default_dir(), copy)
    monkeypatch.setenv("HT_CONCEPTS", str(copy))
    original = (copy / SPLIT_FILE).read_bytes()
    (copy / SPLIT_FILE).unlink()
    for _ in range(2):
        result = invoke("split")
        assert result.exit_code == 0, result.output
        assert (copy / SPLIT_FILE).read_bytes() == original
    assert not list(copy.glob(".split-*"))  # the temporary file was renamed into place
    too_big = invoke("split", "--test-size", "9999")
    assert too_big.exit_code == 1 and len(error_lines(too_big)) == 1 and "9999" in too_big.output
    assert (copy / SPLIT_FILE).read_bytes() == original
    assert invoke("split", "--seed", "1").exit_code == 0
    assert (copy / SPLIT_FILE).read_bytes() != original
    assert invoke("list", "--split", "test", "--json").exit_code == 0  # a new seed is still valid


def test_every_template_fills_in_prompt_and_name(library):
    for concept in library.targets():
        for i in range(len(concept.templates)):
            text = concept.apply("a cat on a chair", i)
            assert "a cat on a chair" in text and concept.name in text and "{" not in text
    watercolor = library.get("watercolor")
    assert watercolor.apply("a cat", 0) == watercolor.apply("a cat", len(watercolor.templates))


def _loose_key(name: str) -> str:
    """Normalise harder than the validator: accents, punctuation, plurals, 'style'/'art' suffixes."""
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()
    words = re.sub(r"[^a-z0-9]+", " ", text).split()
    while len(words) > 1 and words[-1] in {"style", "art", "artwork", "aesthetic", "painting"}:
        words.pop()
    return " ".join(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in words)


def test_no_near_duplicate_names(library):
    seen: dict[str, str] = {}
    for concept in library:
        for text in (concept.name, *concept.aliases):
            key = _loose_key(text)
            assert seen.setdefault(key, concept.name) == concept.name, (text, seen[key])


# Words that would give a source prompt a style, medium, era, colour or lighting of its own.
STYLE_WORDS = set(
    """painting painted paint photo photograph photography drawing sketch illustration render style
    art artistic artwork vintage retro antique neon cinematic film movie sepia monochrome black white
    red blue green yellow orange purple pink gold golden silver brown gray grey colorful colourful
    color colour pastel vivid bright dark night sunset sunrise dusk dawn twilight moonlit fog foggy
    mist misty rain rainy snow snowy storm stormy medieval ancient victorian futuristic modern baroque
    gothic fantasy magical surreal dreamy anime cartoon digital pixel watercolor oil sculpture glowing
    lighting shadow""".split()
)


def _words(text: str) -> str:
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return " " + " ".join(re.sub(r"[^a-z0-9]+", " ", text).split()) + " "


def test_source_prompts_are_many_neutral_and_free_of_concept_names(library):
    prompts = library.source_prompts()
    assert len(prompts) >= 400 and len(set(prompts)) == len(prompts)
    names = {_words(t) for c in library.targets() for t in (c.name, *c.aliases)}
    for prompt in prompts:
        words = _words(prompt)
        assert not {w for w in words.split() if w in STYLE_WORDS}, prompt
        assert not [n for n in names if n in words], prompt


# --- Lookup, free text and slugs ----------------------------------------------------------------


def test_lookup_by_name_and_alias_ignores_case_and_spaces(library):
    assert library.get("  AQUARELLE ").name == "watercolor"
    assert library.get("salvador dali").name == "Salvador Dalí"
    assert library.get("art-nouveau").name == "Art Nouveau"  # by slug
    assert "jugendstil" in library and "no such thing" not in library
    with pytest.raises(HTError, match=r"unknown concept 'impresionism'; did you mean 'Impressionism'"):
        library.get("impresionism")


def test_free_text_concepts_use_the_default_template(library):
    concept = library.resolve("  a   melting clock ")
    assert concept == Concept("a melting clock", FREE_TEXT_CATEGORY)
    assert not concept.in_library and concept.templates == (DEFAULT_TEMPLATE,)
    assert concept.apply("a cat") == "a cat, in the style of a melting clock"
    assert library.resolve("Watercolour") is library.get("watercolor")
    with pytest.raises(HTError):
        library.resolve("   ")


def test_slugs_are_safe_and_unique(library):
    slugs = [c.slug for c in library]
    assert len(set(slugs)) == len(slugs)
    tricky = ["../etc/passwd", "CON", "東京", "Dalí", "Dali", "a" * 300, "Ünïcödé", "x\ty", "-_-x"]
    for slug in slugs + [slugify(name) for name in tricky]:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", slug), slug
        assert len(slug) <= 90 and slug not in {"con", "nul"}
    assert slugify("Dalí") != slugify("Dali") == "dali"
    assert slugify("東京") != slugify("京都")
    assert slugify("Dalí") == slugify("  DALÍ ")  # stable, case-insensitive
    with pytest.raises(HTError):
        slugify("  ")


# --- The CLI ------------------------------------------------------------------------------------


def test_list_json_counts():
    everything = json.loads(invoke("list", "--json").output)
    assert len(everything) == 777
    assert sum(row["category"] == SOURCE_CATEGORY for row in everything) == 1
    assert len(json.loads(invoke("list", "--split", "test", "--json").output)) == TEST_SIZE
    assert len(json.loads(invoke("list", "--split", "train", "--json").output)) == 776 - TEST_SIZE
    rows = json.loads(invoke("list", "--category", "individual artists", "--json").output)
    assert len(rows) == 61 and {"name", "category", "split", "slug", "templates"} <= set(rows[0])


def test_list_table_show_and_validate():
    result = invoke("list", "--split", "test")
    assert result.exit_code == 0 and "167 concepts" in result.output
    result = invoke("show", "aquarelle")
    assert result.exit_code == 0 and "Art Techniques" in result.output
    result = invoke("show", "a melting clock")
    assert (
        result.exit_code == 0 and "outside the library" in result.output and DEFAULT_TEMPLATE in result.output
    )
    result = invoke("validate")
    assert result.exit_code == 0 and "777 concepts" in result.output
    result = invoke("list", "--category", "Art Tech")
    assert result.exit_code == 1 and error_lines(result) and "did you mean 'Art Techniques'" in result.output


def test_user_directories_add_concepts(tmp_path):
    (tmp_path / "mine.yaml").write_text(
        "category: My Styles\ntemplates: ['{prompt}, drawn as {concept}']\n"
        "concepts:\n  - name: crayon scribble\n    aliases: [scribbles]\n",
        encoding="utf-8",
    )
    library = load_library([tmp_path])
    assert len(library) == 778 and library.split_of("scribbles") == "train"
    assert library.get("crayon scribble").apply("a cat") == "a cat, drawn as crayon scribble"
    assert len(json.loads(invoke("list", "--concepts", str(tmp_path), "--json").output)) == 778
    assert (
        len(json.loads(invoke("list", "--concepts", str(tmp_path), "--split", "test", "--json").output))
        == 167
    )
    assert invoke("validate", "--concepts", str(tmp_path)).exit_code == 0
    for missing in ("list", "show x", "validate"):
        result = invoke(*missing.split(), "--concepts", str(tmp_path / "nowhere"))
        assert result.exit_code == 1 and f"--concepts {tmp_path / 'nowhere'} does not exist" in result.output


def test_library_summary_counts_categories_and_the_split(library):
    summary = library.summary()
    assert summary["concepts"] == 777 and summary["targets"] == 776 and summary["prompts"] == len(library.prompts)
    assert {c: row["concepts"] for c, row in summary["categories"].items()} == CATEGORY_COUNTS
    assert summary["test"] == sum(row["test"] for row in summary["categories"].values()) == TEST_SIZE
    assert summary["train"] == 776 - TEST_SIZE and summary["split_seed"] == 0
    for category, row in summary["categories"].items():
        assert row["test"] == len(library.targets("test", category))
    result = invoke("validate")
    assert "in 10 categories, 495 source prompts; split seed 0: 167 test, 609 train" in result.output


def test_list_table_is_not_cut_when_output_is_not_a_terminal(tmp_path):
    # CliRunner's output is not a terminal: the table must keep its natural width, not 80 columns.
    name = "an extraordinarily long user concept name that " + "keeps going " * 3 + "to the end"
    description = "a description that is also much longer than eighty columns, " * 2 + "whole"
    (tmp_path / "long.yaml").write_text(
        f"category: Long Names\ntemplates: ['{{prompt}}, {{concept}}']\n"
        f"concepts:\n  - name: {name}\n    description: {description}\n",
        encoding="utf-8",
    )
    result = invoke("list", "--concepts", str(tmp_path), "--category", "long names")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].strip() == "1 concept"  # the title, in the singular
    row = next(line for line in result.output.splitlines() if "extraordinarily" in line)
    assert name in row and description in row  # each on one line, whole
    assert len(row) > 80 + len(description)


def test_table_title_longer_than_its_columns_is_not_wrapped():
    import io

    from rich.console import Console
    from rich.table import Table

    from htcli.cli.output import print_table

    title = "Transport judge: 1 held-out concept, W2 residual ratio (lower is better)"
    table = Table(title=title)
    table.add_column("method")
    table.add_row("none")
    out = io.StringIO()
    print_table(table, Console(file=out))  # not a terminal: natural width
    assert out.getvalue().splitlines()[0].strip() == title


# --- Bad input: one line that names the file and the entry, and a non-zero exit ---------------

GOOD = "category: Mine\ntemplates: ['{prompt}, {concept}']\nconcepts:\n"
BAD_FILES = {
    "duplicate-in-file": (
        {"a.yaml": GOOD + "  - name: foo bar\n  - name: ' Foo  Bar'\n"},
        "a.yaml",
        "Foo  Bar",
    ),
    "duplicate-across-user-files": (
        {"a.yaml": GOOD + "  - name: zig\n", "b.yaml": GOOD + "  - name: ZIG\n"},
        "b.yaml",
        "ZIG",
    ),
    "duplicate-of-bundled": ({"a.yaml": GOOD + "  - name: Watercolor\n"}, "a.yaml", "art_techniques.yaml"),
    "alias-of-bundled": (
        {"a.yaml": GOOD + "  - name: new one\n    aliases: [Aquarelle]\n"},
        "a.yaml",
        "Aquarelle",
    ),
    "same-file-name": ({"a.yaml": GOOD + "  - name: Oil-Painting\n"}, "a.yaml", "Oil-Painting"),
    "missing-name": ({"a.yaml": GOOD + "  - description: no name\n"}, "a.yaml", "concept #1"),
    "missing-category": (
        {"a.yaml": "templates: ['{prompt}, {concept}']\nconcepts:\n  - name: x\n"},
        "a.yaml",
        "'category'",
    ),
    "missing-templates": ({"a.yaml": "category: Mine\nconcepts:\n  - name: x\n"}, "a.yaml", "'templates'"),
    "name-not-a-string": ({"a.yaml": GOOD + "  - name: 42\n"}, "a.yaml", "concept #1"),
    "aliases-not-a-list": ({"a.yaml": GOOD + "  - name: foo\n    aliases: bar\n"}, "a.yaml", "'foo'"),
    "templates-not-a-list": (
        {"a.yaml": "category: Mine\ntemplates: '{prompt}'\nconcepts: [{name: x}]\n"},
        "a.yaml",
        "'templates'",
    ),
    "concepts-not-a-list": (
        {"a.yaml": "category: Mine\ntemplates: ['{prompt}, {concept}']\nconcepts: x\n"},
        "a.yaml",
        "'concepts'",
    ),
    "entry-not-a-mapping": ({"a.yaml": GOOD + "  - just a string\n"}, "a.yaml", "concept #1"),
    "unknown-field": ({"a.yaml": GOOD + "  - name: foo\n    desc: typo\n"}, "a.yaml", "'desc'"),
    "unknown-placeholder": (
        {"a.yaml": "category: Mine\ntemplates: ['{prompt} by {artist}']\nconcepts: [{name: x}]\n"},
        "a.yaml",
        "{artist}",
    ),
    "missing-placeholder": (
        {"a.yaml": "category: Mine\ntemplates: ['{prompt} alone']\nconcepts: [{name: x}]\n"},
        "a.yaml",
        "{concept}",
    ),
    "format-spec": (
        {"a.yaml": "category: Mine\ntemplates: ['{prompt} {concept!r}']\nconcepts: [{name: x}]\n"},
        "a.yaml",
        "template #1",
    ),
    "bad-braces": (
        {"a.yaml": "category: Mine\ntemplates: ['{prompt} {concept']\nconcepts: [{name: x}]\n"},
        "a.yaml",
        "template #1",
    ),
    "empty-file": ({"a.yaml": ""}, "a.yaml", "empty"),
    "comments-only": ({"a.yaml": "# nothing here yet\n"}, "a.yaml", "empty"),
    "not-utf8": ({"a.yaml": (GOOD + "  - name: caf\xe9\n").encode("latin-1")}, "a.yaml", "UTF-8"),
    "invalid-yaml": ({"a.yaml": GOOD + "  - name: [unclosed\n"}, "a.yaml", "line"),
    "duplicate-key": ({"a.yaml": GOOD + "  - name: foo\n    name: bar\n"}, "a.yaml", "'name'"),
    "name-with-slash": ({"a.yaml": GOOD + "  - name: pen/ink\n"}, "a.yaml", "pen/ink"),
    "name-with-dots": ({"a.yaml": GOOD + "  - name: a..b\n"}, "a.yaml", "a..b"),
    "name-with-backslash": ({"a.yaml": GOOD + "  - name: 'a\\b'\n"}, "a.yaml", "file name"),
    "name-leading-dot": ({"a.yaml": GOOD + "  - name: .hidden\n"}, "a.yaml", ".hidden"),
    "name-control-char": ({"a.yaml": GOOD + '  - name: "tab\\there"\n'}, "a.yaml", "control character"),
    "name-too-long": ({"a.yaml": GOOD + f"  - name: {'x' * 101}\n"}, "a.yaml", "101 characters"),
    "second-source": (
        {"a.yaml": "category: Source\ntemplates: ['{prompt}']\nconcepts: [{name: blank}]\n"},
        "a.yaml",
        "'blank'",
    ),
    "split-in-user-dir": (
        {"a.yaml": GOOD + "  - name: foo\n", "split.yaml": "seed: 0\n"},
        "split.yaml",
        "split.yaml",
    ),
    "no-yaml-files": ({"notes.txt": "hello"}, "", "no concept files"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_user_files_give_one_line_errors(tmp_path, case):
    files, where, entry = BAD_FILES[case]
    for name, content in files.items():
        data = content if isinstance(content, bytes) else content.encode("utf-8")
        (tmp_path / name).write_bytes(data)
    for args in (["validate", "--concepts", str(tmp_path)], ["list", "--concepts", str(tmp_path)]):
        result = invoke(*args)
        assert result.exit_code != 0, (case, args, result.output)
        lines = error_lines(result)
        assert len(lines) == 1, (case, result.output)
        assert where in lines[0] and entry in lines[0], (case, lines[0])
    with pytest.raises(HTError):
        load_library([tmp_path])


def test_wrong_counts_or_stale_split_in_the_bundled_library(tmp_path, monkeypatch):
    copy = tmp_path / "library"
    shutil.copytree(default_dir(), copy)
    monkeypatch.setenv("HT_CONCEPTS", str(copy))
    split = copy / SPLIT_FILE
    text = split.read_text(encoding="utf-8")
    stored = yaml.safe_load(text)["test"]["Art Techniques"][0]
    split.write_text(text.replace(f"  - {stored}\n", "  - oil painting\n", 1), encoding="utf-8")
    assert any("stored split" in p and SPLIT_FILE in p for p in validate_library())
    split.write_text(text, encoding="utf-8")

    digital = copy / "digital_methods.yaml"
    digital.write_text(
        digital.read_text(encoding="utf-8").replace(
            "  - name: pixel art\n", "  - name: pixel art\n  - name: pixel mosaic\n"
        ),
        encoding="utf-8",
    )
    result = invoke("validate")
    assert result.exit_code == 1
    lines = error_lines(result)
    assert len(lines) == 1 and "digital_methods.yaml" in lines[0] and "has 45 concepts" in lines[0]
