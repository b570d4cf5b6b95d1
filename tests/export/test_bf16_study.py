"""scripts/bf16_study.py: the BF16 emulation rounds what it says it rounds (tiny variant)."""

import importlib.util
import json
from pathlib import Path

import torch

from asym_export.feeds import make_feed
from asym_export.reference import reference_outputs
from asym_export.verify import output_stats
from asym_runtime.specs import DECODER, Shape

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bf16_study.py"


def _study():
    spec = importlib.util.spec_from_file_location("bf16_study", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_emulation_loses_what_bf16_loses_and_keeping_parts_fp32_wins_it_back(tmp_path, tiny_vae, capsys):
    study = _study()
    parts = study.parts_of(tiny_vae, "decoder")
    assert {"post_quant_conv", "decoder.up_blocks.0", "decoder.condition_encoder"} <= set(parts)
    out = tmp_path / "rows.json"
    everything = ",".join(parts)
    assert study.main(["--variant", "tiny", "--size", "64", "--no-parts", "--keep", "up_blocks.0",
                       "--keep", everything, "--json", str(out)]) == 0
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    psnr = {k: r["outputs"]["sample"]["psnr_db"] for k, r in rows.items()}
    all_bf16, resid = psnr["all bf16"], psnr["residual fp32"]
    # BF16 keeps 8 bits of mantissa: a real but bounded loss (the x2 decoder measures 44-46 dB)
    assert 30 < all_bf16 < 70, psnr
    assert resid >= all_bf16 - 0.5  # fewer roundings cannot be much worse
    full = next(k for k in psnr if k.startswith("residual fp32 + post_quant_conv+"))
    # with every part FP32 only the inputs' BF16 rounding is left: exactly the FP32 model's
    # error on BF16-rounded inputs, and well above the all-BF16 row
    feed = make_feed(DECODER, Shape(1, 64, 64), 7, tiny_vae.config.scaling_factor)
    rounded = {k: torch.from_numpy(v).bfloat16().float().numpy() for k, v in feed.items()}
    ref, inputs_only = reference_outputs(tiny_vae, DECODER, feed), reference_outputs(tiny_vae, DECODER, rounded)
    want = output_stats("sample", ref["sample"], inputs_only["sample"], (-1.0, 1.0)).psnr_db
    assert abs(psnr[full] - want) < 1e-9, (psnr[full], want)
    assert psnr[full] > all_bf16 + 5, psnr
    assert abs(rows[full]["fp32_mac_share"] - 1.0) < 1e-9
    assert 0 < rows["residual fp32 + up_blocks.0 fp32"]["fp32_mac_share"] < 1
    assert "levels)" in capsys.readouterr().out
