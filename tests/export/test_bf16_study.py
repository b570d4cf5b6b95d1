"""scripts/bf16_study.py: the BF16 emulation rounds what it says it rounds (tiny variant)."""

import json

import torch
from repo_files import load_file

from asym_export.feeds import make_feed
from asym_export.reference import reference_outputs
from asym_export.verify import output_stats
from asym_runtime.specs import DECODER, Shape


def _study():
    return load_file("scripts/bf16_study.py")


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


class _Res(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return x + self.conv(x)


class _Toy(torch.nn.Module):
    """A conv, then a residual block: the shapes the emulation has to treat differently."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.post_quant_conv = torch.nn.Conv2d(2, 2, 1)
        self.decoder = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), _Res())


def test_the_emulation_rounds_weights_outputs_and_block_sums_as_documented():
    """Against a hand-written BF16 computation, exactly: every weight rounded, every module's
    output rounded; with residual_fp32 the block's sum is not rounded (its conv's output is)."""
    study = _study()
    toy = _Toy()
    x = torch.randn(1, 2, 4, 4)
    r = lambda t: t.to(torch.bfloat16).to(torch.float32)  # noqa: E731
    conv1, conv2 = toy.decoder[0], toy.decoder[1].conv

    def conv(m, t):
        return torch.nn.functional.conv2d(t, r(m.weight), r(m.bias))

    with torch.no_grad():
        y = r(conv(conv1, x))  # decoder.0
        h = r(conv(conv2, y))  # decoder.1.conv
        want_all = r(r(y + h))  # decoder.1 (the block), then decoder (the Sequential)
        want_resid = y + h
        got_all = study.emulate(toy, "decoder").decoder(x)
        got_resid = study.emulate(toy, "decoder", residual_fp32=True).decoder(x)
        got_keep = study.emulate(toy, "decoder", keep=("decoder.1",), residual_fp32=True).decoder(x)
        want_keep = y + conv2(y)  # the kept block computes in FP32 with its FP32 weights
    assert torch.equal(got_all, want_all)
    assert torch.equal(got_resid, want_resid)
    assert torch.equal(got_keep, want_keep)
    assert not torch.equal(want_all, toy.decoder(x))  # the rounding is visible at all
    assert study.mac_share({"decoder.0": 1, "decoder.1.conv": 3}, ["decoder.1"]) == 0.75
