"""Run history through a real MongoDB wire-protocol server (mongod, else nx-27017), W&B offline, and what
the Sacred run records."""
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import gridfs
import lightning as L
import pymongo
import pytest
import torch

from experiments.checkpointing import CHECKPOINT_SECONDS, FileCheckpointIO, LastEpochCheckpoint
from experiments.tracking import TRAIN_LOSS, SacredMetrics
from tests.conftest import RESULT_KEYS

REPO = Path(__file__).resolve().parents[1]
DEMO = ["with", "demo", "data_loader.n_workers=0", "data_loader.batch_size=8", "log_every_n_steps=1"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(folder: Path, port: int) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mongod"):
        command = ["mongod", "--dbpath", str(folder), "--port", str(port), "--bind_ip", "127.0.0.1"]
    else:
        command = [str(Path(sys.executable).with_name("nx-27017")), "--db", str(folder / "runs.db"), "-p", str(port),
                   "--pid-file", str(folder / "server.pid")]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = pymongo.MongoClient(f"mongodb://127.0.0.1:{port}", serverSelectionTimeoutMS=500)
    for _ in range(60):
        try:
            client.admin.command("ping")
            return server
        except pymongo.errors.PyMongoError:
            time.sleep(0.25)
    server.kill()
    raise RuntimeError(f"{command[0]} did not start on port {port}")


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if the server is still there after 10 s (nx-27017 once ignored SIGTERM in a full run:
    its shutdown is not what these tests check, and a server left behind would outlive the suite)."""
    if server.poll() is not None:
        return
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@pytest.fixture
def mongo(tmp_path):
    port = free_port()
    server = start_server(tmp_path / "mongo", port)
    yield server, port
    stop_server(server)


def experiment(data_dir: Path, *arguments: str, env: dict | None = None, wait: bool = True):
    command = [sys.executable, "-m", "experiments.ex_dcase24", *arguments, f"directories.data_dir={data_dir}"]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "DATA_DIR": str(data_dir), **(env or {})}
    if not wait:
        return subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)


def test_run_history_in_mongodb_from_the_environment(data_dir, mongo):
    _, port = mongo
    completed = experiment(data_dir, *DEMO, "max_epochs=2", "seed=77", env={"DCASE24_MONGO": f"127.0.0.1:{port}:history"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    database = pymongo.MongoClient(f"mongodb://127.0.0.1:{port}")["history"]
    (run,) = list(database.runs.find())
    assert run["status"] == "COMPLETED"
    assert set(run["result"]) == RESULT_KEYS
    assert run["config"]["seed"] == 77 and run["config"]["max_epochs"] == 2
    assert "Result:" in run["captured_out"] or "test split" in run["captured_out"]
    assert run["host"]["hostname"]
    series = {metric["name"]: metric["values"] for metric in database.metrics.find({"run_id": run["_id"]})}
    for name in ("train/loss", "val/mAP@10", "val/R@1", "lr-AdamW/audio_encoder"):
        assert len(series[name]) == 2, name
    assert len(series["test/mAP@10"]) == 1
    assert Path(run["info"]["best_checkpoint"]).is_file()
    artifacts = {artifact["name"]: artifact["file_id"] for artifact in run["artifacts"]}
    assert set(artifacts) == {"lr_schedule.png", "training_curves.png"}
    for name, file_id in artifacts.items():
        assert gridfs.GridFS(database).get(file_id).read() == (Path(run["info"]["run_folder"]) / name).read_bytes()


def test_server_down_at_start_fails_at_once_or_falls_back(data_dir):
    port = free_port()
    started = time.time()
    completed = experiment(data_dir, "-m", f"127.0.0.1:{port}:history", *DEMO, "max_epochs=1")
    assert completed.returncode != 0 and time.time() - started < 60
    assert f"error: MongoDB at 127.0.0.1:{port} does not answer" in completed.stderr
    assert not (data_dir / "runs").exists()
    fallback = data_dir / "file_runs"
    completed = experiment(data_dir, "-m", f"127.0.0.1:{port}:history", *DEMO, "max_epochs=1",
                           env={"DCASE24_MONGO_FALLBACK": str(fallback)})
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert f"recording this run with a file observer in {fallback}" in completed.stderr
    assert json.loads((fallback / "1" / "run.json").read_text())["status"] == "COMPLETED"


def test_server_lost_mid_run_keeps_the_run(data_dir, mongo):
    server, port = mongo
    process = experiment(data_dir, "-m", f"127.0.0.1:{port}:history", *DEMO, "max_epochs=6", wait=False)
    runs = pymongo.MongoClient(f"mongodb://127.0.0.1:{port}", serverSelectionTimeoutMS=2000)["history"].runs
    deadline = time.time() + 120
    while time.time() < deadline and runs.count_documents({"status": "RUNNING"}) == 0:
        time.sleep(0.2)
    server.kill()  # the server goes away while the run trains
    server.wait()
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    assert "saving to MongoDB failed! Stored experiment entry in" in stderr
    (run_folder,) = (data_dir / "runs").glob("2*")
    (pickled,) = (run_folder / "mongo_failures").glob("*.pickle")
    record = pickle.loads(pickled.read_bytes())
    assert record["status"] == "COMPLETED" and set(record["result"]) == RESULT_KEYS
    copy = json.loads(next((data_dir / "sacred_runs").glob("*/run.json")).read_text())
    assert copy["status"] == "COMPLETED"
    metrics = json.loads(next((data_dir / "sacred_runs").glob("*/metrics.json")).read_text())
    assert len(metrics["val/mAP@10"]["values"]) == 6


def test_wandb_offline_logs_metrics_and_config(data_dir):
    completed = experiment(data_dir, *DEMO, "max_epochs=1", "use_wandb=True", "run_name=offline-test",
                           env={"WANDB_MODE": "offline"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    (record,) = (data_dir / "runs").glob("*/wandb/offline-run-*/run-*.wandb")
    content = record.read_bytes()
    for key in (b"train/loss", b"val/mAP@10", b"test/mAP@10", b"lr-AdamW/audio_encoder", b"shared_representation_size",
                b"offline-test"):
        assert key in content, key
    assert "wandb sync" in completed.stderr + completed.stdout


def test_fresh_databases_and_concurrent_runs_share_the_file_copy_without_collisions(data_dir, mongo, tmp_path):
    # MongoDB numbers runs from 1 in every fresh database; the file-observer copies all live in one sacred_runs/.
    _, port = mongo
    fresh_port = free_port()
    fresh = start_server(tmp_path / "fresh_mongo", fresh_port)
    try:  # three runs at once: two in the fresh database, one in the other, which also numbers its first run 1
        running = [experiment(data_dir, "-m", f"127.0.0.1:{server_port}:history", *DEMO, "max_epochs=1", wait=False)
                   for server_port in (port, fresh_port, fresh_port)]
        for process in running:
            _, stderr = process.communicate(timeout=600)
            assert process.returncode == 0, stderr[-3000:]
        ids = {}
        for server_port in (port, fresh_port):  # clients closed, so the server's shutdown waits for none of them
            with pymongo.MongoClient(f"mongodb://127.0.0.1:{server_port}") as client:
                ids[server_port] = sorted(run["_id"] for run in client["history"].runs.find())
    finally:
        stop_server(fresh)
    assert ids == {port: [1], fresh_port: [1, 2]}  # id 1 twice: the case that used to crash at start
    copies = sorted((data_dir / "sacred_runs").glob("*/run.json"))
    assert len(copies) == 3 and all(json.loads(copy.read_text())["status"] == "COMPLETED" for copy in copies)


class _ConstantLoss(L.LightningModule):
    """Logs and returns a training loss of 3.0 in every batch."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_index):
        loss = (self.weight * batch).sum() + 3.0
        self.log(TRAIN_LOSS, loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD([{"params": self.parameters(), "name": "all"}], lr=0.1)


def test_sacred_train_loss_is_the_logged_loss_when_batches_accumulate(tmp_path):
    # Lightning divides a step's output loss by the accumulated batches: averaging those gave 1.5 here.
    scalars = []
    run = SimpleNamespace(log_scalar=lambda name, value, step: scalars.append((name, value, step)))
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, accumulate_grad_batches=2, callbacks=[SacredMetrics(run)],
                        default_root_dir=tmp_path)
    trainer.fit(_ConstantLoss(), torch.utils.data.DataLoader(torch.zeros(8, 1), batch_size=2))
    assert [scalar for scalar in scalars if scalar[0] == TRAIN_LOSS] == [(TRAIN_LOSS, 3.0, 0), (TRAIN_LOSS, 3.0, 1)]
    assert ("lr-AdamW/all", 0.1, 1) in scalars


def test_sacred_gets_each_epochs_checkpoint_time_under_that_epoch(tmp_path, slow_saves):
    # The checkpoints are written after SacredMetrics' epoch end: read there, an epoch got the one before's time.
    slow_saves([0.6, 0.2, 0.4])  # epochs 0, 1, 2
    scalars = []
    run = SimpleNamespace(log_scalar=lambda name, value, step: scalars.append((name, value, step)))
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        callbacks=[SacredMetrics(run), LastEpochCheckpoint(tmp_path)], plugins=[FileCheckpointIO()],
                        default_root_dir=tmp_path)
    trainer.fit(_ConstantLoss(), torch.utils.data.DataLoader(torch.zeros(4, 1), batch_size=2))
    logged = [(step, value) for name, value, step in scalars if name == CHECKPOINT_SECONDS]
    assert [step for step, _ in logged] == [0, 1, 2]
    assert all(slowdown <= value < slowdown + 0.15 for (_, value), slowdown in zip(logged, [0.6, 0.2, 0.4]))


def test_sacred_gets_the_epochs_speed_and_gpu_memory_figures():
    scalars = []
    run = SimpleNamespace(log_scalar=lambda name, value, step: scalars.append((name, value, step)))
    trainer = SimpleNamespace(current_epoch=4, optimizers=[SimpleNamespace(param_groups=[{"name": "all", "lr": 0.1}])],
                              callback_metrics={"time/validation_seconds": torch.tensor(3.4), "val/mAP@10": 0.2,
                                                "memory/peak_gpu_reserved_gib": torch.tensor(18.5),
                                                CHECKPOINT_SECONDS: torch.tensor(6.0)})  # the epoch before's, yet
    SacredMetrics(run).on_train_epoch_end(trainer, None)
    assert sorted(scalars) == sorted([("lr-AdamW/all", 0.1, 4), ("time/validation_seconds", pytest.approx(3.4), 4),
                                      ("memory/peak_gpu_reserved_gib", 18.5, 4)])
