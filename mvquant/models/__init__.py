"""What a model is: its architecture's declaration (adapters), the built-in models, where a named model
lives (sources) and where it computes (device). Loading it is `mvquant.loading.load_model`."""
from .adapters import SUPPORTED_ARCHITECTURES, ModelLayout, get_layout
from .builtin import BUILTIN_NAME, builtin_model_dir
from .sources import is_mvquant_checkpoint, resolve_model_source

__all__ = ["ModelLayout", "get_layout", "SUPPORTED_ARCHITECTURES", "BUILTIN_NAME",
           "builtin_model_dir", "resolve_model_source", "is_mvquant_checkpoint"]
