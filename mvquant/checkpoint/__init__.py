"""Quantized checkpoints: the format (safetensors shards, config.json, manifest; format.py) and the
transformers integration that loads them with `from_pretrained` (hf.py)."""
from .format import (INDEX_NAME, MANIFEST, WEIGHTS_NAME, ShardWriter, finish_checkpoint, load, save_quantized,
                     state_dict_for_saving, verify_checkpoint)

__all__ = ["save_quantized", "load", "verify_checkpoint", "finish_checkpoint", "ShardWriter", "MANIFEST",
           "INDEX_NAME", "WEIGHTS_NAME", "state_dict_for_saving"]
