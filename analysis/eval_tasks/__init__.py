"""Local lm-evaluation-harness tasks on the embedded corpus's held-out verses (see build.py): they need no download.

TASKS_DIR is the folder of their task YAMLs (lm-eval's `include_path`). Each YAML loads its items with a
`custom_dataset` function of this module, because a YAML's `data_files` path is read relative to the working
directory, not to the YAML, and this folder is wherever the package is installed.
"""
from __future__ import annotations

import json
from pathlib import Path

import datasets

TASKS_DIR = Path(__file__).resolve().parent
LOCAL_TASKS = ("kjv_cloze", "kjv_order")


def _items(name: str) -> datasets.DatasetDict:
    with open(TASKS_DIR / f"{name}.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def kjv_cloze(**_task_metadata) -> datasets.DatasetDict:
    """lm-eval calls a custom dataset with the task's metadata and dataset_kwargs; these items need none."""
    return _items("kjv_cloze")


def kjv_order(**_task_metadata) -> datasets.DatasetDict:
    return _items("kjv_order")
