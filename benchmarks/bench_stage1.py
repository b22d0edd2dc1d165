"""Stage-1 speed: the model step alone, lever by lever, and the end-to-end Lightning fit.

    python -m benchmarks.bench_stage1 step --config baseline      # PaSST ap468 (stride 16) + RoBERTa-large
    python -m benchmarks.bench_stage1 step --config demo          # CPU-sized models
    python -m benchmarks.bench_stage1 fit --data-dir /tmp/bench   # real DataLoader, HDF5 cache, Lightning, Sacred
    python -m benchmarks.bench_stage1 plot --json-in step.jsonl --output levers.png  # samples/s and MFU per lever
    python -m benchmarks.bench_stage1 plot-fits --json-in fit.jsonl --output fits.png  # end to end, fit by fit

`step` builds the model with the published code's choices (fp16 AMP with a gradient scaler, explicit attention,
per-tensor AdamW, hear21passt's host-side augmentation, transformers' own mask) and adds one lever at a time, each
lever's model built with its settings and the same weights, so each row shows what that lever buys: SDPA
attention in both encoders, bf16 autocast, fused AdamW, the real windows counted on the host, every window
embedded, our faster computation of hear21passt's front end, augmentation and masks made on the device,
torch.compile with fixed caption shapes, CUDA graphs, CUDA graphs over the real windows only, max-autotune. Batches
are random (audio with Clotho's 15-30 s lengths, generated on the device; captions from the demo vocabulary,
tokenised on the host as in training), weights random: the architectures, not the weights, set the cost. PaSST
trains with the configuration's structured patchout (baseline: the published 15 of 62 time columns and 2 of 8
frequency rows of patches dropped; `--patchout 0 0`, as runs 1-4 of RESULTS.md, times ~1.8x its audio FLOPs). Model
FLOPs are counted with torch's FlopCounterMode on the timed batches; MFU divides them by the time and the GPU's dense
bf16 peak. One more step per lever runs under CUDA's synchronisation debug mode, which counts how often the step
makes the host wait for the GPU; a compiled lever's scores are compared with its weights run eagerly, and two of
its training passes over one batch must embed different windows (fresh patchout draws). A full-split
evaluation (1,045 clips, 5,225 captions: encode each once, score all pairs, compute the metrics) is timed after the
levers named by --evaluate-after.

`fit` writes a Clotho-format data set of noise clips (32 kHz, 15-30 s; its size set by --clips), a random-init
model of RoBERTa-large's sizes, and runs `python -m experiments.ex_dcase24` for --epochs epochs, which logs the steady
training throughput, the validation time and on a GPU the peak memory of each (`time/*`, `memory/*`,
experiments/tracking.py's Throughput); the last epoch's are reported, with the MFU of its throughput and the
projected length of the published run (20 epochs of Clotho's size, checkpoint writes and one-time costs included).
`--profile-steps N` trains one more epoch and traces N of its steps (the experiment's `profile_steps`): the GPU's
busy time per step against the step's wall time says whether the real loop waits for the GPU or for the host.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from unittest import mock

import numpy as np
import soundfile
import torch
from hear21passt.models.preprocess import AugmentMelSTFT
from torch._dynamo.utils import counters
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.kernel_breakdown import breakdown
from data_loaders.demo_data import EVENTS, TEXT_MODEL_FOLDER, caption_for, write_captions_csv, write_text_model
from experiments.checkpointing import CHECKPOINT_SECONDS
from experiments.retrieval_module import recorded_step_inputs, recorded_step_loss
from experiments.tracking import PROFILE_TRACE
from models.audio.passt import MEL_SETTINGS, SAMPLE_RATE, PasstEncoder
from models.audio.windowing import split_into_windows
from models.losses import multi_positive_contrastive_loss
from models.pooling import MeanPooling
from models.retrieval_model import RetrievalModel
from models.text.transformer import TextEncoder
from utils.figures import pyplot, save_figure
from utils.metrics import retrieval_metrics
from utils.step_graph import RecordedStep

CLOTHO_DEVELOPMENT_CLIPS, CLOTHO_EVAL_CLIPS = 3839, 1045
CAPTIONS_PER_CLIP = 5
PUBLISHED_EPOCHS = 20
SHORTEST_CLIP_SECONDS, LONGEST_CLIP_SECONDS = 15, 30  # Clotho's clips, padded to the longest
DENSE_BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # the vendors' dense tensor-core figures
ROBERTA_LARGE = dict(hidden_size=1024, layers=24, attention_heads=16, intermediate_size=4096, vocab_size=50265)
# `patchout`: the structured patchout (time columns, frequency rows dropped in training) of the experiment's defaults
# for `baseline` and of its `demo` named config; it removes 45% of PaSST's training FLOPs at 10-s windows.
CONFIGS = {
    "demo": dict(audio="passt_small", window_seconds=5, text=dict(hidden_size=128, layers=2), shared=128,
                 batch_size=32, crop_seconds=5, patchout=(0, 0)),
    "baseline": dict(audio="passt", window_seconds=10, text=ROBERTA_LARGE, shared=1024, batch_size=16,
                     crop_seconds=None, patchout=(15, 2)),
}
PUBLISHED = dict(precision="fp16", attention=False, fused_adamw=False, count_on_host=False, all_windows=False,
                 fast_front_end=False, on_device=False, padding="longest", compile=None, recorded_step=False)
# Cumulative: each lever keeps the ones before it.
LEVER_CHANGES = {
    "published": ({}, "fp16 AMP + GradScaler, explicit attention, for-each AdamW"),
    "sdpa": (dict(attention=True), "+ SDPA attention in PaSST and RoBERTa"),
    "bf16": (dict(precision="bf16"), "+ bf16 autocast, no GradScaler"),
    "fused_adamw": (dict(fused_adamw=True), "+ fused AdamW"),
    "host_count": (dict(count_on_host=True), "+ real windows counted from the lengths on the host (no read-back)"),
    "all_windows": (dict(all_windows=True), "+ padding windows embedded too (fixed shapes)"),
    "mel_front_end": (dict(fast_front_end=True), "+ hear21passt's front end computed faster (MelSTFT, the default)"),
    "on_device": (dict(on_device=True), "+ mel bands, patchout indices and attention masks made on the device"),
    "compile": (dict(padding="max_length", compile="default"),
                "+ torch.compile of both encoders, captions padded to max_sentence_tokens (fixed shapes)"),
    "cuda_graphs": (dict(compile="reduce-overhead"), "+ CUDA graphs (torch.compile mode reduce-overhead)"),
    "real_windows_graphs": (dict(all_windows=False), "+ only the real windows again, their number varying (the "
                            "encoder compiled with it as a symbol; one CUDA graph per number, each recorded in "
                            "warm-up)"),
    "max_autotune": (dict(compile="max-autotune", all_windows=True),  # on cuda_graphs, not real_windows_graphs
                     "+ matrix kernels chosen by timing (mode max-autotune, CUDA graphs too; every window embedded, "
                     "as in cuda_graphs)"),
    "recorded_step": (dict(compile="default", recorded_step=True),  # on cuda_graphs' settings but the compile mode
                      "+ the whole forward and backward pass recorded as one CUDA graph (cuda_graph_step; the "
                      "encoders compiled in mode default inside it)"),
}


def cumulative(changes: dict[str, tuple[dict, str]]) -> dict[str, dict]:
    levers, settings = {}, PUBLISHED
    for name, (change, _) in changes.items():
        settings = levers[name] = {**settings, **change}
    return levers


LEVERS = cumulative(LEVER_CHANGES)
LEVER_MEANING = {name: meaning for name, (_, meaning) in LEVER_CHANGES.items()}


def caption_vocabulary(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [caption_for(sorted(rng.choice(list(EVENTS), size=2, replace=False).tolist()), rng) for _ in range(count)]


def random_batch(batch_size: int, crop_seconds: float | None, vocabulary: list[str], generator: torch.Generator,
                 device: str, seconds: torch.Tensor | None = None) -> dict:
    """Audio zero-padded to 30 s after a random 15-30 s length (or `seconds`), as the cache-backed loader delivers
    it."""
    if seconds is None:
        seconds = torch.empty(batch_size).uniform_(SHORTEST_CLIP_SECONDS, LONGEST_CLIP_SECONDS, generator=generator)
    if crop_seconds:
        seconds = seconds.clamp(max=crop_seconds)
    lengths = (seconds * SAMPLE_RATE).long()
    clip_samples = int(lengths.max()) if crop_seconds else LONGEST_CLIP_SECONDS * SAMPLE_RATE
    audio = torch.randn(batch_size, clip_samples, device=device) * 0.1
    audio *= torch.arange(clip_samples, device=device).unsqueeze(0) < lengths.to(device).unsqueeze(1)
    picks = torch.randint(len(vocabulary), (batch_size,), generator=generator)
    return {"audio": audio, "audio_length": lengths.to(device), "host_length": lengths,
            "caption": [vocabulary[i] for i in picks],
            "clip_index": torch.arange(batch_size, device=device)}


def every_window_total(config: dict) -> list[torch.Tensor]:
    """Clip lengths (seconds) of batches whose totals of real windows run through every total that clips of 15-30 s
    can give: every clip at its fewest windows, then one clip after another at one window more, up to every clip at
    its most. An epoch meets each total sooner or later, and a lever whose shapes follow the total compiles and
    records a CUDA graph for each new one, once; warmed up on these, its timed steps measure what a run then gets."""
    hop, longest = config["window_seconds"], min(LONGEST_CLIP_SECONDS, config["crop_seconds"] or LONGEST_CLIP_SECONDS)
    fewest, most = math.ceil(SHORTEST_CLIP_SECONDS / hop), math.ceil(longest / hop)
    counts, lengths = [fewest] * config["batch_size"], []
    for clip in [None] + [clip for _ in range(most - fewest) for clip in range(config["batch_size"])]:
        if clip is not None:
            counts[clip] += 1
        lengths.append(torch.tensor([min(count * hop, longest) for count in counts], dtype=torch.float))
    return lengths


def build_model(config: dict, text_folder: Path, device: str, lever: dict) -> RetrievalModel:
    audio = PasstEncoder(config["audio"], window_seconds=config["window_seconds"],
                         hop_seconds=config["window_seconds"], pretrained=False,
                         s_patchout_t=config["patchout"][0], s_patchout_f=config["patchout"][1],
                         attention="sdpa" if lever["attention"] else "explicit",
                         embed_padding_windows=lever["all_windows"], augment_on_device=lever["on_device"])
    text = TextEncoder(str(text_folder), attention="sdpa" if lever["attention"] else "eager",
                       padding=lever["padding"])
    if not lever["fast_front_end"]:  # the published code's own front end (on_device keeps the faster one)
        audio.mel = AugmentMelSTFT(freqm=0, timem=0, **MEL_SETTINGS)
    model = RetrievalModel(audio, text, MeanPooling(), config["shared"], text_projection="none").to(device)
    if lever["compile"]:
        model.compile_encoders(mode=lever["compile"])
    return model


@contextmanager
def mask_made_by(lever: dict):
    """Before the `on_device` lever, as in the published code, transformers makes the 4D attention mask from the 2D
    one, after reading `mask.all()` back from the device."""
    if lever["on_device"]:
        yield
        return
    with mock.patch("models.text.transformer.expanded_attention_mask", lambda mask, attention, dtype: mask):
        yield


def autocast(device: str, precision: str):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return torch.autocast(device, dtype=dtype) if device == "cuda" else nullcontext()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def window_total(model: RetrievalModel, batch: dict) -> int:
    """The batch's real windows, counted from the clip lengths on the host."""
    return model.audio_encoder.real_window_count(batch["audio"].shape[1], batch["host_length"])


def training_step(model: RetrievalModel, optimizer, scaler, batch: dict, device: str, lever: dict,
                  recorded: RecordedStep | None = None) -> None:
    """As the Lightning module's step, which counts the real windows before the batch moves to the device.
    `recorded`: the `recorded_step` lever's step, replayed once recorded."""
    if recorded is not None:
        with autocast(device, lever["precision"]):
            recorded(recorded_step_inputs(model, batch, torch.device(device)), optimizer)
        return
    real_windows = window_total(model, batch) if lever["count_on_host"] else None
    with autocast(device, lever["precision"]):
        windows, mask = model.encode_audio(batch["audio"], batch["audio_length"], real_windows)
        scores = model.score(model.encode_text(batch["caption"]), windows, mask)
    loss = multi_positive_contrastive_loss(scores.float(), batch["clip_index"])
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:  # fp16: the scaler checks for overflow on the host, one synchronisation per step
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()


def model_tflop_per_sample(config: dict, text_folder: Path, batches: list[dict], device: str) -> float:
    """Forward and backward FLOPs per caption-clip pair of the published model on the batches (matrix products and
    attention, as FlopCounterMode counts, in training mode: patchout's dropped patches, padding windows and padding
    tokens are not model FLOPs)."""
    model = build_model(config, text_folder, device, PUBLISHED)
    counter = FlopCounterMode(display=False)
    with counter:
        for batch in batches:
            with autocast(device, "bf16"):
                windows, mask = model.encode_audio(batch["audio"], batch["audio_length"])
                scores = model.score(model.encode_text(batch["caption"]), windows, mask)
            multi_positive_contrastive_loss(scores.float(), batch["clip_index"]).backward()
    return counter.get_total_flops() / sum(len(batch["caption"]) for batch in batches) / 1e12


def model_flop_utilisation(samples_per_second: float, tflop_per_sample: float, device: str) -> float | None:
    peak = peak_flops(device)
    return samples_per_second * tflop_per_sample * 1e12 / peak if peak else None


def time_training(model: RetrievalModel, lever: dict, warmup: Iterable[dict], timed: list[dict], device: str,
                  recorded: RecordedStep | None = None) -> dict:
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=2e-5, fused=lever["fused_adamw"] and device == "cuda")
    scaler = torch.amp.GradScaler(device) if lever["precision"] == "fp16" and device == "cuda" else None
    step = partial(training_step, model, optimizer, scaler, device=device, lever=lever, recorded=recorded)
    model.train()
    for batch in warmup:
        step(batch)
    synchronize(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for batch in timed:
        step(batch)
    synchronize(device)
    seconds = time.perf_counter() - start
    waits = host_waits(lambda: step(timed[0]), device)
    return {"seconds": seconds, "samples_per_second": sum(len(b["caption"]) for b in timed) / seconds,
            # allocated misses what replayed CUDA graphs use (their recording reserved it); reserved holds it
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if device == "cuda" else None,
            "host_waits_per_step": waits}


def host_waits(step, device: str) -> int | None:
    """How often one step makes the host wait for the GPU (reads back a value, copies from pageable memory,
    synchronises), as CUDA's synchronisation debug mode reports them; None off CUDA."""
    if device != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    synchronize(device)
    return sum("called a synchronizing CUDA operation" in str(warning.message) for warning in caught)


@torch.inference_mode()
def time_evaluation(model: RetrievalModel, clips: int, batch_size: int, vocabulary: list[str], device: str,
                    precision: str, generator: torch.Generator) -> float:
    """Seconds for one full-split evaluation as the Lightning module does it: clips in batches with their captions,
    then every caption against every clip, then the metrics."""
    model.eval()
    clips_to, captions_to = (batch_size, batch_size * CAPTIONS_PER_CLIP) if model.compiled else (None, None)
    synchronize(device)
    start = time.perf_counter()
    texts, all_windows, all_masks = [], [], []
    with autocast(device, precision):
        for first in range(0, clips, batch_size):
            batch = random_batch(min(batch_size, clips - first), None, vocabulary, generator, device)
            windows, mask = model.encode_audio(batch["audio"], batch["audio_length"], pad_to=clips_to)
            all_windows.append(windows.float())
            all_masks.append(mask)
            captions = [caption for caption in batch["caption"] for _ in range(CAPTIONS_PER_CLIP)]
            texts.append(model.encode_text(captions, pad_to=captions_to).float())
    caption_clip = torch.arange(clips, device=device).repeat_interleave(CAPTIONS_PER_CLIP)
    scores = model.pooling.rank_split(torch.cat(texts), torch.cat(all_windows), torch.cat(all_masks), caption_clip)
    retrieval_metrics(scores, caption_clip)
    synchronize(device)
    return time.perf_counter() - start


def trace_beside(summary: Path) -> Path:
    """Where a profile's whole trace is written: beside its text summary, for chrome://tracing or Perfetto."""
    return summary.with_suffix(".trace.json.gz")


def profile_training(model: RetrievalModel, lever: dict, batches: list[dict], device: str, path: str,
                     recorded: RecordedStep | None = None) -> None:
    """Where a step's time goes, written to `path`: the GPU's busy time and its kinds of kernel, then the operators by
    device time and by host time; the whole trace beside it (`.trace.json.gz`, for chrome://tracing or Perfetto)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5,
                                  fused=lever["fused_adamw"] and device == "cuda")
    step = partial(training_step, model, optimizer, None, device=device, lever=lever, recorded=recorded)
    step(batches[0])
    synchronize(device)
    start = time.perf_counter()
    with profile(activities=activities) as profiler:
        for batch in batches[1:]:
            step(batch)
        synchronize(device)
    wall = time.perf_counter() - start
    steps = len(batches) - 1
    trace_path = trace_beside(Path(path))
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    profiler.export_chrome_trace(str(trace_path))
    averages = profiler.key_averages()
    sort_key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    summary = (f"{steps} steps, {wall:.3f} s wall under the profiler\n"
               + breakdown(trace_path, steps, step_milliseconds=wall * 1000 / steps))
    print(summary, end="", flush=True)
    with open(path, "w") as handle:
        handle.write(summary)
        handle.write(averages.table(sort_by=sort_key, row_limit=30) + "\n")
        handle.write(averages.table(sort_by="self_cpu_time_total", row_limit=20) + "\n")
    print(f"profile of {steps} steps written to {path}, its trace to {trace_path}", flush=True)


def draws_differ(model: RetrievalModel, lever: dict, batch: dict, device: str) -> bool:
    """Whether two training passes of the same weights over the same spectrograms embed different windows, as
    patchout's fresh random draws make them (the mel front end's own draws held still): a CUDA graph that replayed
    the random numbers of its recording would embed the same windows twice, and train on one patchout all run long."""
    encoder = model.audio_encoder
    model.train()
    encoder.mel.eval()
    windows, mask = split_into_windows(batch["audio"], batch["audio_length"], encoder.window_samples,
                                       encoder.hop_samples)
    rows = windows.flatten(0, 1) if encoder.embed_padding_windows else windows[mask]  # the training step's shape
    embedded = []
    for _ in range(2):
        with autocast(device, lever["precision"]):
            tokens = encoder.embed_windows(rows)
        embedded.append(tokens.detach().float().clone())
        tokens.float().sum().backward()  # the backward graph runs too, as in training
    model.zero_grad(set_to_none=True)
    encoder.mel.train()
    return not torch.equal(*embedded)


def replays_draw_afresh(model: RetrievalModel, recorded: RecordedStep, batch: dict, device: str,
                        precision: str) -> bool:
    """Whether two replays of the recorded step on the same batch and weights (a step of learning rate 0) give
    different losses, as fresh random draws (patchout, the mel band edges) make them: the recorded step's own check
    of what `draws_differ` checks for the encoders."""
    frozen = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    losses = []
    for _ in range(2):
        with autocast(device, precision):
            losses.append(recorded(recorded_step_inputs(model, batch, torch.device(device)), frozen).clone())
    return not torch.equal(*losses)


@torch.no_grad()
def compiled_error(model: RetrievalModel, config: dict, text_folder: Path, lever: dict, batch: dict,
                   device: str) -> float:
    """How far the compiled model's scores of a batch (evaluation mode: no random draws) lie from the same weights run
    eagerly, as ||compiled - eager|| / ||eager||: a CUDA graph replaying stale inputs would show here, rounding not."""
    eager = build_model(config, text_folder, device, {**lever, "compile": None})
    eager.load_state_dict(model.state_dict())
    scores = []
    for candidate in (model.eval(), eager.eval()):
        with autocast(device, lever["precision"]):
            windows, mask = candidate.encode_audio(batch["audio"], batch["audio_length"])
            scores.append(candidate.score(candidate.encode_text(batch["caption"]), windows, mask).float())
    model.train()
    return float(torch.linalg.vector_norm(scores[0] - scores[1]) / torch.linalg.vector_norm(scores[1]))


def counting_totals(model: RetrievalModel, batches: Iterable[dict], totals: set[int]) -> Iterator[dict]:
    """The batches, one at a time (made as they are needed), adding each one's total of real windows to `totals`."""
    for batch in batches:
        totals.add(window_total(model, batch))
        yield batch


def compilation_counts() -> dict[str, int]:
    """What torch.compile did so far: graphs compiled, graph breaks, graphs it could not replay as CUDA graphs
    (inductor logs the reason of each skip)."""
    return {"compiled_graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def peak_flops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((tflops * 1e12 for key, tflops in DENSE_BF16_PEAK_TFLOPS.items() if key in name), None)


def report(record: dict, json_path: str | None) -> None:
    print(json.dumps(record), flush=True)
    if json_path:
        with open(json_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def chosen_config(args: argparse.Namespace) -> dict:
    overrides = {"batch_size": getattr(args, "batch_size", None), "patchout": args.patchout and tuple(args.patchout)}
    return dict(CONFIGS[args.config], **{key: value for key, value in overrides.items() if value is not None})


def bench_step(args: argparse.Namespace) -> None:
    config = chosen_config(args)
    device, started = args.device, time.monotonic()
    vocabulary = caption_vocabulary(2000)
    folder = tempfile.TemporaryDirectory()
    torch.manual_seed(0)
    text_folder = write_text_model(Path(folder.name), vocabulary, **config["text"])
    weights = build_model(config, text_folder, "cpu", PUBLISHED).state_dict()
    generator = torch.Generator().manual_seed(0)
    batches = [random_batch(config["batch_size"], config["crop_seconds"], vocabulary, generator, device)
               for _ in range(args.warmup + args.steps)]
    warmup, timed = batches[:args.warmup], batches[args.warmup:]
    tflop_per_sample = model_tflop_per_sample(config, text_folder, timed, device)
    common = {"config": args.config, "machine": machine(device), "batch": config["batch_size"],
              "patchout": config["patchout"], "steps": args.steps, "model_tflop_per_sample": tflop_per_sample}
    for name in args.levers:
        lever = LEVERS[name]
        if lever["compile"] and args.deadline and time.monotonic() - started > args.deadline:
            report({**common, "lever": name, "skipped": f"past --deadline {args.deadline} s"}, args.json)
            continue
        # the memory this lever reserves is its own: the last lever's model, recorded step (which holds the model
        # and its graph's pool), graphs and cache go first
        model = recorded = None
        torch._dynamo.reset()  # this lever's compilation counted alone; frees earlier CUDA graphs' pools
        counters.clear()
        if device == "cuda":
            torch.cuda.empty_cache()
        model = build_model(config, text_folder, device, lever)
        model.load_state_dict(weights)
        lever_warmup = warmup * 3 if lever["compile"] else warmup  # compilation and graph capture in warm-up
        if lever["compile"] and not lever["all_windows"]:  # shapes follow the window total: record every one first
            lever_warmup = itertools.chain((random_batch(config["batch_size"], config["crop_seconds"], vocabulary,
                                                         generator, device, seconds)
                                            for seconds in every_window_total(config)), lever_warmup)
        warmed_totals: set[int] = set()
        recorded = RecordedStep(partial(recorded_step_loss, model)) if lever["recorded_step"] else None
        with mask_made_by(lever):
            result = time_training(model, lever, counting_totals(model, lever_warmup, warmed_totals), timed, device,
                                   recorded)
        result["mfu"] = model_flop_utilisation(result["samples_per_second"], tflop_per_sample, device)
        if lever["compile"]:
            result.update(compilation_counts(),
                          error_vs_eager=compiled_error(model, config, text_folder, lever, timed[0], device),
                          random_draws_differ=draws_differ(model, lever, timed[0], device) if any(
                              config["patchout"]) else None)
        if recorded is not None:
            result["replays_draw_afresh"] = replays_draw_afresh(model, recorded, timed[0], device, lever["precision"])
        if not lever["all_windows"]:
            result["timed_window_totals_new"] = len({window_total(model, batch) for batch in timed} - warmed_totals)
        report({**common, "lever": name, "meaning": LEVER_MEANING[name], **result}, args.json)
        if name in args.evaluate_after:
            for eval_batch in args.eval_batches:
                with mask_made_by(lever):
                    seconds = time_evaluation(model, args.eval_clips, eval_batch, vocabulary, device,
                                              lever["precision"], generator)
                report({**common, "lever": name, "evaluation_clips": args.eval_clips, "eval_batch": eval_batch,
                        "evaluation_seconds": seconds,
                        "full_split_seconds": seconds * CLOTHO_EVAL_CLIPS / args.eval_clips}, args.json)
        if name == args.profile_after:
            with mask_made_by(lever):
                profile_training(model, lever, timed[:6], device, args.profile_file, recorded)
    folder.cleanup()


def write_noise_dataset(folder: Path, clips: dict[str, int], text: dict | None, seed: int = 0) -> Path:
    """Clotho's layout with noise clips at 32 kHz (no resampling to pay for) and demo-vocabulary captions, and a
    random-init RoBERTa of the sizes in `text` (none if None)."""
    rng = np.random.default_rng(seed)
    vocabulary = caption_vocabulary(2000, seed)
    for split, count in clips.items():
        audio_folder = folder / split
        audio_folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for index in range(count):
            name = f"{split}_{index:05d}.wav"
            samples = int(rng.uniform(SHORTEST_CLIP_SECONDS, LONGEST_CLIP_SECONDS) * SAMPLE_RATE)
            soundfile.write(audio_folder / name, rng.integers(-3000, 3000, samples, dtype=np.int16), SAMPLE_RATE,
                            subtype="PCM_16")
            rows.append([name, *(vocabulary[i] for i in rng.integers(len(vocabulary), size=CAPTIONS_PER_CLIP))])
        write_captions_csv(folder / f"clotho_captions_{split}.csv", rows)
    if text is not None:
        write_text_model(folder, vocabulary, **text)
    return folder


def bench_fit(args: argparse.Namespace) -> None:
    data_dir, profile_file = Path(args.data_dir), Path(args.profile_file)
    profile_file.parent.mkdir(parents=True, exist_ok=True)  # before the run, not after it
    folder = data_dir / "clotho_bench"
    if not folder.is_dir():
        start = time.perf_counter()
        write_noise_dataset(folder, dict(zip(("development", "validation", "evaluation"), args.clips)),
                            ROBERTA_LARGE if args.config == "baseline" else CONFIGS["demo"]["text"])
        print(f"data set written in {time.perf_counter() - start:.0f} s", flush=True)
    config = chosen_config(args)
    epochs = args.epochs + (1 if args.profile_steps else 0)  # the profiled epoch's figures are not reported
    settings = [f"directories.data_dir={data_dir}", "clotho_v2.folder_name=clotho_bench",
                f"sentence_features.model=clotho_bench/{TEXT_MODEL_FOLDER}", f"audio_features.model={config['audio']}",
                f"audio_features.segment_length={config['window_seconds']}",
                f"audio_features.hop_length={config['window_seconds']}",
                "audio_features.model_config.pretrained=False", f"shared_representation_size={config['shared']}",
                f"max_epochs={epochs}", "warmup_length=0", "rampdown_start=0", f"rampdown_stop={epochs}",
                f"data_loader.batch_size={config['batch_size']}",
                f"data_loader.n_workers={args.workers}",
                f"audio_features.model_config.s_patchout_t={config['patchout'][0]}",
                f"audio_features.model_config.s_patchout_f={config['patchout'][1]}",
                f"profile_steps={args.profile_steps}", *args.settings]
    log_file = Path(args.log_file) if args.log_file else None
    run_seconds, per_epoch, run_folder = run_experiment(data_dir, settings, log_file)
    logged = {"run_seconds": run_seconds, **per_epoch[args.epochs - 1]}  # the last unprofiled epoch: warm
    if args.profile_steps:  # the summary, and the trace beside it (the run folder may stay on a lent machine)
        logged["time/profiled_step_ms"] = per_epoch[epochs - 1]["time/profiled_step_ms"]
        summary = breakdown(run_folder / PROFILE_TRACE, args.profile_steps,
                            step_milliseconds=logged["time/profiled_step_ms"])
        print(summary, end="", flush=True)
        profile_file.write_text(summary)
        shutil.copyfile(run_folder / PROFILE_TRACE, trace_beside(profile_file))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(0)  # whole clips of 15-30 s and captions, as in the data set
    batches = [random_batch(config["batch_size"], None, caption_vocabulary(2000), generator, device) for _ in range(4)]
    tflop_per_sample = model_tflop_per_sample(config, folder / TEXT_MODEL_FOLDER, batches, device)
    rate = logged.get("time/train_samples_per_second")
    report({"command": "fit", "config": args.config, "machine": machine(device), "patchout": config["patchout"],
            "clips": args.clips, "epochs": args.epochs, "profile_steps": args.profile_steps,
            "settings": args.settings, "workers": args.workers, **logged, "model_tflop_per_sample": tflop_per_sample,
            "mfu": model_flop_utilisation(rate, tflop_per_sample, device) if rate else None,
            **(projected_published_run(per_epoch, run_seconds, args.epochs - 1, args.clips[0] * CAPTIONS_PER_CLIP)
               if rate else {})}, args.json)  # no steady rate in an epoch of 10 batches or fewer


def run_experiment(data_dir: Path, settings: list[str],
                   log_path: Path | None = None) -> tuple[float, dict[int, dict[str, float]], Path]:
    """One `python -m experiments.ex_dcase24 with ...` run: its wall time, each epoch's `time/*` and `memory/*`
    figures, and its run folder. Its output is appended to `log_path` (default: data_dir/experiment.log) as it
    comes, after a line naming the settings, so that a run stopped by a time limit still shows how far it got."""
    log_path = log_path or data_dir / "experiment.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"=== {time.strftime('%H:%M:%S')} ex_dcase24 with {' '.join(settings)}\n")
        log.flush()
        start = time.perf_counter()
        completed = subprocess.run([sys.executable, "-m", "experiments.ex_dcase24", "with", *settings],
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=log, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - start
    if completed.returncode:
        sys.exit(f"training run failed (its output: {log_path}):\n{log_path.read_text()[-6000:]}")
    (metrics_file,) = sorted((data_dir / "runs").glob("*/logs/version_0/metrics.csv"), key=os.path.getmtime)[-1:]
    per_epoch: dict[int, dict[str, float]] = {}
    with open(metrics_file) as handle:
        for row in csv.DictReader(handle):  # the test pass's rows carry the epoch after the last: no figures
            figures = {key: float(value) for key, value in row.items()
                       if value and key.startswith(("time/", "memory/"))}
            if figures:
                per_epoch.setdefault(int(row["epoch"]), {}).update(figures)
    return wall, per_epoch, metrics_file.parents[2]


def projected_published_run(per_epoch: dict[int, dict[str, float]], run_seconds: float, report_epoch: int,
                            development_captions: int) -> dict[str, float]:
    """The published run's length from a short benchmark run: 20 epochs over Clotho's 19,195 development captions
    at the reported epoch's steady rate and validation time, every epoch paying the costliest checkpoint writes of
    the run (an epoch that improves validation writes two); plus what the benchmark run spent beyond its epochs at
    that pace (process start, its data set's cache, compilation, the first batches, its small test pass), and one
    validation's time for the test pass over Clotho's evaluation split (as large as the validation split)."""
    reported = per_epoch[report_epoch]
    rate, validation = reported["time/train_samples_per_second"], reported["time/validation_seconds"]
    checkpoint = max(figures.get(CHECKPOINT_SECONDS, 0.0) for figures in per_epoch.values())

    def epoch_seconds(captions: int) -> float:
        return captions / rate + validation + checkpoint

    one_time = run_seconds - len(per_epoch) * epoch_seconds(development_captions)
    total = one_time + PUBLISHED_EPOCHS * epoch_seconds(CLOTHO_DEVELOPMENT_CLIPS * CAPTIONS_PER_CLIP) + validation
    return {"one_time_seconds": one_time, "checkpoint_seconds_per_epoch": checkpoint,
            "projected_published_minutes": total / 60}


def json_lines(path: Path) -> list[dict]:
    """The records of a `--json` file, one per non-empty line."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def lever_rows(json_path: Path) -> list[dict]:
    """The timed training rows of a `step --json` file, in the order they were measured."""
    rows = json_lines(json_path)
    timed = [row for row in rows if "samples_per_second" in row and "lever" in row]
    if not timed:
        raise SystemExit(f"{json_path}: no timed lever rows (lines with 'lever' and 'samples_per_second')")
    return timed


def bar_label(row: dict) -> str:
    """A lever's rate, MFU and peak memory, the memory named: under CUDA graphs the allocated peak leaves out the
    graphs' activations, which only the reserved one holds (runs 1-4 recorded the allocated one alone)."""
    details = [f"{row['samples_per_second']:.1f}/s"]
    details += [f"MFU {row['mfu']:.1%}"] if row.get("mfu") else []
    if row.get("peak_reserved_gib"):
        details.append(f"{row['peak_reserved_gib']:.1f} GiB reserved")
    elif row.get("peak_memory_gib"):
        details.append(f"{row['peak_memory_gib']:.1f} GiB allocated")
    return ", ".join(details)


def plot_rates(names: list[str], rates: list[float], labels: list[str], title: str, output: Path,
               target: float | None) -> None:
    """Horizontal bars of training samples/s, top to bottom in the order given, each labelled, with the target as a
    dashed line."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(11, 0.6 * len(names) + 1.5))
    axis.barh(names[::-1], rates[::-1], color="tab:blue")
    texts = [axis.text(rate, position, "  " + label, va="center", fontsize="small")
             for position, (rate, label) in enumerate(zip(rates[::-1], labels[::-1]))]
    if target:
        axis.axvline(target, color="tab:red", linestyle="--")
        axis.text(target, len(names) - 0.45, f" target {target:g}/s", color="tab:red", fontsize="small")
    axis.set_ylim(-0.6, len(names) - 0.1)
    axis.set(xlabel="training samples (caption-clip pairs) per second", title=title)
    axis.set_xlim(0, max(rates + [target or 0]) * 1.8)  # room for the labels while the layout is made, then exact
    figure.tight_layout()
    axis.set_xlim(0, axis_end_for_labels(figure, axis, rates[::-1], texts, minimum=max(rates + [target or 0]) * 1.1))
    save_figure(figure, output)


def axis_end_for_labels(figure, axis, rates: list[float], texts: list, minimum: float) -> float:
    """The x-axis end at which each bar's label, drawn right of its bar, fits inside the axes: a label of p pixels
    on an axis of w pixels ending at x needs rate + p / w * x <= x (at most 90% of the axis for labels)."""
    figure.canvas.draw()
    axis_pixels = axis.get_window_extent().width
    ends = [rate / (1 - min(0.9, text.get_window_extent().width / axis_pixels)) for rate, text in zip(rates, texts)]
    return max([minimum] + ends) * 1.02


def plot_levers(rows: list[dict], output: Path, target: float | None) -> None:
    """One bar per lever: training samples/s, labelled by `bar_label`."""
    plot_rates([row["lever"] for row in rows], [row["samples_per_second"] for row in rows],
               [bar_label(row) for row in rows],
               f"{rows[0]['machine']}, {rows[0]['config']}, batch {rows[0]['batch']}\neach lever keeps those above it",
               output, target)


def fit_rows(json_paths: list[Path]) -> list[dict]:
    """The end-to-end rows of `fit --json` files, in the order of the files and their lines, each with its `source`
    (folder/file, as benchmarks/results/ names a lease and a run)."""
    rows = [{**row, "source": f"{path.parent.name}/{path.stem}"} for path in json_paths for row in json_lines(path)]
    fits = [row for row in rows if row.get("command") == "fit" and "time/train_samples_per_second" in row]
    if not fits:
        raise SystemExit(f"{', '.join(map(str, json_paths))}: no fit rows (lines with command 'fit' and "
                         f"'time/train_samples_per_second')")
    return fits


def fit_name(row: dict) -> str:
    """Where a fit's row came from, its card, and the settings it ran with (where the compilation cache file lay is
    left out)."""
    card = row["machine"].split(",")[0].removeprefix("NVIDIA ")
    settings = [setting for setting in row["settings"] if not setting.startswith("compile_cache=")]
    return f"{row['source']}, {card}\n{' '.join(settings) or 'published settings'}"


def fit_label(row: dict) -> str:
    """A fit's rate and, where it reported them, its reserved GPU memory and the 20 epochs it projects."""
    details = [f"{row['time/train_samples_per_second']:.1f}/s"]
    if row.get("memory/peak_gpu_reserved_gib"):
        details.append(f"{row['memory/peak_gpu_reserved_gib']:.1f} GiB reserved")
    if row.get("projected_published_minutes"):
        details.append(f"20 epochs {row['projected_published_minutes']:.1f} min")
    return ", ".join(details)


def plot_fits(rows: list[dict], output: Path, target: float | None) -> None:
    """One bar per end-to-end fit: training samples/s of its last epoch, named by card and settings."""
    plot_rates([fit_name(row) for row in rows], [row["time/train_samples_per_second"] for row in rows],
               [fit_label(row) for row in rows],
               "end to end: the real loader, Lightning, loss and optimiser\n(the last epoch's steady rate)", output,
               target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also append each result as a JSON line to this file")
    commands = parser.add_subparsers(dest="command", required=True)
    step = commands.add_parser("step", help="the model step alone, lever by lever, and full-split evaluation")
    step.add_argument("--config", choices=CONFIGS, default="demo")
    step.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    step.add_argument("--steps", type=int, default=20, help="timed steps per lever")
    step.add_argument("--warmup", type=int, default=3, help="untimed steps before each lever's timing")
    step.add_argument("--batch-size", type=int, help="override the configuration's training batch")
    step.add_argument("--levers", nargs="+", choices=LEVERS,
                      default=[name for name, lever in LEVERS.items() if not lever["compile"]])
    step.add_argument("--evaluate-after", nargs="*", choices=LEVERS, default=["published", "fused_adamw"],
                      help="levers after which a full-split evaluation is timed")
    step.add_argument("--eval-batches", type=int, nargs="+", default=[16, 64], help="clips per evaluation step")
    step.add_argument("--eval-clips", type=int, default=CLOTHO_EVAL_CLIPS, help="timed, then scaled to 1,045")
    step.add_argument("--deadline", type=float, help="skip compiled levers if this many seconds have passed")
    step.add_argument("--profile-after", choices=LEVERS, help="profile five training steps after this lever")
    step.add_argument("--profile-file", default="stage1_profile.txt")
    fit = commands.add_parser("fit", help="one epoch of the real experiment on a generated noise data set")
    fit.add_argument("--config", choices=CONFIGS, default="demo")
    fit.add_argument("--data-dir", required=True, help="where the data set is written (reused if present)")
    fit.add_argument("--clips", type=int, nargs=3, default=[600, CLOTHO_EVAL_CLIPS, 20],
                     metavar=("DEV", "VAL", "EVAL"))
    fit.add_argument("--workers", type=int, default=8, help="data_loader.n_workers")
    fit.add_argument("--epochs", type=int, default=2, help="the figures are the last epoch's (the first starts the "
                     "validation workers and compiles)")
    fit.add_argument("--profile-steps", type=int, default=0, help="trace this many steps of one more epoch "
                     "(profile_steps=N) and write the GPU's busy time per step and its kinds of kernel")
    fit.add_argument("--profile-file", default="fit_profile.txt")
    fit.add_argument("--log-file", help="append the training run's output here (default: DATA_DIR/experiment.log)")
    fit.add_argument("settings", nargs="*", help="further key=value settings of the experiment")
    for command, earlier in ((step, "; runs 1-4 of benchmarks/RESULTS.md: 0 0"), (fit, "")):
        command.add_argument("--patchout", type=int, nargs=2, metavar=("TIME", "FREQUENCY"),
                             help="PaSST's structured patchout in training instead of the configuration's (the "
                             f"published (15, 2) for baseline){earlier}")
    plot = commands.add_parser("plot", help="a PNG of samples/s and MFU per lever from a `step --json` file")
    plot.add_argument("--json-in", type=Path, required=True)
    fits = commands.add_parser("plot-fits", help="a PNG of the end-to-end rate of each fit in `fit --json` files")
    fits.add_argument("--json-in", type=Path, nargs="+", required=True)
    for chart in (plot, fits):
        chart.add_argument("--output", type=Path, required=True)
        chart.add_argument("--target", type=float, help="a dashed line at this many samples/s")
    args = parser.parse_args()
    if args.command == "plot":
        plot_levers(lever_rows(args.json_in), args.output, args.target)
    elif args.command == "plot-fits":
        plot_fits(fit_rows(args.json_in), args.output, args.target)
    else:
        bench_step(args) if args.command == "step" else bench_fit(args)


if __name__ == "__main__":
    main()
