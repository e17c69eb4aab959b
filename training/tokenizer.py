"""Byte-level BPE tokenizer: trained locally with HF `tokenizers`, or loaded from a tokenizer.json.

Byte-level means every string encodes and decodes back exactly (no unknown tokens, no normalisation),
which is what lets `prepare` promise a lossless text -> tokens -> text round trip.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

BOS = "<|bos|>"
MIN_VOCAB = 256 + 1 + 3  # all bytes, BOS, and room for at least a few merges

# GPT-4 style pre-split (as nanochat uses, digits in groups of up to 2): words, numbers, punctuation runs
# and whitespace become separate pre-tokens so merges never cross them.
_SPLIT = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)


def check_vocab_size(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size: {vocab_size!r} is too small; use an int >= {MIN_VOCAB} "
                         "(256 bytes + BOS + merges)")


def _empty_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` entries (BOS included) on `texts`.

    A corpus too small to support that many merges yields a smaller vocabulary; callers read the real
    size from `tok.get_vocab_size()`.
    """
    check_vocab_size(vocab_size)
    tok = _empty_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path_or_json: str) -> Tokenizer:
    """A tokenizer from a tokenizer.json path or its JSON text; BOS is added as a special token if missing."""
    text = path_or_json
    if not text.lstrip().startswith("{"):
        with open(path_or_json, encoding="utf-8") as fh:
            text = fh.read()
    tok = Tokenizer.from_str(text)
    if tok.token_to_id(BOS) is None:
        tok.add_special_tokens([BOS])
    return tok


def bos_id(tok: Tokenizer) -> int:
    i = tok.token_to_id(BOS)
    if i is None:
        raise ValueError(f"tokenizer has no {BOS!r} token; load it with load_tokenizer() which adds one")
    return i
