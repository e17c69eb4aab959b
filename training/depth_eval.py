"""Held-out loss of a trained looped model, at its trained depth and at other test-time depths.

A looped model can run a different number of recurrences at inference than it was trained with. After training,
`evaluate_depths` measures the held-out loss at each evaluation r on the same validation batches as the run's
final loss: evaluation only, timed, no parameter changes. Every rank runs the same forwards (ZeRO-3 gathers
parameters collectively) and gets the same all-reduced numbers.
"""
from __future__ import annotations

import time
from typing import Any, Iterable

import torch
import torch.distributed as dist

from training.loader import bits_per_byte


@torch.no_grad()
def evaluate(model, batches: list, device: torch.device, r: int | None = None) -> float:
    """Mean held-out loss (nats/token) over every rank's batches, at `r` recurrences (None: the model's own r)."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in batches:
        _, loss = model(x.to(device), y.to(device), r=r)
        total[0] += float(loss) * y.numel()
        total[1] += y.numel()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    model.train()
    return float(total[0] / total[1])


def evaluate_depths(model, batches: list, depths: Iterable[int], device: torch.device,
                    meta: dict | None = None) -> list[dict[str, Any]]:
    """One depth-table row per evaluation r: {eval_r, val_loss, val_bpb, seconds}; `model` is a DeepSpeed engine
    or a bare LoopedLM. Bits per byte need the prepared data's meta (NaN without it)."""
    rows = []
    for r in depths:
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"eval_depths: {r!r} is not a recurrence count; use integers >= 1")
        t0 = time.perf_counter()
        loss = evaluate(model, batches, device, r=r)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        bpb = bits_per_byte(loss, meta) if meta is not None else float("nan")
        rows.append({"eval_r": r, "val_loss": loss, "val_bpb": bpb, "seconds": time.perf_counter() - t0})
    return rows
