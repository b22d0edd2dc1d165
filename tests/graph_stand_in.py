"""A stand-in for a recorded CUDA graph on the CPU, so that what happens around a recording (Lightning's loop, the
optimiser, the benchmark's checks) is tested on machines without CUDA."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import pytest
import torch

import utils.step_graph
from utils.step_graph import RecordedStep


class CpuGraph:
    """torch.cuda.CUDAGraph's effect, on the CPU: the recording block runs once (a real recording only records it),
    and a replay runs the recorded step again through its own input tensors, writing the loss and the gradients
    into the tensors the recording left, as a replay overwrites them."""
    made = 0
    step: RecordedStep | None = None  # the step whose recording this is

    def __init__(self):
        CpuGraph.made += 1
        self._random_state = torch.get_rng_state()  # before the recording, which a replay runs first

    def replay(self):
        if self._random_state is not None:  # a recording runs nothing: its replay draws what the recording drew
            torch.set_rng_state(self._random_state)
            self._random_state = None
        held = [(parameter, parameter.grad) for parameter, _ in self.step._recorded_gradients]
        for parameter, gradient in self.step._recorded_gradients:
            gradient.zero_()  # backward then adds into the recorded tensors: what the replay writes
            parameter.grad = gradient
        loss = self.step.forward_and_loss(self.step._inputs)
        loss.backward()
        self.step._loss.copy_(loss.detach())
        for parameter, gradient in held:  # a replay writes memory; it leaves what each parameter's .grad is alone
            parameter.grad = gradient


def record_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps record and replay on the CPU through `CpuGraph` (each graph replays the step that recorded it); the
    streams are no-ops."""
    CpuGraph.made = 0
    record = RecordedStep._record

    def recording_step(step: RecordedStep, optimizer) -> None:
        CpuGraph.step = step
        record(step, optimizer)

    stream = type("Stream", (), {"wait_stream": lambda self, other: None})

    @contextmanager
    def recording(graph, capture_error_mode="global"):
        assert capture_error_mode == "thread_local"  # the loader's pin-memory thread keeps using CUDA
        yield

    monkeypatch.setattr(utils.step_graph, "records_on", lambda inputs: True)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", CpuGraph)
    monkeypatch.setattr(torch.cuda, "graph", recording)
    monkeypatch.setattr(torch.cuda, "Stream", stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", stream)
    monkeypatch.setattr(RecordedStep, "_record", recording_step)
