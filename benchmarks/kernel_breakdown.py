"""Where a profiled step's GPU time goes, by kind of kernel, and what the host was doing while the GPU idled, read
from the Chrome trace that torch.profiler exports.

The profiler's operator table cannot answer this: its self-CUDA column also credits each kernel to the annotations
around it (a compiled graph, the optimiser step), so its rows add up to more than the GPU worked. The trace lists
every kernel, copy and memset once, with its start and duration in microseconds, and every host operation with its
thread.
"""
from __future__ import annotations

import bisect
import gzip
import heapq
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
HOST_CATEGORIES = ("cpu_op", "user_annotation", "cuda_runtime")
# runtime calls that return only once the GPU has finished: a value or copy read back, an explicit synchronisation
SYNCHRONIZING_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
NO_OPERATION = "no operation (Python between operations: Lightning, callbacks, the module's own code)"


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


def busy_intervals(events: list[dict]) -> list[tuple[float, float]]:
    """The times in which the GPU ran anything, overlapping events (several streams) merged."""
    merged: list[list[float]] = []
    for start, end in sorted((event["ts"], event["ts"] + event["dur"]) for event in events):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end) for start, end in merged]


def busy_milliseconds(events: list[dict], steps: int) -> float:
    """Milliseconds per step in which the GPU ran anything: overlapping events count once."""
    return sum(end - start for start, end in busy_intervals(events)) / 1000 / steps


def innermost_host_operations(trace: dict) -> list[tuple[float, float, str]]:
    """(start, end, name) pieces of time, each named by the shortest host operation running then on a thread that
    launches GPU work (the training loop's, and autograd's for the backward pass); none where none ran."""
    launchers = {(event.get("pid"), event.get("tid")) for event in trace.get("traceEvents", [])
                 if event.get("cat") == "cuda_runtime"}
    operations = sorted((event["ts"], event["ts"] + event["dur"], event["name"])
                        for event in trace.get("traceEvents", [])
                        if event.get("ph") == "X" and event.get("cat") in HOST_CATEGORIES
                        and (event.get("pid"), event.get("tid")) in launchers)
    boundaries = sorted({time for start, end, _ in operations for time in (start, end)})
    pieces, running, next_operation = [], [], 0
    for start, end in zip(boundaries, boundaries[1:]):
        while next_operation < len(operations) and operations[next_operation][0] <= start:
            begins, ends, name = operations[next_operation]
            heapq.heappush(running, (ends - begins, ends, name))
            next_operation += 1
        while running and running[0][1] <= start:  # ended; a longer ended one is dropped when it comes on top
            heapq.heappop(running)
        if running:
            pieces.append((start, end, running[0][2]))
    return pieces


def idle_milliseconds_by_host_operation(trace: dict, steps: int) -> dict[str, float]:
    """GPU idle milliseconds per step between its first and its last work, by what the host was running meanwhile
    (`innermost_host_operations`), largest first: what the GPU waited for."""
    busy = busy_intervals(device_events(trace))
    gaps = [(end, next_start) for (_, end), (next_start, _) in zip(busy, busy[1:])]
    totals: dict[str, float] = {}
    pieces, first_piece = innermost_host_operations(trace), 0
    for gap_start, gap_end in gaps:
        named = 0.0
        while first_piece < len(pieces) and pieces[first_piece][1] <= gap_start:
            first_piece += 1
        piece = first_piece
        while piece < len(pieces) and pieces[piece][0] < gap_end:
            start, end, name = pieces[piece]
            overlap = min(end, gap_end) - max(start, gap_start)
            totals[name] = totals.get(name, 0.0) + overlap
            named += overlap
            piece += 1
        totals[NO_OPERATION] = totals.get(NO_OPERATION, 0.0) + (gap_end - gap_start - named)
    per_step = {name: microseconds / 1000 / steps for name, microseconds in totals.items() if microseconds > 0}
    return dict(sorted(per_step.items(), key=lambda item: -item[1]))


def host_waits(trace: dict) -> list[tuple[str, float, float | None]]:
    """Each time the host waited for the GPU, in order: (the outermost operator that waited, or the runtime call where
    none did; microseconds waited; microseconds the GPU then stood idle before its next work, None where it did no
    more work in the trace). After a wait the GPU holds no queued work (once any other stream's is done), so it
    idles until the host launches more."""
    events = [event for event in trace.get("traceEvents", []) if event.get("ph") == "X"]
    operators: dict[tuple, list[dict]] = {}
    for event in events:
        if event.get("cat") == "cpu_op":
            operators.setdefault((event.get("pid"), event.get("tid")), []).append(event)
    busy = busy_intervals(device_events(trace))
    starts = [start for start, _ in busy]
    waits = []
    for call in sorted((event for event in events if event.get("cat") == "cuda_runtime"
                        and event["name"] in SYNCHRONIZING_CALLS), key=lambda event: event["ts"]):
        end = call["ts"] + call["dur"]
        enclosing = [operator for operator in operators.get((call.get("pid"), call.get("tid")), [])
                     if operator["ts"] <= call["ts"] and operator["ts"] + operator["dur"] >= end]
        name = min(enclosing, key=lambda operator: operator["ts"])["name"] if enclosing else call["name"]
        current = bisect.bisect_right(starts, end) - 1  # another stream may still be busy when this one is done
        idle_from = max(end, busy[current][1]) if current >= 0 else end
        following = current + 1
        waits.append((name, call["dur"], starts[following] - idle_from if following < len(starts) else None))
    return waits


def waits_per_step(waits: list[tuple[str, float, float | None]], steps: int) -> dict[str, tuple[float, float, float]]:
    """By the operator that waited, most GPU idle first: (waits, milliseconds waited, milliseconds of GPU idle after
    them), each per step."""
    totals: dict[str, list[float]] = {}
    for name, waited, idle_after in waits:
        total = totals.setdefault(name, [0, 0.0, 0.0])
        total[0] += 1
        total[1] += waited
        total[2] += idle_after or 0.0
    per_step = {name: (count / steps, waited / 1000 / steps, idle / 1000 / steps)
                for name, (count, waited, idle) in totals.items()}
    return dict(sorted(per_step.items(), key=lambda item: -item[1][2]))


def breakdown(trace_path: Path, steps: int, step_milliseconds: float, rows: int = 8) -> str:
    """A few lines for the profile's text: the GPU's busy time against the step's, each kind of kernel, the host
    operations the GPU's idle time fell in, and the host's waits for the GPU."""
    opener = gzip.open if trace_path.suffix == ".gz" else open
    with opener(trace_path, "rt") as handle:
        trace = json.load(handle)
    events = device_events(trace)
    if not events:
        return f"no GPU work in {trace_path.name}\n"
    busy = busy_milliseconds(events, steps)
    lines = [f"GPU busy {busy:.1f} ms of {step_milliseconds:.1f} ms per step under the profiler "
             f"({busy / step_milliseconds:.0%}; from {trace_path.name})"]
    lines += [f"  {milliseconds:7.2f} ms  {label}"
              for label, milliseconds in milliseconds_by_class(events, steps).items()]
    idle = idle_milliseconds_by_host_operation(trace, steps)
    lines.append(f"GPU idle {sum(idle.values()):.1f} ms per step between its first and last work, while the host ran:")
    lines += [f"  {milliseconds:7.2f} ms  {name}" for name, milliseconds in list(idle.items())[:rows]]
    waits = waits_per_step(host_waits(trace), steps)
    lines.append(f"The host waited for the GPU {sum(count for count, _, _ in waits.values()):.2f} times per step; "
                 f"the GPU idled {sum(idle for _, _, idle in waits.values()):.2f} ms per step right after:")
    lines += [f"  {count:5.2f} x {waited:7.2f} ms waited, {idle:6.2f} ms idle after  {name}"
              for name, (count, waited, idle) in list(waits.items())[:rows]]
    return "\n".join(lines) + "\n"
