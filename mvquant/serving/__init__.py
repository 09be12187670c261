"""Serving: vLLM (its own environment) on an exported checkpoint, talked to over HTTP."""
from .server import BASE_NAME, LORA_NAME, running_server, serve_forever

__all__ = ["running_server", "serve_forever", "BASE_NAME", "LORA_NAME"]
