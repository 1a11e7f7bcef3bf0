"""The concept library: named concepts, their prompt templates, source prompts and the split.

A library is a directory of YAML files, one per category::

    category: Art Techniques
    templates:                  # each has {prompt} and {concept}, nothing else in braces
      - "{prompt}, made using the {concept} technique"
    concepts:
      - name: watercolor
        aliases: [aquarelle]    # optional
        description: transparent pigment washes on paper   # optional

`prompts.yaml` holds the neutral source prompts and `split.yaml` the held-out test split. The
bundled library holds the paper's 776 target concepts in ten categories plus one generic source
concept; user directories add to it. Text that names no library concept is a valid concept too:
a free-text concept with `DEFAULT_TEMPLATE`.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import random
import re
import string
import tempfile
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from htcli.errors import HTError

# The paper's library: target concepts per category (776), plus one generic source concept.
CATEGORY_COUNTS: dict[str, int] = {
    "Environmental Settings": 124,
    "Art Techniques": 100,
    "Historical Periods": 99,
    "Color Treatments": 80,
    "Photography & Cinema": 80,
    "Fantasy Genres": 77,
    "Illustration Styles": 64,
    "Individual Artists": 61,
    "Artistic Movements": 47,
    "Digital Methods": 44,
}
SOURCE_CATEGORY = "Source"
FREE_TEXT_CATEGORY = "Free text"
DEFAULT_TEMPLATE = "{prompt}, in the style of {concept}"
TEST_SIZE = 167
DEFAULT_SEED = 0
PROMPTS_FILE = "prompts.yaml"
SPLIT_FILE = "split.yaml"
MAX_NAME_LENGTH = 100

_FILE_KEYS = ("category", "templates", "concepts")
_ENTRY_KEYS = ("name", "aliases", "description")
_UNSAFE_CHARS = '/\\<>:"|?*'
_RESERVED_STEMS = {"con", "prn", "aux", "nul", *(f"{p}{i}" for p in ("com", "lpt") for i in range(10))}


@dataclass(frozen=True)
class Concept:
    """One concept: a name plus the templates that put it into a prompt."""

    name: str
    category: str
    templates: tuple[str, ...] = (DEFAULT_TEMPLATE,)
    aliases: tuple[str, ...] = ()
    description: str | None = None
    source_file: Path | None = None  # None for free-text concepts

    def apply(self, prompt: str, index: int = 0) -> str:
        """Fill template `index` (cycling through the templates) with `prompt` and the name."""
        template = self.templates[index % len(self.templates)]
        return template.format(prompt=prompt, concept=self.name)

    @property
    def slug(self) -> str:
        return slugify(self.name)

    @property
    def phrase(self) -> str:
        """What concept encoders embed: the first template without a prompt, e.g.
        "in the style of Art Deco" (richer than the bare name)."""
        return self.templates[0].replace("{prompt}", "").format(concept=self.name).strip(" ,")

    @property
    def in_library(self) -> bool:
        return self.source_file is not None


def normalize(name: str) -> str:
    """Lookup key: case-insensitive, whitespace collapsed."""
    return " ".join(name.casefold().split())


def slugify(name: str) -> str:
    """A safe, stable file-name stem: lowercase ascii letters, digits and single '-'.

    Names with non-ascii characters (or cut short, or reserved on Windows) get a short hash of the
    whole name appended, so "Salvador Dalí" and "Salvador Dali" never share a file.

    >>> slugify("Photography & Cinema"), slugify("Salvador Dalí")
    ('photography-cinema', 'salvador-dali-a235d61c')
    """
    key = normalize(name)
    if not key:
        raise HTError("a concept name cannot be empty")
    ascii_text = unicodedata.normalize("NFKD", key).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text).strip("-")
    if not key.isascii() or not slug or slug in _RESERVED_STEMS or len(slug) > 80:
        digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:8]
        slug = f"{slug[:80].strip('-')}-{digest}".strip("-")
    return slug


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


# --- Reading and checking files -----------------------------------------------------------------


class _StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """A safe YAML loader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    keys = [k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)]
    for i, key in enumerate(keys):
        if key in keys[:i]:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", node.start_mark)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _show(path: Path) -> str:
    """A path for messages: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _read_yaml(path: Path) -> tuple[Any, str | None]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        byte = f"0x{raw[error.start]:02x} at offset {error.start}"
        return None, f"{_show(path)}: not valid UTF-8 (byte {byte}); save the file as UTF-8"
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(error, "problem", None) or error).split())
        return None, f"{_show(path)}: invalid YAML{line}: {problem}"
    if data is None:
        return None, f"{_show(path)}: file is empty; expected the keys {', '.join(_FILE_KEYS)}"
    return data, None


def _template_problem(template: Any, needed: Sequence[str]) -> str | None:
    if not isinstance(template, str):
        return f"must be a string, not {type(template).__name__}"
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as error:
        return f"has malformed braces ({error}); write a literal brace as {{{{ or }}}}"
    for name, spec, conversion in fields:
        if name not in ("prompt", "concept") or spec or conversion:
            shown = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            return f"has unknown placeholder {{{shown}}}; only {{prompt}} and {{concept}} are allowed"
    missing = [name for name in needed if name not in {f for f, _, _ in fields}]
    return f"is missing {{{missing[0]}}}" if missing else None


def _unsafe_reason(name: str) -> str | None:
    """Why `name` cannot safely become a file name, or None."""
    bad = [ch for ch in _UNSAFE_CHARS if ch in name]
    checks = [
        (not name.strip(), "it is empty"),
        (name != name.strip(), "it has leading or trailing whitespace"),
        (len(name) > MAX_NAME_LENGTH, f"it is {len(name)} characters long (at most {MAX_NAME_LENGTH})"),
        (any(unicodedata.category(ch).startswith("C") for ch in name), "it contains a control character"),
        (name.startswith("."), "it starts with a dot"),
        (".." in name, "it contains '..'"),
        (bool(bad), f"it contains {bad[0]!r}" if bad else ""),
    ]
    return next((reason for failed, reason in checks if failed), None)


def _parse_file_header(where: str, data: Any) -> list[str]:
    if not isinstance(data, dict):
        return [f"{where}: expected a mapping with the keys {', '.join(_FILE_KEYS)}, not {_brief(data)}"]
    allowed = ", ".join(_FILE_KEYS)
    problems = [f"{where}: unknown key {k!r} (allowed: {allowed})" for k in data if k not in _FILE_KEYS]
    problems += [f"{where}: missing required key {k!r}" for k in _FILE_KEYS if k not in data]
    category, templates, entries = data.get("category"), data.get("templates"), data.get("concepts")
    if "category" in data and not (isinstance(category, str) and category.strip()):
        problems.append(f"{where}: 'category' must be a non-empty string, not {_brief(category)}")
    if "templates" in data and not (isinstance(templates, list) and templates):
        problems.append(f"{where}: 'templates' must be a non-empty list of strings, not {_brief(templates)}")
    elif isinstance(templates, list):
        needed = ("prompt",) if category == SOURCE_CATEGORY else ("prompt", "concept")
        for i, template in enumerate(templates, 1):
            if (problem := _template_problem(template, needed)) is not None:
                problems.append(f"{where}: template #{i} {template!r} {problem}")
    if "concepts" in data and not (isinstance(entries, list) and entries):
        problems.append(f"{where}: 'concepts' must be a non-empty list, not {_brief(entries)}")
    return problems


def _parse_concepts(path: Path, data: Any) -> tuple[list[Concept], list[str]]:
    where = _show(path)
    if problems := _parse_file_header(where, data):
        return [], problems
    concepts = []
    for i, entry in enumerate(data["concepts"], 1):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            why = (
                "missing required field 'name'"
                if isinstance(entry, dict) and name is None
                else (f"expected a mapping with a string 'name', not {_brief(entry)}")
            )
            problems.append(f"{where}: concept #{i}: {why}")
            continue
        label = f"{where}: concept {name!r}"
        allowed = ", ".join(_ENTRY_KEYS)
        found = [f"{label}: unknown field {k!r} (allowed: {allowed})" for k in entry if k not in _ENTRY_KEYS]
        if (reason := _unsafe_reason(name)) is not None:
            found.append(f"{label}: name is unsafe as a file name: {reason}")
        aliases, description = entry.get("aliases", []), entry.get("description")
        if not (isinstance(aliases, list) and all(isinstance(a, str) and a.strip() for a in aliases)):
            found.append(f"{label}: 'aliases' must be a list of non-empty strings, not {_brief(aliases)}")
        if description is not None and not isinstance(description, str):
            found.append(f"{label}: 'description' must be a string, not {_brief(description)}")
        if not found:
            templates = tuple(data["templates"])
            concepts.append(Concept(name, data["category"], templates, tuple(aliases), description, path))
        problems += found
    return concepts, problems


def _parse_prompts(path: Path, data: Any) -> tuple[list[str], list[str]]:
    prompts = data.get("prompts") if isinstance(data, dict) and set(data) == {"prompts"} else None
    if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) and p.strip() for p in prompts)):
        return [], [f"{_show(path)}: expected one key, 'prompts', holding a non-empty list of strings"]
    first: dict[str, int] = {}
    problems = [
        f"{_show(path)}: prompt #{i} {p!r} repeats prompt #{first[normalize(p)]}"
        for i, p in enumerate(prompts, 1)
        if first.setdefault(normalize(p), i) != i
    ]
    return prompts, problems


def _check_names(concepts: Sequence[Concept]) -> list[str]:
    """Duplicate names or aliases (case- and whitespace-insensitive), file-name collisions."""
    problems, owners, slugs, sources = [], {}, {}, 0
    for concept in concepts:
        label = f"{_show(concept.source_file)}: concept {concept.name!r}"
        for kind, text in [("name", concept.name), *(("alias", a) for a in concept.aliases)]:
            mine = (concept, kind)
            if (owner := owners.setdefault(normalize(text), mine)) is not mine:
                place = f"the {owner[1]} of {owner[0].name!r} in {_show(owner[0].source_file)}"
                problems.append(f"{label}: {kind} {text!r} duplicates {place}")
        other = slugs.setdefault(concept.slug, concept)
        if normalize(other.name) != normalize(concept.name):
            place = f"{other.name!r} in {_show(other.source_file)}"
            problems.append(f"{label}: its file name {concept.slug!r} collides with {place}")
        sources += concept.category == SOURCE_CATEGORY
        if concept.category == SOURCE_CATEGORY and sources > 1:
            problems.append(f"{label}: a second {SOURCE_CATEGORY!r} concept; the library has exactly one")
    return problems


def _check_counts(base: Path, bundled: Sequence[Concept]) -> list[str]:
    """The bundled library holds exactly the paper's counts and one source concept."""
    counts = Counter(c.category for c in bundled)
    where = {c.category: _show(c.source_file) for c in bundled}
    expected = {**CATEGORY_COUNTS, SOURCE_CATEGORY: 1}
    problems = [
        f"{where[c]}: category {c!r} has {n} concepts; the paper's library has {expected[c]}"
        if c in expected
        else f"{where[c]}: category {c!r} is not in the paper's library; add it with --concepts DIR"
        for c, n in counts.items()
        if n != expected.get(c)
    ]
    problems += [f"{_show(base)}: no file holds the category {c!r}" for c in expected if c not in counts]
    return problems


def _load(
    base: Path, extra_dirs: Sequence[Path], with_split: bool = True
) -> tuple[ConceptLibrary, list[str]]:
    """Read and check every file; return what could be loaded and all problems found."""
    problems: list[str] = []
    concepts: list[Concept] = []
    prompts: list[str] = []
    n_bundled, split_file = 0, None
    # Naming the bundled directory again (`ht concepts validate concepts/`) adds nothing.
    extra_dirs = [d for d in extra_dirs if not (d.is_dir() and d.resolve() == base.resolve())]
    for directory in [base, *extra_dirs]:
        if not directory.is_dir():
            problems.append(f"{_show(directory)}: not a directory")
            continue
        files = sorted(directory.glob("*.yaml"))
        if not files:
            problems.append(f"{_show(directory)}: no concept files (*.yaml) in this directory")
        for path in files:
            if path.name == SPLIT_FILE:
                if directory != base:
                    problems.append(f"{_show(path)}: {SPLIT_FILE} is only read from the bundled library")
                elif with_split:
                    split_file = path
                continue
            data, problem = _read_yaml(path)
            parse = _parse_prompts if path.name == PROMPTS_FILE else _parse_concepts
            found, file_problems = parse(path, data) if problem is None else ([], [problem])
            (prompts if path.name == PROMPTS_FILE else concepts).extend(found)
            problems += file_problems
        if directory == base:
            n_bundled = len(concepts)
    problems += _check_names(concepts)
    problems += _check_counts(base, concepts[:n_bundled])
    test_names, seed = [], None
    if split_file is not None and not problems:
        test_names, seed, split_problems = _check_split(split_file, concepts[:n_bundled])
        problems += split_problems
    return ConceptLibrary(concepts, prompts, test_names, seed), problems


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
    fd, tmp = tempfile.mkstemp(dir=base, prefix=".split-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as file:
            file.write(format_split(test, seed, test_size))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path, test


def _check_split(path: Path, bundled: Sequence[Concept]) -> tuple[list[str], int | None, list[str]]:
    """The stored split must be exactly the one its seed gives for the bundled library."""
    data, problem = _read_yaml(path)
    if problem is not None:
        return [], None, [problem]
    seed, size = (data.get("seed"), data.get("test_size")) if isinstance(data, dict) else (None, None)
    fix = f"regenerate it with `ht concepts split --seed {seed} --test-size {size}`"
    if type(seed) is not int or type(size) is not int or set(data) != {"seed", "test_size", "counts", "test"}:
        return [], None, [f"{_show(path)}: expected the keys seed, test_size, counts and test; {fix}"]
    try:
        expected = make_split(bundled, seed, size)
    except HTError as error:
        return [], None, [f"{_show(path)}: {error}; {fix}"]
    if data["test"] != expected or data["counts"] != {c: len(names) for c, names in expected.items()}:
        return [], None, [f"{_show(path)}: the stored split differs from the one seed {seed} gives; {fix}"]
    return [name for names in expected.values() for name in names], seed, []
