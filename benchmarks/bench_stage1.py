"""Training throughput and full-split evaluation time of the stage-1 model.

    python -m benchmarks.bench_stage1 --config demo        # CPU-sized models (the `demo` named config)
    python -m benchmarks.bench_stage1 --config baseline    # PaSST-S + RoBERTa-large architectures

Weights are random (the architectures, not the weights, set the cost), audio is random with Clotho's
15-30 s lengths, captions are drawn from the demo vocabulary. Evaluation is timed on `--eval-clips`
clips with five captions each and scaled to Clotho's evaluation split (1,045 clips, 5,225 captions).
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from data_loaders.demo_data import EVENTS, caption_for, write_text_model
from models.audio.passt import SAMPLE_RATE, PasstEncoder
from models.losses import multi_positive_contrastive_loss
from models.pooling import MeanPooling
from models.retrieval_model import RetrievalModel
from models.text.transformer import TextEncoder

CLOTHO_EVAL_CLIPS = 1045
CONFIGS = {
    "demo": dict(audio="passt_small", window_seconds=5, text_hidden=128, text_layers=2, shared=128,
                 batch_size=32, crop_seconds=5),
    "baseline": dict(audio="passt", window_seconds=10, text_hidden=1024, text_layers=24, shared=1024,
                     batch_size=16, crop_seconds=None),
}


def random_batch(batch_size: int, crop_seconds: float | None, generator: torch.Generator, device: str):
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=generator)))
    seconds = torch.empty(batch_size).uniform_(15, 30, generator=generator)
    if crop_seconds:
        seconds = seconds.clamp(max=crop_seconds)
    lengths = (seconds * SAMPLE_RATE).long()
    audio = torch.randn(batch_size, 30 * SAMPLE_RATE, generator=generator) * 0.1
    audio *= torch.arange(audio.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    names = list(EVENTS)
    captions = [caption_for(sorted(rng.choice(names, size=2, replace=False).tolist()), rng) for _ in range(batch_size)]
    return audio.to(device), lengths.to(device), captions


def build(config: dict, text_folder: Path, device: str) -> RetrievalModel:
    audio = PasstEncoder(config["audio"], window_seconds=config["window_seconds"],
                         hop_seconds=config["window_seconds"], pretrained=False)
    text = TextEncoder(str(text_folder))
    return RetrievalModel(audio, text, MeanPooling(), config["shared"]).to(device)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=CONFIGS, default="demo")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--eval-clips", type=int, default=CLOTHO_EVAL_CLIPS)
    parser.add_argument("--batch-size", type=int, help="override the configuration's training batch")
    args = parser.parse_args()
    config = dict(CONFIGS[args.config], **({"batch_size": args.batch_size} if args.batch_size else {}))
    generator = torch.Generator().manual_seed(0)
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda")
    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)
        vocabulary = [caption_for(sorted(rng.choice(list(EVENTS), size=2, replace=False).tolist()), rng)
                      for _ in range(2000)]
        text_folder = write_text_model(Path(folder), vocabulary, config["text_hidden"], config["text_layers"])
        model = build(config, text_folder, args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()
    timings = []
    for step in range(args.train_steps + 1):
        audio, lengths, captions = random_batch(config["batch_size"], config["crop_seconds"], generator, args.device)
        synchronize(args.device)
        start = time.perf_counter()
        with autocast:
            windows, mask = model.encode_audio(audio, lengths)
            scores = model.score(model.encode_text(captions), windows, mask)
            loss = multi_positive_contrastive_loss(scores.float(), torch.arange(len(captions), device=args.device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        synchronize(args.device)
        if step:  # the first step pays for allocation and kernel selection
            timings.append(time.perf_counter() - start)
    samples_per_second = config["batch_size"] * len(timings) / sum(timings)

    model.eval()
    eval_batch = config["batch_size"]
    synchronize(args.device)
    start = time.perf_counter()
    with torch.no_grad(), autocast:
        texts, all_windows, all_masks = [], [], []
        for first in range(0, args.eval_clips, eval_batch):
            count = min(eval_batch, args.eval_clips - first)
            audio, lengths, captions = random_batch(count, None, generator, args.device)
            windows, mask = model.encode_audio(audio, lengths)
            all_windows.append(windows.float())
            all_masks.append(mask)
            texts.append(model.encode_text(captions * 5).float())
        scores = model.pooling.score(torch.cat(texts), torch.cat(all_windows), torch.cat(all_masks))
    synchronize(args.device)
    eval_seconds = (time.perf_counter() - start) * CLOTHO_EVAL_CLIPS / args.eval_clips
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
    print(f"config={args.config} device={args.device} ({device_name}) batch={config['batch_size']} "
          f"train={samples_per_second:.2f} samples/s over {len(timings)} steps; "
          f"full evaluation split ({CLOTHO_EVAL_CLIPS} clips, scores {tuple(scores.shape)} measured on "
          f"{args.eval_clips} clips) = {eval_seconds:.1f} s")


if __name__ == "__main__":
    main()
