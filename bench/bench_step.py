"""Step-time benchmark: what Ray Train + DeepSpeed costs over bare PyTorch on the same model, batch and threads.

CPU (default), in one run: bare PyTorch steps in this process and the production step (training.trainer.Trainer:
DeepSpeed engine, prefetching loader over a synthetic prepared folder) inside a 1-worker Ray TorchTrainer,
alternating round by round so both see the same background load. Prints tokens/s and MFU for both and the
ratio of median step times (goal <= 1.05), on wall and on CPU time.

    python bench/bench_step.py [--d-model 128 --r 2 --seq-len 256 --micro-batch 8 --grad-accum 1 --threads 2]

GPU (--gpu, no Ray): the same Trainer (DeepSpeed bf16 engine, torch.compile, prefetching loader, chunked loss) in
this process on the reference sizes, the study's micro-batches (32 below s=18, 16 below s=30, else 8) at T=2048;
prints tokens/s, MFU against 989 TFLOP/s (H100 dense bf16) and against the measured large-matmul rate, and peak
memory. `--profile` adds a torch-profiler table of the first configuration's step.

    python bench/bench_step.py --gpu [--sizes 6 12 20 --rs 1 4 --seq-len 2048 --zero-stage 0]
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a plain script from a checkout

import ray.train  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from ray.train.torch import TorchConfig, TorchTrainer  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.synthetic_data import write_synthetic_prepared  # noqa: E402
from models import LoopedLM  # noqa: E402
from training.config import RunConfig  # noqa: E402
from training.monitor import device_peak_flops, mfu  # noqa: E402
from training.optim import param_groups  # noqa: E402
from training.ray_session import ray_session  # noqa: E402
from training.trainer import Trainer, configure_cpu, global_sum  # noqa: E402


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
    """Runs inside the Ray Train worker: the production Trainer's step over a synthetic prepared folder.

    Steps in rounds, each started by the driver through a file in `sync`, so that Ray and bare rounds alternate
    and share whatever else loads the machine at the time."""
    cfg = RunConfig.from_dict(config["run"])
    configure_cpu(config["threads"])
    trainer = Trainer(cfg, config["data"])
    trainer.start_batches()
    sync = Path(config["sync"])

    def step():
        float(global_sum(trainer.train_step().reshape(1)))  # the loop's flush, here every step
        trainer.engine.get_global_grad_norm()

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
    bare_step = bare_stepper(cfg, args.threads)
    timed_steps(bare_step, 0, args.warmup)
    tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    sync = Path(tmp) / "sync"
    sync.mkdir()
    out: dict = {}
    try:
        # A private local Ray through the project's one way to a Ray (training.ray_session), reaped with this process.
        with ray_session("local", num_cpus=args.threads, log_to_driver=args.verbose,
                         logging_level="INFO" if args.verbose else "WARNING"):
            data = write_synthetic_prepared(f"{tmp}/data", cfg.model.vocab_size, train_tokens=200_000,
                                            val_tokens=4 * cfg.model.seq_len, doc_tokens=min(1500, cfg.model.seq_len))
            trainer = TorchTrainer(
                ray_worker,
                train_loop_config={"run": cfg.to_dict(), "data": data, "threads": args.threads, "steps": args.steps,
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
        shutil.rmtree(tmp, ignore_errors=True)


def cpu_main(args) -> int:
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


def study_micro_batch(size: int) -> int:
    """The study's device batch: 32 below s=18, 16 below s=30, else 8."""
    return 32 if size < 18 else 16 if size < 30 else 8


def single_process_group(backend: str) -> None:
    """A world of one, as Ray Train would set up, so DeepSpeed runs outside Ray."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        for key in ("RANK", "LOCAL_RANK"):
            os.environ.setdefault(key, "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group(backend, rank=0, world_size=1)


def matmul_rate(n: int = 8192, reps: int = 10) -> float:
    """bf16 FLOP/s of a large random matrix product: the practical ceiling on this GPU."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    end.synchronize()
    return 2 * n ** 3 * reps / (start.elapsed_time(end) / 1e3)


def gpu_config(size: int, r: int, args) -> RunConfig:
    micro = args.micro_batch or study_micro_batch(size)
    batch = micro * args.seq_len
    return RunConfig.from_dict({
        "model": {"family": "reference", "size": size, "r": r, "seq_len": args.seq_len},
        "budget": {"tokens": batch * (args.warmup + args.steps)}, "batch_tokens": batch, "micro_batch": micro,
        "zero_stage": args.zero_stage, "val_tokens": args.seq_len * micro,
        "resources": {"num_workers": 1, "use_gpu": True}, "compile": not args.no_compile,
        **({"optim": {"optimizer": args.optimizer}} if args.optimizer else {}),
    })


def gpu_step_time(trainer, args, profile_to: str | None) -> float:
    """Median seconds of the Trainer's own step (CUDA events), after warm-up steps that compile."""
    trainer.start_batches()
    for _ in range(args.warmup):
        trainer.train_step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, host = [], []
    for _ in range(args.steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        trainer.train_step()
        host.append(time.perf_counter() - t0)  # time to enqueue the step: near the step time means host-bound
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    print(f"  host enqueue {statistics.median(host) * 1e3:.1f} ms of a {statistics.median(times) * 1e3:.1f} ms step",
          flush=True)
    if profile_to:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                trainer.train_step()
            torch.cuda.synchronize()
        averages = prof.key_averages()
        table = (averages.table(sort_by="cuda_time_total", row_limit=40) + "\n"
                 + averages.table(sort_by="self_cpu_time_total", row_limit=40))
        Path(profile_to).write_text(table)
        print(table[:6000])
    trainer.batches.close()
    return statistics.median(times)


def gpu_main(args) -> int:
    if not torch.cuda.is_available():
        print("--gpu: no CUDA device visible", file=sys.stderr)
        return 2
    single_process_group("nccl")
    tmp = tempfile.mkdtemp(prefix="bench-data-")
    data = write_synthetic_prepared(tmp, vocab_size=32064, train_tokens=4_000_000, val_tokens=300_000)
    peak = device_peak_flops(True)
    measured = matmul_rate()
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; bf16 8192^3 matmul {measured / 1e12:.0f} "
          f"TFLOP/s; MFU basis {peak / 1e12:.0f} TFLOP/s", flush=True)
    rows = []
    for i, (size, r) in enumerate((s, r) for s in args.sizes for r in args.rs):
        cfg = gpu_config(size, r, args)
        t0 = time.perf_counter()
        trainer = Trainer(cfg, data, device=torch.device("cuda"))
        profile_to = f"{args.profile}" if args.profile and i == 0 else None
        t = gpu_step_time(trainer, args, profile_to)
        tps = cfg.batch_tokens / t
        f = cfg.flops_per_token
        row = (size, cfg.model.d_model, r, cfg.micro_batch, t * 1e3, tps, mfu(f, tps, peak), mfu(f, tps, measured),
               torch.cuda.max_memory_allocated() / 2 ** 30, time.perf_counter() - t0)
        rows.append(row)
        print("s=%d d=%d r=%d micro=%d: step %.1f ms  %.0f tokens/s  MFU %.1f%% (989)  %.1f%% (matmul)  "
              "peak %.1f GiB  (%.0f s incl. compile)" % (*row[:6], 100 * row[6], 100 * row[7], *row[8:]), flush=True)
        del trainer
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    print("\n| s | d | r | micro-batch | step ms | tokens/s | MFU (989) | MFU (matmul) | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| %d | %d | %d | %d | %.1f | %.0f | %.1f%% | %.1f%% | %.1f |"
              % (*row[:6], 100 * row[6], 100 * row[7], row[8]))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="the production Trainer on a GPU, no Ray")
    p.add_argument("--sizes", type=int, nargs="+", default=[6, 12, 20], help="--gpu: reference sizes s")
    p.add_argument("--rs", type=int, nargs="+", default=[1, 4], help="--gpu: recurrences")
    p.add_argument("--no-compile", action="store_true", help="--gpu: eager step")
    p.add_argument("--optimizer", default=None, help="--gpu: optim.optimizer (default: the RunConfig default)")
    p.add_argument("--profile", default=None, help="--gpu: write a torch-profiler table of the first config here")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--r", type=int, default=None, help="CPU: recurrences (default 2)")
    p.add_argument("--seq-len", type=int, default=None, help="default 256 on CPU, 2048 on GPU")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=None, help="default 8 on CPU, the study's on GPU")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--zero-stage", type=int, default=None, help="default 2 on CPU, 1 on GPU (measured faster than 0)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--steps", type=int, default=None, help="timed steps (per round on CPU; default 5 CPU, 20 GPU)")
    p.add_argument("--rounds", type=int, default=6, help="CPU: alternating bare / Ray rounds")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 CPU, 10 GPU)")
    p.add_argument("--verbose", action="store_true", help="show Ray's and the worker's logs")
    args = p.parse_args(argv)
    if args.gpu:
        args.seq_len = args.seq_len or 2048
        args.zero_stage = 1 if args.zero_stage is None else args.zero_stage
        args.steps, args.warmup = args.steps or 20, args.warmup or 5
        return gpu_main(args)
    args.r = args.r or 2
    args.seq_len = args.seq_len or 256
    args.micro_batch = args.micro_batch or 8
    args.zero_stage = 2 if args.zero_stage is None else args.zero_stage
    args.steps, args.warmup = args.steps or 5, args.warmup or 3
    return cpu_main(args)


if __name__ == "__main__":
    sys.exit(main())
