"""The speed levers of the stage-1 model (benchmarks/RESULTS.md): each computes what the published code computes."""
import contextlib
import copy
from collections import Counter

import lightning as L
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from experiments.ex_dcase24 import ex
from experiments.retrieval_module import RetrievalModule
from experiments.tracking import LatestOnHost, Throughput
from models.losses import multi_positive_contrastive_loss
from tests.test_experiment import run_demo
from utils.devices import SideStreamCopy


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
    torch._dynamo.reset()
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


def test_compile_settings_reach_the_model(data_dir, monkeypatch):
    from models.retrieval_model import RetrievalModel
    calls, compile_encoders = [], RetrievalModel.compile_encoders
    monkeypatch.setattr(RetrievalModel, "compile_encoders", lambda self, mode: calls.append((self, mode)))
    assert calls == [] and demo_model(data_dir, compile=True, compile_mode="reduce-overhead") is calls[0][0]
    demo_model(data_dir)
    assert [mode for _, mode in calls] == ["reduce-overhead"]
    with pytest.raises(ValueError, match="compile_mode='fast' is not one of default, reduce-overhead, max-autotune"):
        compile_encoders(calls[0][0], mode="fast")


FIXED_SHAPES = {"audio_features": {"augment_on_device": True, "embed_all_windows": True},
                "sentence_features": {"padding": "max_length"}}


def training_step(model, audio, lengths, captions, real_windows=None):
    windows, mask = model.encode_audio(audio, lengths, real_windows)
    scores = model.score(model.encode_text(captions), windows, mask)
    multi_positive_contrastive_loss(scores, torch.arange(len(captions), device=scores.device)).backward()


class HostTensors(TorchDispatchMode):
    """Records every operation that leaves a tensor on the CPU while the model runs on the `meta` device."""

    def __init__(self):
        super().__init__()
        self.operations = []

    def __torch_dispatch__(self, function, types, args=(), kwargs=None):
        result = function(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tree_flatten(result)[0]):
            self.operations.append(str(function))
        return result


@pytest.mark.parametrize("aggregate", ["mean", "TAP"])
def test_a_training_step_does_no_host_work_but_tokenising_with_fixed_shapes_or_counted_windows(data_dir, aggregate):
    """On the `meta` device tensors have shapes but no values: reading one back (`.item()`, `.all()` in an `if`)
    raises, and anything made on the host shows up as a CPU tensor. On a GPU both would make the host wait."""
    fast = demo_model(data_dir, **{**FIXED_SHAPES, "audio_features": {**FIXED_SHAPES["audio_features"],
                                                                       "aggregate": aggregate}}).train().to("meta")
    audio, lengths = torch.zeros(3, 30 * 32000, device="meta"), torch.tensor([30, 12, 4], device="meta") * 32000
    captions = ["a dog barks", "rain falls on a tin roof while thunder rumbles", "a bell"]
    with HostTensors() as host:
        training_step(fast, audio, lengths, captions)
    assert host.operations == ["aten.lift_fresh.default"] * 2  # the tokenizer's ids and mask, copied over once
    varying = demo_model(data_dir, audio_features={"aggregate": aggregate, "augment_on_device": True}).train()
    real_windows = varying.audio_encoder.real_window_count(audio.shape[1], torch.tensor([30, 12, 4]) * 32000)
    with HostTensors() as host:  # real windows counted on the host: shapes vary, nothing is read back
        training_step(varying.to("meta"), audio, lengths, captions, real_windows)
    assert real_windows == 6 + 3 + 1 and host.operations == ["aten.lift_fresh.default"] * 2
    published = demo_model(data_dir, audio_features={"aggregate": aggregate}).train().to("meta")
    # It reads back how many windows are real, to select them.
    with pytest.raises(RuntimeError, match=r"item\(\) cannot be called on meta tensors|for torch.nonzero\(\)"):
        training_step(published, audio, lengths, captions)


def test_an_evaluation_step_does_no_host_work_but_tokenising(data_dir):
    from data_loaders.data_loader import pad_collate

    items = [{"audio": torch.zeros(12 * 32000), "captions": ["a dog barks", "a dog"], "clip_index": 3},
             {"audio": torch.zeros(30 * 32000), "captions": ["rain", "rain falls", "thunder"], "clip_index": 4}]
    batch = pad_collate(items, 30 * 32000)
    assert batch["caption_clip"].tolist() == [0, 0, 1, 1, 1]  # made by the loader, copied with the batch
    module = RetrievalModule(demo_model(data_dir, **FIXED_SHAPES).eval().to("meta"), optimisation=None)
    batch = module.on_before_batch_transfer(batch, 0)  # Lightning's hook, before the batch moves to the device
    on_meta = {key: value.to("meta") if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    with torch.no_grad(), HostTensors() as host:
        module.validation_step(on_meta, 0)
        module.validation_step(on_meta, 1)
    # each step's token ids and mask only (the caption rows used to be built on the host and copied over)
    assert host.operations == ["aten.lift_fresh.default"] * 4


def test_fixed_shapes_compile_each_encoder_once_while_captions_and_clips_vary(data_dir):
    def steps(**updates):
        torch._dynamo.reset()
        graphs = []
        model = demo_model(data_dir, **updates).train()
        model.compile_encoders(backend=lambda graph, example_inputs: graphs.append(graph) or graph.forward)
        counts = []
        for captions, seconds in [(["a dog", "rain falls on a roof"], 30), (["a bell rings twice", "wind"], 7),
                                  (["birds chirp in the trees while a car passes", "water"], 12)]:
            training_step(model, torch.randn(2, 30 * 32000) * 0.1, torch.tensor([30, seconds]) * 32000, captions)
            counts.append(len(graphs))
        return counts

    fixed = steps(**FIXED_SHAPES)
    assert fixed[0] >= 2 and fixed == [fixed[0]] * 3  # both encoders compiled in the first step, never again
    varying = steps()
    assert varying[-1] > varying[0]  # captions of other lengths and other numbers of real windows recompile
    torch._dynamo.reset()


@pytest.mark.parametrize("shapes", [FIXED_SHAPES, {}], ids=["fixed shapes", "real windows, captions to the longest"])
def test_compiled_evaluation_compiles_each_encoder_once_and_scores_as_eager(data_dir, shapes):
    """A split's last batch is smaller; compiled encoders see it padded to the first batch's shape (silent clips,
    empty captions), which changes nothing in what is kept. Only fixed shapes keep the compilations to one."""
    from data_loaders.data_loader import pad_collate

    torch._dynamo.reset()
    graphs = []
    eager = demo_model(data_dir, **shapes).eval()
    compiled = demo_model(data_dir, **shapes).eval()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_encoders(backend=lambda graph, example_inputs: graphs.append(graph) or graph.forward)
    modules = [RetrievalModule(model, optimisation=None) for model in (eager, compiled)]
    generator = torch.Generator().manual_seed(0)
    counts = []
    for first_clip, seconds in ((0, (30, 12, 20)), (3, (25, 30, 8)), (6, (17, 9))):  # 8 clips in batches of 3
        items = [{"audio": torch.randn(second * 32000, generator=generator) * 0.1, "clip_index": first_clip + row,
                  "captions": [f"a dog barks {first_clip + row}", "rain falls on a tin roof"]}
                 for row, second in enumerate(seconds)]
        for module in modules:
            with torch.no_grad():
                module.validation_step(module.on_before_batch_transfer(pad_collate(items, 30 * 32000), 0), 0)
        counts.append(len(graphs))
    if shapes:
        assert counts == [counts[0]] * 3 and counts[0] >= 2  # both encoders compiled by the first batch, never again
    for key in ("windows", "mask", "text", "caption_row"):
        outputs = [torch.cat([step[key] for step in module._evaluation]) for module in modules]
        assert outputs[1].shape == outputs[0].shape and torch.allclose(*outputs, atol=1e-5), key
    assert len(outputs[0]) == 16  # the last batch's 2 clips x 2 captions, not the padded 3 x 2
    torch._dynamo.reset()


def test_counted_real_windows_compile_the_audio_encoder_twice_however_their_number_varies(data_dir):
    """The premise of the `real_windows_graphs` lever (benchmarks/bench_stage1.py): only the real windows embedded,
    their number counted on the host. The first count compiles a graph of fixed shapes, the second a graph with the
    window count as a symbol, which every later count reuses (on a GPU, with one CUDA graph recorded per count)."""
    torch._dynamo.reset()
    graphs = []
    model = demo_model(data_dir, audio_features={"augment_on_device": True},
                       sentence_features={"padding": "max_length"}).train()
    model.compile_encoders(backend=lambda graph, example_inputs: graphs.append(graph) or graph.forward)
    counts = {}
    for seconds in [(30, 30, 30), (30, 7, 30), (12, 12, 4), (2, 2, 2), (20, 25, 3)]:
        lengths = torch.tensor(seconds) * 32000
        real_windows = model.audio_encoder.real_window_count(30 * 32000, lengths)
        training_step(model, torch.randn(3, 30 * 32000) * 0.1, lengths, ["a dog", "rain falls", "wind"], real_windows)
        counts[real_windows] = len(graphs)
    assert len(counts) == 5  # five different numbers of windows
    assert list(counts.values()) == [2, 3, 3, 3, 3]  # text and audio, then audio once more, never again
    torch._dynamo.reset()


def printed_config(*named: str) -> dict:
    """The config `print_config with <named...>` shows, with a data folder so that the schema can check it."""
    values = dict(ex.run("print_config", named_configs=list(named), options={"--loglevel": "ERROR"}).config)
    return {**values, "directories": {"data_dir": "/tmp"}}


def test_fast_gpu_adds_levers_to_the_published_defaults():
    published, fast = printed_config(), printed_config("fast_gpu")
    assert (published["precision"], published["audio_features"]["embed_all_windows"], published["compile"],
            published["audio_features"]["attention"], published["sentence_features"]["attention"]) == (
        "16-mixed", False, False, "sdpa", "sdpa")
    assert (fast["precision"], fast["data_loader"]["batch_size_eval"], fast["compile"], fast["compile_mode"]) == (
        "bf16-mixed", 64, True, "reduce-overhead")
    for scope, fixed in FIXED_SHAPES.items():  # the shapes under which each encoder compiles once (test below)
        assert {key: fast[scope][key] for key in fixed} == fixed
    changed = {key for key in published if published[key] != fast[key]}
    # nothing else of the published system moves
    assert changed == {"precision", "audio_features", "sentence_features", "data_loader", "compile", "compile_mode",
                       "background_checkpoints", "require_gpu"}
    assert (published["background_checkpoints"], fast["background_checkpoints"]) == (False, True)


def test_graph_step_after_fast_gpu_records_the_step_and_the_wrong_order_is_named():
    from experiments.config_schema import ConfigError, validate_config

    fast, graph = printed_config("fast_gpu"), printed_config("fast_gpu", "graph_step")
    assert {key for key in fast if fast[key] != graph[key]} == {"cuda_graph_step", "compile_mode", "overlap_batch_copy"}
    assert (graph["cuda_graph_step"], graph["compile_mode"], graph["overlap_batch_copy"]) == (True, "default", True)
    validate_config(graph)  # every rule of the recorded step is met
    with pytest.raises(ConfigError, match="compile_mode='reduce-overhead': needs 'default'"):
        validate_config(printed_config("graph_step", "fast_gpu"))  # fast_gpu's compile mode, set after, wins


# Where a GPU makes the host wait: a value read back (`.item()`, `float()`, a tensor in an `if`), or a result whose
# size depends on values (`nonzero`, indexing with a boolean mask).
READ_BACKS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}


class DeviceReads(TorchDispatchMode, L.Callback):
    """Counts the read-backs of each training batch, from its `on_train_batch_start` to the next one's (validation
    left out). DataLoader workers are other processes, so only the training loop's own work is counted."""

    def __init__(self):
        TorchDispatchMode.__init__(self)
        self.batch: int | None = None
        self.on_host = False  # set while the batch is still on the host, before it moves to the device
        self.reads = Counter()

    def __torch_dispatch__(self, function, types, args=(), kwargs=None):
        if function in READ_BACKS and self.batch is not None and not self.on_host:
            self.reads[self.batch] += 1
        return function(*args, **(kwargs or {}))

    def on_train_batch_start(self, trainer, module, batch, batch_index):
        self.batch = batch_index

    def on_validation_start(self, trainer, module):
        self.batch = None


class GpuAdamW(torch.optim.AdamW):
    """The fused AdamW the module picks on a GPU; on a CPU it would pick torch's loop, which reads each step count."""

    def __init__(self, *arguments, fused=None, **keywords):
        super().__init__(*arguments, fused=True, **keywords)


def reads_per_training_batch(data_dir, monkeypatch, **settings) -> Counter:
    """One demo epoch of 15 batches through the experiment, logging every 5 batches, the bar refreshing every 10."""
    import experiments.ex_dcase24 as experiment

    recorder, real_fit = DeviceReads(), experiment.fit_recording_interrupts
    before_transfer = RetrievalModule.on_before_batch_transfer

    def fit(trainer, *arguments, **keywords):
        trainer.callbacks.insert(0, recorder)  # first, so that a batch's reads start with its own hooks
        with recorder:
            real_fit(trainer, *arguments, **keywords)

    def on_host(module, batch, dataloader_index):
        recorder.on_host = True
        try:
            return before_transfer(module, batch, dataloader_index)
        finally:
            recorder.on_host = False

    monkeypatch.setattr(experiment, "fit_recording_interrupts", fit)
    monkeypatch.setattr(RetrievalModule, "on_before_batch_transfer", on_host)
    monkeypatch.setattr(torch.optim, "AdamW", GpuAdamW)
    assert experiment.PROGRESS_BAR_REFRESH_STEPS == 10
    run_demo(data_dir, data_loader__batch_size=2, data_loader__n_workers=1, log_every_n_steps=5, **settings)
    return recorder.reads


FIXED_SHAPE_UPDATES = {"audio_features__embed_all_windows": True, "sentence_features__padding": "max_length"}


@pytest.mark.parametrize("settings", [{}, FIXED_SHAPE_UPDATES, {**FIXED_SHAPE_UPDATES, "cuda_graph_step": True}],
                         ids=["varying_shapes", "fixed_shapes", "recorded_step"])
def test_the_training_loop_reads_the_device_only_to_log_and_refresh_the_bar(data_dir, monkeypatch, settings):
    """The whole Lightning loop (step, loss, logging, callbacks, optimiser, schedule), augmentation on the device
    (hear21passt's host-side draws are read-backs only on a CPU). Lightning turns values logged with `prog_bar=True`
    into numbers after every batch: with the loss on the bar that way, every batch read the device once; and
    without the real windows counted on the host, every batch read how many of its windows were real. A recorded
    step (`cuda_graph_step`) reads no more: a read-back inside it would stop its recording on a GPU."""
    reads = reads_per_training_batch(data_dir, monkeypatch, audio_features__aggregate="TAP",
                                     audio_features__augment_on_device=True, **settings)
    assert sorted(reads) == [4, 9, 14]  # logging (batches 5, 10, 15) and the bar (10, 15; from a GPU it never waits)


class ArrivesWhenTold:
    """A copy to the host that arrives only once the test says so, as a copy queued behind a busy GPU's work does."""

    def __init__(self):
        self.started: list[float] = []
        self.arrived = 0

    def __call__(self, tensor: torch.Tensor):
        index = len(self.started)
        self.started.append(float(tensor))
        return tensor.clone(), lambda: self.arrived > index


def test_the_bar_shows_the_newest_loss_that_reached_the_host_without_waiting_for_one():
    copies = ArrivesWhenTold()
    latest = LatestOnHost(copies)
    assert latest(torch.tensor(3.0)) is None  # its first copy is on its way: nothing to show yet, and no wait
    assert latest(torch.tensor(2.5)) is None
    assert copies.started == [3.0]  # no second copy while one is on its way
    copies.arrived = 1
    assert latest(torch.tensor(2.0)) == 3.0  # the copy that arrived, and a copy of this value started
    assert latest(torch.tensor(1.5)) == 3.0
    copies.arrived = 2
    assert latest(torch.tensor(1.0)) == 2.0
    assert copies.started == [3.0, 2.0, 1.0]


def test_on_a_cpu_the_bar_shows_the_current_loss():
    latest = LatestOnHost()
    assert [latest(torch.tensor(value)) for value in (3.0, 2.0)] == [3.0, 2.0]


class StreamLog:
    """CUDA streams on the CPU: each stream made, entered, waited for and recorded is written to `events`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.events: list[tuple] = []
        self.current = "compute"
        log = self

        class Stream:
            def __init__(self, device=None):
                self.name = "side"
                log.events.append(("made", device))

            def wait_stream(self, other):
                log.events.append(("wait", self.name, other.name))

        compute = Stream()
        compute.name = "compute"
        self.events.clear()

        @contextlib.contextmanager
        def entered(stream):
            log.current = stream.name
            yield
            log.current = "compute"

        move = torch.Tensor.to

        def to(tensor, device, non_blocking=False):
            log.events.append(("copy", tuple(tensor.shape), log.current, non_blocking))
            return move(tensor, "meta")  # a new tensor, as a copy to the GPU makes

        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
        monkeypatch.setattr(torch.cuda, "stream", entered)
        monkeypatch.setattr(torch.Tensor, "to", to)
        monkeypatch.setattr(torch.Tensor, "record_stream",
                            lambda tensor, stream: log.events.append(("used on", tuple(tensor.shape), stream.name)))


def test_a_batch_copied_on_a_side_stream_is_waited_for_and_kept_for_the_compute_stream(monkeypatch):
    """The copy runs on the side stream without waiting (so it overlaps the step before); the compute stream waits for
    it before its next work; and the allocator is told that the compute stream uses the copies, or it could hand their
    memory to the next batch's copy while this step still reads them. Captions stay as they are."""
    log = StreamLog(monkeypatch)
    batch = {"audio": torch.zeros(2, 8), "audio_length": torch.tensor([8, 5]), "caption": ["a dog", "rain"]}
    copy_aside = SideStreamCopy()
    for _ in range(2):
        moved = copy_aside(batch, torch.device("cuda"))
        assert moved["caption"] is batch["caption"] and moved["audio"].is_meta and moved["audio_length"].is_meta
    each_batch = [("copy", (2, 8), "side", True), ("copy", (2,), "side", True), ("wait", "compute", "side"),
                  ("used on", (2, 8), "compute"), ("used on", (2,), "compute")]
    assert log.events == [("made", torch.device("cuda")), *each_batch, *each_batch]  # one side stream for the run


@pytest.mark.parametrize("fused, reads", [(False, 3), (True, 0)])
def test_fp16_loss_scaling_reads_back_only_with_a_per_tensor_adamw(fused, reads):
    """The published precision (16-mixed) keeps a gradient scaler. Its overflow check reads the device in every step
    before a per-tensor AdamW; a fused AdamW takes the scale and the overflow flag into its kernel instead."""
    weights = [torch.nn.Parameter(torch.ones(3)) for _ in range(2)]
    optimizer, scaler, recorder = torch.optim.AdamW(weights, fused=fused), torch.amp.GradScaler("cpu"), DeviceReads()
    recorder.batch = 0
    for step in range(2):  # the first sets the optimiser's state up
        with recorder if step else contextlib.nullcontext():
            scaler.scale(sum((weight * weight).sum() for weight in weights)).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
    assert recorder.reads[0] == reads


def test_a_gpu_run_gets_the_adamw_lightning_can_clip_with(data_dir, monkeypatch):
    """The module is told it runs on a GPU. Lightning raises at the first step when it must clip the gradients of a
    fused optimiser under mixed precision: so did `make train` (lean_single_gpu: bf16, clipping at 1.0) on a GPU."""
    import experiments.retrieval_module as retrieval_module

    real, chosen = retrieval_module.adamw_implementation, []
    monkeypatch.setattr(retrieval_module, "adamw_implementation",
                        lambda on_gpu, clips: chosen.append(real(True, clips)) or chosen[-1])
    for gradient_clip_val in (None, 1.0):
        run_demo(data_dir, precision="bf16-mixed", gradient_clip_val=gradient_clip_val, data_loader__batch_size=8)
    assert chosen == [{"fused": True}, {"foreach": True}]
    monkeypatch.setattr(retrieval_module, "adamw_implementation", lambda on_gpu, clips: {"fused": True})
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        run_demo(data_dir, precision="bf16-mixed", gradient_clip_val=1.0, data_loader__batch_size=8)


class _Counting(L.LightningModule):
    """Each training step takes 20 ms and each validation step 0.3 s of `clock`'s time."""

    def __init__(self, clock: list[float]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.clock = clock

    def training_step(self, batch, batch_index):
        self.clock[0] += 0.02
        return (self.weight * batch["x"]).sum()

    def validation_step(self, batch, batch_index):
        self.clock[0] += 0.3

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_throughput_counts_steady_training_samples_and_leaves_validation_out(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import experiments.tracking as tracking

    clock = [0.0]  # the callback's clock: the steps' own times, none of the machine's
    monkeypatch.setattr(tracking, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    batches = [{"x": torch.ones(4), "clip_index": torch.arange(4)} for _ in range(14)]
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, callbacks=[Throughput(warmup_batches=10)], default_root_dir=tmp_path)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(_Counting(clock), loader, torch.utils.data.DataLoader(batches[:3], batch_size=None))
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    assert metrics["time/train_samples_per_second"] == pytest.approx(4 / 0.02)  # the 4 steps after the warm-up
    assert metrics["time/validation_seconds"] == pytest.approx(0.9)  # three validation steps of 0.3 s
    assert metrics["time/train_epoch_seconds"] == pytest.approx(14 * 0.02)  # validation left out


def test_throughput_logs_each_epochs_own_peaks_of_gpu_memory(monkeypatch):
    """The hooks called as Lightning calls them on a GPU, with the CUDA memory counters played by a fake."""
    from types import SimpleNamespace

    allocated, reserved = {"peak": 7 * 2**30}, {"peak": 9 * 2**30}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device=None: (allocated.update(peak=0), reserved.update(peak=0)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocated["peak"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: reserved["peak"])
    logged = {}
    module = SimpleNamespace(device=torch.device("cuda", 0), log=lambda key, value: logged.update({key: value}))
    trainer = SimpleNamespace(world_size=1, sanity_checking=False)
    throughput = Throughput(warmup_batches=0)
    for epoch_peak in (3 * 2**30, 2**29):  # the first epoch's peak must not stay in the second's figure
        throughput.on_train_epoch_start(trainer, module)
        throughput.on_train_batch_start(trainer, module, {"clip_index": torch.arange(4)}, 0)
        allocated["peak"] = max(allocated["peak"], epoch_peak)
        reserved["peak"] = max(reserved["peak"], 2 * epoch_peak)  # CUDA graphs' pools: held, never allocated
        throughput.on_train_batch_end(trainer, module, None, {"clip_index": torch.arange(4)}, 0)
        throughput.on_train_epoch_end(trainer, module)
        assert logged["memory/peak_gpu_gib"] == epoch_peak / 2**30
        assert logged["memory/peak_gpu_reserved_gib"] == 2 * epoch_peak / 2**30


def test_half_precision_weights_cannot_take_a_small_step():
    """The measurement behind refusing precision=bf16-true: the spacing of bf16 numbers just below 1 is 2^-8."""
    from benchmarks.bench_half_weights import frozen_fraction
    weights = torch.tensor([1.0, 1.0, 0.001, 0.25])
    assert frozen_fraction(weights, 1e-3, torch.bfloat16) == 0.5  # 1 - 1e-3 rounds back to 1; the smaller ones move
    assert frozen_fraction(weights, 1e-2, torch.bfloat16) == 0.0
    assert frozen_fraction(weights, 1e-3, torch.float16) == 0.0  # fp16's spacing below 1 is 2^-11


def test_profile_steps_beyond_the_epoch_stop_before_training(data_dir):
    with pytest.raises(ValueError, match=r"profile_steps=25: .* batch 10 of the last epoch, which has 3 batches; "
                                         r"train on more clips or in smaller batches"):
        run_demo(data_dir, profile_steps=25, data_loader__batch_size=8)  # 30 captions, the last batch dropped
    with pytest.raises(ValueError, match=r"profile_steps=25: .* which has 30 batches; profile at most 20 steps"):
        run_demo(data_dir, profile_steps=25, data_loader__batch_size=1)
    assert not list((data_dir / "runs").glob("*/checkpoints/*.ckpt"))
