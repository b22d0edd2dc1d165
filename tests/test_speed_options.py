"""The speed levers of the stage-1 model (benchmarks/RESULTS.md): each computes what the published code computes."""
import copy
import time

import lightning as L
import pytest
import torch

from experiments.ex_dcase24 import ex
from experiments.tracking import Throughput
from models.losses import multi_positive_contrastive_loss


def demo_model(data_dir, **updates):
    from experiments.ex_dcase24 import build_model

    @ex.command(unobserved=True)
    def built_model():
        return build_model()

    return ex.run("built_model", named_configs=["demo"], options={"--loglevel": "ERROR"},
                  config_updates={"directories": {"data_dir": str(data_dir)}, **updates}).result


def loss_and_gradients(model, audio, lengths, captions):
    windows, mask = model.encode_audio(audio, lengths)
    loss = multi_positive_contrastive_loss(model.score(model.encode_text(captions), windows, mask),
                                           torch.arange(len(captions)))
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_compiled_encoders_train_like_eager_ones_under_the_same_weight_names(data_dir):
    torch.manual_seed(0)
    eager = demo_model(data_dir).eval()  # eval: no dropout, so both runs draw nothing at random
    compiled = copy.deepcopy(eager)
    compiled.compile_encoders(backend="aot_eager")  # dynamo tracing and AOT autograd, without a C++ toolchain
    assert list(compiled.state_dict()) == list(eager.state_dict())
    audio, lengths = torch.randn(3, 10 * 32000) * 0.1, torch.tensor([10 * 32000, 6 * 32000, 2 * 32000])
    captions = ["a dog barks", "rain falls on a roof", "a bell rings twice"]
    eager_loss, eager_gradients = loss_and_gradients(eager, audio, lengths, captions)
    compiled_loss, compiled_gradients = loss_and_gradients(compiled, audio, lengths, captions)
    torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-5, rtol=1e-5)
    assert compiled_gradients.keys() == eager_gradients.keys()
    for name, gradient in eager_gradients.items():
        torch.testing.assert_close(compiled_gradients[name], gradient, atol=1e-5, rtol=1e-4, msg=name)


def test_compile_setting_reaches_the_model(data_dir, monkeypatch):
    from models.retrieval_model import RetrievalModel
    calls = []
    monkeypatch.setattr(RetrievalModel, "compile_encoders", lambda self: calls.append(self))
    assert demo_model(data_dir, compile=True) is calls[0]
    demo_model(data_dir)
    assert len(calls) == 1


def test_fast_gpu_adds_levers_to_the_published_defaults():
    published = ex.run("print_config", options={"--loglevel": "ERROR"}).config
    fast = ex.run("print_config", named_configs=["fast_gpu"], options={"--loglevel": "ERROR"}).config
    assert (published["precision"], published["audio_features"]["embed_all_windows"], published["compile"],
            published["audio_features"]["attention"], published["sentence_features"]["attention"]) == (
        "16-mixed", False, False, "sdpa", "sdpa")
    assert (fast["precision"], fast["audio_features"]["embed_all_windows"], fast["data_loader"]["batch_size_eval"]) == (
        "bf16-mixed", True, 64)
    changed = {key for key in published if published[key] != fast[key]}
    assert changed == {"precision", "audio_features", "data_loader"}  # nothing else of the published system moves


class _Counting(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch, batch_index):
        time.sleep(0.02)
        return (self.weight * batch["x"]).sum()

    def validation_step(self, batch, batch_index):
        time.sleep(0.3)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_throughput_counts_steady_training_samples_and_leaves_validation_out(tmp_path):
    batches = [{"x": torch.ones(4), "clip_index": torch.arange(4)} for _ in range(14)]
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, callbacks=[Throughput(warmup_batches=10)], default_root_dir=tmp_path)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(_Counting(), loader, torch.utils.data.DataLoader(batches[:3], batch_size=None))
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    assert 50 < metrics["time/train_samples_per_second"] <= 4 / 0.02  # 4 samples per step of at least 20 ms
    assert metrics["time/validation_seconds"] >= 0.9  # three validation steps of 0.3 s
    assert 0.28 <= metrics["time/train_epoch_seconds"] < 0.9  # 14 steps of 20 ms, validation left out
