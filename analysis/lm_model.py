"""`looplaw`, an lm-evaluation-harness model: a stored run's final weights, run at a chosen test-time r.

    lm_eval.simple_evaluate(model="looplaw", model_args="run=results/laptop/d16-r4-7fb4bdaef06945d4,r=8", tasks=[...])
    python -m analysis lmeval --model looplaw --model_args run=STORE/RUN_ID,r=8 --tasks kjv_cloze

Importing this module registers the name (lm-eval 0.4.13 discovers no third-party models by itself, so its own
`lm_eval` command cannot see it; `python -m analysis lmeval` is that command with this module imported).

Model arguments: `run` (STORE/RUN_ID, or RUN_ID with `store=STORE`; STORE a folder or any pyarrow.fs URI), `r`
(recurrences at evaluation, default the trained r), `batch_size` (default 32), `device` (default cuda when there
is one, else cpu), `dtype` (default bfloat16 on cuda, float32 on cpu), `max_length` (default the trained sequence
length), `max_gen_toks` (default 256). Every sequence starts with the tokenizer's BOS, as every training document
did; BOS is also where generation stops (it begins a new document). Scores do not depend on the batch: attention
is causal and padding only follows a sequence.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences

from training.storage import is_uri
from training.tokenizer import bos_id, load_tokenizer
from training.weights import read_weights

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def split_run(run: Any, store: Any = None) -> tuple[str, str]:
    """(store, run_id) from `run=STORE/RUN_ID`, or `run=RUN_ID` with `store=STORE`."""
    if not isinstance(run, str) or not run.strip("/"):
        raise ValueError(f"run: {run!r} names no run; pass run=STORE/RUN_ID (or run=RUN_ID,store=STORE)")
    if store is not None:
        return os.fspath(store), run
    head, _, run_id = run.rstrip("/").rpartition("/")
    if not head or (is_uri(run) and head.endswith(":/")):
        raise ValueError(f"run: {run!r} has no store part; pass run=STORE/RUN_ID (or run=RUN_ID,store=STORE)")
    return head, run_id


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: {value!r} must be an integer >= 1")
    return value


def _batch_size(value: Any) -> int:
    """lm-eval's --batch_size: an integer (its default is 1), or 'auto' / 'auto:N', which mean DEFAULT_BATCH_SIZE
    here (no search for the largest batch that fits: these models are small)."""
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    try:
        return _positive_int("batch_size", int(value))
    except (TypeError, ValueError):
        raise ValueError(f"batch_size: {value!r} must be an integer >= 1 or 'auto'") from None


@register_model("looplaw")
class LooplawLM(LM):
    """A looped model from a results store, evaluated at `r` recurrences."""

    def __init__(self, run: str, store: str | None = None, r: int | None = None, batch_size: Any = None,
                 max_batch_size: Any = None, device: str | None = None, dtype: str | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256):
        super().__init__()
        del max_batch_size  # lm-eval passes it to every model; one fixed batch size serves these small models
        self.store, self.run_id = split_run(run, store)
        stored = read_weights(self.store, self.run_id)
        self.trained_r = stored.config.r
        self.r = self.trained_r if r is None else r
        self.batch_size = _batch_size(batch_size)
        self.max_length = _positive_int("max_length", stored.config.seq_len if max_length is None else max_length)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self._device.type == "cuda" and not torch.cuda.is_available():
            # lm-eval's command asks for cuda:0 unless told otherwise, on any machine; its own models fall back too
            log.warning("device %s: no CUDA device here; evaluating on the CPU", device)
            self._device = torch.device("cpu")
        dtype = dtype or ("bfloat16" if self._device.type == "cuda" else "float32")
        if dtype not in DTYPES:
            raise ValueError(f"dtype: {dtype!r} is not one of {sorted(DTYPES)}")
        self.model = stored.model(self._device, DTYPES[dtype])
        self.model.track_state_norms = False
        self.tokenizer = load_tokenizer(stored.tokenizer_json)
        self.bos = bos_id(self.tokenizer)
        self.step = stored.step

    @property
    def r(self) -> int:
        return self._r

    @r.setter
    def r(self, value: Any) -> None:
        self._r = _positive_int("r", value)

    @property
    def tokenizer_name(self) -> str:
        return f"looplaw-{self.run_id}"

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records in its results' config."""
        return {"store": self.store, "run_id": self.run_id, "r": self.r, "trained_r": self.trained_r,
                "step": self.step}

    # ---- tokens -------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """As lm-eval's own models: trailing spaces of the context belong to the continuation, and the continuation
        is what encoding the whole adds to encoding the context (BPE merges across the boundary)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.encode(context + continuation)
        head = self.encode(context)
        return [self.bos] + head, whole[len(head):]

    @torch.no_grad()
    def _log_probs(self, rows: list[list[int]]) -> torch.Tensor:
        """Log-softmax of the next-token logits at every position of each row, [B, T, V] fp32 on the CPU; rows are
        right-padded (causal attention: padding after a row never reaches it)."""
        width = max(len(row) for row in rows)
        batch = torch.full((len(rows), width), self.bos, dtype=torch.long)
        for i, row in enumerate(rows):
            batch[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        logits, _ = self.model(batch.to(self._device), r=self.r)
        return F.log_softmax(logits.float(), dim=-1).cpu()

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding gives the continuation) per (context tokens,
        continuation tokens); longest first in batches, answered in the given order."""
        for context, continuation in pairs:
            if not continuation:
                raise ValueError("loglikelihood: an empty continuation has no tokens to score")
            if len(continuation) > self.max_length:
                raise ValueError(f"loglikelihood: a continuation of {len(continuation)} tokens is longer than the "
                                 f"model's context ({self.max_length} tokens, max_length)")
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            rows = [(pairs[i][0] + pairs[i][1])[-(self.max_length + 1):][:-1] for i in chunk]
            log_probs = self._log_probs(rows)
            for b, i in enumerate(chunk):
                target = torch.tensor(pairs[i][1], dtype=torch.long)
                end = len(rows[b])
                scores = log_probs[b, end - len(target):end]
                logp = float(scores.gather(1, target[:, None]).sum())
                out[i] = (logp, bool((scores.argmax(dim=-1) == target).all()))
        return out

    # ---- the three requests lm-eval makes -----------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        results = self._score([self._encode_pair(*req.args) for req in requests])
        for req, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        windows, owner = [], []
        for n, req in enumerate(requests):
            for window in lm_utils.get_rolling_token_windows(token_list=self.encode(req.args[0]),
                                                             prefix_token=self.bos, max_seq_len=self.max_length,
                                                             context_len=1):
                windows.append(lm_utils.make_disjoint_window(window))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logp, _) in zip(owner, self._score(windows)):
            totals[n] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy continuation of each context until one of its stop strings, BOS, or max_gen_toks tokens; batched
        by stepping every unfinished request one token per forward (the model keeps no cache)."""
        jobs = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
                raise ValueError(f"generate_until: {kwargs!r} asks for sampling; the looplaw model decodes greedily "
                                 "(do_sample: false, temperature: 0)")
            limit = kwargs.get("max_gen_toks", self.max_gen_toks)
            jobs.append({"tokens": [self.bos] + self.encode(context), "new": [], "text": "", "done": False,
                         "until": handle_stop_sequences(kwargs.get("until"), eos=None),
                         "limit": _positive_int("max_gen_toks", limit)})
        order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i]["tokens"]))
        for start in range(0, len(order), self.batch_size):
            chunk = [jobs[i] for i in order[start:start + self.batch_size]]
            while live := [job for job in chunk if not job["done"]]:
                rows = [(job["tokens"] + job["new"])[-self.max_length:] for job in live]
                log_probs = self._log_probs(rows)
                for b, job in enumerate(live):
                    self._extend(job, int(log_probs[b, len(rows[b]) - 1].argmax()))
        for req, job in zip(requests, jobs):
            self.cache_hook.add_partial("generate_until", req.args, job["text"])
        return [job["text"] for job in jobs]

    def _extend(self, job: dict, token: int) -> None:
        """One greedy token onto a generation job; it ends at BOS, at a stop string (cut before it) or at its limit."""
        if token == self.bos:
            job["done"] = True
            return
        job["new"].append(token)
        text = self.tokenizer.decode(job["new"])
        cuts = [text.index(stop) for stop in job["until"] if stop and stop in text]
        job["text"] = text[:min(cuts)] if cuts else text
        job["done"] = bool(cuts) or len(job["new"]) >= job["limit"]
