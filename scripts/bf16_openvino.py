#!/usr/bin/env python3
"""OpenVINO's real BF16 against the FP32 reference, and what FP32 marks on chosen nodes buy.

    python scripts/bf16_openvino.py DIR [--graph decoder] [--size 256] [--keep residual]
                                        [--keep up_blocks.0,mid_block] [--json out.json]

DIR is an artifact folder written by asym-export. Its portable FP32 graph (the checked bytes,
as the runtime reads them) is compiled by OpenVINO's CPU plugin once per row and run on one
seeded feed at 1xSIZExSIZE; the reference is diffusers' model with the folder's weights in
FP32. Rows:

* ``fp32``: OpenVINO FP32 (agrees with the reference to ~1e-5: the yardstick);
* ``bf16``: the bf16 inference hint, as ``load(DIR, backend="openvino", precision="bf16")``;
* ``bf16, fp32: A+B``: the same with OpenVINO's per-node precision mark (the runtime
  attribute that ``ov::disable_fp16_compression`` sets, honoured under bf16 too) on the ONNX
  nodes of parts A and B. A part is a top-level module of the graph (``up_blocks.0``,
  ``upsamplers.0``, ``mid_block``, ``conv_out``, ...; the export's node metadata
  ``pkg.torch.onnx.name_scopes`` says which node belongs where) or ``residual``: the sums of
  the residual and attention blocks and the mask blends (elementwise work, no MACs).

The mark has no Python binding; the script writes the model as OpenVINO IR into a temporary
folder, adds ``<rt_info><attribute name="precise" version="0"/></rt_info>`` to the marked
layers (and to the layers the ONNX frontend made for them under names of its own, such as a
GroupNorm's ``MVN_123``) and reads it back. OpenVINO does not copy the mark onto nodes its CPU
transformations create (the SiLU that becomes one fused Swish), so a marked block's activations
still reach its convolutions in BF16; each row prints how many convolutions ran in which
precision, so what a mark kept is visible.

It prints PSNR (images peak 2.0, latents their own range) and max abs error of every output
(images also in 8-bit levels), and OpenVINO's latency of one call after a warm-up. On a CPU
without BF16 units OpenVINO emulates BF16 (AVX-512): the numbers are BF16's, the latency is
not what BF16 units give.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

SCOPES = "pkg.torch.onnx.name_scopes"
HIERARCHY = "pkg.torch.onnx.class_hierarchy"
#: the blocks whose sum is the residual stream (diffusers' class names as the exporter records them)
RESIDUAL_BLOCKS = ("ResnetBlock2D", "Attention")


def _part(scope: str) -> str:
    """``decoder.up_blocks.0.resnets.1`` -> ``up_blocks.0``; ``upsamplers.0`` stays."""
    parts = scope.split(".")
    if parts[0] in ("decoder", "encoder") and len(parts) > 1:
        parts = parts[1:]
    return ".".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else parts[0]


def node_parts(model) -> dict[str, tuple[str, str | None, bool]]:
    """ONNX node name -> (op type, its top-level part or None, whether it is residual work)."""
    out = {}
    for n in model.graph.node:
        meta = {p.key: p.value for p in n.metadata_props}
        scopes = ast.literal_eval(meta.get(SCOPES, "[]"))
        hierarchy = ast.literal_eval(meta.get(HIERARCHY, "[]"))
        # the last scope is the node's own name; "_..." scopes are the exporter's (shape arithmetic)
        named = [s for s in scopes[:-1] if s and not s.startswith("_")]
        part = _part(named[0]) if named else None
        block = hierarchy[-2].rsplit(".", 1)[-1] if len(hierarchy) >= 2 else ""
        residual = (n.op_type in ("Add", "Div") and block in RESIDUAL_BLOCKS
                    and hierarchy[-1] in ("aten.add.Tensor", "aten.div.Tensor")) or \
                   (not named and len(hierarchy) == 2 and not hierarchy[0].startswith("_")  # the wrapper's own:
                    and n.op_type in ("Add", "Sub", "Mul"))  # the mask blends (not the exporter's shape arithmetic)
        out[n.name] = (n.op_type, part, residual)
    return out


def select(parts: dict, keep: list[str]) -> set[str]:
    """The ONNX node names that ``keep`` (part names and/or ``residual``) covers."""
    known = sorted({p for _, p, _ in parts.values() if p})
    unknown = [k for k in keep if k != "residual" and k not in known]
    if unknown:
        raise ValueError(f"unknown part(s) {', '.join(unknown)}; this graph has residual, {', '.join(known)}")
    return {name for name, (_, part, residual) in parts.items()
            if part in keep or ("residual" in keep and residual)}


def mark_fp32(core, model, names: set[str], onnx_names: set[str], workdir: str):
    """``model`` with OpenVINO's precision mark on every layer made from the ONNX nodes ``names``
    (the ONNX frontend names a node's layers ``NAME`` or ``NAME/...``) and on the layers the
    frontend made up names for (an InstanceNormalization's ``MVN_123``) whose inputs all come
    from marked layers; and how many layers it marked."""
    import openvino as ov

    xml = Path(workdir) / "marked.xml"
    ov.save_model(model, xml, compress_to_fp16=False)
    tree = ET.parse(xml)
    root = tree.getroot()
    layers = {layer.get("id"): layer for layer in root.iter("layer")}
    inputs: dict[str, list[str]] = {}
    for edge in root.iter("edge"):
        inputs.setdefault(edge.get("to-layer"), []).append(edge.get("from-layer"))
    marked: set[str] = set()
    for lid, layer in layers.items():  # the IR lists layers in topological order
        name = layer.get("name", "").split("/")[0]
        if name in names:
            marked.add(lid)
        elif name not in onnx_names and layer.get("type") not in ("Const", "Parameter", "Result"):
            producers = [i for i in inputs.get(lid, []) if layers[i].get("type") != "Const"]
            if producers and all(i in marked for i in producers):
                marked.add(lid)
    for lid in marked:
        layer = layers[lid]
        rt = layer.find("rt_info")
        if rt is None:
            rt = ET.Element("rt_info")
            layer.insert(0, rt)
        ET.SubElement(rt, "attribute", name="precise", version="0")
    tree.write(xml)
    return core.read_model(xml), len(marked)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", help="an asym-export folder")
    p.add_argument("--graph", default="decoder", choices=["encoder", "decoder", "decoder_uncond"])
    p.add_argument("--size", type=int, default=256, help="square image size in pixels (multiple of 8)")
    p.add_argument("--seed", type=int, default=7, help="the feed's seed")
    p.add_argument("--keep", action="append", default=[], metavar="A,B",
                   help="a row with FP32 marks on these parts (repeatable; 'residual' for the residual sums)")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)

    import numpy as np
    import onnx
    import openvino as ov

    from asym_export.feeds import make_feed
    from asym_export.reference import reference_from_manifest, reference_outputs
    from asym_export.verify import output_summary
    from asym_runtime.backends.openvino import bf16_reason, bf16_support, conv_precisions, embedded_model
    from asym_runtime.manifest import read_manifest
    from asym_runtime.specs import GRAPHS, Shape

    reason = bf16_reason()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    manifest = read_manifest(args.artifact)
    graph = GRAPHS[args.graph]
    entry = manifest.find(args.graph, "onnx", "fp32")
    if entry is None:
        print(f"error: {args.artifact} has no FP32 {args.graph} graph", file=sys.stderr)
        return 2
    data = embedded_model(manifest.graph_source(entry.name))
    parts = node_parts(onnx.load_from_string(data))
    try:
        rows = [("fp32", "f32", set()), ("bf16", "bf16", set())] + [
            (f"bf16, fp32: {'+'.join(k.split(','))}", "bf16", select(parts, k.split(","))) for k in args.keep]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    vae = reference_from_manifest(manifest)
    feed = make_feed(graph, Shape(1, args.size, args.size), args.seed, vae.config.scaling_factor)
    ref = reference_outputs(vae, graph, feed)
    del vae
    core = ov.Core()
    base = core.read_model(data)
    print(f"{args.artifact} {args.graph} 1x{args.size}x{args.size}, OpenVINO {ov.__version__}, "
          f"BF16 on this CPU: {bf16_support()}", flush=True)
    results = []
    for label, hint, names in rows:
        with tempfile.TemporaryDirectory(prefix="asym-bf16-") as workdir:
            model, marked = mark_fp32(core, base, names, set(parts), workdir) if names else (base, 0)
            t0 = time.perf_counter()
            compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                         "PERFORMANCE_HINT": "LATENCY"})
            compile_s = time.perf_counter() - t0
            request = compiled.create_infer_request()
            request.infer(feed)  # warm-up
            t0 = time.perf_counter()
            got = {port.get_any_name(): np.array(v) for port, v in request.infer(feed).items()}
            infer_s = time.perf_counter() - t0
            convs = conv_precisions(compiled)
            del request, compiled, model
        outputs, text = output_summary(graph, ref, got)
        results.append({"row": label, "onnx_nodes_marked": len(names), "layers_marked": marked,
                        "convolutions": convs, "compile_s": compile_s, "infer_s": infer_s, "outputs": outputs})
        conv_text = ", ".join(f"{k} {v}" for k, v in sorted(convs.items()))
        print(f"{label:40s} convolutions {conv_text:16s} {text}  [{infer_s:.1f} s per call]", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"artifact": str(args.artifact), "graph": args.graph, "size": args.size, "seed": args.seed,
                       "openvino": ov.__version__, "bf16": bf16_support(), "rows": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
