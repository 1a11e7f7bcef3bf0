"""Concept YAML files: what a concept is, and reading and checking the files that define them.

A library directory holds one YAML file per category::

    category: Art Techniques
    templates:                  # each has {prompt} and {concept}, nothing else in braces
      - "{prompt}, made using the {concept} technique"
    concepts:
      - name: watercolor
        aliases: [aquarelle]    # optional
        description: transparent pigment washes on paper   # optional

plus `prompts.yaml` (the neutral source prompts) and, in the bundled library only, `split.yaml`
(the held-out test split). Reading never stops at the first problem: `read_files` returns every
problem found, one line each, naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
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
DEFAULT_TEMPLATE = "{prompt}, in the style of {concept}"
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
    def phrases(self) -> list[str]:
        """Each template without a prompt, e.g. "in the style of Art Deco"."""
        return [template.replace("{prompt}", "").format(concept=self.name).strip(" ,") for template in self.templates]

    @property
    def phrase(self) -> str:
        """What concept encoders embed: the first of `phrases` (richer than the bare name)."""
        return self.phrases[0]

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


@dataclass
class LibraryFiles:
    """What `read_files` found: concepts in reading order (bundled first), prompts, problems."""

    concepts: list[Concept] = field(default_factory=list)
    n_bundled: int = 0  # concepts[:n_bundled] come from the bundled directory
    prompts: list[str] = field(default_factory=list)
    split_file: Path | None = None  # the bundled split.yaml, if there is one
    problems: list[str] = field(default_factory=list)


def read_files(base: Path, extra_dirs: Sequence[Path] = ()) -> LibraryFiles:
    """Read and check every file of the bundled directory `base` and of `extra_dirs`."""
    found = LibraryFiles()
    # Naming the bundled directory again (`ht concepts validate concepts/`) adds nothing.
    extra_dirs = [d for d in extra_dirs if not (d.is_dir() and d.resolve() == base.resolve())]
    for directory in [base, *extra_dirs]:
        if not directory.is_dir():
            what = "does not exist" if not directory.exists() else "is a file, not a directory"
            found.problems.append(f"extra_dirs={show_path(directory)} {what}; give a directory of concept YAML files")
            continue
        files = sorted(directory.glob("*.yaml"))
        if not files:
            found.problems.append(f"{show_path(directory)}: no concept files (*.yaml) in this directory")
        for path in files:
            if path.name == SPLIT_FILE:
                if directory == base:
                    found.split_file = path
                else:
                    found.problems.append(f"{show_path(path)}: {SPLIT_FILE} is only read from the bundled library")
                continue
            data, problem = read_yaml(path)
            parse = _parse_prompts if path.name == PROMPTS_FILE else _parse_concepts
            items, file_problems = parse(path, data) if problem is None else ([], [problem])
            (found.prompts if path.name == PROMPTS_FILE else found.concepts).extend(items)
            found.problems += file_problems
        if directory == base:
            found.n_bundled = len(found.concepts)
    found.problems += _check_names(found.concepts)
    found.problems += _check_counts(base, found.concepts[: found.n_bundled])
    return found


class _StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """A safe YAML loader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    keys = [k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)]
    for i, key in enumerate(keys):
        if key in keys[:i]:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", node.start_mark)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def show_path(path: Path) -> str:
    """A path for messages: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_yaml(path: Path) -> tuple[Any, str | None]:
    """(data, None), or (None, a one-line problem) for bad UTF-8, bad YAML or an empty file."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        byte = f"0x{raw[error.start]:02x} at offset {error.start}"
        return None, f"{show_path(path)}: not valid UTF-8 (byte {byte}); save the file as UTF-8"
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(error, "problem", None) or error).split())
        return None, f"{show_path(path)}: invalid YAML{line}: {problem}"
    if data is None:
        return None, f"{show_path(path)}: file is empty; expected the keys {', '.join(_FILE_KEYS)}"
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
    where = show_path(path)
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
        return [], [f"{show_path(path)}: expected one key, 'prompts', holding a non-empty list of strings"]
    first: dict[str, int] = {}
    problems = [
        f"{show_path(path)}: prompt #{i} {p!r} repeats prompt #{first[normalize(p)]}"
        for i, p in enumerate(prompts, 1)
        if first.setdefault(normalize(p), i) != i
    ]
    return prompts, problems


def _check_names(concepts: Sequence[Concept]) -> list[str]:
    """Duplicate names or aliases (case- and whitespace-insensitive), file-name collisions."""
    problems, owners, slugs, sources = [], {}, {}, 0
    for concept in concepts:
        label = f"{show_path(concept.source_file)}: concept {concept.name!r}"
        for kind, text in [("name", concept.name), *(("alias", a) for a in concept.aliases)]:
            mine = (concept, kind)
            if (owner := owners.setdefault(normalize(text), mine)) is not mine:
                place = f"the {owner[1]} of {owner[0].name!r} in {show_path(owner[0].source_file)}"
                problems.append(f"{label}: {kind} {text!r} duplicates {place}")
        other = slugs.setdefault(concept.slug, concept)
        if normalize(other.name) != normalize(concept.name):
            place = f"{other.name!r} in {show_path(other.source_file)}"
            problems.append(f"{label}: its file name {concept.slug!r} collides with {place}")
        sources += concept.category == SOURCE_CATEGORY
        if concept.category == SOURCE_CATEGORY and sources > 1:
            problems.append(f"{label}: a second {SOURCE_CATEGORY!r} concept; the library has exactly one")
    return problems


def _check_counts(base: Path, bundled: Sequence[Concept]) -> list[str]:
    """The bundled library holds exactly the paper's counts and one source concept."""
    counts = Counter(c.category for c in bundled)
    where = {c.category: show_path(c.source_file) for c in bundled}
    expected = {**CATEGORY_COUNTS, SOURCE_CATEGORY: 1}
    problems = [
        f"{where[c]}: category {c!r} has {n} concepts; the paper's library has {expected[c]}"
        if c in expected
        else f"{where[c]}: category {c!r} is not in the paper's library; add it with extra_dirs=DIR"
        for c, n in counts.items()
        if n != expected.get(c)
    ]
    problems += [f"{show_path(base)}: no file holds the category {c!r}" for c in expected if c not in counts]
    return problems


