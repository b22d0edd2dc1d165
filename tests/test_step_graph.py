"""`cuda_graph_step`: a training step recorded once and replayed. The recording itself needs CUDA; these tests check
on the CPU what decides whether a replay trains right: every per-batch value reaches the step through the tensors
it owns, Lightning's loop, optimiser and schedule run as in automatic optimisation, and (through `CpuGraph`, a
stand-in for the recorded graph) the optimiser steps after each replay on the gradients the recording made."""
import csv
import io
from collections.abc import Callable
from functools import partial

import pytest
import torch

import experiments.retrieval_module
from experiments.retrieval_module import recorded_step_inputs, recorded_step_loss
from tests.graph_stand_in import CpuGraph
from tests.test_experiment import run_demo
from tests.test_speed_options import HostTensors, demo_model
from utils.devices import SideStreamCopy
from utils.step_graph import RecordedStep

PUBLISHED_PATCHOUT = {"s_patchout_t": 15, "s_patchout_f": 2}  # the demo's is off
FIXED_SHAPES = {"audio_features__embed_all_windows": True, "audio_features__augment_on_device": True,
                "sentence_features__padding": "max_length"}


def logged_steps(data_dir) -> dict[str, list[float]]:
    (run_folder,) = (data_dir / "runs").iterdir()
    rows = list(csv.DictReader(io.StringIO(next(run_folder.glob("logs/*/metrics.csv")).read_text())))
    columns = ("train/loss", "lr-AdamW/audio_encoder", "val/mAP@10")
    return {column: [float(row[column]) for row in rows if row.get(column)] for column in columns}


@pytest.mark.parametrize("precision, adamw", [("32", {}), ("bf16-mixed", {"fused": True})],
                         ids=["demo", "fast_gpu_precision_and_adamw"])
def test_a_recorded_step_trains_as_lightnings_own_loop(data_dir, tmp_path, monkeypatch, request, precision, adamw):
    """Two demo epochs, TAP with the published patchout, the same seed: the step's losses, the learning rate of every
    step and the validation metrics of Lightning's automatic optimisation, stepped by the module instead: as a CPU
    runs it (each step through the step's tensors), and with the step recorded and replayed through `CpuGraph`
    (Lightning's optimiser wrapper then steps on the recorded gradients, which Lightning's release of gradients before
    each validation used to replace: on a GPU the run stopped after it). Also under what fast_gpu trains
    with on a GPU, Lightning's bf16 autocast and fused AdamW (which the CPU has too). The replayed run also takes every
    batch through `overlap_batch_copy`'s copy (on a CPU a plain move)."""
    monkeypatch.setattr(experiments.retrieval_module, "adamw_implementation", lambda on_gpu, clips_gradients: adamw)
    settings = dict(FIXED_SHAPES, max_epochs=2, data_loader__batch_size=4, log_every_n_steps=1,
                    audio_features__aggregate="TAP", precision=precision,
                    **{f"audio_features__model_config__{key}": value for key, value in PUBLISHED_PATCHOUT.items()})

    def logged_run(**updates) -> dict[str, list[float]]:
        run_demo(data_dir, **settings, **updates)
        logged = logged_steps(data_dir)
        for run in (data_dir / "runs").iterdir():
            run.rename(tmp_path / run.name)
        return logged

    automatic = logged_run()
    assert len(automatic["train/loss"]) >= 6 and len(automatic["val/mAP@10"]) == 2
    assert len(set(automatic["train/loss"])) == len(automatic["train/loss"])  # each step saw its own batch
    assert logged_run(cuda_graph_step=True) == automatic  # to the last digit logged: the same computation, in order
    request.getfixturevalue("cpu_graphs")  # from here on steps record and replay
    copied, copy_aside = [], SideStreamCopy.__call__
    monkeypatch.setattr(SideStreamCopy, "__call__", lambda self, batch, device: copied.append(sorted(batch))
                        or copy_aside(self, batch, device))
    assert logged_run(cuda_graph_step=True, overlap_batch_copy=True) == automatic  # every batch through the copy
    assert CpuGraph.made == 1 and CpuGraph.step.steps == len(automatic["train/loss"])
    assert sum("caption" in keys for keys in copied) == CpuGraph.step.steps
    assert sum("captions" in keys for keys in copied) >= 2  # validation's batches too


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        self.bias = torch.nn.Parameter(torch.tensor(0.5))

    def loss(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return ((inputs["x"] @ self.weight + self.bias - inputs["y"]) ** 2).mean()


def trains_as_direct_steps(model: Linear, step: Callable[[dict, torch.optim.Optimizer], torch.Tensor],
                           steps: int) -> None:
    """`step` trains `model` on `steps` random batches as SGD stepping directly on each batch trains a copy."""
    reference = Linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    for index in range(steps):
        batch = {"x": torch.randn(5, 2, generator=generator), "y": torch.randn(5, generator=generator)}
        loss = step(batch, optimizer)
        reference_optimizer.zero_grad()
        expected = reference.loss(batch)
        expected.backward()
        reference_optimizer.step()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6), index
    assert torch.allclose(model.weight, reference.weight) and torch.allclose(model.bias, reference.bias)


def test_a_recorded_step_replays_each_batch_into_the_recorded_gradients(cpu_graphs):
    """Two warm-up steps, one recording, then replays: every step trains as a direct step on its batch would, one
    graph is recorded, and the gradients the optimiser reads stay the tensors the recording made."""
    model = Linear()
    step = RecordedStep(model.loss, warmup_steps=2)
    trains_as_direct_steps(model, step, steps=6)
    assert CpuGraph.made == 1
    assert len(step._recorded_gradients) == 2
    assert all(parameter.grad is gradient for parameter, gradient in step._recorded_gradients)


def test_gradients_set_to_none_after_the_recording_are_given_back_to_the_replays(cpu_graphs):
    """Lightning sets every gradient to None before each validation; the replays after it write into the recorded
    gradient tensors, so the optimiser must find those again (it stepped on none, or the run stopped, before)."""
    model = Linear()
    step = RecordedStep(model.loss, warmup_steps=1)

    def step_after_release(inputs: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        return step(inputs, optimizer)

    trains_as_direct_steps(model, step_after_release, steps=5)  # warm-up, recording, then each replay released
    assert CpuGraph.made == 1
    assert all(parameter.grad is gradient for parameter, gradient in step._recorded_gradients)


def test_each_step_trains_on_its_own_batch_through_the_step_s_tensors():
    """Without CUDA every call runs the function again, through the tensors copied in: a function that kept the
    first batch (as a replay keeps whatever it did not read from its inputs) would train on it every time."""
    model = Linear()
    trains_as_direct_steps(model, RecordedStep(model.loss, warmup_steps=1), steps=4)


def test_a_batch_of_another_shape_or_other_inputs_is_named():
    model = Linear()
    step = RecordedStep(model.loss)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step({"x": torch.zeros(5, 2), "y": torch.zeros(5)}, optimizer)
    with pytest.raises(ValueError, match=r"batch input 'x' is \(3, 2\) torch.float32, the recorded step takes "
                                         r"\(5, 2\) torch.float32"):
        step({"x": torch.zeros(3, 2), "y": torch.zeros(3)}, optimizer)
    with pytest.raises(ValueError, match=r"batch inputs \['x'\], the recorded step takes \['x', 'y'\]"):
        step({"x": torch.zeros(5, 2)}, optimizer)
    with pytest.raises(ValueError, match="warmup_steps=0 must be >= 1"):
        RecordedStep(model.loss, warmup_steps=0)


def test_a_recording_that_fails_names_the_setting_to_turn_off(cpu_graphs):
    """A step that ran eagerly can still fail to record (a CUDA call that a recording forbids, or memory for the
    graph's own pool): the error keeps CUDA's message and names the key that trains without recording."""
    model = Linear()
    calls = []

    def loss(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        calls.append(len(calls))
        if len(calls) == 2:  # the recording, after one warm-up step
            raise RuntimeError("operation not permitted when stream is capturing")
        return model.loss(inputs)

    step = RecordedStep(loss, warmup_steps=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = {"x": torch.ones(5, 2), "y": torch.zeros(5)}
    step(batch, optimizer)
    with pytest.raises(RuntimeError, match=r"recording training step 2 as one CUDA graph failed: operation not "
                                           r"permitted when stream is capturing\nTrain with cuda_graph_step=False"):
        step(batch, optimizer)


def test_compiled_encoders_in_a_recorded_step_compile_in_its_first_step_only(data_dir):
    """On a GPU the step after the warm-up is recorded: a compilation then (a guard that failed on new captions or
    clip lengths) would run inside the recording. `fast_gpu cuda_graph_step=True compile_mode=default` compiles both
    encoders in the first step; later batches, tokenised outside the step and padded alike, compile nothing."""
    torch._dynamo.reset()
    graphs = []
    model = demo_model(data_dir, audio_features={"embed_all_windows": True, "augment_on_device": True,
                                                 "model_config": PUBLISHED_PATCHOUT},
                       sentence_features={"padding": "max_length"}).train()
    model.compile_encoders(backend=lambda graph, example_inputs: graphs.append(graph) or graph.forward)
    step = RecordedStep(partial(recorded_step_loss, model))
    optimizer = torch.optim.AdamW(model.parameters())
    counts = []
    for captions, seconds in [(["a dog", "rain falls on a roof"], 30), (["a bell rings twice", "wind"], 7),
                              (["birds chirp in the trees while a car passes", "water"], 12), (["a", "b c"], 2),
                              (["thunder rumbles far away", "a door creaks open and slams shut"], 21)]:
        batch = {"audio": torch.randn(2, 30 * 32000) * 0.1, "audio_length": torch.tensor([30, seconds]) * 32000,
                 "clip_index": torch.arange(2), "caption": captions}
        step(recorded_step_inputs(model, batch, torch.device("cpu")), optimizer)
        counts.append(len(graphs))
    assert step.warmup_steps < len(counts)
    assert counts[0] >= 2 and counts == [counts[0]] * len(counts)  # text and audio, in the first step, never again
    torch._dynamo.reset()


@pytest.mark.parametrize("aggregate", ["mean", "TAP"])
def test_the_recorded_function_makes_nothing_on_the_host_and_reads_nothing_back(data_dir, aggregate):
    """What a recording keeps as it was: a tensor made on the host inside the step (copied over once, then frozen in
    the graph) or a value read back (which stops a recording). On the `meta` device a read-back raises and a host
    tensor shows up; the step's function, forward and backward, makes none (the captions are tokenised before)."""
    model = demo_model(data_dir, audio_features={"embed_all_windows": True, "augment_on_device": True,
                                                 "aggregate": aggregate, "model_config": PUBLISHED_PATCHOUT},
                       sentence_features={"padding": "max_length"}).train()
    assert model.audio_encoder.network.s_patchout_t == 15 and model.audio_encoder.network.s_patchout_f == 2
    batch = {"audio": torch.zeros(3, 30 * 32000), "audio_length": torch.tensor([30, 12, 4]) * 32000,
             "clip_index": torch.tensor([0, 1, 1]), "caption": ["a dog barks", "rain on a tin roof", "a bell"]}
    inputs = {key: value.to("meta") for key, value in recorded_step_inputs(model, batch, torch.device("cpu")).items()}
    model.to("meta")
    with HostTensors() as host:
        recorded_step_loss(model, inputs).backward()
    assert host.operations == []
