"""Issue 22 (all but the --force rule): exports load wherever mvquant takes a model, calibrate's two
files are one output, export files keep the umask, serve validates before starting, eval URL against
a misbehaving server (a local http.server fixture per case), unknown hub models, full disks, --limit
inf, binary recipes, a light `import mvquant`, Ctrl-C during start-up and stray stderr. Each case:
the message, the exit code, and nothing left behind."""
from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ToyTokenizer, make_tiny_model, make_tiny_tokenizer, save_tiny_model
from test_bad_input import _one_error

import mvquant
from mvquant.cli import main

REPO = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[5, 17, 99, 3, 42, 7, 8, 120, 64, 33, 2, 90, 11, 60]])


def _files(root: Path) -> list[str]:
    """Every entry under root, hidden temporaries included."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    """A protected tiny llama checkpoint and its three exports (fp16 rows for the plugin, dense fp16 q/k/v,
    and rows as a LoRA)."""
    from mvquant.export import export_compressed_tensors
    from mvquant.pipeline import quantize
    from mvquant.quantization import QuantConfig

    root = tmp_path_factory.mktemp("ck")
    model = make_tiny_model("llama")
    report = mvquant.calibrate(model, ToyTokenizer(), samples=4, seq_len=32, top_k=1, progress=False)
    quantize(model, QuantConfig(method="rtn", bits=4, group_size=32, protect="massive"), report=report,
             tokenizer=ToyTokenizer(), progress=False)
    ckpt = mvquant.save_quantized(model, make_tiny_tokenizer(), root / "ck", report=report)
    for protect_as in ("rows", "fp16", "lora"):
        export_compressed_tensors(ckpt, root / f"ex-{protect_as}", protect_as=protect_as)
    return root


# -- wrong or missing results ----------------------------------------------------------------------
@pytest.mark.parametrize("protect_as", ["rows", "fp16", "lora"])
def test_export_loads_in_process_like_the_checkpoint(ck, protect_as):
    from mvquant.quantization import quantized_modules

    ref = mvquant.load(ck / "ck")
    for q in quantized_modules(ref).values():   # the exact float path
        q.compute = "dequant"
        q.prepare()
    model, tok = mvquant.load_model(ck / f"ex-{protect_as}")
    assert not any("lora" in n for n, _ in model.named_modules())   # the protect-LoRA is merged
    with torch.no_grad():
        a, b = ref(IDS).logits, model(IDS).logits
    assert (a - b).abs().max() < 2e-3 * a.abs().max()   # fp16 storage of the export
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    if protect_as == "rows":    # the protected rows are the checkpoint's fp16 rows, bit for bit
        for name, q in quantized_modules(ref).items():
            if q.n_protected:
                w = model.get_submodule(name).weight
                assert torch.equal(w[q.protected_rows.long()], q.protected_weight.to(w.dtype))


@pytest.mark.parametrize("form", ["lora", "rows"])
def test_eval_calibrate_quantize_take_an_export(ck, tmp_path, capsys, form):
    ex = str(ck / f"ex-{form}")
    assert main(["eval", ex, "--tasks", "capitals", "--limit", "2", "--no-progress",
                 "--output", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["tasks"]["capitals"]["n"] == 2
    assert main(["calibrate", ex, "--samples", "2", "--seq-len", "16", "--quiet", "--output", str(tmp_path / "r.json")]) == 0
    assert mvquant.load_report(tmp_path / "r.json").meta["num_layers"] == 2
    assert main(["quantize", ex, "--quiet", "--output", str(tmp_path / "q")]) == 0
    assert (tmp_path / "q" / "config.json").is_file()
    assert "error" not in capsys.readouterr().err


def _fail_on_fsync(monkeypatch, call: int):
    """The `call`-th fsync in mvquant.io fails as a full disk does."""
    real, n = os.fsync, [0]

    def fsync(fd):
        n[0] += 1
        if n[0] == call:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)
    monkeypatch.setattr("mvquant.io.os.fsync", fsync)


def test_calibrate_full_disk_writes_neither_file_and_the_rerun_works(tmp_path, capsys, monkeypatch):
    model_dir = save_tiny_model("llama", tmp_path / "m")
    out = tmp_path / "out"
    out.mkdir()
    argv = ["calibrate", str(model_dir), "--samples", "2", "--seq-len", "16", "--quiet", "--output", str(out / "r.json")]
    _fail_on_fsync(monkeypatch, 2)   # the stats file is complete, the JSON is not
    line = _one_error(capsys, argv)
    assert f"no space left on " in line and "MB free)" in line and "nothing was written" in line, line
    assert _files(out) == []
    monkeypatch.undo()
    assert main(argv) == 0               # no orphan blocks the rerun
    assert _files(out) == ["r.json", "r.stats.safetensors"]


def test_atomic_write_files_keeps_the_old_pair_on_failure(tmp_path, monkeypatch):
    from mvquant.io import atomic_write_files

    a, b = tmp_path / "a.json", tmp_path / "a.stats"
    atomic_write_files({a: b"old a", b: b"old b"})
    _fail_on_fsync(monkeypatch, 2)
    with pytest.raises(OSError):
        atomic_write_files({b: b"new b", a: b"new a"})
    assert (a.read_bytes(), b.read_bytes()) == (b"old a", b"old b") and _files(tmp_path) == ["a.json", "a.stats"]


def test_export_files_keep_the_umask(ck, tmp_path):
    from mvquant.export import export_compressed_tensors

    old = os.umask(0o022)
    try:
        export_compressed_tensors(ck / "ck", tmp_path / "ex", protect_as="lora")
    finally:
        os.umask(old)
    for f in ("model.safetensors", "protect-lora/adapter_model.safetensors", "config.json"):
        assert stat.S_IMODE((tmp_path / "ex" / f).stat().st_mode) == 0o644, f


# -- serve validates before anything starts -----------------------------------------------------------
@pytest.fixture
def no_engine(monkeypatch, tmp_path):
    """A serving environment that exists, and an engine start that fails the test if reached."""
    fake = tmp_path / "venv" / "bin"
    fake.mkdir(parents=True)
    (fake / "python").write_text("#!/bin/sh\nexit 1\n")

    def popen(*a, **k):
        raise AssertionError("vLLM was started on bad input")
    monkeypatch.setattr("mvquant.serving.server.subprocess.Popen", popen)
    monkeypatch.setattr("mvquant.serving.server.subprocess.run", popen)
    return ["--venv", str(tmp_path / "venv")]


@pytest.mark.parametrize("argv,match", [
    (["--port", "0"], "--port 0 is not a TCP port: give one in 1..65535"),
    (["--port", "70000"], "--port 70000 is not a TCP port"),
    (["--port", "-1"], "--port -1 is not a TCP port"),
    (["--timeout", "-1"], "--timeout -1.0 must be a positive number of seconds"),
    (["--timeout", "nan"], "--timeout nan must be a positive number"),
    (["--max-model-len", "-5"], "--max-model-len -5 must be a positive number of tokens"),
    (["--dtype", "int3"], "unknown --dtype 'int3'"),
])
def test_serve_refuses_bad_options(argv, match, ck, no_engine, capsys):
    line = _one_error(capsys, ["serve", str(ck / "ex-fp16"), *no_engine, *argv])
    assert match in line, line


def test_serve_refuses_a_checkpoint_with_the_export_command(ck, no_engine, capsys):
    line = _one_error(capsys, ["serve", str(ck / "ck"), *no_engine])
    assert "is an mvquant checkpoint, which vLLM cannot load" in line and f"mvquant export {ck / 'ck'}" in line


def test_serve_refuses_a_broken_adapter_and_a_file(ck, no_engine, tmp_path, capsys):
    import shutil
    ex = tmp_path / "ex"
    shutil.copytree(ck / "ex-lora", ex)
    (ex / "protect-lora" / "adapter_config.json").write_text("{")
    line = _one_error(capsys, ["serve", str(ex), *no_engine])
    assert "no valid LoRA rank" in line and "--no-lora" in line
    line = _one_error(capsys, ["serve", str(ex / "config.json"), *no_engine])
    assert "is not a directory: give the --output of mvquant export" in line


# -- eval URL against a misbehaving server ----------------------------------------------------------
class FakeServer:
    """An http.server on 127.0.0.1 answering GET /v1/models with `models` and POST with `post`."""

    def __init__(self, models, post=(200, {"choices": [{"text": "x"}]})):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, outer.models) if self.path == "/v1/models" else self._send(404, {})

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.posts += 1
                self._send(*outer.post)

            def log_message(self, *a):   # not on stderr: the test checks stderr
                pass

        self.models, self.post, self.posts = models, post, 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("served") / "ex")


def _eval_url(capsys, tmp_path, url, *extra):
    out = tmp_path / "e.json"
    line = _one_error(capsys, ["eval", url, "--tasks", "capitals", "--limit", "1", "--no-progress", *extra,
                               "--output", str(out)])
    assert not out.exists()
    return line


URL_CASES = {  # name: (models body, POST answer, extra argv, what the line says)
    "POST 501": (lambda d: {"data": [{"id": "base", "root": d}]}, (501, {"error": "no"}), [],
                 "lists models but does not answer completions (POST {url}/completions: HTTP 501)"),
    "no choices": (lambda d: {"data": [{"id": "base", "root": d}]}, (200, {"ok": 1}), [], "HTTP 200, no choices"),
    "data []": (lambda d: {"data": []}, None, [], "serves no model ({url}/models lists none)"),
    "no id": (lambda d: {"data": [{"root": d}]}, None, [], "is not an OpenAI model list ('data' must be a list"),
    "data a string": (lambda d: {"data": "base"}, None, [], "is not an OpenAI model list"),
    "not an object": (lambda d: ["base"], None, [], "not a JSON object"),
    "remote root": (lambda d: {"data": [{"id": "base", "root": "/srv/gpu-host/served"}]}, None, [],
                    "model root '/srv/gpu-host/served' is not a directory on this machine (a server on another host?): "
                    "pass --tokenizer DIR"),
    "no root": (lambda d: {"data": [{"id": "base"}]}, None, [], "does not say where its tokenizer is: pass --tokenizer"),
    "tokenizer not a dir": (lambda d: {"data": [{"id": "base", "root": d}]}, None, ["--tokenizer", "/nonexistent/tok"],
                            "--tokenizer '/nonexistent/tok' is not a directory"),
    "tokenizer without one": (lambda d: {"data": [{"id": "base", "root": d}]}, None, ["--tokenizer", "EMPTY"],
                              "holds no tokenizer transformers can load"),
}


@pytest.mark.parametrize("case", list(URL_CASES))
def test_eval_url_misbehaving_server_is_one_line(case, tok_dir, tmp_path, capsys):
    models, post, extra, message = URL_CASES[case]
    (tmp_path / "empty").mkdir()
    extra = [str(tmp_path / "empty") if a == "EMPTY" else a for a in extra]
    server = FakeServer(models(str(tok_dir)), **({"post": post} if post else {}))
    try:
        line = _eval_url(capsys, tmp_path, server.url, *extra)
    finally:
        server.close()
    assert message.format(url=server.url) in line, line
    assert server.posts <= 1          # one probe, not lm-eval's retries
    assert _files(tmp_path) == ["empty"]


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/v1 x", "http://127.0.0.1 :8000/v1", "http://:8000/v1",
                                 "http://127.0.0.1:99999/v1"])
def test_eval_url_that_cannot_be_sent(url, tmp_path, capsys):
    line = _eval_url(capsys, tmp_path, url)
    assert f"'{url}' is not a valid server URL" in line and "http://127.0.0.1:8000/v1" in line


# -- the rest ----------------------------------------------------------------------------------------
def _recipe(path: Path, **over) -> Path:
    data = {"name": "r", "model": "no-such-model", "tasks": ["capitals"], "limit": 2,
            "arms": [{"name": "fp", "method": "none"}]} | over
    path.write_text(yaml.safe_dump(data))
    return path


def test_compare_unknown_model_offline_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe, out = _recipe(tmp_path / "r.yaml"), tmp_path / "cmp"
    t = time.perf_counter()
    line = _one_error(capsys, ["compare", "--recipe", str(recipe), "--output", str(out)])
    assert time.perf_counter() - t < 10
    assert ("model 'no-such-model' is not a local path, not a built-in model and not in the Hugging Face cache, "
            "and the hub is off (HF_HUB_OFFLINE=1)") in line and "smollm2-135m" in line, line
    assert _files(tmp_path) == ["r.yaml"]


def test_unknown_model_hub_unreachable_is_one_line(tmp_path, capsys, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)

    def unreachable(*a, **k):
        raise OSError("Name or service not known")
    monkeypatch.setattr("mvquant.models.sources.socket.create_connection", unreachable)
    recipe = _recipe(tmp_path / "r.yaml")
    for argv in (["compare", "--recipe", str(recipe), "--output", str(tmp_path / "cmp")],
                 ["calibrate", "no-such-model", "--output", str(tmp_path / "r.json")]):
        line = _one_error(capsys, argv)
        assert "huggingface.co cannot be reached (offline?)" in line, line
    assert _files(tmp_path) == ["r.yaml"]


def _full_disk_on_save(monkeypatch):
    """safetensors' save_file on a full disk: a partial file, then its own error type (as measured on a
    full tmpfs: 'Error while serializing: I/O error: No space left on device (os error 28)')."""
    from safetensors import SafetensorError

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr("safetensors.torch.save_file", save_file)


@pytest.mark.parametrize("verb", ["quantize", "export"])
def test_full_disk_is_exit_2_and_leaves_nothing(verb, ck, tmp_path, capsys, monkeypatch):
    model_dir = save_tiny_model("llama", tmp_path / "m") if verb == "quantize" else None
    out = tmp_path / "out"
    out.mkdir()
    _full_disk_on_save(monkeypatch)
    argv = (["quantize", str(model_dir), "--quiet", "--output", str(out / "q")] if verb == "quantize"
            else ["export", str(ck / "ck"), "--output", str(out / "q")])
    line = _one_error(capsys, argv)
    assert f"no space left on " in line and "MB free): free some space there or choose another --output" in line, line
    assert "internal error" not in line and _files(out) == []


def test_limit_inf_and_binary_recipe(tmp_path, capsys, monkeypatch):
    model_dir = save_tiny_model("llama", tmp_path / "m")
    for limit in ("inf", "-inf", "Infinity"):
        line = _one_error(capsys, ["eval", str(model_dir), f"--limit={limit}", "--output", str(tmp_path / "e.json")])
        assert "is not a number of items: leave --limit out" in line or "--limit must be positive" in line, line
    line = _one_error(capsys, ["compare", "--recipe", str(_recipe(tmp_path / "inf.yaml", model=str(model_dir), limit=float("inf"))),
                               "--output", str(tmp_path / "cmp")])
    assert "limit must be an integer >= 1 or null, got inf" in line
    binary = tmp_path / "recipe.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe" + bytes(range(256)))
    line = _one_error(capsys, ["compare", "--recipe", str(binary), "--output", str(tmp_path / "cmp")])
    assert f"recipe '{binary}' is not a text file (not UTF-8)" in line
    assert _files(tmp_path).count("e.json") == 0 and not (tmp_path / "cmp").exists()


def _python(code: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300, **kw)


def test_import_is_light_and_still_registers_with_transformers(ck):
    out = _python("import sys, mvquant; print(sorted(m for m in ('torch', 'transformers', 'hqq') if m in sys.modules))")
    assert out.stdout.strip() == "[]", out.stderr
    out = _python("import sys, mvquant.cli as c; c.build_parser(); "
                  "print(sorted(m for m in ('transformers.quantizers', 'hqq', 'lm_eval', 'peft') if m in sys.modules))")
    assert out.stdout.strip() == "[]", out.stderr      # `mvquant --help` imports none of these
    out = _python("import mvquant; from transformers.quantizers import auto; import mvquant.compare.engine; "
                  "print('mvquant' in auto.AUTO_QUANTIZER_MAPPING, callable(mvquant.compare), mvquant.load.__module__)")
    assert out.stdout.split() == ["True", "True", "mvquant.checkpoint.format"], out.stderr
    out = _python("import mvquant; from transformers import AutoModelForCausalLM; "   # DESIGN.md's promise
                  f"m = AutoModelForCausalLM.from_pretrained({str(ck / 'ck')!r}); "
                  "print(type(m.model.layers[0].self_attn.q_proj).__name__)")
    assert out.stdout.split() == ["QuantLinear"], out.stderr


def test_ctrl_c_at_any_moment_of_start_up_is_one_line_exit_130(tmp_path):
    """SIGINT at several points of start-up and of the first work (imports, parser, model load, the
    pass). Timed from when Python has initialized, plus 0.3 s: before mvquant/__main__.py runs (Python's
    own start-up, importing `site`, finding the package: some 50 ms) a Ctrl-C is the interpreter's own
    traceback, before any mvquant code runs."""
    model_dir = save_tiny_model("llama", tmp_path / "m")
    argv = ["mvquant", "calibrate", str(model_dir), "--samples", "4096", "--seq-len", "256",
            "--output", str(tmp_path / "r.json")]
    code = (f"import runpy, sys; sys.argv = {argv!r}; print('ready', flush=True); "
            "runpy.run_module('mvquant', run_name='__main__', alter_sys=True)")
    for delay in (0.3, 0.5, 0.8, 1.2, 2.0, 3.0):
        p = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln]
        # 130; or killed by SIGINT (-2, which a shell also reports as 130): CPython re-raises SIGINT at
        # exit when a KeyboardInterrupt went through C code that ran Python (an import in an extension)
        assert p.returncode in (130, -signal.SIGINT) and len(lines) == 1 and "interrupted" in lines[0], (delay, err)
        assert "Traceback" not in err
    assert _files(tmp_path).count("r.json") == 0


def test_no_stray_stderr_on_export_eval_and_compare(ck, tmp_path):
    """Outside any git repository; bitsandbytes (imported by peft) warns about a kernel package on
    AVX-512-BF16 CPUs; transformers deprecated past_key_values."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = lambda *argv: subprocess.run([sys.executable, "-m", "mvquant", *argv], capture_output=True, text=True,
                                       cwd=tmp_path, env=env, timeout=600)
    recipe = _recipe(tmp_path / "r.yaml", model=str(ck / "ck"))
    for r in (run("export", str(ck / "ck"), "--output", "ex"),
              run("eval", str(ck / "ck"), "--tasks", "capitals", "--limit", "2", "--no-progress", "--output", "e.json"),
              run("compare", "--recipe", str(recipe), "--output", "cmp", "--no-progress")):
        assert r.returncode == 0, r.stderr
        for noise in ("gemm_4bit_forward", "fatal:", "Warning", "deprecated", "Traceback"):
            assert noise not in r.stderr, (r.args, r.stderr)
