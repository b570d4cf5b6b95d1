#!/usr/bin/env python3
"""Where does BF16 lose quality? An emulation that runs on any CPU (no BF16 units needed).

    python scripts/bf16_study.py --variant x2 --size 256 [--graph decoder] [--json out.json]

The reference model runs once in FP32 and then once per row with BF16 emulated in torch: every
weight and every module's output rounded to BF16 (round to nearest even), each module computing
in FP32 inside. That is roughly what OpenVINO's CPU plugin does under the bf16 inference hint
(BF16 tensors between fused operators, FP32 accumulation in oneDNN's BF16 kernels). Rows:

* ``all bf16``: as above;
* ``residual fp32``: only the leaf modules' outputs (convolutions, norms, activations, linear
  layers) rounded; the sums of residual blocks, the mask blends and every block's output stay
  FP32 (cheap elementwise work, in OpenVINO a per-node precision mark on the Add/Multiply);
* ``residual fp32 + <part> fp32``: one part of the network (a top-level block, with
  ``up_blocks``/``down_blocks`` split per block) also kept in FP32, weights and outputs, with
  the share of the graph's convolution/linear work (MACs) that this keeps in FP32;
* ``--keep a,b``: a row of your own (module names under the graph's encoder/decoder).

It prints PSNR (the project's definition: images peak 2.0, latents their own range) and the
max abs error of every output, for images also in 8-bit levels (x 127.5). Weights are seeded random
unless ``--weights`` names a diffusers folder; real weights may differ, so measure with them
where you have them.

This is a model of OpenVINO's arithmetic, not OpenVINO: wherever OpenVINO computes BF16 (BF16
units, or emulated on AVX-512), ``scripts/bf16_openvino.py DIR`` runs OpenVINO's own BF16 on the
same feed (x2 at 256x256: within 0.25 dB of this emulation on the decoders, 0.6 dB on the
encoder). OpenVINO keeps less in FP32 than this emulation's ``--keep`` rows do (see
docs/bf16.md), so their gains are an upper bound.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import sys
import time


def _round(x):
    import torch

    if isinstance(x, torch.Tensor):
        return x.to(torch.bfloat16).to(torch.float32) if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_round(v) for v in x)
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    return x


def _short(name: str) -> str:
    """"decoder.up_blocks.0" -> "up_blocks.0"; "post_quant_conv" stays."""
    return name.split(".", 1)[1] if "." in name else name


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def emulate(vae, root: str, keep=(), residual_fp32: bool = False):
    """A copy of ``vae`` whose ``root`` ("encoder" or "decoder", with the quant convs) computes
    with BF16 weights and BF16 module outputs, except the modules under ``keep`` (names relative
    to the model, e.g. "decoder.up_blocks.0"); ``residual_fp32``: round leaf outputs only."""
    import torch

    v = copy.deepcopy(vae)
    roots = (root, "quant_conv") if root == "encoder" else (root, "post_quant_conv")
    with torch.no_grad():
        for name, p in v.named_parameters():
            if _within(name, roots) and not _within(name, keep):
                p.copy_(_round(p))
    for name, m in v.named_modules():
        if not _within(name, roots) or _within(name, keep):
            continue
        if residual_fp32 and list(m.children()):
            continue
        m.register_forward_hook(lambda mod, inp, out: _round(out))
    return v


def macs_by_module(vae, graph, feed) -> collections.Counter:
    """The graph's convolution + linear multiply-accumulates, per module name."""
    import torch

    from asym_export.reference import reference_outputs

    macs = collections.Counter()
    hooks = []
    for name, m in vae.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            def h(mod, i, o, name=name):
                macs[name] += o.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(m, torch.nn.Linear):
            def h(mod, i, o, name=name):
                macs[name] += o.numel() * mod.in_features
        else:
            continue
        hooks.append(m.register_forward_hook(h))
    reference_outputs(vae, graph, feed)
    for h in hooks:
        h.remove()
    return macs


def mac_share(macs: collections.Counter, prefixes) -> float:
    """Share of all MACs done inside the modules under ``prefixes`` (any depth)."""
    return sum(v for n, v in macs.items() if _within(n, prefixes)) / sum(macs.values())


def parts_of(vae, root: str) -> list[str]:
    """The top-level blocks of the encoder or decoder, block lists split per block, and the
    quant conv the graph runs with it (post_quant_conv before the decoder, quant_conv after the
    encoder)."""
    import torch

    quant = "quant_conv" if root == "encoder" else "post_quant_conv"
    out = [quant] if getattr(vae, quant, None) is not None else []
    for name, child in getattr(vae, root).named_children():
        if isinstance(child, torch.nn.ModuleList):
            out += [f"{root}.{name}.{i}" for i in range(len(child))]
        else:
            out.append(f"{root}.{name}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="x2")
    p.add_argument("--weights", help="a diffusers folder (save_pretrained); default: seeded random weights")
    p.add_argument("--graph", default="decoder", choices=["encoder", "decoder", "decoder_uncond"])
    p.add_argument("--size", type=int, default=256, help="square image size in pixels (multiple of 8)")
    p.add_argument("--seed", type=int, default=7, help="the feed's seed")
    p.add_argument("--keep", action="append", default=[], metavar="A,B",
                   help="an extra row keeping these modules FP32 (on top of residual fp32)")
    p.add_argument("--no-parts", action="store_true", help="skip the one-part-at-a-time rows")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)

    import torch

    from asym_export.feeds import make_feed
    from asym_export.reference import reference_outputs
    from asym_export.variants import get_variant
    from asym_export.verify import output_summary
    from asym_export.weights import load_reference, random_model
    from asym_runtime.specs import GRAPHS, Shape

    torch.manual_seed(0)
    variant = get_variant(args.variant)
    vae = (load_reference(variant, args.weights)[0] if args.weights else random_model(variant, seed=0)).eval()
    graph = GRAPHS[args.graph]
    root = "encoder" if args.graph == "encoder" else "decoder"
    feed = make_feed(graph, Shape(1, args.size, args.size), args.seed, vae.config.scaling_factor)
    feed_bf16 = {k: _round(torch.from_numpy(v)).numpy() for k, v in feed.items()}
    t0 = time.perf_counter()
    ref = reference_outputs(vae, graph, feed)
    print(f"{args.variant} {args.graph} 1x{args.size}x{args.size}: FP32 reference {time.perf_counter() - t0:.1f} s",
          flush=True)
    parts = parts_of(vae, root)
    macs = macs_by_module(vae, graph, feed)
    share = {p: mac_share(macs, [p]) for p in parts}

    rows = [("all bf16", (), False), ("residual fp32", (), True)]
    if not args.no_parts:
        rows += [(f"residual fp32 + {_short(p)} fp32", (p,), True) for p in parts
                 if share[p] > 0 or any(True for _ in vae.get_submodule(p).parameters())]
    for spec in args.keep:
        keep = tuple(k if k.startswith(root + ".") or k.endswith("quant_conv") else f"{root}.{k}"
                     for k in spec.split(","))
        rows.append((f"residual fp32 + {'+'.join(_short(k) for k in keep)} fp32", keep, True))

    results = []
    for label, keep, residual in rows:
        t0 = time.perf_counter()
        out = reference_outputs(emulate(vae, root, keep, residual), graph, feed_bf16)
        outputs, text = output_summary(graph, ref, out)
        kept = mac_share(macs, keep)
        results.append({"row": label, "keep": list(keep), "residual_fp32": residual, "fp32_mac_share": kept,
                        "outputs": outputs})
        print(f"{label:44s} {100 * kept:5.1f} % MACs fp32  {text}  [{time.perf_counter() - t0:.0f} s]", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"variant": args.variant, "graph": args.graph, "size": args.size, "seed": args.seed,
                       "weights": args.weights or "random seed 0", "macs": sum(macs.values()), "rows": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
