"""scripts/bf16_openvino.py: OpenVINO's real BF16 on an artifact's graph, with FP32 marks on
chosen nodes (tiny variant; where OpenVINO computes BF16: BF16 units, or emulated on AVX-512)."""

import json

import onnx
import pytest
from repo_files import load_file

from asym_export.verify import FP32_MAX_ABS

ov_backend = pytest.importorskip("asym_runtime.backends.openvino")


def _reason():
    return ov_backend.unavailable_reason() or ov_backend.bf16_reason()


pytestmark = pytest.mark.skipif(_reason() is not None, reason=str(_reason()))


def _script():
    return load_file("scripts/bf16_openvino.py")


def _decoder_nodes(folder):
    from asym_runtime.manifest import read_manifest

    m = read_manifest(folder)
    return onnx.load_from_string(ov_backend.embedded_model(m.graph_source(m.find("decoder", "onnx", "fp32").name)))


def test_marks_keep_what_they_name_in_fp32(tiny_artifact, tmp_path, capsys):
    script = _script()
    model = _decoder_nodes(tiny_artifact)
    parts = script.node_parts(model)
    known = sorted({p for _, p, _ in parts.values() if p})
    assert {"up_blocks.0", "mid_block", "conv_in", "conv_out", "condition_encoder", "post_quant_conv"} <= set(known)
    out = tmp_path / "rows.json"
    assert script.main([str(tiny_artifact), "--size", "64", "--keep", "residual", "--keep", ",".join(known),
                        "--json", str(out)]) == 0
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    n_conv = sum(n.op_type == "Conv" for n in model.graph.node)
    fp32, bf16 = rows["fp32"], rows["bf16"]
    resid, everything = rows["bf16, fp32: residual"], rows[f"bf16, fp32: {'+'.join(known)}"]
    psnr = {k: r["outputs"]["sample"]["psnr_db"] for k, r in rows.items()}
    # the yardstick: OpenVINO FP32 agrees with diffusers; BF16 loses a bounded amount
    assert fp32["convolutions"] == {"f32": n_conv} and fp32["outputs"]["sample"]["max_abs"] <= FP32_MAX_ABS
    assert bf16["convolutions"] == {"bf16": n_conv} and 30 < psnr["bf16"] < 70, psnr
    # residual marks are elementwise work: no convolution leaves BF16, and they are the blocks'
    # sums and the blends only
    marked = [n for n in model.graph.node if parts[n.name][2]]
    assert resid["onnx_nodes_marked"] == len(marked) > 0 and {n.op_type for n in marked} <= {"Add", "Div", "Sub", "Mul"}
    # ... on images, never the exporter's shape arithmetic (its nodes sit in "_..." scopes)
    assert not [n.name for n in marked if any(p.value.startswith("['_") for p in n.metadata_props)]
    assert resid["convolutions"] == {"bf16": n_conv}
    # every part marked: every convolution runs in FP32 (the mark reaches OpenVINO's kernels) and
    # the result is far closer to FP32 than all-BF16 (what stays BF16 is fused norm/activation work)
    assert everything["convolutions"] == {"f32": n_conv}
    assert psnr[f"bf16, fp32: {'+'.join(known)}"] > psnr["bf16"] + 3, psnr
    assert "BF16 on this CPU:" in capsys.readouterr().out


def test_an_unknown_part_is_refused_with_the_graph_s_parts(tiny_artifact, capsys):
    assert _script().main([str(tiny_artifact), "--size", "64", "--keep", "up_blocks.9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown part(s) up_blocks.9; this graph has residual, ") and "mid_block" in err


def test_parts_are_top_level_modules():
    part = _script()._part
    assert part("decoder.up_blocks.0.resnets.1.conv1") == "up_blocks.0"
    assert part("encoder.down_blocks.3") == "down_blocks.3"
    assert part("decoder.mid_block.attentions.0") == "mid_block"
    assert part("upsamplers.2") == "upsamplers.2"
    assert part("post_quant_conv") == "post_quant_conv"
    assert part("decoder.condition_encoder.layers.0") == "condition_encoder"
