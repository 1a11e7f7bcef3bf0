"""The concept library: look concepts up by name or alias, list them, and hold out a test split.

The bundled library holds the paper's 776 target concepts in ten categories plus one generic
source concept; user directories add to it (their files are read and checked by
`htcli.data.concept_files`). Text that names no library concept is a valid concept too: a
free-text concept with the default template. The held-out split (`split.yaml`) is stratified by
category and fixed by a seed, and loading checks that the stored file is exactly what its seed
gives.
"""

from __future__ import annotations

import difflib
import os
import random
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from htcli.core.files import atomic_path
from htcli.data.concept_files import (
    PROMPTS_FILE,
    SOURCE_CATEGORY,
    SPLIT_FILE,
    Concept,
    normalize,
    read_files,
    read_yaml,
    show_path,
    slugify,
)
from htcli.errors import HTError

FREE_TEXT_CATEGORY = "Free text"
TEST_SIZE = 167
DEFAULT_SEED = 0


def default_dir() -> Path:
    """The bundled library: $HT_CONCEPTS, else the repo's `concepts/`, else the packaged copy."""
    if env := os.environ.get("HT_CONCEPTS"):
        if not Path(env).expanduser().is_dir():
            raise HTError(f"HT_CONCEPTS={env!r} is not a directory; point it at a concept library")
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[2] / "concepts"
    if (repo / PROMPTS_FILE).is_file():
        return repo
    packaged = Path(str(resources.files("htcli") / "concept_library"))
    if packaged.is_dir():
        return packaged
    raise HTError("cannot find the bundled concept library; set HT_CONCEPTS to its directory")


class ConceptLibrary:
    """All concepts (bundled first, then user directories), the source prompts and the split."""

    def __init__(
        self,
        concepts: Sequence[Concept],
        prompts: Sequence[str] = (),
        test_names: Iterable[str] = (),
        split_seed: int | None = None,
    ) -> None:
        self.concepts = tuple(concepts)
        self.prompts = tuple(prompts)
        self.split_seed = split_seed  # None when there is no split file
        self._test = frozenset(normalize(name) for name in test_names)
        self._index: dict[str, Concept] = {}  # normalized name, alias or slug -> concept
        for concept in self.concepts:
            for key in (normalize(concept.name), *map(normalize, concept.aliases), concept.slug):
                self._index.setdefault(key, concept)

    def __len__(self) -> int:
        return len(self.concepts)

    def __iter__(self) -> Iterator[Concept]:
        return iter(self.concepts)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._lookup(name) is not None

    def _lookup(self, name: str) -> Concept | None:
        key = normalize(name)
        return (self._index.get(key) or self._index.get(slugify(key))) if key else None

    def close_matches(self, name: str, n: int = 3) -> list[str]:
        """Library names that look like `name` (or whose aliases do), best first."""
        keys = difflib.get_close_matches(normalize(name), list(self._index), n=n * 2, cutoff=0.6)
        return list(dict.fromkeys(self._index[key].name for key in keys))[:n]

    def get(self, name: str) -> Concept:
        """A library concept by name or alias (case- and whitespace-insensitive)."""
        concept = self._lookup(name)
        if concept is None:
            close = self.close_matches(name)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise HTError(f"unknown concept {name!r}{hint} (`ht concepts list` shows all {len(self)})")
        return concept

    def held_out_match(self, text: str) -> Concept | None:
        """The held-out test concept `text` names, ignoring case, accents and whitespace and
        going through aliases ("Art Déco" -> "art deco"), or None. Extra training concepts must
        not be test concepts under another spelling: that would leak the test split into training."""
        if self.split_seed is None:
            return None
        key = _loose(text)
        for concept in self.targets("test"):
            if key in {_loose(concept.name), *map(_loose, concept.aliases)}:
                return concept
        return None

    def extra_training(self, names: Sequence[str], source: str = "extra_concepts=") -> list[Concept]:
        """User-given training concepts (library names or free text), each refused with an
        HTError when it is a held-out test concept under any spelling."""
        concepts = []
        for name in names:
            held_out = self.held_out_match(name)
            if held_out is not None:
                raise HTError(f"extra concept {name!r} ({source}) is the held-out test concept {held_out.name!r}: "
                              "training on it would leak the test split; remove it")
            concepts.append(self.resolve(name))
        return concepts

    def resolve(self, text: str) -> Concept:
        """A library concept, or else a free-text concept with DEFAULT_TEMPLATE."""
        text = " ".join(text.split())
        if not text:
            raise HTError("empty concept: give a library concept name or any free-text description")
        return self._lookup(text) or Concept(name=text, category=FREE_TEXT_CATEGORY)

    @property
    def source(self) -> Concept:
        """The generic source concept: the neutral prompt itself."""
        for concept in self.concepts:
            if concept.category == SOURCE_CATEGORY:
                return concept
        raise HTError(f"the concept library has no generic source concept (category {SOURCE_CATEGORY!r})")

    def categories(self) -> list[str]:
        """Target categories, in the order their files were read."""
        return list(dict.fromkeys(c.category for c in self.concepts if c.category != SOURCE_CATEGORY))

    def targets(self, split: str | None = None, category: str | None = None) -> list[Concept]:
        """Target concepts (all but the source), optionally of one split and one category."""
        if split not in (None, "train", "test"):
            raise HTError(f"unknown split {split!r}; use 'train' or 'test'")
        if split == "test" and self.split_seed is None:
            raise HTError(f"the library has no {SPLIT_FILE}; make one with `ht concepts split`")
        chosen = [c for c in self.concepts if c.category != SOURCE_CATEGORY]
        if category is not None:
            known = {normalize(c): c for c in self.categories()}
            if normalize(category) not in known:
                close = difflib.get_close_matches(category, self.categories(), n=1, cutoff=0.5)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise HTError(f"unknown category {category!r}; {hint}categories: {', '.join(known.values())}")
            chosen = [c for c in chosen if c.category == known[normalize(category)]]
        return [c for c in chosen if split is None or self.split_of(c.name) == split]

    def split_of(self, name: str) -> str | None:
        """'test' if held out, 'train' for other targets (user ones too), None for the source."""
        concept = self.get(name)
        if concept.category == SOURCE_CATEGORY:
            return None
        return "test" if normalize(concept.name) in self._test else "train"

    def source_prompts(self) -> tuple[str, ...]:
        return self.prompts

    def select(self, split: str | None = None, category: str | None = None) -> list[Concept]:
        """Every concept, the source too, when unfiltered; else the targets of a split/category."""
        if split is None and category is None:
            return list(self.concepts)
        return self.targets(split, category)

    def summary(self) -> dict[str, Any]:
        """Counts for a report: concepts, targets, prompts, the split and, per category, its
        concepts and held-out ones (JSON-ready)."""
        targets = self.targets()
        per_category = {category: {"concepts": 0, "test": 0} for category in self.categories()}
        for concept in targets:
            per_category[concept.category]["concepts"] += 1
            per_category[concept.category]["test"] += normalize(concept.name) in self._test
        test = sum(row["test"] for row in per_category.values())
        return {"concepts": len(self), "targets": len(targets), "prompts": len(self.prompts),
                "split_seed": self.split_seed, "test": test, "train": len(targets) - test,
                "categories": per_category}

    def record(self, concept: Concept) -> dict[str, Any]:
        """A concept as plain, JSON-ready data, with its split in this library."""
        return {
            "name": concept.name,
            "category": concept.category,
            "split": self.split_of(concept.name) if concept.in_library else None,
            "aliases": list(concept.aliases),
            "description": concept.description,
            "templates": list(concept.templates),
            "slug": concept.slug,
            "file": str(concept.source_file) if concept.source_file else None,
        }


def _loose(text: str) -> str:
    """Case-, accent- and whitespace-insensitive key: 'Art  Déco' -> 'art deco'."""
    decomposed = unicodedata.normalize("NFKD", text)
    return normalize("".join(ch for ch in decomposed if not unicodedata.combining(ch)))


def read_concept_names(path: Path) -> list[str]:
    """Concept names from a text file: one per line, blank lines and `#` comments ignored,
    duplicates dropped (`--extra-concepts FILE`)."""
    path = Path(path)
    if not path.is_file():
        raise HTError(f"extra_concepts={str(path)!r} is not a file (one concept name per line)")
    names = [" ".join(line.split("#", 1)[0].split()) for line in path.read_text(encoding="utf-8").splitlines()]
    names = list(dict.fromkeys(name for name in names if name))
    if not names:
        raise HTError(f"extra_concepts={str(path)!r} names no concept")
    return names


def load_library(extra_dirs: Sequence[Path] = ()) -> ConceptLibrary:
    """The bundled library plus user directories; HTError names the first problem."""
    library, problems = _load(default_dir(), [Path(d) for d in extra_dirs])
    if problems:
        more = f" (and {len(problems) - 1} more; run `ht concepts validate`)" if len(problems) > 1 else ""
        raise HTError(problems[0] + more)
    return library


def validate_library(extra_dirs: Sequence[Path] = ()) -> list[str]:
    """Every problem in the bundled library plus user directories, one line each; [] if valid."""
    return _load(default_dir(), [Path(d) for d in extra_dirs])[1]


def _load(base: Path, extra_dirs: Sequence[Path], with_split: bool = True) -> tuple[ConceptLibrary, list[str]]:
    """Read and check every file and the split; return what could be loaded and all problems."""
    found = read_files(base, extra_dirs)
    problems, test_names, seed = found.problems, [], None
    if with_split and found.split_file is not None and not problems:
        test_names, seed, problems = _check_split(found.split_file, found.concepts[: found.n_bundled])
    return ConceptLibrary(found.concepts, found.prompts, test_names, seed), problems


# --- The held-out split -------------------------------------------------------------------------


def _sort_key(name: str) -> tuple[str, str]:
    return (name.casefold(), name)


def apportion(sizes: Mapping[str, int], total: int) -> dict[str, int]:
    """Share `total` out in proportion to `sizes` (largest remainder; ties go by name).

    >>> apportion({"a": 3, "b": 1}, 2)
    {'a': 2, 'b': 0}
    """
    whole = sum(sizes.values())
    if not 0 <= total <= whole:
        raise HTError(f"test size {total} must be between 0 and the number of target concepts ({whole})")
    shares = {group: total * size // whole for group, size in sizes.items()}
    ranked = sorted(sizes, key=lambda group: (-(total * sizes[group] % whole), _sort_key(group)))
    for group in ranked[: total - sum(shares.values())]:
        shares[group] += 1
    return shares


def make_split(
    targets: Iterable[Concept], seed: int = DEFAULT_SEED, test_size: int = TEST_SIZE
) -> dict[str, list[str]]:
    """Held-out test concept names per category, stratified in proportion and fixed by `seed`."""
    by_category: dict[str, list[str]] = defaultdict(list)
    for concept in targets:
        if concept.category != SOURCE_CATEGORY:
            by_category[concept.category].append(concept.name)
    quotas = apportion({c: len(names) for c, names in by_category.items()}, test_size)
    rng = random.Random(seed)
    test = {}
    for category in sorted(by_category, key=_sort_key):
        names = sorted(by_category[category], key=_sort_key)
        test[category] = sorted(rng.sample(names, quotas[category]), key=_sort_key)
    return test


def format_split(test: Mapping[str, list[str]], seed: int, test_size: int) -> str:
    """The text of split.yaml: the same split always gives the same bytes."""
    counts = {category: len(names) for category, names in test.items()}
    body = {"seed": seed, "test_size": test_size, "counts": counts, "test": dict(test)}
    header = (
        "# Held-out test split: concepts never seen in training, stratified by category.\n"
        f"# Generated by `ht concepts split --seed {seed} --test-size {test_size}`; do not edit by hand.\n"
    )
    return header + yaml.safe_dump(body, sort_keys=False, allow_unicode=True, width=100)


def write_split(seed: int = DEFAULT_SEED, test_size: int = TEST_SIZE) -> tuple[Path, dict[str, list[str]]]:
    """Regenerate the bundled library's split.yaml atomically; return its path and the split."""
    base = default_dir()
    library, problems = _load(base, [], with_split=False)
    if problems:
        raise HTError(problems[0])
    test = make_split(library.targets(), seed, test_size)
    path = base / SPLIT_FILE
    with atomic_path(path) as tmp:
        tmp.write_bytes(format_split(test, seed, test_size).encode("utf-8"))
        tmp.chmod(0o644)  # mkstemp makes it private; split.yaml is read by everyone
    return path, test


def _check_split(path: Path, bundled: Sequence[Concept]) -> tuple[list[str], int | None, list[str]]:
    """The stored split must be exactly the one its seed gives for the bundled library."""
    data, problem = read_yaml(path)
    if problem is not None:
        return [], None, [problem]
    seed, size = (data.get("seed"), data.get("test_size")) if isinstance(data, dict) else (None, None)
    fix = f"regenerate it with `ht concepts split` (seed={seed}, test_size={size})"
    if type(seed) is not int or type(size) is not int or set(data) != {"seed", "test_size", "counts", "test"}:
        return [], None, [f"{show_path(path)}: expected the keys seed, test_size, counts and test; {fix}"]
    try:
        expected = make_split(bundled, seed, size)
    except HTError as error:
        return [], None, [f"{show_path(path)}: {error}; {fix}"]
    if data["test"] != expected or data["counts"] != {c: len(names) for c, names in expected.items()}:
        return [], None, [f"{show_path(path)}: the stored split differs from the one seed {seed} gives; {fix}"]
    return [name for names in expected.values() for name in names], seed, []
