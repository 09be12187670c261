"""mvquant: find the massive Q/K values of RoPE models and keep them while quantizing.

`import mvquant` is cheap (no torch, no transformers): each public name is imported on first use, so
`mvquant --help` answers at once and Ctrl-C during start-up can be caught. Importing transformers'
quantizers (as any model load does) registers quant_method "mvquant", so
`AutoModelForCausalLM.from_pretrained(checkpoint_dir)` works after `import mvquant`.
"""
from __future__ import annotations

import importlib
import sys
import types

from .errors import MvquantError

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "calibrate": ".calibration", "load_report": ".calibration", "CalibrationReport": ".calibration",
    "load_model": ".loading", "get_layout": ".models",
    "evaluate": ".evaluation", "disrupt": ".evaluation",
    "load": ".checkpoint", "save_quantized": ".checkpoint",   # quantization and checkpoints
    "quantize": ".pipeline", "QuantConfig": ".quantization",
    "compare": ".compare",                                     # the experiment runner
    "kv_cache": ".kvcache", "KVConfig": ".kvcache",            # KV cache that keeps the massive K channels
}
__all__ = ["MvquantError", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'mvquant' has no attribute '{name}'")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """`mvquant.compare` is the function, not the subpackage of the same name: importing a submodule
    (`mvquant.compare.engine`) makes Python set the parent's attribute to the subpackage; that
    assignment is skipped so the name stays the function (the subpackage is in sys.modules)."""

    def __setattr__(self, name, value):
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def _register_with_transformers() -> None:
    from .checkpoint import hf  # noqa: F401  (registers quant_method "mvquant" on import)


def _after_import(module_name: str, callback) -> None:
    """Run `callback` once `module_name` has been imported (now if it already is)."""
    if module_name in sys.modules:
        callback()
        return

    class Finder:
        @staticmethod
        def find_spec(fullname, path=None, target=None):
            if fullname != module_name:
                return None
            sys.meta_path.remove(Finder)
            for finder in sys.meta_path:
                spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
                if spec is not None and spec.loader is not None:
                    break
            else:
                return None
            exec_module = spec.loader.exec_module

            def exec_then_callback(module):
                exec_module(module)
                callback()
            spec.loader.exec_module = exec_then_callback
            return spec

    sys.meta_path.insert(0, Finder)


# transformers.quantizers imports every quantizer (seconds); it is imported by transformers' model
# loading, and that is when our quantizer must be registered.
_after_import("transformers.quantizers", _register_with_transformers)
