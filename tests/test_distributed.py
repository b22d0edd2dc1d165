"""Training and evaluation over ranks equal one process on the whole batch / split.

The sharding maths is checked without processes; then two real `gloo` processes compute their loss shares with
gathered features, average gradients as DDP does, and must match one process on the doubled batch; and their
evaluation collections, gathered, must hold every clip and caption of the split exactly once.
"""
from __future__ import annotations

import ast
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data_loaders.demo_data import generate_demo_dataset
from models.losses import multi_positive_contrastive_loss, sharded_contrastive_loss
from models.pooling import MeanPooling, OwnCaptionAttentionPooling, TextAwareAttentionPooling
from models.retrieval_model import RetrievalModel
from tests.conftest import RESULT_KEYS

REPO = Path(__file__).resolve().parents[1]
# One clip (3) appears on both ranks, another (5) twice across them: positives cross the shard boundary.
CLIP_IDS = torch.tensor([3, 5, 3, 8, 5, 9, 3, 1])


@pytest.mark.parametrize("weighting", ["pair", "row"])
@pytest.mark.parametrize("shards", [1, 2, 4])
def test_shard_losses_sum_to_the_loss_of_the_whole_batch(weighting, shards):
    scores = torch.randn(8, 8, generator=torch.Generator().manual_seed(shards), requires_grad=True)
    whole = multi_positive_contrastive_loss(scores, CLIP_IDS, weighting)
    (expected,) = torch.autograd.grad(whole, scores)
    size = len(CLIP_IDS) // shards
    parts = [sharded_contrastive_loss(scores[own], scores[:, own], CLIP_IDS, own, weighting)
             for own in (slice(k * size, (k + 1) * size) for k in range(shards))]
    (gradient,) = torch.autograd.grad(sum(parts), scores)
    assert float(sum(parts)) == pytest.approx(float(whole), abs=1e-6)
    torch.testing.assert_close(gradient, expected, atol=1e-6, rtol=1e-5)


class FeatureEncoder(torch.nn.Linear):
    """Stands in for an encoder: features in, features out (the real model's heads and pooling follow)."""
    output_size = 6

    def __init__(self):
        super().__init__(6, 6)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None, real_windows: int | None = None):
        return super().forward(features) if mask is None else (super().forward(features), mask)


def tiny_model(pooling: str) -> RetrievalModel:
    torch.manual_seed(0)
    tap = {"dim": 8, "p_dropout_weights": 0, "p_dropout_proj": 0}
    pool = {"mean": lambda: MeanPooling(), "TAP": lambda: TextAwareAttentionPooling(8, **tap),
            "TAP_own_caption": lambda: OwnCaptionAttentionPooling(8, **tap)}[pooling]()
    return RetrievalModel(FeatureEncoder(), FeatureEncoder(), pool, 8, text_projection="linear", initial_tau=0.1)


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    text, windows = torch.randn(8, 6, generator=generator), torch.randn(8, 4, 6, generator=generator)
    mask = torch.tensor([[True, True, True, False]] * 4 + [[True, True, True, True], [True, False, False, False],
                                                            [True, True, False, False], [True, True, True, True]])
    return text, windows, mask


def single_process_gradients(pooling: str, weighting: str) -> tuple[float, dict[str, torch.Tensor]]:
    model = tiny_model(pooling)
    text, windows, mask = batch()
    loss = multi_positive_contrastive_loss(model.score(model.encode_text(text), *model.encode_audio(windows, mask)),
                                           CLIP_IDS, weighting)
    loss.backward()
    return float(loss), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def rank_step(rank: int, world: int, port: int, pooling: str, weighting: str, results) -> None:
    from models.distributed_loss import global_contrastive_loss

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = tiny_model(pooling)
        text, windows, mask = batch()
        own = slice(rank * 4, (rank + 1) * 4)
        # Rank 0's clips hold 3 windows at most: it sends 3, the gathers pad to the longest (4) with masked zeros.
        windows, mask = (windows[own, :3], mask[own, :3]) if rank == 0 and pooling != "TAP_own_caption" else (
            windows[own], mask[own])
        loss = global_contrastive_loss(model, model.encode_text(text[own]), *model.encode_audio(windows, mask),
                                       CLIP_IDS[own], weighting)
        loss.backward()
        logged = loss.detach().clone()
        dist.all_reduce(logged)
        gradients = {}
        for name, parameter in model.named_parameters():
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad)  # what DDP does: the mean over ranks
                gradients[name] = parameter.grad / world
        results[rank] = (float(logged) / world, gradients)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("pooling, weighting", [("mean", "pair"), ("TAP", "pair"), ("TAP", "row"),
                                                ("TAP_own_caption", "pair")])
def test_two_gloo_ranks_equal_one_process_on_the_doubled_batch(pooling, weighting):
    expected_loss, expected_gradients = single_process_gradients(pooling, weighting)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(rank_step, args=(2, free_port(), pooling, weighting, results), nprocs=2, join=True)
        results = dict(results)
    for rank in (0, 1):
        loss, gradients = results[rank]
        assert loss == pytest.approx(expected_loss, abs=1e-5)
        assert gradients.keys() == expected_gradients.keys()
        for name, gradient in gradients.items():
            torch.testing.assert_close(gradient, expected_gradients[name], atol=1e-5, rtol=1e-4, msg=name)


def rank_evaluation(rank: int, world: int, port: int, results) -> None:
    from utils.distributed import gather_evaluation

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # A split of 5 clips over 2 ranks: a DistributedSampler gives rank 1 clip 0 again to even out the shards.
        clips = torch.tensor([[0, 2, 4], [1, 3, 0]][rank])
        windows = torch.stack([torch.full((2, 3), float(clip)) for clip in clips])
        mask = torch.tensor([[True, clip % 2 == 0] for clip in clips.tolist()])
        text = torch.stack([torch.full((3,), 10.0 * clip + caption) for clip in clips for caption in range(2)])
        caption_row = torch.arange(len(clips)).repeat_interleave(2)
        results[rank] = gather_evaluation({"clip_index": clips, "windows": windows, "mask": mask, "text": text,
                                           "caption_row": caption_row})
    finally:
        dist.destroy_process_group()


def test_gathered_evaluation_holds_every_clip_and_caption_once():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(rank_evaluation, args=(2, free_port(), results), nprocs=2, join=True)
        results = dict(results)
    for rank in (0, 1):
        gathered = results[rank]
        assert gathered["clip_index"].tolist() == [0, 1, 2, 3, 4]
        assert gathered["windows"][:, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert gathered["mask"][:, 1].tolist() == [True, False, True, False, True]
        assert gathered["text"][:, 0].tolist() == [0.0, 1.0, 10.0, 11.0, 20.0, 21.0, 30.0, 31.0, 40.0, 41.0]
        assert gathered["caption_row"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    completed = subprocess.run([sys.executable, "-m", "experiments.ex_dcase24", *arguments], cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                               timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def result_of(completed: subprocess.CompletedProcess) -> dict:
    line = [line for line in completed.stderr.splitlines() if "Result: {" in line][-1]
    return ast.literal_eval(line.split("Result: ", 1)[1])


def two_process_demo(data_dir: Path, sacred: Path, compiled: bool) -> subprocess.CompletedProcess:
    """Two epochs of the demo on two `gloo` processes; `compiled` also writes checkpoints in the background, as
    `fast_gpu` does."""
    return run_cli("-F", str(sacred), "with", "demo", f"directories.data_dir={data_dir}", "data_loader.n_workers=0",
                   "accelerator=cpu", "devices=2", "strategy=ddp", "max_epochs=2", "data_loader.batch_size=4",
                   "log_every_n_steps=1", "seed=3", f"compile={compiled}", f"background_checkpoints={compiled}")


@pytest.fixture(scope="module")
def eager_two_process_run(tmp_path_factory) -> SimpleNamespace:
    """One eager two-process run, shared by the tests below (it is the slow part of each): its data folder, Sacred
    folder, output and the run folders that exist right after it."""
    data_dir = tmp_path_factory.mktemp("two_processes")
    generate_demo_dataset(data_dir / "clotho_demo", {"development": 6, "validation": 3, "evaluation": 5}, seed=1)
    sacred = data_dir / "sacred_eager"
    completed = two_process_demo(data_dir, sacred, compiled=False)
    return SimpleNamespace(data_dir=data_dir, sacred=sacred, completed=completed,
                           run_folders=list((data_dir / "runs").iterdir()))


def test_two_process_demo_is_one_run_and_tests_a_checkpoint_like_one_process(eager_two_process_run):
    run = eager_two_process_run
    (run_folder,) = run.run_folders  # one run folder, written by rank 0
    (record,) = [path for path in run.sacred.iterdir() if path.name != "_sources"]  # one Sacred run
    assert json.loads((record / "run.json").read_text())["status"] == "COMPLETED"
    assert set(result_of(run.completed)) == RESULT_KEYS
    checkpoint = run_folder / "checkpoints" / "last.ckpt"
    common = ["with", "demo", f"directories.data_dir={run.data_dir}", "data_loader.n_workers=0", "accelerator=cpu"]
    alone, together = (result_of(run_cli("cmd_test_on_clothov2", *common, f"load_model={checkpoint}",
                                         f"devices={devices}", "data_loader.batch_size_eval=2"))
                       for devices in (1, 2))
    assert alone == together  # 5 test clips: the sampler repeats one on the second rank, counted once


def test_compiled_encoders_under_ddp_train_as_eager_ones(eager_two_process_run):
    """DDP hands compiled modules to its graph-splitting optimiser (one graph per gradient bucket); the two processes
    must still train what eager ones train. On a GPU `fast_gpu` adds CUDA graphs, which a CPU cannot replay. The
    compiled run also writes its checkpoints in the background, as `fast_gpu` does (rank 0 writes; the test split
    scores the weights read back from the file)."""
    run = eager_two_process_run
    sacred = run.data_dir / "sacred_compiled"
    two_process_demo(run.data_dir, sacred, compiled=True)
    eager, compiled = (json.loads((folder / "1" / "metrics.json").read_text()) for folder in (run.sacred, sacred))
    first_epoch, second_epoch = eager["train/loss"]["values"]  # one per epoch
    assert abs(first_epoch - second_epoch) > 1e-3  # training moved the weights, so later losses test the updates too
    assert compiled["train/loss"]["values"] == pytest.approx(eager["train/loss"]["values"], rel=1e-4)
    for key in ("val/mAP@10", "test/mAP@10", "test/R@1"):
        assert compiled[key]["values"] == pytest.approx(eager[key]["values"], abs=1e-6)
