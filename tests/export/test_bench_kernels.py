"""asym-bench --kernels: the summary of a profiler trace (per call, per kind of work, overlaps
counted once) and the kinds read from real kernel names. Recording itself needs a GPU (CUPTI):
``scripts/gpu_check.py`` runs it there; here it must refuse clearly."""

import pytest

from asym_export.bench import main
from asym_export.bench_kernels import kernel_table, kind_of, profile_calls, summarise

torch = pytest.importorskip("torch")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no GPU")


@pytest.mark.parametrize("name, kind", [
    # cuDNN's convolution kernels as they appear in Hopper traces (ONNX Runtime's NhwcConv, torch's conv)
    ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1_"
     "execute_segment_k_off_kernel__5x_cudnn", "convolution"),
    ("void cudnn::winograd_nonfused::winogradForwardData4x4<float, __half>(...)", "convolution"),
    ("void implicit_convolve_sgemm<float, float, 128, 5, 5, 3, 3, 3, 1, false, false, true>(...)", "convolution"),
    ("cutlass3x_sm90_tensorop_s64x128x16gemm_f16_f16_f32_void_f16_128x128x64_1x1x1_0_tnn_align8", "matmul"),
    ("ampere_fp16_s16816gemm_fp16_128x128_ldg8_f2f_stages_32x5_nn", "matmul"),
    # ONNX Runtime's contrib GroupNorm and torch's eager group_norm, torch.compile's Triton kernels
    ("void onnxruntime::contrib::cuda::GroupNormNHWCSumKernel<__half, 256>(...)", "norm"),
    ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float, float>(...)", "norm"),
    ("triton_red_fused_native_group_norm_0", "norm"),
    ("triton_poi_fused_convolution_silu_3", "elementwise"),  # a bias and SiLU, not the convolution
    ("triton_per_fused_mean_1", "reduction"),
    ("void onnxruntime::cuda::_BinaryElementWiseSimple<true, true, __half, __half, __half, "
     "onnxruntime::cuda::OP_Add<__half, __half, __half>, 256, 4>(...)", "elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::Half>>(...)", "elementwise"),
    ("void onnxruntime::cuda::_PadKernel<__half, 0>(...)", "layout"),
    ("void onnxruntime::cuda::Transpose3DKernel<short>(...)", "layout"),
    ("void onnxruntime::cuda::softmax_warp_forward<__half, __half, float, 10, false>(...)", "softmax"),
    ("some_kernel_nobody_named", "other"),
])
def test_kernel_names_are_read_as_the_work_they_do(name, kind):
    assert kind_of(name) == kind


def _kernel(name, ts, dur, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": 7}


def test_the_summary_is_per_call_and_counts_overlapping_work_once():
    conv = "sm90_xmma_fprop_implicit_gemm_f16f16_nhwc_cudnn"
    add = "void onnxruntime::cuda::_BinaryElementWiseSimple<OP_Add>"
    events = [
        {"ph": "M", "name": "process_name", "pid": 0, "args": {"name": "python"}},  # not work
        {"ph": "X", "cat": "cpu_op", "name": "aten::conv2d", "ts": 0, "dur": 5000},  # host side: not GPU work
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 0, "dur": 5},
        _kernel(conv, 0, 1000), _kernel(add, 500, 1000),  # overlap 500 us: busy 1500, summed 2000
        _kernel(conv, 3000, 1000), _kernel(add, 4000, 200),
        _kernel("Memcpy HtoD (Pageable -> Device)", 5000, 300, cat="gpu_memcpy"),
        _kernel("Memset (Device)", 5400, 100, cat="gpu_memset"),
    ]
    s = summarise(events, calls=2)
    assert s["calls"] == 2 and s["launches"] == 2  # four kernels in two calls; copies are no launches
    assert s["kernel_ms"] == pytest.approx((1000 + 1000 + 1000 + 200) / 2 / 1000)
    assert s["gpu_busy_ms"] == pytest.approx((1500 + 1200 + 300 + 100) / 2 / 1000)
    assert s["kinds"] == pytest.approx({"convolution": 1.0, "elementwise": 0.6, "copy": 0.2})
    assert list(s["kinds"]) == ["convolution", "elementwise", "copy"]  # largest first
    assert [t["name"] for t in s["top"]] == [conv, add, "gpu_memcpy", "gpu_memset"]
    assert s["top"][0] == {"name": conv, "kind": "convolution", "ms": 1.0, "count": 1.0}
    assert s["top"][1]["count"] == 1.0 and s["top"][1]["ms"] == pytest.approx(0.6)
    assert len(summarise(events, calls=2, top=1)["top"]) == 1
    with pytest.raises(ValueError, match="calls must be >= 1"):
        summarise(events, calls=0)


def test_nested_and_disjoint_spans_give_the_busy_time():
    events = [_kernel("a", 0, 1000), _kernel("b", 100, 200), _kernel("c", 2000, 10), _kernel("d", 1000, 5)]
    assert summarise(events, calls=1)["gpu_busy_ms"] == pytest.approx((1000 + 5 + 10) / 1000)


def test_the_kernel_lines_give_the_waiting_share_and_errors():
    row = {"graph": "decode", "shape": "1x512x512", "backend": "onnxruntime-cuda/fp16", "median_s": 0.010,
           "kernels": summarise([_kernel("sm90_xmma_fprop_x", 0, 6000), _kernel("y_PadKernel", 6000, 2000)], 1)}
    failed = dict(row, backend="torch-compile/fp16", kernels={"error": "no CUPTI"})
    text = kernel_table({"rows": [row, failed, dict(row, kernels=None)]})
    assert "decode 1x512x512 onnxruntime-cuda/fp16: GPU busy 8.00 of 10.00 ms (20 % waiting), 2 kernels" in text
    assert "ms by kind: convolution 6.00, layout 2.00" in text
    assert "torch-compile/fp16: not recorded: no CUPTI" in text
    assert text.count("decode 1x512x512") == 2  # the row without a record prints nothing


@no_gpu
def test_recording_refuses_without_a_gpu(capsys):
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        profile_calls(lambda feed: None, {})
    assert main(["--kernels", "--sizes", "64"]) == 2  # before any export or load
    captured = capsys.readouterr()
    assert "asym-bench: error: --kernels records CUDA kernels and needs a GPU" in captured.err
    assert "exporting" not in captured.out
