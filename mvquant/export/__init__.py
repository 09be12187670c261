"""Export: mvquant checkpoints in the formats engines run (compressed-tensors + an exact protect-LoRA)."""
from .compressed import export_compressed_tensors
from .lora import ENGINE_RANKS, padded_rank, selector_and_delta

__all__ = ["export_compressed_tensors", "padded_rank", "selector_and_delta", "ENGINE_RANKS"]
