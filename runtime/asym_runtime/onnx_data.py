"""What an ONNX graph reads besides itself: its external data files, taken from the graph's own
tensors (:func:`external_locations`, :func:`external_tensors`), and :class:`GraphSource`, a graph
with those files as checked bytes, which ONNX Runtime and OpenVINO load from memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from .errors import ArtifactError


@dataclass
class GraphSource:
    """An ONNX graph and every external data file it reads, as checked bytes.

    ``external`` maps each location exactly as the graph writes it to that file's bytes;
    ONNX Runtime gets them from memory, so no file is opened again after the check.
    ``digests``: the recorded sha256 of the graph, then of each data file in that order.
    """

    name: str
    model: bytes
    external: dict[str, bytes] = field(default_factory=dict)
    digests: tuple[str, ...] = ()


def external_tensors(model) -> Iterator:
    """Every tensor of an ONNX ``ModelProto`` that may keep its data in an external file:
    initializers, sparse initializers and tensors in node attributes, in subgraphs and in
    functions too."""

    def of_nodes(nodes):
        for node in nodes:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                for sparse in ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors):
                    yield sparse.values
                    yield sparse.indices
                if a.HasField("g"):
                    yield from of_graph(a.g)
                for g in a.graphs:
                    yield from of_graph(g)

    def of_graph(g):
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        yield from of_nodes(g.node)

    yield from of_graph(model.graph)
    for f in model.functions:
        yield from of_nodes(f.node)


def external_locations(model_bytes: bytes, where: str) -> list[str]:
    """The external data locations an ONNX model (serialised bytes) reads, in first-use order."""
    import onnx

    try:
        model = onnx.ModelProto.FromString(model_bytes)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise ArtifactError(f"{where} is not an ONNX model ({e})") from None
    found: dict[str, None] = {}
    for t in external_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if not loc:
                raise ArtifactError(f"{where}: tensor {t.name!r} is external but names no location")
            found.setdefault(loc)
    return list(found)
