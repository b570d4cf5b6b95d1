"""Edits to a copied artifact folder's manifest, for tests of what the runtime and the
repository writer do with it: any change to its JSON (``edit_manifest``), or engine entries
(``add_engine_entries``). The engine bytes are not a TensorRT plan (nothing on a CPU machine can
build or deserialize one): what those tests check is how engines are chosen, checked against the
manifest and copied, never what TensorRT does with them."""

from __future__ import annotations

import json
from pathlib import Path

from asym_runtime.manifest import read_manifest, sha256_file

#: the manifest's "engines" section as an export on an H100 writes it (profile added per folder)
ENGINES_META = {
    "tensorrt_version": "10.13.0.35",
    "device": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},
    "version_compatible": False,
    "hardware_compatibility_level": "none",
    "variant": "tiny",
}


def edit_manifest(folder: Path, change) -> None:
    """Apply ``change`` to the folder's manifest data and write it back (its files untouched)."""
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def add_engine_entries(folder: Path, graphs=("encoder", "decoder")) -> None:
    """List an ``engines/<graph>.plan`` per graph in ``folder``'s manifest, with its real sha256."""
    gen = read_manifest(folder).folder
    (gen / "engines").mkdir()
    for g in graphs:
        (gen / "engines" / f"{g}.plan").write_bytes(b"not a TensorRT plan " + g.encode())

    def add(d):
        for g in graphs:
            name = f"engines/{g}.plan"
            d["files"][name] = {"role": g, "format": "tensorrt_plan", "precision": "fp16",
                                "sha256": sha256_file(gen / name), "size": (gen / name).stat().st_size}
        d["engines"] = dict(ENGINES_META, profile=d["shape_limits"])

    edit_manifest(folder, add)
