"""Pairwise vision-language-model judge: is method A's image better than method B's?

For each (concept, prompt, seed, strength) the judge sees the two images twice, A first then
B first, and answers FIRST, SECOND or TIE. Seen from A, an answer counts +1 (A preferred), 0
(tie) or -1; the two orders are summed, so a judge that always picks the first image yields a
tie, not a win (position bias cancels). An item whose answers do not parse is counted as
malformed and left out of the rates; nothing a judge says can crash the run.

Backends are callables `(question, images) -> answer text`: a local transformers
vision-language model, or any OpenAI-compatible chat-completions endpoint (vLLM,
llama.cpp server, ...), which gets the images as base64 PNG data URLs.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from htcli.errors import HTError
from htcli.evaluation.runs import Progress, load_images
from htcli.evaluation.stats import bootstrap_ci, strength_order

DEFAULT_VLM = "Qwen/Qwen2.5-VL-7B-Instruct"
BACKENDS = ("transformers", "openai")
QUESTION = (
    "Both images were generated for the prompt \"{prompt}\" and should show it {phrase}. "
    "Which image shows {phrase} more clearly while still depicting \"{prompt}\"? "
    "Answer with one word: FIRST, SECOND or TIE."
)
Ask = Callable[[str, Sequence[Any]], str]

_WORDS = {"first": "first", "1": "first", "a": "first", "second": "second", "2": "second", "b": "second",
          "tie": "tie", "equal": "tie", "neither": "tie", "both": "tie", "same": "tie"}


def parse_verdict(text: str) -> str | None:
    """'first', 'second' or 'tie' from a judge's answer; None when it says none or several.

    >>> parse_verdict("FIRST"), parse_verdict("Answer: **Second**."), parse_verdict("first or second?")
    ('first', 'second', None)
    """
    if not isinstance(text, str):
        return None
    body = text.strip().lower()
    if body.strip(" .*!:'\"") in ("a", "b"):  # a lone letter; elsewhere "a" is just the article
        return _WORDS[body.strip(" .*!:'\"")]
    found = {_WORDS[w] for w in re.findall(r"\b(first|second|tie|equal|neither|both|same|1|2)\b", body)}
    return found.pop() if len(found) == 1 else None


@dataclass(frozen=True)
class PairItem:
    concept: str
    phrase: str
    prompt: str
    seed: int
    strength: float | None
    file_a: str
    file_b: str


def pair_items(records: Sequence[Mapping[str, Any]], a: str, b: str) -> list[PairItem]:
    """Images of methods a and b for the same concept, prompt and seed (and strength, when both
    have one; `prompt` has none and pairs with every strength of the other method)."""
    methods = sorted({r["method"] for r in records})
    for name in (a, b):
        if name not in methods:
            raise HTError(f"pair=: method {name!r} is not in the run; it has {', '.join(methods)}")
    by_key: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in records:
        if r["method"] == b:
            by_key.setdefault((r["concept"], r["prompt"], r["seed"]), []).append(r)
    items = []
    for ra in records:
        if ra["method"] != a:
            continue
        for rb in by_key.get((ra["concept"], ra["prompt"], ra["seed"]), []):
            sa, sb = ra["strength"], rb["strength"]
            if sa is not None and sb is not None and sa != sb:
                continue
            items.append(PairItem(ra["concept"], ra["phrase"], ra["prompt"], ra["seed"], sa if sa is not None else sb,
                                  ra["file"], rb["file"]))
    if not items:
        raise HTError(f"no images of {a!r} and {b!r} share a concept, prompt, seed and strength in this run")
    return items


def _score(verdict: str | None, a_first: bool) -> int | None:
    """+1 when the answer prefers A, -1 when it prefers B, 0 for a tie."""
    if verdict is None:
        return None
    if verdict == "tie":
        return 0
    return 1 if (verdict == "first") == a_first else -1


def judge_pairs(items: Sequence[PairItem], ask: Ask, root: Path, progress: Progress | None = None) -> list[dict]:
    """Ask about every item in both orders; one row per item with both raw answers and the outcome."""
    rows, asked = [], 0
    for item in items:
        image_a, image_b = load_images(root, [item.file_a, item.file_b])
        question = QUESTION.format(prompt=item.prompt, phrase=item.phrase)
        answers, verdicts, scores = [], [], []
        for a_first in (True, False):
            answer = ask(question, [image_a, image_b] if a_first else [image_b, image_a])
            answers.append(str(answer)[:200])  # kept for auditing the judge
            verdicts.append(parse_verdict(answer))
            scores.append(_score(verdicts[-1], a_first))
            asked += 1
            if progress:
                progress(asked, 2 * len(items), item.concept)
        total = None if None in scores else sum(scores)
        outcome = "malformed" if total is None else "win" if total > 0 else "loss" if total < 0 else "tie"
        rows.append({"concept": item.concept, "prompt": item.prompt, "seed": item.seed, "strength": item.strength,
                     "a_first": answers[0], "b_first": answers[1], "verdicts": verdicts, "outcome": outcome,
                     "consistent": total is not None and scores[0] == scores[1]})
    return rows


def summarize_pairs(rows: Sequence[Mapping[str, Any]], seed: int = 0) -> list[dict]:
    """Win/tie/loss rates (of A) per strength and over all, with bootstrap intervals."""
    groups: dict[Any, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["strength"], []).append(row)
    ordered = [(s, groups[s]) for s in sorted(groups, key=strength_order)]
    if len(groups) > 1:
        ordered.append(("all", list(rows)))
    out = []
    for strength, members in ordered:
        judged = [m for m in members if m["outcome"] != "malformed"]
        entry: dict[str, Any] = {"strength": strength, "items": len(members), "judged": len(judged),
                                 "malformed": len(members) - len(judged)}
        for outcome in ("win", "tie", "loss"):
            entry[outcome] = bootstrap_ci([float(m["outcome"] == outcome) for m in judged], seed=seed)
        entry["consistency"] = sum(m["consistent"] for m in judged) / len(judged) if judged else None
        out.append(entry)
    return out


# --- backends ----------------------------------------------------------------------------


def _data_url(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class OpenAIBackend:
    """Any OpenAI-compatible `/chat/completions` endpoint; the images go as data URLs."""

    def __init__(self, endpoint: str, model: str, timeout: float = 120.0, api_key: str | None = None) -> None:
        if not endpoint.startswith(("http://", "https://")):
            raise HTError(f"endpoint= must be an http(s) URL such as http://127.0.0.1:8000/v1, got {endpoint!r}")
        base = endpoint.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model, self.timeout = model, timeout
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.id = f"openai:{model}@{self.url}"

    def __call__(self, question: str, images: Sequence[Any]) -> str:
        content = [{"type": "text", "text": question}]
        content += [{"type": "image_url", "image_url": {"url": _data_url(image)}} for image in images]
        body = {"model": self.model, "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 16}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise HTError(f"the VLM endpoint {self.url} answered HTTP {error.code}: {error.reason}") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise HTError(f"cannot reach the VLM endpoint {self.url}: {reason}") from None
        except json.JSONDecodeError:
            raise HTError(f"the VLM endpoint {self.url} did not answer JSON; is it OpenAI-compatible?") from None
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            return ""  # a reply with no answer in it is a malformed answer, counted by the caller


class TransformersBackend:
    """A local vision-language model through transformers' image-text-to-text classes."""

    def __init__(self, model_id: str, device: str = "cpu") -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from htcli.models.encoders import require_hub_files

        self.id = f"transformers:{model_id}"
        if not Path(model_id).is_dir():
            require_hub_files(model_id, ["config.json"], "the VLM")
        try:
            self.processor = AutoProcessor.from_pretrained(model_id)
            self.model = AutoModelForImageTextToText.from_pretrained(model_id, dtype="auto").to(device).eval()
        except (OSError, ValueError) as error:
            raise HTError(f"cannot load the VLM {model_id!r} ({type(error).__name__}); check the id, or use "
                          "backend='openai' with endpoint=URL") from None

    def __call__(self, question: str, images: Sequence[Any]) -> str:
        import torch

        content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": question}]
        inputs = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt",
        ).to(self.model.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=16, do_sample=False)
        return self.processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]


def make_backend(backend: str | None, model_id: str | None, endpoint: str | None, device: str = "cpu",
                 timeout: float = 120.0) -> Ask:
    """The backend `--backend` names (default: openai when an --endpoint is given, else transformers)."""
    backend = backend or ("openai" if endpoint else "transformers")
    if backend not in BACKENDS:
        raise HTError(f"unknown backend={backend!r}; use {' or '.join(BACKENDS)}")
    if backend == "openai":
        if not endpoint:
            raise HTError("backend='openai' needs endpoint=URL (e.g. http://127.0.0.1:8000/v1)")
        return OpenAIBackend(endpoint, model_id or DEFAULT_VLM, timeout)
    return TransformersBackend(model_id or DEFAULT_VLM, device)


def vlm_judge(records: Sequence[Mapping[str, Any]], a: str, b: str, ask: Ask, root: Path, seed: int = 0,
              progress: Progress | None = None) -> dict:
    """One VLM section of scores.json: the pair, the raw answers and the rates."""
    rows = judge_pairs(pair_items(records, a, b), ask, root, progress)
    return {"judge": "vlm", "pair": [a, b], "backend": getattr(ask, "id", type(ask).__name__), "question": QUESTION,
            "items": rows, "summary": summarize_pairs(rows, seed),
            "malformed_answers": sum(v is None for r in rows for v in r["verdicts"])}
