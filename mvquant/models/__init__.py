from .adapters import ModelLayout, get_layout, SUPPORTED_ARCHITECTURES
from .builtin import BUILTIN_NAME, builtin_model_dir
from .loading import load_model, resolve_model_source, is_mvquant_checkpoint

__all__ = ["ModelLayout", "get_layout", "SUPPORTED_ARCHITECTURES", "BUILTIN_NAME",
           "builtin_model_dir", "load_model", "resolve_model_source", "is_mvquant_checkpoint"]
