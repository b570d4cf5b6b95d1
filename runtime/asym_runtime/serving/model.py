"""The python-backend model ``asym-serve`` puts on Triton: ``asym_runtime`` inside the server.

Triton's python backend runs this class in a stub process per model instance (the
``model.py`` that :mod:`.server` writes imports it). Each instance loads the artifact folder once
with :func:`asym_runtime.load` (only the graph its model serves) and answers a batch of
requests in :meth:`TritonPythonModel.execute`:

1. every request is checked on its own with the runtime's checks (``checks.check_inputs``:
   sizes that are multiples of 8, the shape limits, inputs that agree, NaN/Inf, value
   ranges); a bad request gets its own error response (``INVALID_ARG``, HTTP 400) naming the
   problem, and the other requests of the batch go on;
2. the good requests are grouped by shape (Triton's dynamic batcher already only batches
   requests whose sizes agree; the grouping makes it a guarantee), concatenated along the
   batch axis and run in one call;
3. the outputs are split back per request.

A failure while running (a machine fault, not the request's) answers every request of that
group with ``INTERNAL`` and the message; the model keeps serving.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Model parameters (``config.pbtxt`` ``parameters``) the server writes and this model reads.
PARAM_ARTIFACT = "asym_artifact"
PARAM_GRAPH = "asym_graph"
PARAM_BACKEND = "asym_backend"
PARAM_PRECISION = "asym_precision"
#: The folder's manifest.json as served (for ``remote()``: variant, model config, shape limits).
PARAM_MANIFEST = "asym_manifest"
PARAM_LOADED = "asym_loaded"


def _param(config: dict, key: str, default: str | None = None) -> str | None:
    value = config.get("parameters", {}).get(key, {}).get("string_value")
    return default if value in (None, "") else value


def batch_chunks(members: list[tuple[int, dict]], max_batch: int) -> list[list[tuple[int, dict]]]:
    """Requests of one shape, in order, cut into runs whose summed batch stays within
    ``max_batch``: Triton's batcher may queue up to the config's max_batch_size, which is the
    folder's limit, while the loaded backend's can be smaller (a TensorRT engine's profile).
    Each request was checked on its own, so each fits alone."""
    chunks: list[list[tuple[int, dict]]] = []
    total = 0
    for member in members:
        n = next(iter(member[1].values())).shape[0]
        if not chunks or total + n > max_batch:
            chunks.append([])
            total = 0
        chunks[-1].append(member)
        total += n
    return chunks


class TritonPythonModel:
    """Triton's python-backend interface: ``initialize``, ``execute``, ``finalize``."""

    def initialize(self, args: dict) -> None:
        import asym_runtime
        from asym_runtime.specs import GRAPHS

        config = json.loads(args["model_config"])
        self.graph = GRAPHS[_param(config, PARAM_GRAPH)]
        backend = _param(config, PARAM_BACKEND, "auto")
        precision = _param(config, PARAM_PRECISION)
        device_id = int(args.get("model_instance_device_id") or 0)
        graphs = (self.graph.name,)
        if self.graph.name == "decoder_uncond":
            # folders without the plain-decoder graph decode plainly through the conditional one
            manifest = asym_runtime.read_manifest(_param(config, PARAM_ARTIFACT))
            if not any(e.role == "decoder_uncond" for e in manifest.files.values()):
                graphs = ("decoder",)
        self.vae = asym_runtime.load(_param(config, PARAM_ARTIFACT), backend=backend, precision=precision,
                                     device_id=device_id, graphs=graphs)
        log.info("%s instance %s: %r", self.graph.name, args.get("model_instance_name"), self.vae)

    # ----- one call of the runtime per group of requests
    def _check(self, values: dict[str, Any]):
        from asym_runtime.checks import check_inputs

        return check_inputs(self.graph.name, self.graph.inputs, values, self.vae.limits)

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The graph's backend on the checked, concatenated feed: any graph of the contract, by name."""
        backend = self.vae.backends.get(self.graph.name)
        if backend is not None:
            return backend.infer(feed)
        # decoder_uncond on a folder without that graph: the runtime's plain decode through decoder
        return {"sample": self.vae.decode(feed["latent"])}

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        from asym_runtime.errors import AsymInputError

        def error(message: str, code_name: str):
            code = getattr(pb_utils.TritonError, code_name, None)
            err = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
            return pb_utils.InferenceResponse(error=err)

        responses: list = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, dict[str, np.ndarray]]]] = {}
        for i, request in enumerate(requests):
            values = {}
            for name in self.graph.input_names:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                values[name] = None if tensor is None else tensor.as_numpy()
            try:
                missing = [n for n, v in values.items() if v is None]
                if missing:  # Triton refuses these itself; kept for a config that allows optional inputs
                    raise AsymInputError(f"{self.graph.name}: missing input(s) {missing}; it takes {self.graph.input_names}")
                checked = self._check(values)
            except AsymInputError as e:
                responses[i] = error(str(e), "INVALID_ARG")
                continue
            key = tuple(tuple(v.shape[1:]) for v in checked.feed.values())
            groups.setdefault(key, []).append((i, checked.feed))
        for members in (c for g in groups.values() for c in batch_chunks(g, self.vae.limits.max_batch)):
            feed = {name: np.concatenate([f[name] for _, f in members], axis=0) for name in self.graph.input_names}
            try:
                outputs = self._run(feed)
            except Exception as e:  # noqa: BLE001 - every failure is answered; the model keeps serving
                log.exception("%s: running a batch of %d failed", self.graph.name, len(members))
                for i, _ in members:
                    responses[i] = error(f"{self.graph.name}: {type(e).__name__}: {e}", "INTERNAL")
                continue
            start = 0
            for i, f in members:
                n = next(iter(f.values())).shape[0]
                responses[i] = pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(name, np.ascontiguousarray(outputs[name][start:start + n], dtype=np.float32))
                    for name in self.graph.output_names
                ])
                start += n
        return responses

    def finalize(self) -> None:
        vae = getattr(self, "vae", None)
        if vae is not None:
            vae.close()
