#!/usr/bin/env python3
"""Build ``asym_export/data/tensorrt_onnx_support.json`` (what TensorRT's ONNX parser takes)
from the sources checked in beside it, in ``asym_export/data/tensorrt_support/``:

* ``tensorrt-<VERSION>.json``, one per TensorRT release: which ONNX operators the release's
  parser supports and for which data types, as read from onnx-tensorrt's
  ``docs/operators.md`` ("Supported ONNX Operators") by the ``extract`` step below. Facts only:
  the operator, Y/N, the data types, the opset range, and whether the row has a restriction.
* ``rules.json``, written by this project: every restriction of a supported operator in our
  own words, and the attribute values the readiness check allows, per operator. Every operator
  the exported graphs use has attribute rules, so a node carrying an attribute nobody has
  looked at fails the check instead of passing unread.

Two steps:

    # 1. a release's table -> its source file (needs a copy of that release's operators.md)
    python scripts/make_trt_support.py extract \\
        --doc 10.15=operators.md=https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md

    # 2. the sources -> the table the check reads (or, with --check, compare and exit 1 on a
    #    difference; tests/export/test_trt_support.py runs that on every CI run)
    python scripts/make_trt_support.py build [--check]

The table keeps what EVERY release supports: an operator supported in all of them, with the
data types they all list, and the opset range they all parse. Giving the oldest and the newest
release a claim should cover (10.0 and the newest table) makes the list hold for every release
in between, which includes 10.12, the oldest TensorRT this project builds engines with. Review
the diff of the data file before committing it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "asym_export" / "data"
OUT = DATA / "tensorrt_onnx_support.json"
SOURCES = DATA / "tensorrt_support"
RULES = SOURCES / "rules.json"

_HEADER = re.compile(r"TensorRT\s+([0-9.]+)\s+supports operators in the inclusive range of opset\s+(\d+)\s+to opset\s+(\d+)")
_ROW = re.compile(r"^\|\s*([A-Za-z0-9]+)\s*\|\s*(Y|N)[^|]*\|?([^|]*)\|?(.*)$")
_RULE_KEYS = {"allowed", "default", "any"}


class SourceError(ValueError):
    """A source file (a release table or the rules) is inconsistent; the message says how."""


# --------------------------------------------------------------------------- extract

def parse(text: str) -> tuple[str, tuple[int, int], dict[str, dict]]:
    """One release's operators.md -> (version, (opset min, max), {operator: row})."""
    m = _HEADER.search(text)
    if not m:
        raise SourceError("no 'TensorRT X supports operators in the inclusive range of opset A to opset B' line")
    ops = {}
    for line in text.splitlines():
        r = _ROW.match(line.strip())
        if not r or r.group(1) == "Operator":
            continue
        name, yes, types, notes = r.groups()
        types = [t.strip().upper().replace("INF64", "INT64") for t in types.split(",") if t.strip()]
        row = {"supported": yes == "Y"}
        if row["supported"]:
            row["types"] = types
            row["restricted"] = bool(notes.strip(" |"))
        ops[name] = row
    if not ops:
        raise SourceError("no operator rows ('| Name | Y or N | types | restrictions |') found")
    return m.group(1), (int(m.group(2)), int(m.group(3))), ops


def release_source(text: str, version: str, url: str, read_on: str) -> dict:
    got, opsets, ops = parse(text)
    if got != version:
        raise SourceError(f"the table describes TensorRT {got}, not {version}")
    return {"tensorrt": version, "opset": list(opsets), "url": url, "read_on": read_on,
            "operators": {k: ops[k] for k in sorted(ops, key=str.lower)}}


# --------------------------------------------------------------------------- build

def _check_rules(rules: dict, operators: dict) -> None:
    for name, r in rules["operators"].items():
        if name not in operators or not operators[name]["supported"]:
            raise SourceError(f"rules.json has rules for {name}, which the table does not list as supported")
        if set(r) - {"restrictions", "attributes"}:
            raise SourceError(f"rules.json: {name} has unknown keys {sorted(set(r) - {'restrictions', 'attributes'})}")
        for attr, rule in r.get("attributes", {}).items():
            if set(rule) - _RULE_KEYS or ("any" in rule) == ("allowed" in rule) or rule.get("any", True) is not True:
                raise SourceError(f"rules.json: {name}.{attr} needs either 'allowed' (with 'default') or 'any': true")
            if "allowed" in rule and rule.get("default") not in rule["allowed"]:
                raise SourceError(f"rules.json: {name}.{attr}'s default {rule.get('default')!r} is not allowed")


def build(releases: list[dict], rules: dict) -> dict:
    """The support table from the release sources (oldest first) and the rules."""
    releases = sorted(releases, key=lambda r: tuple(int(x) for x in r["tensorrt"].split(".")))
    names = set.intersection(*(set(r["operators"]) for r in releases))
    operators = {}
    for name in sorted(names, key=str.lower):
        rows = [r["operators"][name] for r in releases]
        if not all(row["supported"] for row in rows):
            operators[name] = {"supported": False}
            continue
        entry = {"supported": True, "types": [t for t in rows[-1]["types"] if all(t in row["types"] for row in rows)]}
        rule = rules["operators"].get(name, {})
        restricting = [r["tensorrt"] for r, row in zip(releases, rows) if row["restricted"]]
        if restricting:  # a restriction of any release holds for the range the table claims
            if not rule.get("restrictions"):
                raise SourceError(f"TensorRT {', '.join(restricting)} restricts {name}; write the restriction "
                                  "in rules.json (in our words) so the table carries it")
            entry["restrictions"] = rule["restrictions"]
        elif rule.get("restrictions"):
            raise SourceError(f"rules.json gives {name} a restriction that no release's table has; "
                              "remove it or check the tables")
        if "attributes" in rule:
            entry["attributes"] = rule["attributes"]
        operators[name] = entry
    _check_rules(rules, operators)
    return {
        "about": ("ONNX operators and data types that TensorRT's ONNX parser supports natively "
                  "(no plugin), kept as data for asym_export.trt_readiness. Built by "
                  "scripts/make_trt_support.py from asym_export/data/tensorrt_support/; never edit by hand."),
        "source": {
            "document": "onnx-tensorrt docs/operators.md, 'Supported ONNX Operators'",
            "tables": [{"tensorrt": r["tensorrt"], "opset": r["opset"], "url": r["url"]} for r in releases],
            "rule": "an operator is listed as supported only if every release above supports it, "
                    "with only the data types every release lists",
            "read_on": max(r["read_on"] for r in releases),
        },
        "tensorrt_version": f"{releases[0]['tensorrt']}..{releases[-1]['tensorrt']}",
        "opset": {"min": max(r["opset"][0] for r in releases), "max": min(r["opset"][1] for r in releases)},
        "operators": operators,
    }


def read_sources(folder: Path = SOURCES) -> tuple[list[dict], dict]:
    releases = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("tensorrt-*.json"))]
    if not releases:
        raise SourceError(f"no tensorrt-<VERSION>.json in {folder}")
    return releases, json.loads((folder / "rules.json").read_text(encoding="utf-8"))


def dump(data: dict) -> str:
    """Indented JSON with one operator per line, so a diff shows what changed per operator."""
    data = dict(data)
    ops = data.pop("operators")
    head = json.dumps(data, indent=1)[:-2]
    lines = [f" {json.dumps(k)}: {json.dumps(v, separators=(', ', ': '))}" for k, v in ops.items()]
    return head + ',\n "operators": {\n' + ",\n".join(" " + ln for ln in lines) + "\n }\n}\n"


# --------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    e = sub.add_parser("extract", help="a release's operators.md -> tensorrt-<VERSION>.json")
    e.add_argument("--doc", action="append", required=True, metavar="VERSION=PATH=URL")
    e.add_argument("--sources", type=Path, default=SOURCES)
    b = sub.add_parser("build", help="the sources -> the support table")
    b.add_argument("--sources", type=Path, default=SOURCES)
    b.add_argument("--out", type=Path, default=OUT)
    b.add_argument("--check", action="store_true", help="compare with --out instead of writing; exit 1 if they differ")
    args = p.parse_args(argv)

    try:
        if args.step == "extract":
            for spec in args.doc:
                version, _, rest = spec.partition("=")
                path, _, url = rest.partition("=")
                src = release_source(Path(path).read_text(encoding="utf-8"), version, url, dt.date.today().isoformat())
                out = args.sources / f"tensorrt-{version}.json"
                out.write_text(dump(src), encoding="utf-8")
                print(f"wrote {out}: {len(src['operators'])} operators, opset {src['opset'][0]}..{src['opset'][1]}")
            return 0
        text = dump(build(*read_sources(args.sources)))
    except (SourceError, OSError, json.JSONDecodeError) as exc:
        print(f"make_trt_support: {exc}", file=sys.stderr)
        return 1
    if args.check:
        old = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if old != text:
            changed = [a for a, b in zip(old.splitlines(), text.splitlines()) if a != b][:3]
            print(f"make_trt_support: {args.out} differs from what its sources build "
                  f"(first differing lines: {changed}); run `python scripts/make_trt_support.py build`",
                  file=sys.stderr)
            return 1
        print(f"{args.out} matches its sources")
        return 0
    args.out.write_text(text, encoding="utf-8")
    ops = json.loads(text)["operators"]
    print(f"wrote {args.out}: {sum(e['supported'] for e in ops.values())} supported operators, {len(ops)} listed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
