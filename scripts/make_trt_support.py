#!/usr/bin/env python3
"""Rebuild ``asym_export/data/tensorrt_onnx_support.json`` from onnx-tensorrt's operator tables.

    python scripts/make_trt_support.py \\
        --doc 10.0=operators-10.0.md=https://github.com/onnx/onnx-tensorrt/blob/10.1-GA/docs/operators.md \\
        --doc 10.15=operators-10.15.md=https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md

Each ``--doc VERSION=PATH=URL`` is a copy of ``docs/operators.md`` ("Supported ONNX Operators")
that describes one TensorRT release, and where it was read. The data file keeps what EVERY given release supports: an operator supported in all
of them, with the data types they all list, and the opset range they all parse. Giving the
oldest and newest release a support claim should cover (10.0 and the newest table) makes the
list hold for every release in between, which includes 10.12, the oldest TensorRT this project
builds engines with. Review the diff of the data file before committing it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "asym_export" / "data" / "tensorrt_onnx_support.json"

#: Attribute values the tables allow, as data the readiness check can test (from the
#: "Restrictions" column; ONNX defaults apply when the attribute is absent).
ATTRIBUTES = {
    "Resize": {
        "coordinate_transformation_mode": {
            "allowed": ["half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"],
            "default": "half_pixel"},
        "mode": {"allowed": ["nearest", "linear"], "default": "nearest"},
        "nearest_mode": {"allowed": ["floor", "ceil", "round_prefer_floor", "round_prefer_ceil"],
                         "default": "round_prefer_floor"},
        "keep_aspect_ratio_policy": {"allowed": ["stretch"], "default": "stretch"},
        "antialias": {"allowed": [0], "default": 0},
    },
    "ScatterND": {"reduction": {"allowed": ["none"], "default": "none"}},
    "TopK": {"sorted": {"allowed": [1], "default": 1}},
}

_HEADER = re.compile(r"TensorRT\s+([0-9.]+)\s+supports operators in the inclusive range of opset\s+(\d+)\s+to opset\s+(\d+)")
_ROW = re.compile(r"^\|\s*([A-Za-z0-9]+)\s*\|\s*(Y|N)[^|]*\|?([^|]*)\|?(.*)$")


def parse(text: str) -> tuple[str, tuple[int, int], dict[str, dict]]:
    m = _HEADER.search(text)
    if not m:
        raise SystemExit("no 'TensorRT X supports operators in the inclusive range of opset A to opset B' line")
    ops = {}
    for line in text.splitlines():
        r = _ROW.match(line.strip())
        if not r or r.group(1) in ("Operator",):
            continue
        name, yes, types, notes = r.groups()
        types = [t.strip().upper().replace("INF64", "INT64") for t in types.split(",") if t.strip()]
        ops[name] = {"supported": yes == "Y", "types": types,
                     "restrictions": re.sub(r"\s+", " ", notes.replace("`", "").replace("<br />", " ")).strip(" |")}
    return m.group(1), (int(m.group(2)), int(m.group(3))), ops


def _dump(data: dict) -> str:
    """Indented JSON with one operator per line, so a diff shows what changed per operator."""
    ops = data.pop("operators")
    head = json.dumps(data, indent=1)[:-2]
    lines = [f" {json.dumps(k)}: {json.dumps(v, separators=(', ', ': '))}" for k, v in ops.items()]
    return head + ',\n "operators": {\n' + ",\n".join(" " + ln for ln in lines) + "\n }\n}\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--doc", action="append", required=True, metavar="VERSION=PATH=URL")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()

    tables = []
    for spec in args.doc:
        version, _, rest = spec.partition("=")
        path, _, url = rest.partition("=")
        got, opsets, ops = parse(Path(path).read_text(encoding="utf-8"))
        if got != version:
            raise SystemExit(f"{path} describes TensorRT {got}, not {version}")
        tables.append((version, opsets, ops, url))
    names = set.intersection(*(set(ops) for _, _, ops, _ in tables))
    operators = {}
    for name in sorted(names, key=str.lower):
        rows = [ops[name] for _, _, ops, _ in tables]
        if not all(r["supported"] for r in rows):
            operators[name] = {"supported": False}
            continue
        types = [t for t in rows[-1]["types"] if all(t in r["types"] for r in rows)]
        entry = {"supported": True, "types": types}
        if rows[-1]["restrictions"]:
            entry["restrictions"] = rows[-1]["restrictions"]
        if name in ATTRIBUTES:
            entry["attributes"] = ATTRIBUTES[name]
        operators[name] = entry
    data = {
        "about": ("ONNX operators and data types that TensorRT's ONNX parser supports natively "
                  "(no plugin), kept as data for asym_export.trt_readiness. Regenerate with "
                  "scripts/make_trt_support.py; never edit by hand."),
        "source": {
            "document": "onnx-tensorrt docs/operators.md, 'Supported ONNX Operators'",
            "tables": [{"tensorrt": v, "opset": list(o), "url": u} for v, o, _, u in tables],
            "rule": "an operator is listed as supported only if every release above supports it, "
                    "with only the data types every release lists",
            "read_on": dt.date.today().isoformat(),
        },
        "tensorrt_version": f"{tables[0][0]}..{tables[-1][0]}",
        "opset": {"min": max(o[0] for _, o, _, _ in tables), "max": min(o[1] for _, o, _, _ in tables)},
        "operators": operators,
    }
    args.out.write_text(_dump(data), encoding="utf-8")
    print(f"wrote {args.out}: {sum(e['supported'] for e in operators.values())} supported operators, "
          f"{len(operators)} listed, opset {data['opset']['min']}..{data['opset']['max']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
