"""`cuda_graph_step`: a training step recorded once and replayed. The recording itself needs CUDA; these tests check
on the CPU what decides whether a replay trains right: every per-batch value reaches the step through the tensors
it owns, and Lightning's loop, optimiser and schedule run as in automatic optimisation."""
import csv
import io

import pytest
import torch

from tests.test_experiment import run_demo
from utils.step_graph import RecordedStep

FIXED_SHAPES = {"audio_features__embed_all_windows": True, "audio_features__augment_on_device": True,
                "sentence_features__padding": "max_length"}


def logged_steps(data_dir) -> dict[str, list[float]]:
    (run_folder,) = (data_dir / "runs").iterdir()
    rows = list(csv.DictReader(io.StringIO(next(run_folder.glob("logs/*/metrics.csv")).read_text())))
    columns = ("train/loss", "lr-AdamW/audio_encoder", "val/mAP@10")
    return {column: [float(row[column]) for row in rows if row.get(column)] for column in columns}


def test_a_recorded_step_trains_as_lightnings_own_loop(data_dir, tmp_path):
    """Two demo epochs, TAP, the same seed: the step's losses, the learning rate of every step and the validation
    metrics of Lightning's automatic optimisation, stepped by the module instead."""
    settings = dict(FIXED_SHAPES, max_epochs=2, data_loader__batch_size=4, log_every_n_steps=1,
                    audio_features__aggregate="TAP")
    run_demo(data_dir, **settings)
    automatic = logged_steps(data_dir)
    for run in (data_dir / "runs").iterdir():
        run.rename(tmp_path / run.name)
    run_demo(data_dir, cuda_graph_step=True, **settings)
    recorded = logged_steps(data_dir)
    assert len(automatic["train/loss"]) >= 6 and len(automatic["val/mAP@10"]) == 2
    assert recorded == automatic  # to the last digit logged: the same computation in the same order
    assert len(set(automatic["train/loss"])) == len(automatic["train/loss"])  # each step saw its own batch


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor([1.0, -2.0]))

    def loss(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return ((inputs["x"] @ self.weight - inputs["y"]) ** 2).mean()


def test_each_step_trains_on_its_own_batch_through_the_step_s_tensors():
    """Without CUDA every call runs the function again, through the tensors copied in: a function that kept the
    first batch (as a replay keeps whatever it did not read from its inputs) would train on it every time."""
    model, reference = Linear(), Linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    step = RecordedStep(model.loss, warmup_steps=1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        batch = {"x": torch.randn(5, 2, generator=generator), "y": torch.randn(5, generator=generator)}
        loss = step(batch, optimizer)
        reference_optimizer.zero_grad()
        expected = reference.loss(batch)
        expected.backward()
        reference_optimizer.step()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(model.weight, reference.weight)


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
