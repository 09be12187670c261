"""mvquant: find the massive Q/K values of RoPE models and keep them while quantizing."""
from .calibration import CalibrationReport, calibrate, load_report
from .errors import MvquantError
from .evaluation import disrupt, evaluate
from .models import get_layout, load_model

__version__ = "0.1.0"
__all__ = ["calibrate", "load_report", "CalibrationReport", "load_model", "get_layout", "MvquantError", "evaluate", "disrupt"]

# Quantization and checkpoints. Importing them registers quant_method "mvquant" with transformers,
# so AutoModelForCausalLM.from_pretrained(checkpoint_dir) works after `import mvquant`.
from .checkpoint import load, save_quantized  # noqa: E402
from .quantization import QuantConfig, quantize  # noqa: E402
from .quantization import hf as _hf_registration  # noqa: E402,F401

__all__ += ["quantize", "QuantConfig", "load", "save_quantized"]

# The experiment runner. The name `mvquant.compare` is the function; its modules stay importable
# (`from mvquant.compare.engine import ...`, `importlib.import_module("mvquant.compare.cli")`).
from .compare import compare  # noqa: E402

__all__ += ["compare"]

# KV-cache quantization that keeps the massive K channels (pass as past_key_values= to generate).
from .kvcache import KVConfig, kv_cache  # noqa: E402

__all__ += ["kv_cache", "KVConfig"]
