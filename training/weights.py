"""A finished run's final weights in the results store, for downstream evaluation.

    STORE/weights/<run_id>.pt    one torch file per completed run (a wsd cooldown branch too): the model config,
                                 the state dict, the tokenizer (JSON) and the step it was taken at

Training writes it at the end of every completed run and of every cooldown branch, before the run's row, so a row
written by this version implies its weights. Rows stored before it have none: their Ray Train checkpoints hold the
weights of an earlier step (the final checkpoint keeps only the run's summary). One self-contained file, so a store
copied anywhere (any pyarrow.fs location) can be evaluated without the prepared data folder.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Mapping

import pyarrow.fs as pafs
import torch

from models import LoopedConfig, LoopedLM
from training.storage import atomic_write, filesystem

WEIGHTS_DIR = "weights"
FORMAT = 1


def _location(store: str | os.PathLike, run_id: str) -> tuple[pafs.FileSystem, str, str]:
    if not isinstance(run_id, str) or not run_id or "/" in run_id or run_id.startswith((".", "_")):
        raise ValueError(f"run_id: {run_id!r} is not a stored run's id (STORE/runs/<run_id>.parquet)")
    fs, root = filesystem(store)
    return fs, f"{root}/{WEIGHTS_DIR}", f"{run_id}.pt"


def has_weights(store: str | os.PathLike, run_id: str) -> bool:
    fs, folder, name = _location(store, run_id)
    return fs.get_file_info(f"{folder}/{name}").type == pafs.FileType.File


def write_weights(store: str | os.PathLike, run_id: str, state_dict: Mapping[str, torch.Tensor],
                  model: LoopedConfig, tokenizer_json: str, step: int) -> None:
    """Write (or replace) the run's weights atomically; tensors are copied to the CPU as they are (bf16 stays bf16)."""
    payload = {"format": FORMAT, "run_id": run_id, "step": int(step), "model": model.to_dict(),
               "tokenizer": tokenizer_json,
               "state_dict": {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    fs, folder, name = _location(store, run_id)

    def write(path: str) -> None:
        with fs.open_output_stream(path) as f:
            f.write(buffer.getvalue())

    atomic_write(fs, folder, name, write)


@dataclass(frozen=True)
class StoredWeights:
    run_id: str
    step: int
    config: LoopedConfig
    tokenizer_json: str
    state_dict: dict

    def model(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LoopedLM:
        """The LoopedLM with these weights, in eval mode, on `device` in `dtype`."""
        model = LoopedLM(self.config)
        model.load_state_dict(self.state_dict)
        return model.to(device=device, dtype=dtype).eval()


def read_weights(store: str | os.PathLike, run_id: str) -> StoredWeights:
    """The run's stored weights; a clear error naming the run when it has none."""
    fs, folder, name = _location(store, run_id)
    path = f"{folder}/{name}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(
            f"run {run_id}: no final weights in the store ({os.fspath(store)}/{WEIGHTS_DIR}/{name}); training writes "
            "them at the end of every completed run since the weights/ folder was added, so a run stored before "
            "that has none: train it again (remove STORE/runs/<run_id>.parquet and rerun its sweep or "
            "`python -m training.run`), or leave it out")
    with fs.open_input_stream(path) as f:
        payload = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    if payload.get("format") != FORMAT:
        raise ValueError(f"run {run_id}: weights file {path} has format {payload.get('format')!r}; this version "
                         f"reads format {FORMAT}")
    return StoredWeights(run_id=run_id, step=int(payload["step"]), config=LoopedConfig.from_dict(payload["model"]),
                         tokenizer_json=payload["tokenizer"], state_dict=payload["state_dict"])
