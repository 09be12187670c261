"""lm-eval loader for the mvquant tasks: rows come from evals/data/<name>.jsonl (see evals/generate.py)."""
from __future__ import annotations

import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def load(name: str, **_metadata):
    """`custom_dataset` hook: lm-eval passes the YAML's dataset_kwargs and metadata as keywords."""
    import datasets

    path = DATA_DIR / f"{name}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `python evals/generate.py`")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
