"""The export side's graph registry covers the contract exactly, and each entry's three calls
(export wrapper, diffusers call, public runtime call) agree on the contract's names."""

import numpy as np
import torch

from asym_export.feeds import make_feed
from asym_export.graphs import BENCH_GRAPHS, EXPORT_GRAPHS, wrapper_for
from asym_runtime.specs import GRAPHS, Shape


def test_every_contract_graph_has_one_export_declaration_in_contract_order():
    assert list(EXPORT_GRAPHS) == list(GRAPHS)
    assert all(e.spec is GRAPHS[name] for name, e in EXPORT_GRAPHS.items())
    assert len(BENCH_GRAPHS) == len(EXPORT_GRAPHS)  # bench names are one per graph


def test_wrapper_and_diffusers_call_name_the_contracts_outputs_and_agree(tiny_vae):
    shape = Shape(1, 64, 64)
    for name, e in EXPORT_GRAPHS.items():
        feed = make_feed(e.spec, shape, seed=3, scaling_factor=0.18215)
        t = {k: torch.from_numpy(v) for k, v in feed.items()}
        with torch.no_grad():
            ref = e.diffusers_call(tiny_vae, t)
            out = wrapper_for(tiny_vae, name, subpixel=False)(*(t[n] for n in e.spec.input_names))
        out = out if isinstance(out, tuple) else (out,)
        assert list(ref) == e.spec.output_names, name
        for k, v in zip(e.spec.output_names, out):
            assert torch.max(torch.abs(v - ref[k])).item() <= 1e-6, (name, k)


def test_runtime_calls_run_every_graph_through_the_public_api(tiny_artifact):
    import asym_runtime

    with asym_runtime.load(tiny_artifact, backend="onnxruntime-cpu", precision="fp32") as rt:
        for name, e in EXPORT_GRAPHS.items():
            feed = make_feed(e.spec, Shape(1, 64, 64), seed=3, scaling_factor=rt.config.scaling_factor)
            out = e.runtime_call(rt, feed)
            assert list(out) == e.spec.output_names, name
            for t in e.spec.outputs:
                assert np.asarray(out[t.name]).shape == t.shape(1, 64, 64)
