"""One loaded runtime used from several threads gives exactly the results of serial calls."""

import threading

import numpy as np
from runtime_helpers import feed

from asym_runtime.specs import Shape

THREADS, CALLS = 4, 2


def test_four_threads_times_two_decodes_equal_serial_decodes(tiny_rt):
    # every call gets its own input (and shapes differ), so a buffer shared between calls
    # would show up as another call's numbers, not as a small error
    shapes = [Shape(1 + i % 3, 64, 64 + 8 * (i % 4)) for i in range(THREADS * CALLS)]
    feeds = [feed("decoder", s, seed=100 + i) for i, s in enumerate(shapes)]

    def run(i):
        f = feeds[i]
        if i % 2:  # odd calls: the plain decode path, which builds its own image/mask
            return tiny_rt.decode(f["latent"])
        return tiny_rt.decode(f["latent"], image=f["image"], mask=f["mask"])

    serial = [run(i) for i in range(len(feeds))]

    results: dict[int, np.ndarray] = {}
    errors = []
    start = threading.Barrier(THREADS)

    def worker(t):
        try:
            start.wait()  # all threads enter the backend together
            for c in range(CALLS):
                i = t * CALLS + c
                results[i] = run(i)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert sorted(results) == list(range(THREADS * CALLS))
    for i, want in enumerate(serial):
        # ONNX Runtime's CPU kernels split work by a fixed plan, so concurrent runs are
        # bit-identical to serial ones: compare exactly
        np.testing.assert_array_equal(results[i], want, err_msg=f"call {i} ({shapes[i]})")


def test_encode_and_decode_at_once(tiny_rt):
    f = feed("decoder", Shape(2, 64, 96), seed=7)
    image = feed("encoder", Shape(2, 64, 96), seed=8)["image"]
    want_mean = tiny_rt.encode(image).mean
    want_dec = tiny_rt.decode(f["latent"], image=f["image"], mask=f["mask"])
    got = {}
    ts = [threading.Thread(target=lambda: got.__setitem__("mean", tiny_rt.encode(image).mean)),
          threading.Thread(target=lambda: got.__setitem__("dec", tiny_rt.decode(f["latent"], image=f["image"],
                                                                               mask=f["mask"])))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    np.testing.assert_array_equal(got["mean"], want_mean)
    np.testing.assert_array_equal(got["dec"], want_dec)


def test_a_call_that_races_close_says_closed(tiny_artifact):
    """close() from another thread between a call's 'is it open?' check and its run: the call
    ends with the 'closed' RuntimeError, not an AttributeError on a released session."""
    import pytest

    import asym_runtime

    f = feed("decoder", Shape(1, 64, 64), seed=7)
    rt = asym_runtime.load(tiny_artifact, backend="onnxruntime-cpu")
    backend = rt.backends["decoder"]
    backend.deactivate()  # what close() does; the call below is already past the check
    with pytest.raises(RuntimeError, match="closed"):
        backend._infer(f)
