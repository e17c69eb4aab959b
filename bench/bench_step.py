"""Step-time benchmark: what Ray Train + DeepSpeed costs over bare PyTorch on the same model, batch and threads.

CPU (default), in one run: bare PyTorch steps in this process and the same steps inside a 1-worker Ray
TorchTrainer through the training loop's own engine and step functions (training.optim.build_engine, training.loop.train_step),
alternating round by round so both see the same background load. Prints tokens/s and MFU for both and the
ratio of median step times (goal <= 1.05), on wall and on CPU time.

    python bench/bench_step.py [--d-model 128 --r 2 --seq-len 256 --micro-batch 8 --grad-accum 1 --threads 2]

GPU (--gpu, no Ray): bf16 weights, torch.compile, SDPA flash attention, fused AdamW on the reference model
s=12, r=4, T=2048; prints tokens/s and MFU.

    python bench/bench_step.py --gpu [--size 12 --r 4 --seq-len 2048 --micro-batch 8]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a plain script from a checkout

import torch  # noqa: E402

from training.config import RunConfig  # noqa: E402


def bench_config(args) -> RunConfig:
    model = {"family": "tiny", "r": args.r, "d_model": args.d_model, "head_dim": 32, "seq_len": args.seq_len,
             "vocab_size": args.vocab_size}
    batch = args.micro_batch * args.seq_len * args.grad_accum
    return RunConfig.from_dict({
        "model": model, "budget": {"tokens": batch}, "batch_tokens": batch,
        "micro_batch": args.micro_batch, "zero_stage": args.zero_stage, "val_tokens": args.seq_len,
        "resources": {"num_workers": 1, "cpus_per_worker": float(args.threads)},
        "optim": {"lr": 1e-3, "grad_clip": 1.0},
    })


def synthetic_batches(cfg: RunConfig, n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.micro_batch, cfg.model.seq_len + 1)
    rows = [torch.randint(0, cfg.model.vocab_size, shape, generator=g) for _ in range(n)]
    return [(r[:, :-1].contiguous(), r[:, 1:].contiguous()) for r in rows]


def _cycle(batches):
    while True:
        yield from batches


def timed_steps(step, steps: int, warmup: int) -> list[tuple[float, float]]:
    """(wall, process CPU) seconds of each timed step. CPU time counts every thread of the process, background
    threads included, and is far less disturbed than wall time when other jobs share the cores."""
    times = []
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if i >= warmup:
            times.append((time.perf_counter() - t0, time.process_time() - c0))
    return times


def medians(times: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(t for t, _ in times), statistics.median(c for _, c in times)


def bare_stepper(cfg: RunConfig, threads: int):
    """The reference: plain PyTorch AdamW with the same groups, accumulation, clipping and CPU settings."""
    from models import LoopedLM
    from training.loop import configure_cpu
    from training.optim import param_groups

    configure_cpu(threads)
    torch.manual_seed(cfg.seed)
    model = LoopedLM(cfg.model)
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            weight_decay=o.weight_decay)
    batches = _cycle(synthetic_batches(cfg, 8))

    def step():
        for _ in range(cfg.grad_accum):
            x, y = next(batches)
            _, loss = model(x, y)
            (loss / cfg.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _wait_for(path: Path, alive=lambda: True) -> None:
    while not path.exists():
        if not alive():
            raise RuntimeError(f"gave up waiting for {path.name}: the other side stopped")
        time.sleep(0.005)


def ray_worker(config: dict) -> list[tuple[float, float]]:
    """Runs inside the Ray Train worker: the training loop's engine and step, on the same synthetic batches.

    Steps in rounds, each started by the driver through a file in `sync`, so that Ray and bare rounds alternate
    and share whatever else loads the machine at the time."""
    from models import LoopedLM
    from training.loop import configure_cpu, global_mean, train_step
    from training.optim import build_engine

    cfg = RunConfig.from_dict(config["run"])
    configure_cpu(config["threads"])
    torch.manual_seed(cfg.seed)
    engine = build_engine(LoopedLM(cfg.model), cfg, on_gpu=False)
    batches = _cycle(synthetic_batches(cfg, 8))
    device = torch.device("cpu")
    sync = Path(config["sync"])

    def step():
        global_mean(train_step(engine, batches, cfg.grad_accum, device))
        engine.get_global_grad_norm()

    timed_steps(step, 0, config["warmup"])
    (sync / "ready").touch()
    times = []
    for i in range(config["rounds"]):
        _wait_for(sync / f"go{i}")
        times += timed_steps(step, config["steps"], 0)
        (sync / f"done{i}").touch()
    return times


def interleaved_step_times(cfg: RunConfig, args) -> tuple[list, list]:
    """(bare, ray) step times: a 1-worker TorchTrainer runs in a thread while this process runs the bare model,
    the two taking turns round by round."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    bare_step = bare_stepper(cfg, args.threads)
    timed_steps(bare_step, 0, args.warmup)
    tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    sync = Path(tmp) / "sync"
    sync.mkdir()
    ray.init(address="local", num_cpus=args.threads, include_dashboard=False, _temp_dir=tmp,
             logging_level="INFO" if args.verbose else "WARNING", log_to_driver=args.verbose)
    out: dict = {}
    try:
        trainer = TorchTrainer(
            ray_worker,
            train_loop_config={"run": cfg.to_dict(), "threads": args.threads, "steps": args.steps,
                               "warmup": args.warmup, "rounds": args.rounds, "sync": str(sync)},
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": args.threads}),
            run_config=ray.train.RunConfig(name="bench_step", storage_path=f"{tmp}/storage"),
        )

        def fit():
            try:
                out["ray"] = trainer.fit().return_value
            except BaseException as exc:  # surfaced below
                out["error"] = exc

        thread = threading.Thread(target=fit, daemon=True)
        thread.start()
        _wait_for(sync / "ready", thread.is_alive)
        bare = []
        for i in range(args.rounds):
            bare += timed_steps(bare_step, args.steps, 0)
            (sync / f"go{i}").touch()
            _wait_for(sync / f"done{i}", thread.is_alive)
        thread.join()
        if "error" in out:
            raise out["error"]
        return bare, out["ray"]
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def cpu_main(args) -> int:
    from training.monitor import device_peak_flops, mfu

    cfg = bench_config(args)
    tokens = cfg.batch_tokens
    peak = device_peak_flops(False, args.threads)
    f = cfg.flops_per_token
    print(f"model d={cfg.model.d_model} r={cfg.model.r} depth={cfg.model.effective_depth} T={cfg.model.seq_len} "
          f"V={cfg.model.vocab_size}; batch {cfg.micro_batch}x{cfg.model.seq_len}x{cfg.grad_accum} = {tokens} tokens; "
          f"{args.threads} threads; ZeRO-{cfg.zero_stage}; F = {f:.3e} FLOPs/token; peak {peak:.3e} FLOP/s; "
          f"{args.rounds} alternating rounds of {args.steps} steps", flush=True)
    bare_times, ray_times = interleaved_step_times(cfg, args)
    bare, ray_t = medians(bare_times), medians(ray_times)
    for label, (wall, cpu) in (("bare PyTorch", bare), ("Ray+DeepSpeed", ray_t)):
        tps = tokens / wall
        print(f"{label:14s} step {wall * 1e3:8.2f} ms wall, {cpu * 1e3:8.2f} ms CPU  {tps:10.0f} tokens/s  "
              f"MFU {mfu(f, tps, peak):.2%}", flush=True)
    wall_ratio, cpu_ratio = ray_t[0] / bare[0], ray_t[1] / bare[1]
    print(f"ratio Ray+DeepSpeed / bare: wall {wall_ratio:.3f}, CPU time {cpu_ratio:.3f}  "
          f"(goal <= 1.05: {'met' if wall_ratio <= 1.05 else 'NOT met'})")
    load = os.getloadavg()[0]
    if load > args.threads + 0.5:
        print(f"note: load average {load:.1f} on {os.cpu_count()} cores: other jobs share them, so wall times are "
              "noisy (rounds alternate to share the noise fairly); CPU time is the steadier comparison")
    return 0


def gpu_main(args) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from models import LoopedConfig, LoopedLM
    from models.accounting import flops_per_token
    from training.monitor import device_peak_flops, mfu

    if not torch.cuda.is_available():
        print("--gpu: no CUDA device visible", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = LoopedConfig.reference(size=args.size, r=args.r, seq_len=args.seq_len)
    torch.manual_seed(0)
    # bf16 weights, as DeepSpeed's bf16 engine runs them (its fp32 master copy lives in the optimizer). Under
    # autocast the norms may hand SDPA fp32 q/k, and the flash kernel takes only bf16/fp16.
    model = LoopedLM(cfg).to(device="cuda", dtype=torch.bfloat16)
    model.track_state_norms = False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), fused=True)
    compiled = torch.compile(model)
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = torch.randint(0, cfg.vocab_size, (args.micro_batch, cfg.seq_len + 1), device="cuda", generator=g)
    x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def step():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            _, loss = compiled(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):  # the first steps compile
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(args.steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    t = statistics.median(times)
    tokens = args.micro_batch * cfg.seq_len
    tps = tokens / t
    f = flops_per_token(cfg)
    peak = device_peak_flops(True)
    print(f"{torch.cuda.get_device_name()}: reference s={args.size} (d={cfg.d_model}) r={cfg.r} T={cfg.seq_len} "
          f"micro-batch {args.micro_batch}; F = {f:.3e} FLOPs/token")
    print(f"step {t * 1e3:.1f} ms  {tps:,.0f} tokens/s  MFU {mfu(f, tps, peak):.1%} (of {peak:.3g} bf16 FLOP/s)  "
          f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="bare PyTorch GPU mode (no Ray)")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--size", type=int, default=12, help="--gpu: reference size s")
    p.add_argument("--r", type=int, default=None, help="recurrences (default 2 on CPU, 4 on GPU)")
    p.add_argument("--seq-len", type=int, default=None, help="default 256 on CPU, 2048 on GPU")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--steps", type=int, default=None, help="timed steps (per round on CPU; default 5 CPU, 30 GPU)")
    p.add_argument("--rounds", type=int, default=6, help="CPU: alternating bare / Ray rounds")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 CPU, 10 GPU)")
    p.add_argument("--verbose", action="store_true", help="show Ray's and the worker's logs")
    args = p.parse_args(argv)
    if args.gpu:
        args.r = args.r or 4
        args.seq_len = args.seq_len or 2048
        args.steps, args.warmup = args.steps or 30, args.warmup or 10
        return gpu_main(args)
    args.r = args.r or 2
    args.seq_len = args.seq_len or 256
    args.steps, args.warmup = args.steps or 5, args.warmup or 3
    return cpu_main(args)


if __name__ == "__main__":
    sys.exit(main())
