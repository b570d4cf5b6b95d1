"""Serving an artifact folder on NVIDIA Triton Inference Server (``pip install -e '.[serve]'``).

* ``asym-serve DIR`` (:mod:`.server`): a real Triton server (the binary the ``nvidia-pytriton``
  wheel carries) whose python-backend models run ``asym_runtime`` on the folder: dynamic
  batching, instances, HTTP/gRPC, health and metrics as Triton provides them, and the
  runtime's input checks answered per request (:mod:`.model`).
* ``asym_runtime.remote(url)`` (:mod:`.client`): the same ``encode``/``decode`` as a loaded
  :class:`~asym_runtime.AsymVAE`, over tritonclient HTTP or gRPC.
* ``asym-triton-repo DIR --out REPO`` (:mod:`.repository`): a model repository for Triton's
  native ``onnxruntime`` and ``tensorrt`` backends, for Triton's container on a GPU machine.

The model configurations of both come from one place (:mod:`.config`), derived from the graph
contract (``specs.GRAPHS``) and the folder's shape limits. docs/serving.md describes the design.
Nothing here is imported by ``import asym_runtime`` except :func:`.client.remote`, which
imports tritonclient only when called.
"""
