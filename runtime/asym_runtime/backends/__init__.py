"""Backends behind one interface (``base.Backend``: activate / infer / deactivate).

``onnxrt``: ONNX Runtime, CPU or CUDA provider. ``tensorrt``: serialized TensorRT engines.
Neither module imports its engine library at import time.
"""
