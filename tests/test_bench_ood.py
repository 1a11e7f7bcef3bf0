"""bench.ood's labelled set: what it holds is what the issue asks, and its AUROC is the textbook one."""

import pytest

from bench.ood import KINDS, auroc, labelled_set
from htcli.data.concepts import load_library, read_concept_names


def test_labelled_set_kinds_sizes_and_no_training_concept_among_the_in_texts():
    rows = labelled_set()
    library = load_library()
    by_kind = {}
    for row in rows:
        by_kind.setdefault(row["kind"], []).append(row)
    for kind in KINDS:
        texts = [r["text"] for r in by_kind[kind]]
        assert len(texts) >= 100 and len(set(texts)) == len(texts) and all(r["label"] == 0 for r in by_kind[kind])
    assert [r["text"] for r in by_kind["held-out test concept"]] == [c.name for c in library.targets("test")]
    free = [r["text"] for r in by_kind["free-text concept"]]
    extra = {name.casefold() for name in read_concept_names("concepts/extra_training.txt")}
    assert len(free) >= 100 and not any(text in library or text.casefold() in extra for text in free)
    assert labelled_set() == rows  # seeded: the same set every run


def test_auroc_counts_pairs_and_ties():
    assert auroc([3, 4], [1, 2]) == 1.0 and auroc([1, 2], [3, 4]) == 0.0
    assert auroc([1, 3], [2]) == 0.5 and auroc([2], [2]) == 0.5
    assert auroc([0.9, 0.4, 0.8], [0.5, 0.1]) == pytest.approx(5 / 6)
