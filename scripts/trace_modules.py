#!/usr/bin/env python3
"""How an export and a load travel through the project's modules: which modules a call path
enters, and how often it calls back into a module that is already further up the stack with
another module in between (A -> B -> A: "back up to a caller's module").

    python scripts/trace_modules.py [--out DIR] [--skip-export]

Runs a tiny export (``--variant tiny``, no CUDA form, one verification shape) and a load plus
one decode under ``sys.setprofile``, counting only calls whose code lies in ``asym_export`` or
``asym_runtime``. Prints, per phase, the modules entered and every re-entry (module pair and
count). A design that needs a call back (a registry entry calling the runtime, say) shows up
here too; the note on a restructuring says which ones are by design.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path


def _module_of(filename: str, roots: dict[str, str]) -> str | None:
    for root, pkg in roots.items():
        if filename.startswith(root):
            rel = filename[len(root):].lstrip("/").removesuffix(".py").replace("/", ".")
            return f"{pkg}.{rel}".removesuffix(".__init__")
    return None


def trace(fn, roots: dict[str, str]):
    stack: list[str | None] = []
    entered: collections.Counter = collections.Counter()
    reentries: collections.Counter = collections.Counter()

    def prof(frame, event, arg):
        if event == "call":
            mod = _module_of(frame.f_code.co_filename, roots)
            if mod is not None:
                prev = next((m for m in reversed(stack) if m is not None), None)
                if mod != prev:
                    entered[mod] += 1
                    # back into a module further up with another module in between
                    if mod in stack and prev is not None:
                        reentries[(prev, mod)] += 1
            stack.append(mod)
        elif event == "return" and stack:
            stack.pop()

    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return entered, reentries


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--skip-export", action="store_true", help="trace the load of an existing --out only")
    args = ap.parse_args()

    import numpy as np

    import asym_export
    import asym_runtime

    roots = {str(Path(asym_export.__file__).parent): "asym_export",
             str(Path(asym_runtime.__file__).parent): "asym_runtime"}
    out = args.out or Path(tempfile.mkdtemp(prefix="trace-")) / "tiny"

    def export():
        from asym_export.export import ExportOptions, export_artifact
        from asym_runtime.specs import Shape

        export_artifact(ExportOptions(variant="tiny", out=out, random_weights=True, seed=0, cuda_form=False,
                                      verify_shapes=(Shape(1, 64, 64),)))

    def load():
        with asym_runtime.load(out, backend="onnxruntime-cpu") as vae:
            rng = np.random.default_rng(0)
            image = rng.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
            vae.decode(vae.encode(image).mean, image=image, mask=np.ones((1, 1, 64, 64), np.float32))

    phases = ([] if args.skip_export else [("export", export)]) + [("load + encode + decode", load)]
    for name, fn in phases:
        entered, reentries = trace(fn, roots)
        print(f"{name}: {len(entered)} modules entered; {sum(reentries.values())} calls back into a module "
              f"further up the stack ({len(reentries)} module pairs)")
        for (src, dst), n in sorted(reentries.items(), key=lambda kv: -kv[1]):
            print(f"    {src} -> {dst}: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
