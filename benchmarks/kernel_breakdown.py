"""Where a profiled step's GPU time goes, by kind of kernel, read from the Chrome trace that torch.profiler exports.

The profiler's operator table cannot answer this: its self-CUDA column also credits each kernel to the annotations
around it (a compiled graph, the optimiser step), so its rows add up to more than the GPU worked. The trace lists
every kernel, copy and memset once, with its start and duration in microseconds.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
# First match wins: PyTorch's memory-efficient attention kernels are CUTLASS kernels (fmha_cutlass...), and
# max-autotune's Triton matrix templates (triton_tem...) are named as its fused kernels are.
KERNEL_CLASSES = (
    ("attention", ("sdpa", "flash", "fmha", "attention", "cudnn::fusion")),
    ("matrix products", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "triton_tem")),
    ("optimiser", ("multi_tensor", "adam")),
    ("fused elementwise and reductions (Triton)", ("triton_",)),
    ("layout changes", ("nchwtonhwc", "nhwctonchw", "transpose")),
)
COPIES = "memory copies and sets"
OTHER = "other kernels"


def kernel_class(name: str, category: str) -> str:
    if category != "kernel":
        return COPIES
    lowered = name.lower()
    for label, markers in KERNEL_CLASSES:
        if any(marker in lowered for marker in markers):
            return label
    return OTHER


def device_events(trace: dict) -> list[dict]:
    """The trace's complete events that ran on a GPU."""
    return [event for event in trace.get("traceEvents", [])
            if event.get("ph") == "X" and event.get("cat") in DEVICE_CATEGORIES]


def milliseconds_by_class(events: list[dict], steps: int) -> dict[str, float]:
    """GPU milliseconds per step of each kind of kernel, largest first."""
    totals: dict[str, float] = {}
    for event in events:
        label = kernel_class(event["name"], event["cat"])
        totals[label] = totals.get(label, 0.0) + event["dur"] / 1000 / steps
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def busy_milliseconds(events: list[dict], steps: int) -> float:
    """Milliseconds per step in which the GPU ran anything: overlapping events (several streams) count once."""
    busy, covered_until = 0.0, float("-inf")
    for start, end in sorted((event["ts"], event["ts"] + event["dur"]) for event in events):
        if end > covered_until:
            busy += end - max(start, covered_until)
            covered_until = end
    return busy / 1000 / steps


def breakdown(trace_path: Path, steps: int, step_milliseconds: float) -> str:
    """A few lines for the profile's text: the GPU's busy time against the step's, then each kind of kernel."""
    opener = gzip.open if trace_path.suffix == ".gz" else open
    with opener(trace_path, "rt") as handle:
        events = device_events(json.load(handle))
    if not events:
        return f"no GPU work in {trace_path.name}\n"
    busy = busy_milliseconds(events, steps)
    lines = [f"GPU busy {busy:.1f} ms of {step_milliseconds:.1f} ms per step under the profiler "
             f"({busy / step_milliseconds:.0%}; from {trace_path.name})"]
    lines += [f"  {milliseconds:7.2f} ms  {label}"
              for label, milliseconds in milliseconds_by_class(events, steps).items()]
    return "\n".join(lines) + "\n"
