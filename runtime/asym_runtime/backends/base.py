"""The one interface every backend implements: activate / infer / deactivate.

Modelled on Polygraphy's runners: ``activate()`` loads and allocates, ``infer(feed)`` runs,
``deactivate()`` frees, and ``with backend:`` does both ends. The public methods check
(is it active? are the feed's names right?) and call the private ``_activate`` / ``_infer``
/ ``_deactivate`` of the subclass.

A backend runs one graph of the contract (``specs.GraphSpec``). Its feed is already checked
(``checks.check_inputs``): contiguous float32 numpy arrays, or torch tensors of one device.
It returns one array per graph output, of the feed's kind (numpy in, numpy out; torch in,
torch out on the same device).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any

from ..specs import GraphSpec, ShapeLimits

log = logging.getLogger(__name__)


class Backend(ABC):
    #: "onnxruntime-cpu", "onnxruntime-cuda" or "tensorrt"
    name: str = "backend"

    def __init__(self, graph: GraphSpec):
        self.graph = graph
        self.active = False
        #: Shape limits the backend itself imposes (a TensorRT engine's optimization
        #: profile); None when it runs any shape the contract allows.
        self.limits: ShapeLimits | None = None

    # ----- lifecycle
    def activate(self) -> "Backend":
        """Load and allocate; idempotent. Returns self."""
        if not self.active:
            self._activate()
            self.active = True
            log.debug("activated %s for %s", self.name, self.graph.name)
        return self

    def deactivate(self) -> None:
        """Free what activate() took; idempotent."""
        if self.active:
            self.active = False
            self._deactivate()
            log.debug("deactivated %s for %s", self.name, self.graph.name)

    def __enter__(self) -> "Backend":
        return self.activate()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.deactivate()

    # ----- running
    def infer(self, feed: dict[str, Any]) -> dict[str, Any]:
        """Run the graph on ``feed`` (input name -> checked float32 array); output name -> array."""
        if not self.active:
            raise RuntimeError(f"{self.name} backend for {self.graph.name} is not active: call "
                               "activate() first or use it in a with statement")
        names = set(feed)
        if names != set(self.graph.input_names):
            raise ValueError(f"{self.graph.name} takes inputs {self.graph.input_names}, got {sorted(names)}")
        return self._infer(feed)

    @abstractmethod
    def _activate(self) -> None: ...

    @abstractmethod
    def _infer(self, feed: dict[str, Any]) -> dict[str, Any]: ...

    @abstractmethod
    def _deactivate(self) -> None: ...

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.graph.name} {'active' if self.active else 'inactive'}>"
