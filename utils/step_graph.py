"""A training step's forward and backward pass recorded once as one CUDA graph and replayed (`cuda_graph_step`)."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Protocol

import torch


class Optimizer(Protocol):  # a torch optimiser, or Lightning's wrapper of one
    param_groups: list[dict]

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def step(self) -> object: ...


def records_on(inputs: dict[str, torch.Tensor]) -> bool:
    """Whether a step over these tensors can be recorded: on CUDA devices only."""
    return all(tensor.is_cuda for tensor in inputs.values())


class RecordedStep:
    """Trains on each batch through input tensors of its own: the first `warmup_steps` batches as they come
    (compilation, cuBLAS and cuDNN set-up happen there, on a side stream, as torch asks before a recording), then
    it records `forward_and_loss` and its backward pass as one CUDA graph and from then on replays it after copying
    the batch into the same tensors. The optimiser steps outside the graph, on the gradients the replay wrote.

    Why: a step whose encoders replay CUDA graphs of their own (`compile_mode=reduce-overhead`) still keeps the host
    busy ~36 ms on an H100 (run 4's profile): a launch per graph, torch.compile's wrappers, the eager front end and
    heads, and per-parameter autograd bookkeeping for 545 tensors. A replay of the whole step is one launch.

    What a replay cannot see: anything `forward_and_loss` takes from elsewhere than `inputs` and the parameters
    (a number on the host, a Python random draw, a tensor made on the host and copied over) keeps its value from
    the recording. Every per-batch value must therefore come in `inputs`. The recorded gradients live in the graph's
    memory, and each replay overwrites them: nothing may accumulate into them, and any set to None since are given
    back before the next replay. Without CUDA the same function runs eagerly on every batch, through the same input
    tensors.
    """

    def __init__(self, forward_and_loss: Callable[[dict[str, torch.Tensor]], torch.Tensor], warmup_steps: int = 3):
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps={warmup_steps} must be >= 1: a recording needs a warmed-up step")
        self.forward_and_loss = forward_and_loss
        self.warmup_steps = warmup_steps
        self.steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self._inputs: dict[str, torch.Tensor] | None = None
        self._loss: torch.Tensor | None = None
        self._side_stream: torch.cuda.Stream | None = None
        self._recorded_gradients: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, its recorded gradient)

    def __call__(self, inputs: dict[str, torch.Tensor], optimizer: Optimizer) -> torch.Tensor:
        """One training step on `inputs` (tensors on the model's device): the loss, detached (once recorded, a
        tensor that the next replay overwrites)."""
        self._copy_in(inputs)
        self.steps += 1
        on_gpu = records_on(self._inputs)
        if not self.recorded and on_gpu and self.steps > self.warmup_steps:
            self._record(optimizer)
        if self.recorded:
            self._restore_gradients()
            self.graph.replay()
            optimizer.step()
            return self._loss
        if on_gpu:
            self._side_stream = self._side_stream or torch.cuda.Stream()
            self._side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._side_stream) if on_gpu else nullcontext():
            optimizer.zero_grad(set_to_none=True)
            loss = self.forward_and_loss(self._inputs)
            loss.backward()
            optimizer.step()
        if on_gpu:
            torch.cuda.current_stream().wait_stream(self._side_stream)
        return loss.detach()

    @property
    def recorded(self) -> bool:
        """Whether steps now replay the recording (and write the gradients it made)."""
        return self.graph is not None

    def _copy_in(self, inputs: dict[str, torch.Tensor]) -> None:
        if self._inputs is None:
            self._inputs = {key: tensor.clone() for key, tensor in inputs.items()}
            return
        if inputs.keys() != self._inputs.keys():
            raise ValueError(f"cuda_graph_step: batch inputs {sorted(inputs)}, the recorded step takes "
                             f"{sorted(self._inputs)}")
        for key, tensor in inputs.items():
            own = self._inputs[key]
            if own.shape != tensor.shape or own.dtype != tensor.dtype:
                raise ValueError(f"cuda_graph_step: batch input {key!r} is {tuple(tensor.shape)} {tensor.dtype}, "
                                 f"the recorded step takes {tuple(own.shape)} {own.dtype}; every training batch "
                                 f"must have the same shapes (full batches, fixed padding)")
        for key, tensor in inputs.items():
            self._inputs[key].copy_(tensor, non_blocking=True)

    def _record(self, optimizer: Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)  # the backward pass then writes gradients into the graph's memory
        graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's pin-memory thread and checkpoint writers may use CUDA while this records
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                loss = self.forward_and_loss(self._inputs)
                loss.backward()
        except RuntimeError as error:  # CUDA's own message names a call, not the setting that made it
            raise RuntimeError(f"cuda_graph_step: recording training step {self.steps} as one CUDA graph failed: "
                               f"{error}\nTrain with cuda_graph_step=False (with fast_gpu each encoder then "
                               f"replays CUDA graphs of its own)") from error
        self.graph, self._loss = graph, loss.detach()
        self._recorded_gradients = [(parameter, parameter.grad) for group in optimizer.param_groups
                                    for parameter in group["params"] if parameter.grad is not None]

    def _restore_gradients(self) -> None:
        """A replay writes into the gradient tensors of the recording, and the optimiser must step on those: any
        that were set to None or replaced since (Lightning sets every gradient to None before each validation) are
        given back. Releasing them freed nothing: they live in the graph's own memory."""
        for parameter, gradient in self._recorded_gradients:
            if parameter.grad is not gradient:
                parameter.grad = gradient
