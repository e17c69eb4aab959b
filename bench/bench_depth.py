"""What test-time depth evaluation costs next to training, and that every injection mode runs past its trained r.

For each injection: a reference-recipe model (size s, trained r) in bf16 on a GPU (fp32 on CPU), fitted to one
batch for a few AdamW steps so that depth changes its loss; times a training step (forward + backward) and
`training.depth_eval.evaluate_depths` over r = 1..2r on that batch, and prints the evaluation cost in training
steps of the same tokens, plus each depth's loss. Measured on one H100 (s=12, T=2048, batch 8, eager): 1..2r
costs about 3.2 training steps at r=4 and 5.7-6.3 at r=8, every injection finite up to 2r.

    python bench/bench_depth.py [--size 12 --r 4 --seq-len 2048 --micro-batch 8]      (GPU if there is one)
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a plain script from a checkout

import torch  # noqa: E402

from models import LoopedLM  # noqa: E402
from models.config import LoopedConfig  # noqa: E402
from training.depth_eval import evaluate_depths  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(injection: str, args, device: torch.device) -> None:
    cfg = LoopedConfig.reference(size=args.size, r=args.r, injection=injection, seq_len=args.seq_len,
                                 vocab_size=args.vocab_size)
    torch.manual_seed(0)
    model = LoopedLM(cfg).to(device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (args.micro_batch, cfg.seq_len + 1), generator=g).to(device)
    batches = [(tokens[:, :-1], tokens[:, 1:])]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    for _ in range(args.fit_steps):  # fit the batch a little, so depth changes the loss; warms up the kernels
        model(*batches[0])[1].backward()
        opt.step()
        opt.zero_grad()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        model(*batches[0])[1].backward()
    _sync(device)
    train = (time.perf_counter() - t0) / args.steps
    evaluate_depths(model, batches, [1], device)  # warm up
    rows = evaluate_depths(model, batches, range(1, 2 * cfg.r + 1), device)
    evaluation = sum(row["seconds"] for row in rows)
    losses = " ".join(f"{row['val_loss']:.3f}" if math.isfinite(row["val_loss"]) else "nan" for row in rows)
    print(f"{injection:>12}: train step {train * 1e3:7.1f} ms; eval at r=1..{2 * cfg.r} {evaluation * 1e3:7.1f} ms "
          f"= {evaluation / train:.2f} train steps of the same tokens; losses {losses}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=12)
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=32064)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--fit-steps", type=int, default=12, help="AdamW steps on the batch before timing")
    parser.add_argument("--injections", default="concat,diagonal,hyperconnect,additive")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, s={args.size}, r={args.r}, "
          f"T={args.seq_len}, batch {args.micro_batch}", flush=True)
    for injection in args.injections.split(","):
        bench(injection, args, device)


if __name__ == "__main__":
    main()
