"""Set-ups shared by export tests that need a real export to fail in a chosen way, fast."""

from __future__ import annotations

import json
import shutil

from asym_runtime.manifest import generation_folder as gen


def tensorrt_without_instance_norm(monkeypatch, tiny_artifact) -> None:
    """The exporter stands in with the session's real tiny graphs (skips minutes of export), and
    the TensorRT support table marks InstanceNormalization unsupported, as if TensorRT dropped
    it: the export's readiness check must fail on every such node."""
    import asym_export.export as ex
    from asym_export import trt_readiness as tr

    def copy_exported(vae, graph, path, **kw):
        for suffix in ("", ".data"):
            shutil.copy(gen(tiny_artifact) / (graph.file_name() + suffix), str(path) + suffix)
        return path

    monkeypatch.setattr(ex, "onnx_from_model", copy_exported)
    table = json.loads(json.dumps(tr.support_table()))
    table["operators"]["InstanceNormalization"] = {"supported": False}
    monkeypatch.setattr(tr, "support_table", lambda: table)
