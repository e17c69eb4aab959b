"""Multi-horizon runs against independent runs: what a wsd cooldown branch costs and how its loss compares.

One wsd run to the longest horizon with cooldown branches at the shorter ones, then, per horizon, an independent
linear-decay run (the study's schedule) and an independent wsd run to that horizon alone, all on the embedded corpus
with the production Trainer in one process (no Ray). Prints each horizon's final validation loss for the three, the
branch - linear gap, and the multi-horizon run's steps over its longest horizon's.

    python bench/bench_horizons.py [--d-model 64 --r 2 --steps 240 --fractions 0.25 0.5 --cooldown 0.2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_step import single_process_group  # noqa: E402
from training.config import RunConfig  # noqa: E402


def config(args, **changes) -> RunConfig:
    batch = args.micro_batch * args.seq_len
    base = RunConfig.from_dict({
        "model": {"family": "tiny", "r": args.r, "d_model": args.d_model, "seq_len": args.seq_len,
                  "vocab_size": 1024},
        "optim": {"lr": args.lr, "embed_lr_mult": 10.0, "schedule": "wsd", "cooldown_frac": args.cooldown},
        "budget": {"tokens": batch * args.steps}, "batch_tokens": batch, "micro_batch": args.micro_batch,
        "zero_stage": 0, "eval_every": 10 ** 6, "log_every": 50, "checkpoint_every": 10 ** 6, "val_tokens": 16384,
        "resources": {"cpus_per_worker": float(args.threads)},
    })
    return base.replace(**changes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--r", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=240, help="the longest horizon")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5], help="shorter horizons / longest")
    p.add_argument("--cooldown", type=float, default=0.2, help="wsd cooldown fraction")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from training.prepare import ensure_default_data
    from training.trainer import Trainer, configure_cpu

    configure_cpu(args.threads)
    single_process_group("gloo")
    data = ensure_default_data(vocab_size=1024)
    full = config(args)
    horizons = [round(f * full.tokens / full.batch_tokens) * full.batch_tokens for f in args.fractions]
    multi = full.replace(horizons=horizons)

    def train(cfg: RunConfig) -> dict:
        t0 = time.perf_counter()
        summary = Trainer(cfg, data).fit(lambda *a: None)
        summary["wall"] = time.perf_counter() - t0
        return summary

    result = train(multi)
    branch_loss = {b["tokens"]: b["val_loss"] for b in result["branches"]} | {full.tokens: result["val_loss"]}
    print(f"tiny d={args.d_model} r={args.r}: multi-horizon wsd run to {full.steps} steps with branches at "
          f"{[h // full.batch_tokens for h in horizons]}: {result['steps_trained']} steps trained = "
          f"{result['steps_trained'] / full.steps:.2f}x its longest horizon ({result['wall']:.0f} s)", flush=True)
    print("| steps | wsd branch | wsd alone | linear alone | branch - linear |")
    print("|---|---|---|---|---|")
    for tokens in [*horizons, full.tokens]:
        alone = train(multi.branch_config(tokens))
        linear = train(multi.branch_config(tokens).replace(optim={"schedule": "linear"}))
        gap = branch_loss[tokens] - linear["val_loss"]
        print(f"| {tokens // full.batch_tokens} | {branch_loss[tokens]:.4f} | {alone['val_loss']:.4f} | "
              f"{linear['val_loss']:.4f} | {gap:+.4f} ({gap / linear['val_loss']:+.2%}) |", flush=True)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
