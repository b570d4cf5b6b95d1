"""asym-export: the export side (reference model, ONNX export, FP16 graphs, engines, checks)."""

__version__ = "0.1.0"
