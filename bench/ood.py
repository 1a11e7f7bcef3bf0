"""Benchmark: how well the out-of-distribution signal tells concepts from nonsense.

Run: python -m bench.ood [--hyper CHECKPOINT] [--model tiny] [--write labelled.json]
A labelled set, made here with fixed seeds:
- "in" (concepts the network never trained on): the 167 held-out test concepts, and the
  plausible free-text concepts of bench/data/ood_in_concepts.txt that neither the library (names
  and aliases) nor concepts/extra_training.txt holds;
- "out" (text that names no concept), 120 of each kind: random letter strings, keyboard mash,
  numbers, emoji, mixed scripts; and the nonsense strings of issue 25.
Each text goes through the path users' concepts take (`Predictor.maps`, then
`Prediction.neighbours`), and the record's `ood_score` ranks it. Prints the AUROC (in vs out), the share
of each kind flagged at the checkpoint's threshold, and last:
auroc=<AUROC> fpr_test=<share of held-out test concepts flagged out of distribution>
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.common import quiet  # noqa: E402

KINDS = ("letters", "keyboard mash", "numbers", "emoji", "mixed scripts")
PER_KIND = 120
ISSUE_EXAMPLES = ["zxqv 1234 lorem", "asdfghjkl", "1234567890", "qwerty uiop", "lorem ipsum dolor", "xkcd zzzz",
                  "\U0001F525\U0001F308\U0001F984", "aaaaaaa", "jjjj kkkk", "0000 1111"]
IN_FILE = Path(__file__).parent / "data" / "ood_in_concepts.txt"
KEYBOARD = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
# Letters of several scripts: Latin, Greek, Cyrillic, Arabic, Devanagari, Hangul, CJK, Hiragana.
SCRIPTS = [(0x61, 0x7A), (0x3B1, 0x3C9), (0x430, 0x44F), (0x627, 0x64A), (0x915, 0x939), (0xAC00, 0xD7A3),
           (0x4E00, 0x9FFF), (0x3041, 0x3096)]
EMOJI = [(0x1F300, 0x1F5FF), (0x1F600, 0x1F64F), (0x1F680, 0x1F6FF), (0x1F900, 0x1F9FF), (0x2600, 0x26FF)]


def _words(rng: random.Random, word, low: int = 1, high: int = 3) -> str:
    return " ".join(word() for _ in range(rng.randint(low, high)))


def letters(rng: random.Random) -> str:
    return _words(rng, lambda: "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 10))))


def keyboard_mash(rng: random.Random) -> str:
    """A walk along neighbouring keys, as a hand drags over a keyboard."""
    def run() -> str:
        row, col, out = rng.randrange(3), rng.randrange(9), []
        for _ in range(rng.randint(4, 12)):
            keys = KEYBOARD[row]
            out.append(keys[min(col, len(keys) - 1)])
            row = min(2, max(0, row + rng.choice([-1, 0, 0, 0, 1])))
            col = min(9, max(0, col + rng.choice([-1, 1, 1, 2, 0])))
        return "".join(out)
    return _words(rng, run, 1, 2)


def numbers(rng: random.Random) -> str:
    forms = [lambda: str(rng.randint(0, 10 ** rng.randint(1, 12))),
             lambda: f"{rng.uniform(0, 1000):.{rng.randint(1, 4)}f}",
             lambda: "-".join(str(rng.randint(10, 9999)) for _ in range(rng.randint(2, 4))),
             lambda: f"{rng.randint(1, 999):,}{rng.randint(100, 999)}"]
    return _words(rng, lambda: rng.choice(forms)(), 1, 3)


def emoji(rng: random.Random) -> str:
    def one() -> str:
        low, high = rng.choice(EMOJI)
        return chr(rng.randint(low, high))
    return _words(rng, lambda: "".join(one() for _ in range(rng.randint(1, 4))), 1, 3)


def mixed_scripts(rng: random.Random) -> str:
    def char() -> str:
        low, high = rng.choice(SCRIPTS)
        return chr(rng.randint(low, high))
    return _words(rng, lambda: "".join(char() for _ in range(rng.randint(2, 8))), 1, 3)


GENERATORS = dict(zip(KINDS, (letters, keyboard_mash, numbers, emoji, mixed_scripts)))


def labelled_set(seed: int = 0) -> list[dict]:
    """[{"text", "kind", "label" (1: in, 0: out)}]: see the module doc."""
    from htcli.data.concepts import load_library, read_concept_names

    library = load_library()
    extra = {name.casefold() for name in read_concept_names(Path("concepts/extra_training.txt"))}
    rows = [{"text": c.name, "kind": "held-out test concept", "label": 1} for c in library.targets("test")]
    free = [text for text in read_concept_names(IN_FILE) if text not in library and text.casefold() not in extra]
    rows += [{"text": text, "kind": "free-text concept", "label": 1} for text in free]
    rng = random.Random(seed)
    for kind, make in GENERATORS.items():
        texts: list[str] = []
        while len(texts) < PER_KIND:
            text = make(rng)
            if text not in texts:
                texts.append(text)
        rows += [{"text": text, "kind": kind, "label": 0} for text in texts]
    rows += [{"text": text, "kind": "issue examples", "label": 0} for text in ISSUE_EXAMPLES]
    return rows


def auroc(positive: list[float], negative: list[float]) -> float:
    """P(a random positive scores above a random negative), ties counting half (Mann-Whitney)."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hyper", type=Path, help="checkpoint file or run folder (default: runs/<model>/hyper, else shipped)")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--write", type=Path, help="also write the labelled set with each text's record here (JSON)")
    args = parser.parse_args()
    quiet()
    from htcli.data.concepts import load_library
    from htcli.methods.predict import Predictor, resolve_checkpoint

    predictor = Predictor.load(resolve_checkpoint(args.hyper, args.model), model=args.model)
    if predictor.checkpoint.ood is None:
        raise SystemExit(f"{predictor.path} stores no out-of-distribution calibration (trained before ht stored it)")
    library = load_library()
    rows = labelled_set()
    for start in range(0, len(rows), 64):
        batch = rows[start : start + 64]
        # What `maps` records for each concept, without the maps: text -> concept -> its record.
        for row, record in zip(batch, predictor.neighbours([library.resolve(row["text"]) for row in batch])):
            row |= record
    score = lambda label: [r["ood_score"] for r in rows if r["label"] == label]  # noqa: E731
    area = auroc(score(1), score(0))
    print(f"threshold {predictor.checkpoint.ood.threshold:.4f} (score: the lowest cue percentile against training concepts)")
    for kind in dict.fromkeys(r["kind"] for r in rows):
        chosen = [r for r in rows if r["kind"] == kind]
        flagged = sum(r["ood"] for r in chosen) / len(chosen)
        print(f"{kind:22s} {len(chosen):4d} texts, flagged out of distribution: {flagged:.1%}")
    test = [r for r in rows if r["kind"] == "held-out test concept"]
    fpr_test = sum(r["ood"] for r in test) / len(test)
    if args.write:
        args.write.write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    print(f"auroc={area:.3f} fpr_test={fpr_test:.3f}")


if __name__ == "__main__":
    main()
