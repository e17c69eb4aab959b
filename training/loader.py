"""BOS-aligned packing of prepared token shards into fixed-length training rows.

Each row holds T+1 tokens and starts at a document's BOS. Documents are packed best-fit from a buffer (as
nanochat does): the largest buffered document that fits the space left goes in whole; when none fits, the
shortest one is cropped to fill the row and its overflow is dropped. No row ever starts mid-document.

The stream each rank packs from is a pure function of (seed, epoch, rank, world_size) over the prepared
folder: the Parquet row groups ("units") are shuffled per epoch, documents shuffled within each unit, and
the ranks take disjoint slices of it. Because the stream is deterministic, a loader's state is just where
it is in the stream plus which documents sit in its buffer, so resuming mid-epoch is exact and cheap.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from training.storage import filesystem

STATE_VERSION = 1
# Sharding by whole row groups saves each rank reading what other ranks use; it needs enough groups per
# rank that ranks' epochs are about the same length. Below that, ranks stride over documents instead.
MIN_UNITS_PER_RANK = 4


def load_meta(data_dir: str) -> dict:
    fs, root = filesystem(data_dir)
    try:
        with fs.open_input_stream(f"{root}/meta.json") as fh:
            return json.loads(fh.read().decode("utf-8"))
    except FileNotFoundError as e:
        raise ValueError(
            f"data_dir: {data_dir!r} has no meta.json; prepare it first (python -m training.prepare ...)"
        ) from e


def load_data_tokenizer(data_dir: str):
    """The tokenizer a prepared folder was tokenized with."""
    from training.tokenizer import load_tokenizer

    fs, root = filesystem(data_dir)
    with fs.open_input_stream(f"{root}/tokenizer.json") as fh:
        return load_tokenizer(fh.read().decode("utf-8"))


def bits_per_byte(loss_nats: float, meta: dict | str) -> float:
    """Mean per-token loss in nats -> bits per UTF-8 byte of held-out text.

    `meta` is a prepared folder's meta.json (dict) or the folder itself. bits/byte = loss * n_tokens /
    (ln 2 * n_bytes), using the validation split's bytes-per-token ratio, so it compares across tokenizers.
    """
    if isinstance(meta, str):
        meta = load_meta(meta)
    return float(loss_nats) / math.log(2) / float(meta["val_bytes_per_token"])


@dataclass(frozen=True)
class _Unit:
    path: str
    row_group: int
    num_rows: int


def _list_units(fs: pafs.FileSystem, split_dir: str) -> list[_Unit]:
    info = fs.get_file_info(split_dir)
    if info.type != pafs.FileType.Directory:
        raise ValueError(f"split: {split_dir!r} does not exist; use 'train' or 'val' of a prepared folder")
    files = sorted(
        i.path
        for i in fs.get_file_info(pafs.FileSelector(split_dir, recursive=True))
        if i.type == pafs.FileType.File and i.path.endswith(".parquet")
    )
    units = []
    for path in files:
        with fs.open_input_file(path) as fh:
            md = pq.ParquetFile(fh).metadata
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            if n:
                units.append(_Unit(path, g, n))
    return units


class TokenLoader:
    """Infinite iterator of (x, y) int64 tensors [micro_batch, seq_len] from a prepared folder.

    rank/world_size pick this data-parallel rank's disjoint slice; `seed` fixes the shuffles; `shuffle=False`
    reads in storage order (used for validation). `state_dict()`/`load_state_dict()` resume exactly.
    """

    def __init__(
        self,
        data_dir: str,
        split: str = "train",
        seq_len: int = 256,
        micro_batch: int = 8,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        buffer_size: int = 256,
        shuffle: bool = True,
    ):
        for name, v in (("seq_len", seq_len), ("micro_batch", micro_batch), ("world_size", world_size),
                        ("buffer_size", buffer_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: {v!r} must be a positive int")
        if not (isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"rank: {rank!r} must be an int in [0, world_size={world_size})")
        if split not in ("train", "val"):
            raise ValueError(f"split: {split!r} must be 'train' or 'val'")
        self.data_dir, self.split = data_dir, split
        self.seq_len, self.micro_batch = seq_len, micro_batch
        self.rank, self.world_size, self.seed = rank, world_size, int(seed)
        self.buffer_size, self.shuffle = buffer_size, shuffle
        self.meta = load_meta(data_dir)
        self.bos_id = int(self.meta["bos_id"])
        self._fs, root = filesystem(data_dir)
        self._units = _list_units(self._fs, f"{root}/{split}")
        n_docs = sum(u.num_rows for u in self._units)
        if n_docs < world_size:
            raise ValueError(f"world_size: {world_size} ranks but the {split} split has {n_docs} documents; "
                             "use fewer ranks or more data")
        self.shard_by = "unit" if len(self._units) >= MIN_UNITS_PER_RANK * world_size else "document"
        self._epoch, self._pos = 0, 0
        self._plan_epoch: int | None = None
        self._plan: list[tuple[int, np.ndarray]] = []
        self._plan_ends = np.zeros(0, dtype=np.int64)
        self._cached_unit: tuple[int, np.ndarray, np.ndarray] | None = None  # (unit id, offsets, values)
        self._buf_refs: list[tuple[int, int]] = []  # (unit id, row) of each buffered document
        self._buf_docs: list[np.ndarray] = []

    # ------------------------------------------------------------ the stream

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *keys])

    def _epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """This rank's documents for `epoch`, as (unit id, rows in order) pairs."""
        n = len(self._units)
        order = self._rng(epoch).permutation(n) if self.shuffle else np.arange(n)
        rows_of = {}
        for u in order:
            rows = np.arange(self._units[u].num_rows)
            rows_of[int(u)] = self._rng(epoch, int(u) + 1).permutation(rows) if self.shuffle else rows
        if self.shard_by == "unit":
            return [(int(u), rows_of[int(u)]) for u in order[self.rank :: self.world_size]]
        plan, offset = [], 0  # global position of each unit's first document in the epoch's stream
        for u in order:
            rows = rows_of[int(u)]
            mine = rows[(self.rank - offset) % self.world_size :: self.world_size]
            if len(mine):
                plan.append((int(u), mine))
            offset += len(rows)
        return plan

    def _ensure_plan(self) -> None:
        if self._plan_epoch != self._epoch:
            self._plan = self._epoch_plan(self._epoch)
            self._plan_ends = np.cumsum([len(r) for _, r in self._plan])
            self._plan_epoch = self._epoch

    def _read_unit(self, unit_id: int) -> tuple[np.ndarray, np.ndarray]:
        u = self._units[unit_id]
        with self._fs.open_input_file(u.path) as fh:
            col = pq.ParquetFile(fh).read_row_group(u.row_group, columns=["tokens"]).column("tokens")
        col = col.combine_chunks()
        return col.offsets.to_numpy(), col.values.to_numpy(zero_copy_only=False)

    def _doc(self, unit_id: int, row: int) -> np.ndarray:
        if self._cached_unit is None or self._cached_unit[0] != unit_id:
            self._cached_unit = (unit_id, *self._read_unit(unit_id))
        _, offsets, values = self._cached_unit
        # A copy, so buffered documents do not pin whole row groups in memory.
        return values[offsets[row] : offsets[row + 1]].copy()

    def _next_ref(self) -> tuple[int, int]:
        self._ensure_plan()
        if self._pos >= self._plan_ends[-1]:
            self._epoch, self._pos = self._epoch + 1, 0
            self._ensure_plan()
        i = int(np.searchsorted(self._plan_ends, self._pos, side="right"))
        start = 0 if i == 0 else int(self._plan_ends[i - 1])
        unit_id, rows = self._plan[i]
        self._pos += 1
        return unit_id, int(rows[self._pos - 1 - start])

    def _refill(self) -> None:
        while len(self._buf_refs) < self.buffer_size:
            ref = self._next_ref()
            self._buf_refs.append(ref)
            self._buf_docs.append(self._doc(*ref))

    # ------------------------------------------------------------ packing

    def _pack_row(self, out: np.ndarray) -> None:
        cap, pos = out.shape[0], 0
        while pos < cap:
            self._refill()
            room = cap - pos
            best, best_len = -1, 0
            for i, d in enumerate(self._buf_docs):
                n = len(d)
                if best_len < n <= room:
                    best, best_len = i, n
            if best < 0:  # nothing fits whole: crop the shortest, drop its overflow
                best = min(range(len(self._buf_docs)), key=lambda i: len(self._buf_docs[i]))
            doc = self._buf_docs.pop(best)
            self._buf_refs.pop(best)
            take = min(len(doc), room)
            out[pos : pos + take] = doc[:take]
            pos += take

    def next_rows(self) -> np.ndarray:
        """The next [micro_batch, seq_len + 1] block of packed tokens (int64)."""
        rows = np.empty((self.micro_batch, self.seq_len + 1), dtype=np.int64)
        for r in range(self.micro_batch):
            self._pack_row(rows[r])
        return rows

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        import torch

        rows = torch.from_numpy(self.next_rows())
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    # ------------------------------------------------------------ resume

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "n_units": len(self._units),
            "epoch": self._epoch,
            "pos": self._pos,
            "buffer": [list(r) for r in self._buf_refs],
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"state.version: {state.get('version')!r} is not {STATE_VERSION}; "
                             "it was saved by another loader version")
        for key in ("split", "seed", "rank", "world_size", "shuffle", "n_units"):
            mine = len(self._units) if key == "n_units" else getattr(self, key)
            if state[key] != mine:
                raise ValueError(f"state.{key}: saved {state[key]!r} but this loader has {mine!r}; "
                                 "resume with the same data folder, split, seed and ranks")
        self._epoch, self._pos = int(state["epoch"]), int(state["pos"])
        self._plan_epoch = None
        self._buf_refs = [(int(u), int(r)) for u, r in state["buffer"]]
        units = {u: self._read_unit(u) for u in sorted({u for u, _ in self._buf_refs})}  # each read once
        self._buf_docs = [units[u][1][units[u][0][r] : units[u][0][r + 1]].copy() for u, r in self._buf_refs]

    @property
    def epoch(self) -> int:
        return self._epoch


def validation_batches(
    data_dir: str,
    seq_len: int,
    micro_batch: int,
    max_tokens: int,
    rank: int = 0,
    world_size: int = 1,
) -> list:
    """A fixed list of held-out (x, y) batches for this rank: the same on every call.

    About `max_tokens` input tokens in all, split evenly over ranks (every rank gets the same number of
    batches, at least one), capped by what the val split holds; it wraps only if the split is smaller than
    one batch per rank.
    """
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens: {max_tokens!r} must be a positive int")
    loader = TokenLoader(data_dir, "val", seq_len, micro_batch, rank, world_size, seed=0, shuffle=False)
    per_batch = world_size * micro_batch * seq_len
    available = int(loader.meta["n_val_tokens"]) // (world_size * micro_batch * (seq_len + 1))
    n = max(1, min(max_tokens // per_batch, available))
    return [next(loader) for _ in range(n)]
