"""Full-split TAP scoring at Clotho's size: blocked closed form vs the per-clip loop.

    python -m benchmarks.bench_tap_scoring [--device cuda] [--loop-clips 20]

5,225 captions x 1,045 clips, 6 windows of 5 s per clip, shared width 1,024, TAP width 1,024.
The per-clip loop is how a straightforward implementation scores: for each clip, pool it once per
caption (attention, output projection, LayerNorm, normalisation) and take the dot product. It is
timed on `--loop-clips` clips and scaled to 1,045.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from models.pooling import TextAwareAttentionPooling

CAPTIONS, CLIPS, WINDOWS, WIDTH = 5225, 1045, 6, 1024


def per_clip_loop(tap: TextAwareAttentionPooling, text, windows, mask) -> torch.Tensor:
    query = tap.query(tap.text_norm(text))
    columns = []
    for clip in range(len(windows)):
        normed = tap.window_norm(windows[clip][mask[clip]])
        weights = (query @ tap.key(normed).t() / query.shape[-1] ** 0.5).softmax(dim=-1)
        pooled = tap.output_norm(tap.output(weights @ tap.value(normed)))
        columns.append((F.normalize(pooled, dim=-1) * text).sum(-1))
    return torch.stack(columns, dim=1)


def timed(function, device: str) -> tuple[torch.Tensor, float]:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = function()
    if device == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--loop-clips", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(CAPTIONS, WIDTH, generator=generator), dim=-1).to(args.device)
    windows = torch.randn(CLIPS, WINDOWS, WIDTH, generator=generator).to(args.device)
    valid = torch.randint(3, WINDOWS + 1, (CLIPS,), generator=generator)  # Clotho clips are 15-30 s
    mask = (torch.arange(WINDOWS).unsqueeze(0) < valid.unsqueeze(1)).to(args.device)
    tap = TextAwareAttentionPooling(WIDTH, dim=1024).to(args.device).eval()
    with torch.no_grad():
        timed(lambda: tap.score(text, windows, mask), args.device)  # warm-up
        blocked_times = []
        for _ in range(args.repeats):
            scores, seconds = timed(lambda: tap.score(text, windows, mask), args.device)
            blocked_times.append(seconds)
        subset = slice(0, args.loop_clips)
        reference, loop_seconds = timed(lambda: per_clip_loop(tap, text, windows[subset], mask[subset]), args.device)
    error = (scores[:, subset] - reference).abs().max().item()
    loop_full = loop_seconds * CLIPS / args.loop_clips
    blocked = min(blocked_times)
    name = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
    print(f"device={args.device} ({name}); scores {tuple(scores.shape)}: blocked {blocked:.2f} s (best of "
          f"{args.repeats}); per-clip loop {loop_full:.1f} s (timed on {args.loop_clips} clips, scaled); "
          f"speed-up {loop_full / blocked:.0f}x; max |difference| {error:.2e}")


if __name__ == "__main__":
    main()
