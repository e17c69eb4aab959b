"""Build the shipped local tasks from the held-out split of the embedded corpus (no download, no Ray).

    python -m analysis.eval_tasks.build        # rewrites analysis/eval_tasks/*.jsonl (deterministic)

Items come from verses of the King James Bible chapters that `training.prepare` holds out for validation (the same
content-keyed split, at its default fraction), so no trained run has seen them. Each item is the verse before
(as context) and a verse cut before its last ENDING_WORDS words; the continuation to choose completes the verse.
- kjv_cloze: the true ending or the endings of three other held-out verses. It needs the context: grammar
  and topic, beyond what single words tell.
- kjv_order: the true ending or three orders of its own words. Every choice has the same words, so a model that
  knows only word frequencies is at chance: it tests word order.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from training import corpus
from training.prepare import DEFAULT_MAX_DOC_CHARS, DEFAULT_VAL_FRACTION

HERE = Path(__file__).resolve().parent
ENDING_WORDS = 5
MIN_WORDS = 2 * ENDING_WORDS  # a verse keeps at least as many words as it gives up
ITEMS = 500
CHOICES = 4
SEED = 0


def heldout_verses() -> list[tuple[str, str]]:
    """(previous line, verse) for every held-out verse of at least MIN_WORDS words, in corpus order. The previous
    line is the verse before, or the chapter's title ("Genesis 17") for a chapter's first verse."""
    out = []
    for text in corpus.default_corpus_texts():
        key = corpus.doc_key(text)
        for part, piece in enumerate(corpus.split_text(text, DEFAULT_MAX_DOC_CHARS)):
            if not corpus.in_val_split(key, part, DEFAULT_VAL_FRACTION):
                continue
            lines = [line for line in piece.split("\n") if line.strip()]
            for before, verse in zip(lines, lines[1:]):
                if len(verse.split()) >= MIN_WORDS:
                    out.append((before, verse))
    return out


def split_verse(verse: str) -> tuple[str, str]:
    """(the verse without its last ENDING_WORDS words, " " + those words)."""
    words = verse.split()
    return " ".join(words[:-ENDING_WORDS]), " " + " ".join(words[-ENDING_WORDS:])


def item(before: str, verse: str, distractors: list[str], rng: random.Random) -> dict:
    """One multiple-choice item: the context, the true ending among `distractors` in a random place."""
    head, ending = split_verse(verse)
    choices = list(distractors)
    label = rng.randrange(len(choices) + 1)
    choices.insert(label, ending)
    return {"context": f"{before}\n{head}", "choices": choices, "label": label}


def cloze_items(verses: list[tuple[str, str]], n: int = ITEMS, seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    endings = [split_verse(v)[1] for _, v in verses]
    pool = sorted(set(endings))
    out = []
    for i in sorted(rng.sample(range(len(verses)), n)):
        others = [e for e in pool if e != endings[i]]
        out.append(item(*verses[i], rng.sample(others, CHOICES - 1), rng))
    return out


def order_items(verses: list[tuple[str, str]], n: int = ITEMS, seed: int = SEED) -> list[dict]:
    rng = random.Random(seed + 1)
    out = []
    for i in range(len(verses)):
        ending = split_verse(verses[i][1])[1].split()
        shuffles: set[str] = set()
        for _ in range(50):  # endings of repeated words have few distinct orders; they are left out
            words = ending[:]
            rng.shuffle(words)
            if words != ending:
                shuffles.add(" " + " ".join(words))
            if len(shuffles) == CHOICES - 1:
                break
        if len(shuffles) == CHOICES - 1:
            out.append(item(*verses[i], sorted(shuffles), rng))
    keep = sorted(rng.sample(range(len(out)), min(n, len(out))))
    return [out[i] for i in keep]


def write_jsonl(path: Path, items: list[dict]) -> None:
    path.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), encoding="utf-8")


def build(folder: Path = HERE) -> dict[str, int]:
    """Write kjv_cloze.jsonl and kjv_order.jsonl into `folder`; returns the item count of each."""
    verses = heldout_verses()
    counts = {}
    for name, items in (("kjv_cloze", cloze_items(verses)), ("kjv_order", order_items(verses))):
        write_jsonl(folder / f"{name}.jsonl", items)
        counts[name] = len(items)
    return counts


if __name__ == "__main__":
    print(build())
