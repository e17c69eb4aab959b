"""Data for training, in one import: prepare a corpus, load packed batches, score in bits per byte.

    from training.data import ensure_default_data, TokenLoader, validation_batches, bits_per_byte
"""

from training.corpus import default_corpus_texts
from training.loader import TokenLoader, bits_per_byte, load_data_tokenizer, load_meta, validation_batches
from training.prepare import PrepareConfig, default_data_root, ensure_default_data, prepare
from training.tokenizer import BOS

__all__ = [
    "BOS",
    "PrepareConfig",
    "TokenLoader",
    "bits_per_byte",
    "default_corpus_texts",
    "default_data_root",
    "ensure_default_data",
    "load_data_tokenizer",
    "load_meta",
    "prepare",
    "validation_batches",
]
