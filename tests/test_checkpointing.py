"""Checkpoints written in the background: the state of each save, shared copies, waits only where needed, and
failures raised with their file."""
import threading
import time

import pytest
import torch

from experiments.checkpointing import FRESH_COPY_BYTES, BackgroundCheckpointIO


class GatedWrites:
    """torch.save that waits for `open()` (called from a timer in the tests) before it writes."""

    def __init__(self, monkeypatch):
        self.gate, self.real_save = threading.Event(), torch.save
        monkeypatch.setattr(torch, "save", self.save)

    def save(self, state, target, *args, **kwargs):
        assert self.gate.wait(timeout=30), "the test never opened the gate"
        self.real_save(state, target, *args, **kwargs)

    def open_in(self, seconds: float) -> None:
        threading.Timer(seconds, self.gate.set).start()


def checkpoint_of(weight: torch.Tensor, moment: torch.Tensor, step: int, best: float) -> dict:
    """Lightning's nesting: the same weight and moment tensors in every save, a new score tensor each time."""
    return {"global_step": step, "state_dict": {"layer.weight": weight},
            "optimizer_states": [{"state": {0: {"exp_avg": moment}}, "param_groups": [{"lr": 0.1}]}],
            "callbacks": {"best": {"best_model_score": torch.tensor(best)}}}


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def test_a_background_write_holds_the_state_of_its_save_while_training_changes_it(tmp_path, monkeypatch):
    writes, weight, moment = GatedWrites(monkeypatch), torch.arange(4.0), torch.full((4,), 2.0)
    checkpoint_io = BackgroundCheckpointIO()
    checkpoint_io.save_checkpoint(checkpoint_of(weight, moment, step=10, best=0.5), tmp_path / "last.ckpt")
    assert not (tmp_path / "last.ckpt").exists()  # still to be written: the save did not wait for it
    weight.add_(100), moment.mul_(0)  # the next training steps, in place
    writes.open_in(0.3)
    assert timed(checkpoint_io.teardown) >= 0.2  # the end of training waits for the write
    written = torch.load(tmp_path / "last.ckpt")
    assert torch.equal(written["state_dict"]["layer.weight"], torch.arange(4.0))
    assert torch.equal(written["optimizer_states"][0]["state"][0]["exp_avg"], torch.full((4,), 2.0))
    assert written["optimizer_states"][0]["param_groups"] == [{"lr": 0.1}] and written["global_step"] == 10
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary left


def test_an_epochs_best_and_last_checkpoints_share_one_copy_and_the_next_epoch_waits_for_them(tmp_path, monkeypatch):
    large = FRESH_COPY_BYTES // 4 + 1  # float32 elements: a change of this tensor waits for the writes
    writes, weight, moment = GatedWrites(monkeypatch), torch.ones(large), torch.zeros(3)
    checkpoint_io = BackgroundCheckpointIO()
    checkpoint_io.save_checkpoint(checkpoint_of(weight, moment, step=5, best=0.7), tmp_path / "best.ckpt")
    # the same state again: only the new score is copied, with no wait for the write in progress (the gate is shut)
    checkpoint_io.save_checkpoint(checkpoint_of(weight, moment, step=5, best=0.8), tmp_path / "last.ckpt")
    moment.add_(1)  # a small change at the same step: new memory, no wait either
    checkpoint_io.save_checkpoint(checkpoint_of(weight, moment, step=5, best=0.8), tmp_path / "moment.ckpt")
    weight.mul_(3)  # the next epoch: its copy would overwrite the memory that the writes in progress read
    writes.open_in(0.3)
    assert timed(lambda: checkpoint_io.save_checkpoint(checkpoint_of(weight, moment, 6, 0.9),
                                                       tmp_path / "next.ckpt")) >= 0.2
    checkpoint_io.wait()
    files = {name: torch.load(tmp_path / f"{name}.ckpt") for name in ("best", "last", "moment", "next")}
    assert [file["callbacks"]["best"]["best_model_score"].item() for file in files.values()] == pytest.approx(
        [0.7, 0.8, 0.8, 0.9])
    assert [file["state_dict"]["layer.weight"][0].item() for file in files.values()] == [1.0, 1.0, 1.0, 3.0]
    assert [file["optimizer_states"][0]["state"][0]["exp_avg"][0].item() for file in files.values()] == [
        0.0, 0.0, 1.0, 1.0]


def test_a_failed_background_write_is_raised_with_its_file(tmp_path):
    checkpoint_io = BackgroundCheckpointIO()
    (tmp_path / "not_a_folder").write_text("a file where the checkpoints' folder should be")
    target = tmp_path / "not_a_folder" / "last.ckpt"
    checkpoint_io.save_checkpoint(checkpoint_of(torch.ones(2), torch.ones(2), step=1, best=0.1), target)
    with pytest.raises(RuntimeError, match=f"writing checkpoint {target} in the background failed"):
        checkpoint_io.wait()
    checkpoint_io.save_checkpoint(checkpoint_of(torch.ones(2), torch.ones(2), step=2, best=0.1),
                                  tmp_path / "last.ckpt")
    checkpoint_io.teardown()  # the failure was raised once; the later write succeeds
    assert torch.load(tmp_path / "last.ckpt")["global_step"] == 2


def test_removing_the_previous_best_waits_only_for_writes_to_that_file(tmp_path, monkeypatch):
    # Lightning removes the previous best checkpoint right after saving the new one.
    writes = GatedWrites(monkeypatch)
    previous = tmp_path / "best-epoch=00.ckpt"
    previous.write_bytes(b"an earlier epoch's checkpoint, written long ago")
    checkpoint_io = BackgroundCheckpointIO()
    checkpoint_io.save_checkpoint(checkpoint_of(torch.ones(2), torch.ones(2), step=9, best=0.9),
                                  tmp_path / "best-epoch=01.ckpt")
    checkpoint_io.remove_checkpoint(previous)  # the gate is shut: waiting for the new file's write would hang here
    assert not previous.exists()
    writes.open_in(0.3)
    assert timed(lambda: checkpoint_io.remove_checkpoint(tmp_path / "best-epoch=01.ckpt")) >= 0.2  # its own write
    assert list(tmp_path.iterdir()) == []
