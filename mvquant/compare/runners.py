"""The real arm and task runners: mvquant.calibrate / quantize / save_quantized / load / evaluate.

The engine only sees `ModelArmRunner()(arm, ctx) -> PreparedArm` and
`EvalTaskRunner()(prepared, task, limit=, seed=) -> {"acc", "stderr", "n"}`.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..errors import MvquantError
from .engine import ArmContext, PreparedArm
from .recipe import Arm


def _is_quantized_linear(module) -> bool:
    return type(module).__name__ in ("QuantLinear", "Linear4bit", "Linear8bitLt")


def unquantized_bytes(model) -> int:
    """Bytes of the parameters and buffers outside quantized linears (tied tensors counted once)."""
    from ..quantization.summary import unique_bytes
    skip = {n for n, m in model.named_modules() if _is_quantized_linear(m)}
    return unique_bytes(t for name, t in [*model.named_parameters(), *model.named_buffers()]
                        if not any(name.startswith(q + ".") for q in skip))


def size_info(model, summary: dict | None) -> dict:
    """Model bytes (quantized linears as stored + everything else as held) and the effective bits per
    weight of the decoder linears (incl. scales, zeros and protected rows); for an unquantized model
    the bits of its dtype."""
    other = unquantized_bytes(model)
    if not summary:
        bits = 8 * next(model.parameters()).element_size()
        return {"size_bytes": other, "bits_per_weight": float(bits)}
    return {"size_bytes": int(summary["linear_bytes"]) + other,
            "bits_per_weight": round(float(summary["bits_per_weight"]), 4),
            "protected_rows": summary.get("protected_rows")}


class ModelArmRunner:
    """Make the model for an arm: load the recipe's model; quantize it (checkpoint cached in the
    arm's directory, reloaded on resume); attach the calibration report where the arm needs one."""
    def __init__(self, load_model=None):
        # load_model(name, dtype) -> (model, tokenizer): injectable so tests can use tiny models
        self._load_model = load_model

    @staticmethod
    def cache_id(arm) -> str:
        """Keys the arm's cache on the quantizer's revision: a new implementation recomputes."""
        from ..quantization.registry import METHODS
        rev = METHODS[arm.method].revision if arm.method in METHODS else None
        return "mvquant" if rev is None else f"mvquant/{arm.method}-r{rev}"

    def load_base(self, recipe):
        if self._load_model is not None:
            return self._load_model(recipe.model, recipe.dtype)
        from ..loading import load_model
        return load_model(recipe.model, dtype=recipe.dtype)

    def report(self, ctx: ArmContext, model=None, tokenizer=None):
        """The calibration report for the recipe, computed once and cached in the output dir."""
        from ..calibration import CalibrationReport, calibrate

        path = ctx.calibration_path
        if path.is_file():
            try:
                return CalibrationReport.load(path)
            except MvquantError as e:  # a damaged cache entry: compute it again rather than fail forever
                print(f"compare: cached calibration unusable ({e}); calibrating again")
        if model is None:
            model, tokenizer = self.load_base(ctx.recipe)
        c = ctx.recipe.calibration
        report = calibrate(model, tokenizer, data=c["data"], samples=c["samples"], seq_len=c["seq_len"],
                           batch_size=c["batch_size"], lam=c["lambda"], top_k=c["top_k"], seed=ctx.recipe.seed,
                           progress=ctx.progress, model_name=str(ctx.recipe.model))
        path.parent.mkdir(parents=True, exist_ok=True)
        report.save(path)
        return report

    def quant_config(self, arm: Arm, recipe):
        """The QuantConfig of an arm; AWQ/GPTQ/SmoothQuant take their calibration data from the recipe."""
        from dataclasses import fields

        from ..quantization import QuantConfig
        allowed = {f.name for f in fields(QuantConfig)}
        fixed = {"method", "bits", "group_size", "protect", "seed"}
        bad = sorted(set(arm.options) - (allowed - fixed))
        if bad:
            raise MvquantError(f"arm '{arm.name}': unknown quantizer option(s) {', '.join(bad)}: use "
                               f"{', '.join(sorted(allowed - fixed))}")
        c = recipe.calibration
        kwargs = {"method": arm.method, "bits": arm.bits, "group_size": arm.group_size, "protect": arm.protect,
                  "seed": arm.seed, "calib_samples": c["samples"], "calib_seq_len": c["seq_len"],
                  "calib_data": c["data"], **arm.options}
        try:
            return QuantConfig(**kwargs)
        except MvquantError as e:
            raise MvquantError(f"arm '{arm.name}': {e}") from None

    def validate(self, recipe) -> None:
        """Up front: the model must exist and every quantized arm must make a valid QuantConfig
        (nothing runs, nothing is written otherwise)."""
        if self._load_model is None:
            from ..models.sources import resolve_model_source
            resolve_model_source(recipe.model)  # a missing local path fails here, before compare.json
        for arm in recipe.arms:
            if arm.quantized:
                self.quant_config(arm, recipe)
        if any(arm.engine == "llamacpp" for arm in recipe.arms):   # before any work: llama.cpp is there
            from ..evaluation.llamacpp import venv_python
            from ..export.gguf_export import llamacpp_dir
            venv_python(), llamacpp_dir()

    def __call__(self, arm: Arm, ctx: ArmContext) -> PreparedArm:
        prepared = self._prepare(arm, ctx)
        if arm.engine == "llamacpp":   # scored in llama.cpp: the checkpoint's GGUF export (cached beside it)
            from ..export.gguf_export import export_gguf
            gguf = ctx.arm_dir / "model.gguf"
            if not gguf.is_file():
                export_gguf(prepared.info["checkpoint"], gguf)
            prepared.info["gguf"] = str(gguf)
            prepared.info["gguf_bytes"] = gguf.stat().st_size
        return prepared

    def _prepare(self, arm: Arm, ctx: ArmContext) -> PreparedArm:
        checkpoint = ctx.arm_dir / "checkpoint"
        if arm.quantized and (checkpoint / "config.json").is_file():
            try:
                return self._from_checkpoint(arm, ctx, checkpoint)
            except MvquantError as e:  # e.g. a corrupt file: quantize again rather than give up
                print(f"arm {arm.name}: cached checkpoint unusable ({e}); quantizing again")
        model, tokenizer = self.load_base(ctx.recipe)
        report = self.report(ctx, model, tokenizer) if arm.uses_calibration else None
        if not arm.quantized:
            return PreparedArm(model, tokenizer, report, size_info(model, None))
        from ..checkpoint import save_quantized
        from ..pipeline import quantize
        t0 = time.perf_counter()
        model = quantize(model, self.quant_config(arm, ctx.recipe), report=report, tokenizer=tokenizer,
                         progress=ctx.progress)
        info = {**size_info(model, model.mvquant_summary), "quantize_s": round(time.perf_counter() - t0, 3)}
        if not arm.method.startswith("bnb-"):  # bitsandbytes baselines live in memory only
            save_quantized(model, tokenizer, checkpoint, report=report, force=True)
            info["checkpoint"] = str(checkpoint)
        # the in-memory model is evaluated: the checkpoint reloads to the same logits (tested)
        return PreparedArm(model, tokenizer, report, info)

    def _from_checkpoint(self, arm: Arm, ctx: ArmContext, checkpoint: Path) -> PreparedArm:
        """Resume: the arm's checkpoint from an earlier (interrupted) run."""
        from ..checkpoint import load as load_checkpoint
        model, tokenizer = load_checkpoint(checkpoint, return_tokenizer=True)
        if tokenizer is None:  # a tokenizer without save_pretrained (tests): take the base model's
            tokenizer = self.load_base(ctx.recipe)[1]
        report = self.report(ctx) if arm.uses_calibration else None
        summary = _manifest_summary(checkpoint)
        info = {**size_info(model, summary), "checkpoint": str(checkpoint), "from_cache": True}
        if summary and summary.get("seconds") is not None:
            info["quantize_s"] = summary["seconds"]
        return PreparedArm(model, tokenizer, report, info)


def _manifest_summary(checkpoint: Path) -> dict | None:
    import json
    try:
        return json.loads((checkpoint / "mvquant_manifest.json").read_text()).get("summary")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class EvalTaskRunner:
    """One task of `mvquant.evaluate` on the arm's in-memory model, with the arm's disruption and
    KV-cache quantization."""
    cache_id = "mvquant"

    def __init__(self, evaluate=None):
        self._evaluate = evaluate

    def __call__(self, prepared: PreparedArm, task: str, *, limit: int | None, seed: int) -> dict:
        if self._evaluate is None:
            from ..evaluation import evaluate
        else:
            evaluate = self._evaluate
        arm = prepared.arm
        disrupt = None if arm is None or arm.disrupt == "none" else arm.disrupt
        kv = {"kv": arm.kv_config()} if arm is not None and arm.kv_bits is not None else {}
        if arm is not None and arm.engine == "llamacpp":
            result = evaluate(prepared.info["gguf"], [task], limit=limit, engine="llamacpp",
                              tokenizer=prepared.info["checkpoint"], progress=False)
        else:
            result = evaluate(None, [task], limit=limit, disrupt=disrupt, top_k=arm.top_k if arm else None,
                              report=prepared.report, model=prepared.model, tokenizer=prepared.tokenizer,
                              progress=False, **kv)
        try:
            return result["tasks"][task]
        except (KeyError, TypeError):
            raise MvquantError(f"evaluate returned no result for task '{task}': got {result!r:.200}") from None
