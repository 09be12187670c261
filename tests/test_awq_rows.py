"""evals/awq_rows.py: rows made exact after AWQ keep every other code and scale, and take the
unquantized weight in AWQ's folded space (W * s, s recovered from the input norm)."""
import importlib.util
from pathlib import Path

import torch
from conftest import ToyTokenizer, make_tiny_model

import mvquant
from mvquant.models import get_layout
from mvquant.pipeline import quantize
from mvquant.quantization import QuantConfig
from mvquant.calibration.selection import protected_rows

spec = importlib.util.spec_from_file_location("awq_rows", Path(__file__).parents[1] / "evals" / "awq_rows.py")
awq_rows = importlib.util.module_from_spec(spec)
spec.loader.exec_module(awq_rows)


def test_exact_rows_after_awq_are_the_folded_weights_and_nothing_else_moves():
    model = make_tiny_model("llama")
    report = mvquant.calibrate(model, ToyTokenizer(), samples=4, seq_len=32, top_k=1, progress=False)
    layout = get_layout(model)
    original = {n: m.weight.detach().float().clone() for n, m in model.named_modules() if n.endswith(("q_proj", "k_proj"))}
    before = awq_rows.input_norms(model, layout)
    calib = [torch.randint(2, 120, (32,)).tolist() for _ in range(4)]
    quantize(model, QuantConfig(method="awq", bits=3, group_size=32, protect="none"), calibration_data=calib,
             tokenizer=ToyTokenizer(), progress=False)
    s = [b / a for b, a in zip(before, awq_rows.input_norms(model, layout))]
    assert any(float((x - 1).abs().max()) > 1e-3 for x in s)          # AWQ did scale the q/k/v input
    folded = {n: w * s[int(n.split(".layers.")[1].split(".")[0])][None, :] for n, w in original.items()}
    rows = protected_rows(model, layout, report, "massive")
    name = next(n for n in rows if n.endswith("q_proj"))
    q = model.get_submodule(name)
    # the quantized rows approximate the folded weight (the fold was recovered correctly)
    err = (q.dequantized_weight() - folded[name]).abs().max() / folded[name].abs().max()
    assert float(err) < 0.3
    with awq_rows.exact(model, rows, folded, "q") as n:
        swapped = model.get_submodule(name)
        assert swapped is not q and n == sum(len(r) for k, r in rows.items() if k.endswith("q_proj"))
        w = swapped.dequantized_weight()
        r = rows[name]
        keep = torch.ones(w.shape[0], dtype=torch.bool)
        keep[r] = False
        assert torch.equal(w[r], folded[name][r].half().float())
        assert torch.equal(w[keep], q.dequantized_weight()[keep])
        assert all(not isinstance(model.get_submodule(k), type(None)) and model.get_submodule(k).n_protected == 0
                   for k in rows if k.endswith("k_proj"))
    assert model.get_submodule(name) is q                              # restored


def test_quantize_warns_where_protection_was_measured_to_hurt(tmp_path, capsys):
    from conftest import save_tiny_model

    from mvquant.cli import main
    from mvquant.pipeline.guidance import HURT, protection_warning
    assert protection_warning("awq", 3, "massive").startswith("--protect massive with --method awq --bits 3 was "
                                                              "measured to cost contextual skill: -20.0 [-23.4, -16.6]")
    assert protection_warning("awq", 3, "none") is None and protection_warning("rtn", 3, "massive") is None
    assert all(m.ci95[1] < 0 for m in HURT)                      # only measured losses are warned about
    model_dir = save_tiny_model("llama", tmp_path / "m")
    report = tmp_path / "r.json"
    mvquant.calibrate(make_tiny_model("llama"), ToyTokenizer(), samples=2, seq_len=16, top_k=1,
                      progress=False).save(report)
    assert main(["quantize", str(model_dir), "--calibration", str(report), "--method", "awq", "--bits", "3",
                 "--group-size", "32", "--protect", "massive", "--calib-samples", "2", "--calib-seq-len", "32",
                 "--output", str(tmp_path / "ck"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("was measured to cost contextual skill") == 1 and "evals/results/figure5" in err
