"""TensorBoard scalars and model-FLOPs utilisation (MFU) of a run."""
from __future__ import annotations

import os
import re
from typing import Iterable

# Dense bf16 peak per GPU (no sparsity), by substring of torch.cuda.get_device_name().
_GPU_PEAK_BF16 = (("H200", 989e12), ("H100", 989e12), ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12),
                  ("L40S", 362e12), ("A10G", 70e12), ("L4", 121e12), ("4090", 165e12), ("3090", 71e12))


def cpu_peak_flops(threads: int) -> float:
    """fp32 FMA peak of `threads` cores: cores x clock x SIMD lanes x 2 FMA units x 2 FLOPs.

    An estimate (the clock is the nominal one from /proc/cpuinfo); set LOOPLAW_PEAK_FLOPS to a measured
    per-device number to override it.
    """
    ghz, lanes = 2.5, 8  # defaults when /proc/cpuinfo is unreadable (AVX2 at 2.5 GHz)
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        mhz = re.search(r"cpu MHz\s*:\s*([\d.]+)", info)
        if mhz:
            ghz = float(mhz.group(1)) / 1000
        flags = re.search(r"^flags\s*:(.*)$", info, re.M)
        flag_set = set(flags.group(1).split()) if flags else set()
        lanes = 16 if "avx512f" in flag_set else 8 if "avx2" in flag_set else 4
    except OSError:
        pass
    return threads * ghz * 1e9 * lanes * 2 * 2


def device_peak_flops(on_gpu: bool, threads: int = 1) -> float:
    """Peak FLOP/s of one worker's device (GPU bf16 table, or the CPU fp32 estimate for its threads)."""
    override = os.environ.get("LOOPLAW_PEAK_FLOPS")
    if override:
        return float(override)
    if on_gpu:
        import torch

        name = torch.cuda.get_device_name()
        for key, peak in _GPU_PEAK_BF16:
            if key in name:
                return peak
        return 989e12  # unknown GPU: report MFU against an H100 rather than not at all
    return cpu_peak_flops(threads)


def mfu(flops_per_token: float, tokens_per_second: float, peak_flops: float) -> float:
    """Model FLOPs (the accounting's F, not hardware FLOPs) per second over peak."""
    return flops_per_token * tokens_per_second / peak_flops if peak_flops > 0 else float("nan")


class Scalars:
    """TensorBoard writer on rank 0, a no-op elsewhere (and when TensorBoard is unavailable)."""

    def __init__(self, logdir: str | None):
        self._writer = None
        if logdir is None:
            return
        from torch.utils.tensorboard import SummaryWriter

        if "://" not in logdir:
            self._writer = SummaryWriter(log_dir=logdir)
            return
        try:  # a pyarrow.fs-style URI store: TensorBoard's own file layer writes s3:// (with boto3) and gs://
            self._writer = SummaryWriter(log_dir=logdir)
        except Exception as exc:  # losing the curves' TensorBoard copy must not lose the run (curves/ keeps them)
            print(f"warning: no TensorBoard scalars at {logdir}: {type(exc).__name__}: {exc}", flush=True)

    def log(self, step: int, **scalars: float | None) -> None:
        if self._writer is None:
            return
        for key, value in scalars.items():
            if value is not None:
                self._writer.add_scalar(key, float(value), step)

    def log_loop_stats(self, step: int, stats: dict) -> None:
        """e's RMS beside the state's RMS per recurrence (and its change between recurrences): an e that outgrows
        the state is the first sign of an idle loop."""
        if self._writer is None:
            return
        self._writer.add_scalar("loop/e_rms", float(stats["e_rms"]), step)
        for i, value in enumerate(stats["state_rms"]):
            self._writer.add_scalar(f"loop/state_rms/r{i + 1}", float(value), step)
        for i, value in enumerate(stats["state_change"]):
            self._writer.add_scalar(f"loop/state_change/r{i + 2}", float(value), step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
