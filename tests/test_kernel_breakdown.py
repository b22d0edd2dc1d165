import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.kernel_breakdown import (NO_OPERATION, breakdown, busy_milliseconds, host_waits,
                                        idle_milliseconds_by_host_operation, kernel_class, milliseconds_by_class,
                                        waits_per_step)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, category, expected", [
    # the kinds of kernel an H100's profile of the CUDA-graph step showed (benchmarks/results/h100-2026-11-27,
    # names completed), and PyTorch's own attention and max-autotune matrix kernels
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_3_64x64x128", "kernel", "attention"),
    ("void cudnn::fusion::compute_dot_do_o_specialized<true>", "kernel", "attention"),
    ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80", "kernel", "attention"),
    ("nvjet_sm90_tst_192x192_64x3_2x1_v_bz_coopB_NNN", "kernel", "matrix products"),
    ("void cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816fprop>", "kernel", "matrix products"),
    ("triton_tem_fused_addmm_0", "kernel", "matrix products"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "kernel",
     "optimiser"),
    ("triton_per_fused__to_copy_add_native_layer_norm_backward_3", "kernel",
     "fused elementwise and reductions (Triton)"),
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16>", "kernel", "layout changes"),
    ("void at::native::vectorized_elementwise_kernel<4, FillFunctor<float>>", "kernel", "other kernels"),
    ("Memcpy HtoD (Pinned -> Device)", "gpu_memcpy", "memory copies and sets"),
])
def test_kernels_are_sorted_into_kinds_first_match_first(name: str, category: str, expected: str):
    assert kernel_class(name, category) == expected


def kernel(name: str, start: float, duration: float, category: str = "kernel") -> dict:
    return {"ph": "X", "cat": category, "name": name, "ts": start, "dur": duration}


def test_overlapping_device_work_counts_once_and_time_is_per_step():
    events = [kernel("nvjet_a", 0, 10_000), kernel("triton_poi_b", 5_000, 10_000),  # two streams, 5 ms overlap
              kernel("nvjet_c", 20_000, 10_000), kernel("Memset (Device)", 12_000, 1_000, "gpu_memset")]
    assert busy_milliseconds(events, steps=1) == pytest.approx(25.0)
    assert busy_milliseconds(events, steps=5) == pytest.approx(5.0)
    by_class = milliseconds_by_class(events, steps=2)
    assert by_class == pytest.approx({"matrix products": 10.0, "fused elementwise and reductions (Triton)": 5.0,
                                      "memory copies and sets": 0.5})
    assert list(by_class) == ["matrix products", "fused elementwise and reductions (Triton)",
                              "memory copies and sets"]


def host(name: str, start: float, duration: float, category: str = "cpu_op", thread: int = 1) -> dict:
    return {"ph": "X", "cat": category, "name": name, "ts": start, "dur": duration, "pid": 7, "tid": thread}


def test_the_gpus_idle_time_is_named_by_the_innermost_host_operation_of_the_launching_threads():
    """Kernels at 0-10, 20-30 and 50-60 ms leave two gaps: 10-20 (the loader for 6 ms of it) and 30-50 (the optimiser
    step's annotation, with a copy inside it for 4 ms); the pinning thread launches nothing and is not asked."""
    trace = {"traceEvents": [
        kernel("nvjet_a", 0, 10_000), kernel("nvjet_b", 20_000, 10_000), kernel("nvjet_c", 50_000, 10_000),
        host("cudaLaunchKernel", 0, 1_000, "cuda_runtime"),
        host("enumerate(DataLoader)#_MultiProcessingDataLoaderIter.__next__", 12_000, 6_000, "user_annotation"),
        host("Optimizer.step#AdamW.step", 30_000, 18_000, "user_annotation"),
        host("aten::copy_", 32_000, 4_000),
        host("aten::pin_memory", 10_000, 10_000, thread=2)]}
    idle = idle_milliseconds_by_host_operation(trace, steps=2)
    loader = "enumerate(DataLoader)#_MultiProcessingDataLoaderIter.__next__"
    assert idle == pytest.approx({"Optimizer.step#AdamW.step": 7.0, loader: 3.0, NO_OPERATION: 3.0, "aten::copy_": 2.0})
    assert list(idle)[0] == "Optimizer.step#AdamW.step"


def test_each_wait_for_the_gpu_is_named_by_the_operator_that_asked_and_the_idle_that_followed_it():
    """As in run 5's trace of the recorded step: the bar's loss read back (`aten::item`), the logger's copy to the
    host (`aten::to`; its asynchronous copy call is no wait), a read at the trace's end, and a synchronisation on a
    thread of its own, inside no operator of that thread, that returns while another stream still works."""
    trace = {"traceEvents": [
        kernel("nvjet_a", 0, 30_000), kernel("nvjet_b", 40_000, 30_000), kernel("nvjet_c", 75_000, 20_000),
        host("aten::item", 10_000, 21_000), host("aten::_local_scalar_dense", 10_100, 20_800),
        host("cudaStreamSynchronize", 10_200, 20_000, "cuda_runtime"),  # 30.2: the GPU next works at 40
        host("aten::to", 60_000, 11_000), host("aten::copy_", 60_100, 10_800),
        host("cudaMemcpyAsync", 60_200, 10, "cuda_runtime"),
        host("cudaStreamSynchronize", 60_300, 10_000, "cuda_runtime"),  # 70.3: next work at 75
        host("cudaDeviceSynchronize", 62_000, 1_000, "cuda_runtime", thread=2),  # 63: busy until 70, then 75
        host("aten::item", 90_000, 6_000), host("cudaStreamSynchronize", 90_100, 5_000, "cuda_runtime")]}
    assert host_waits(trace) == [("aten::item", 20_000, 9_800), ("aten::to", 10_000, 4_700),
                                 ("cudaDeviceSynchronize", 1_000, 5_000), ("aten::item", 5_000, None)]
    per_step = waits_per_step(host_waits(trace), steps=2)
    expected = {"aten::item": (1.0, 12.5, 4.9), "cudaDeviceSynchronize": (0.5, 0.5, 2.5), "aten::to": (0.5, 5.0, 2.35)}
    assert list(per_step) == list(expected)  # most idle after first
    assert all(per_step[name] == pytest.approx(figures) for name, figures in expected.items())


def test_the_breakdown_reads_a_gzipped_trace_and_ignores_host_events(tmp_path: Path):
    trace = {"traceEvents": [kernel("nvjet_a", 0, 30_000), kernel("sdpa_flash_fprop", 30_000, 10_000),
                             kernel("aten::mm", 0, 45_000, "cpu_op"),
                             {"ph": "i", "cat": "kernel", "name": "instant", "ts": 0}]}
    path = tmp_path / "profile.trace.json.gz"
    with gzip.open(path, "wt") as handle:
        json.dump(trace, handle)
    text = breakdown(path, steps=2, step_milliseconds=25.0)
    assert text.splitlines()[0].startswith("GPU busy 20.0 ms of 25.0 ms per step under the profiler (80%")
    assert "15.00 ms  matrix products" in text and "5.00 ms  attention" in text
    assert "GPU idle 0.0 ms per step between its first and last work" in text  # back to back: no gap
    assert "The host waited for the GPU 0.00 times per step" in text
    (tmp_path / "cpu.trace.json").write_text(json.dumps({"traceEvents": [kernel("aten::mm", 0, 5, "cpu_op")]}))
    assert breakdown(tmp_path / "cpu.trace.json", steps=1, step_milliseconds=1.0) == "no GPU work in cpu.trace.json\n"


def test_the_step_benchmark_profiles_into_a_text_and_a_trace(tmp_path: Path):
    profile = tmp_path / "profiles" / "published.txt"
    subprocess.run([sys.executable, "-m", "benchmarks.bench_stage1", "step", "--config", "demo", "--device", "cpu",
                    "--levers", "published", "--steps", "3", "--warmup", "1", "--evaluate-after",
                    "--profile-after", "published", "--profile-file", str(profile)], cwd=REPO, check=True,
                   capture_output=True, timeout=300)
    text = profile.read_text()
    assert text.startswith("2 steps, ") and "no GPU work in published.trace.json.gz" in text
    assert "Self CPU" in text  # the operator tables follow
    with gzip.open(profile.with_suffix(".trace.json.gz"), "rt") as handle:
        assert any(event.get("cat") == "cpu_op" for event in json.load(handle)["traceEvents"])
