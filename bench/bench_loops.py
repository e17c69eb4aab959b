"""Do the loops work? Direct runs of the production Trainer (no Ray), one per design, printing what the idle-loop
check reads: final held-out loss at the trained r, the loss at one recurrence, their gap (the loop gain), e's RMS
over the final state's, and the state's mean relative change per recurrence.

    python bench/bench_loops.py --injection additive additive_normed --r 1 4 8 --compute 3.16e11 --d-model 16
    python bench/bench_loops.py --recipe muonh --lr 0.014 ...

Runs go two at a time on 2 cores (one thread each) in child processes; each line prints as its run ends.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_config(injection: str, r: int, d_model: int, compute: float, lr: float, seed: int, recipe: str,
               head_dim: int, schedule: str, batch_tokens: int = 1024) -> dict:
    return {
        "model": {"family": "tiny", "r": r, "d_model": d_model, "seq_len": 128, "vocab_size": 1024,
                  "head_dim": head_dim, "injection": injection},
        "optim": {"optimizer": recipe, "lr": lr, "final_lr_frac": 0.1, "schedule": schedule,
                  **({"embed_lr_mult": 10.0, "beta1": 0.9, "beta2": 0.95, "grad_clip": 1.0} if recipe == "adamw" else {})},
        "budget": {"compute": compute}, "batch_tokens": batch_tokens, "micro_batch": batch_tokens // 128, "seed": seed,
        "zero_stage": 0, "eval_every": 10 ** 6, "log_every": 50, "checkpoint_every": 10 ** 6, "val_tokens": 8192,
        "eval_depths": [1, r], "resources": {"cpus_per_worker": 1.0},
    }


def child(spec: str) -> int:
    """Train one config (JSON) in this process and print its figures as one JSON line."""
    from bench.bench_step import single_process_group
    from training.config import RunConfig
    from training.prepare import ensure_default_data
    from training.trainer import Trainer, configure_cpu

    configure_cpu(1)
    single_process_group("gloo")
    cfg = RunConfig.from_dict(json.loads(spec))
    t0 = time.perf_counter()
    summary = Trainer(cfg, ensure_default_data(vocab_size=1024)).fit(lambda *a: None)
    loop = summary.get("loop") or {}
    changes = loop.get("state_change") or []
    states = loop.get("state_rms") or [float("nan")]
    print(json.dumps({"val_loss": summary["val_loss"], "loss_r1": loop.get("loss_r1", summary["val_loss"]),
                      "e_rms": loop.get("e_rms", float("nan")), "state_rms": states[-1],
                      "state_change": sum(changes) / len(changes) if changes else float("nan"),
                      "steps": summary["steps"], "seconds": time.perf_counter() - t0}), flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--injection", nargs="+", default=["additive", "additive_normed"])
    p.add_argument("--r", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--d-model", type=int, nargs="+", default=[16])
    p.add_argument("--compute", type=float, default=3.16e11)
    p.add_argument("--lr", type=float, nargs="+", default=[0.02])
    p.add_argument("--seed", type=int, nargs="+", default=[0])
    p.add_argument("--recipe", default="adamw", help="optim.name: adamw or muonh")
    p.add_argument("--schedule", default="linear")
    p.add_argument("--head-dim", type=int, default=8)
    p.add_argument("--batch-tokens", type=int, default=1024, help="tokens per optimizer step (128-token sequences)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child)

    designs = []
    for injection, r, d, lr, seed in itertools.product(args.injection, args.r, args.d_model, args.lr, args.seed):
        if r == 1 and injection != args.injection[0]:
            continue  # r = 1 has no injection: one plain run serves every mode
        designs.append((injection if r > 1 else "-", r, d, lr, seed,
                        run_config(injection, r, d, args.compute, lr, seed, args.recipe, args.head_dim, args.schedule,
                                   args.batch_tokens)))

    def train(design):
        *label, spec = design
        with socket.socket() as sock:  # each child its own process group port
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                             cwd=ROOT, env={**os.environ, "MASTER_PORT": str(port)})
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode or not lines:
            return label, {"error": out.stderr.strip().splitlines()[-1:] or ["no output"]}
        return label, json.loads(lines[-1])

    print(f"recipe {args.recipe}, C={args.compute:.3g}, schedule {args.schedule}, head_dim {args.head_dim}, "
          f"batch {args.batch_tokens} tokens")
    print("| injection | r | d | lr | seed | loss at r | loss at r'=1 | loop gain | e/state RMS | state change | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with ThreadPoolExecutor(args.jobs) as pool:
        for (injection, r, d, lr, seed), res in pool.map(train, designs):
            if "error" in res:
                print(f"| {injection} | {r} | {d} | {lr} | {seed} | error: {res['error']} |", flush=True)
                continue
            gain = res["loss_r1"] - res["val_loss"]
            ratio = res["e_rms"] / res["state_rms"] if r > 1 else float("nan")
            print(f"| {injection} | {r} | {d} | {lr:g} | {seed} | {res['val_loss']:.4f} | {res['loss_r1']:.4f} | "
                  f"{gain:+.4f} | {ratio:.2f} | {res['state_change']:.4f} | {res['seconds']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
