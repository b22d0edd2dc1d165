"""A small synthetic dataset in the exact Clotho v2.1 layout, for the CPU demo and the tests.

Layout `mixed` (the demo): every clip mixes one to three synthesised sound events that last the whole
clip, and each of its five captions names those events in different words (with 12 events there are
298 event sets: chance mAP@10 on 100 clips is about 0.03). Layout `ordered`, a differently built set
for checking learning claims: every clip holds two events one after the other (the first fills the
first half) and its captions say so in order ("a whistle blows, followed by thunder rumbles"), so the
same pair in the other order is another clip. The development split also gets a ten-caption CSV in the
format of the published Phi-4 overcaptions, so retrieval has to be learned from the audio.
The generator also trains a byte-level BPE tokenizer on the captions and saves a small, randomly
initialised RoBERTa beside the data, so the demo exercises the real `transformers` loading path.

    python -m data_loaders.demo_data --data-dir ~/data --folder-name clotho_demo
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile

from data_loaders.clotho_v2 import PHI4_CAPTIONS_FILE
from utils.cli import bounded
from utils.paths import default_data_dir

SOURCE_RATE = 44100
DEMO_SPLITS = {"development": 240, "validation": 40, "evaluation": 100}
TEXT_MODEL_FOLDER = "roberta-tiny"
Synth = Callable[[np.random.Generator, int], np.ndarray]


def _time(samples: int) -> np.ndarray:
    return np.arange(samples) / SOURCE_RATE


def _events_at(rng: np.random.Generator, samples: int, mean_gap_seconds: float) -> np.ndarray:
    """Onset sample indices of a sound repeated through the whole clip."""
    onsets, position = [], rng.uniform(0, mean_gap_seconds)
    while position < samples / SOURCE_RATE:
        onsets.append(int(position * SOURCE_RATE))
        position += rng.uniform(0.6, 1.4) * mean_gap_seconds
    return np.array(onsets, dtype=int)


def _place(signal: np.ndarray, sound: np.ndarray, onsets: np.ndarray) -> np.ndarray:
    for onset in onsets:
        end = min(len(signal), onset + len(sound))
        signal[onset:end] += sound[:end - onset]
    return signal


def _tone_burst(frequencies: list[float], seconds: float, decay: float) -> np.ndarray:
    t = _time(int(seconds * SOURCE_RATE))
    tone = sum(np.sin(2 * np.pi * f * t) / (i + 1) for i, f in enumerate(frequencies))
    return tone * np.exp(-t / decay) * np.minimum(1.0, t * 200)


def _lowpass(noise: np.ndarray, width: int) -> np.ndarray:
    return np.convolve(noise, np.ones(width) / width, mode="same")


def dog(rng, n):
    f0 = rng.uniform(350, 600)
    bark = _tone_burst([f0, 2 * f0, 3 * f0, 4.2 * f0], 0.18, 0.06)
    return _place(np.zeros(n), bark, _events_at(rng, n, 0.9))


def bell(rng, n):
    f0 = rng.uniform(500, 900)
    strike = _tone_burst([f0, 2.76 * f0, 5.4 * f0, 8.93 * f0], 2.0, 0.7)
    return _place(np.zeros(n), strike, _events_at(rng, n, 2.5))


def siren(rng, n):
    t = _time(n)
    frequency = 900 + 300 * np.sin(2 * np.pi * t / rng.uniform(2, 4))
    return np.sin(2 * np.pi * np.cumsum(frequency) / SOURCE_RATE)


def rain(rng, n):
    hiss = np.diff(rng.standard_normal(n + 1)) * 0.3
    drops = _place(np.zeros(n), _tone_burst([rng.uniform(2000, 4000)], 0.02, 0.004), _events_at(rng, n, 0.05))
    return hiss + drops


def birds(rng, n):
    length = int(0.08 * SOURCE_RATE)
    t = _time(length)
    start = rng.uniform(3000, 4500)
    chirp = np.sin(2 * np.pi * (start * t + 12000 * t ** 2)) * np.hanning(length)
    return _place(np.zeros(n), chirp, _events_at(rng, n, 0.25))


def engine(rng, n):
    t = _time(n)
    f0 = rng.uniform(40, 70)
    harmonics = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 8))
    return harmonics * (1 + 0.3 * np.sin(2 * np.pi * 8 * t))


def wind(rng, n):
    gust = 0.6 + 0.4 * np.sin(2 * np.pi * _time(n) / rng.uniform(3, 6))
    return _lowpass(rng.standard_normal(n), 40) * 4 * gust


def knocking(rng, n):
    knock = _tone_burst([rng.uniform(120, 180), 420], 0.12, 0.03)
    triple = _place(np.zeros(int(0.8 * SOURCE_RATE)), knock, (np.array([0, 0.25, 0.5]) * SOURCE_RATE).astype(int))
    return _place(np.zeros(n), triple, _events_at(rng, n, 2.5)) * 1.5


def whistle(rng, n):
    t = _time(n)
    frequency = rng.uniform(1500, 2500) + 40 * np.sin(2 * np.pi * 6 * t)
    on = (np.sin(2 * np.pi * t / rng.uniform(1.5, 2.5)) > 0).astype(float)
    return np.sin(2 * np.pi * np.cumsum(frequency) / SOURCE_RATE) * _lowpass(on, 400)


def clapping(rng, n):
    clap = rng.standard_normal(int(0.01 * SOURCE_RATE)) * np.hanning(int(0.01 * SOURCE_RATE))
    return _place(np.zeros(n), clap, _events_at(rng, n, 0.03)) * 1.5


def horn(rng, n):
    t = _time(int(0.6 * SOURCE_RATE))
    beep = np.sign(np.sin(2 * np.pi * 400 * t)) + np.sign(np.sin(2 * np.pi * 500 * t))
    return _place(np.zeros(n), beep * 0.3 * np.minimum(1, t * 50), _events_at(rng, n, 1.6))


def thunder(rng, n):
    length = int(3 * SOURCE_RATE)
    rumble = _lowpass(rng.standard_normal(length), 200) * 12 * np.exp(-_time(length) / 1.0)
    return _place(np.zeros(n), rumble, _events_at(rng, n, 4.0))


# Each event: its synthesiser, metadata keyword, and phrasings a caption may use.
EVENTS: dict[str, tuple[Synth, list[str]]] = {
    "dog": (dog, ["a dog barks", "a dog is barking", "a barking dog", "a dog barks repeatedly"]),
    "bell": (bell, ["a bell rings", "a bell is ringing", "a ringing bell", "a bell chimes"]),
    "siren": (siren, ["a siren wails", "a siren is blaring", "an emergency siren", "a wailing siren"]),
    "rain": (rain, ["rain falls", "rain is pouring", "falling rain", "rain patters steadily"]),
    "birds": (birds, ["birds chirp", "birds are singing", "chirping birds", "birds tweet"]),
    "engine": (engine, ["an engine hums", "an engine is idling", "a humming motor", "a motor runs"]),
    "wind": (wind, ["wind blows", "the wind is howling", "gusts of wind", "a strong wind blows"]),
    "knocking": (knocking, ["someone knocks on a door", "knocking on a door", "a person knocks",
                            "a door is knocked on"]),
    "whistle": (whistle, ["someone whistles", "a whistle blows", "a high whistle", "a person is whistling"]),
    "clapping": (clapping, ["people clap", "an audience applauds", "hands are clapping", "applause"]),
    "horn": (horn, ["a car horn honks", "a horn is honking", "a car honks", "a honking horn"]),
    "thunder": (thunder, ["thunder rumbles", "thunder is rolling", "rumbling thunder", "thunder crashes"]),
}
JOINERS = ["{} while {}", "{} and {}", "{} as {} in the background", "{}, and {}", "{} with {}"]
ORDERED_JOINERS = ["{}, followed by {}", "first {}, then {}", "{}, after that {}", "{} and then {}",
                   "{} before {}"]
LAYOUTS = ("mixed", "ordered")
SINGLE = ["{}", "{} in a quiet place", "{} nearby", "{} close to the microphone", "{} for a while"]
NON_ASCII_MANUFACTURERS = ["Jürgen", "Zoë", "Ångström", "alice", "bob"]


def caption_for(events: list[str], rng: np.random.Generator) -> str:
    phrases = [EVENTS[event][1][rng.integers(len(EVENTS[event][1]))] for event in rng.permutation(events)]
    if len(phrases) == 1:
        text = SINGLE[rng.integers(len(SINGLE))].format(phrases[0])
    else:
        text = phrases[0]
        for phrase in phrases[1:]:
            text = JOINERS[rng.integers(len(JOINERS))].format(text, phrase)
    return text[0].upper() + text[1:] + "."


def ordered_caption_for(events: list[str], rng: np.random.Generator) -> str:
    first, second = (EVENTS[event][1][rng.integers(len(EVENTS[event][1]))] for event in events)
    text = ORDERED_JOINERS[rng.integers(len(ORDERED_JOINERS))].format(first, second)
    return text[0].upper() + text[1:] + "."


def synthesise_clip(events: list[str], seconds: float, rng: np.random.Generator, ordered: bool = False) -> np.ndarray:
    """Events mixed over the whole clip, or (`ordered`) each in its own consecutive part of it."""
    samples = int(seconds * SOURCE_RATE)
    mix = 0.003 * rng.standard_normal(samples)
    bounds = np.linspace(0, samples, len(events) + 1).astype(int) if ordered else [0] * len(events) + [samples]
    for index, event in enumerate(events):
        start, end = (bounds[index], bounds[index + 1]) if ordered else (0, samples)
        sound = EVENTS[event][0](rng, end - start)
        mix[start:end] += rng.uniform(0.5, 1.0) * sound / (np.abs(sound).max() + 1e-9)
    return (0.9 * mix / np.abs(mix).max()).astype(np.float32)


def write_captions_csv(path: Path, rows: list[list[str]]) -> None:
    """Clotho's captions CSV: `file_name, caption_1..caption_N` (N from the rows)."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        header = ["file_name"] + [f"caption_{i}" for i in range(1, len(rows[0]))]
        csv.writer(handle).writerows([header, *rows])


def _write_split(folder: Path, split: str, clips: int, rng: np.random.Generator, layout: str = "mixed") -> list[str]:
    audio_folder = folder / split
    audio_folder.mkdir(parents=True)
    names = list(EVENTS)
    caption_rows, metadata_rows, augmented_rows, all_captions = [], [], [], []
    for index in range(clips):
        ordered = layout == "ordered"
        if ordered:
            events = rng.choice(names, size=2, replace=False).tolist()
        else:
            events = sorted(rng.choice(names, size=rng.choice([1, 2, 2, 3]), replace=False).tolist())
        describe = ordered_caption_for if ordered else caption_for
        file_name = f"demo {split} clip {index:04d}.wav"
        soundfile.write(audio_folder / file_name, synthesise_clip(events, rng.uniform(15, 30), rng, ordered),
                        SOURCE_RATE, subtype="PCM_16")
        captions = [describe(events, rng) for _ in range(5)]
        all_captions += captions
        caption_rows.append([file_name, *captions])
        augmented_rows.append([file_name, *captions, *[describe(events, rng) for _ in range(5)]])
        metadata_rows.append([file_name, ";".join(events), index, f"https://example.org/demo/{index}",
                              "[0, 0]", NON_ASCII_MANUFACTURERS[index % len(NON_ASCII_MANUFACTURERS)], "CC0"])
    write_captions_csv(folder / f"clotho_captions_{split}.csv", caption_rows)
    if split == "development":  # stands in for the Phi-4 overcaptions: five more paraphrases per clip
        write_captions_csv(folder / PHI4_CAPTIONS_FILE, augmented_rows)
    with open(folder / f"clotho_metadata_{split}.csv", "w", newline="", encoding="ISO-8859-1") as handle:
        csv.writer(handle).writerows([["file_name", "keywords", "sound_id", "sound_link", "start_end_samples",
                                       "manufacturer", "license"], *metadata_rows])
    return all_captions


def write_text_model(folder: Path, captions: list[str], hidden_size: int = 128, layers: int = 2,
                     attention_heads: int = 4, intermediate_size: int | None = None,
                     vocab_size: int | None = None, seed: int = 0) -> Path:
    """A BPE tokenizer trained on the captions and a RoBERTa initialised from `seed`, saved as a transformers model.

    The defaults make the demo's tiny model; benchmarks pass RoBERTa-large's sizes (its vocabulary included). The
    caller's random numbers are left as they were."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    from models.text.transformer import normalize_caption

    target = folder / TEXT_MODEL_FOLDER
    specials = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
                "mask_token": "<mask>"}
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([normalize_caption(c) for c in captions], vocab_size=600, min_frequency=1,
                            special_tokens=list(specials.values()), show_progress=False)
    bpe.post_processor = RobertaProcessing(("</s>", bpe.token_to_id("</s>")), ("<s>", bpe.token_to_id("<s>")))
    tokenizer = RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, cls_token="<s>", sep_token="</s>",
                                     model_max_length=64, **specials)
    tokenizer.save_pretrained(target)
    config = RobertaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=hidden_size, num_hidden_layers=layers,
                           num_attention_heads=attention_heads, intermediate_size=intermediate_size or 2 * hidden_size,
                           max_position_embeddings=66,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RobertaModel(config, add_pooling_layer=False)
    model.save_pretrained(target)
    return target


def generate_demo_dataset(folder: Path, splits: dict[str, int] | None = None, seed: int = 0,
                          layout: str = "mixed") -> Path:
    """Write the dataset into `folder` (built in a temporary sibling, renamed into place when complete)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {', '.join(LAYOUTS)}")
    empty = [split for split, clips in (splits or {}).items() if clips < 1]
    if empty:
        raise ValueError(f"splits={splits}: {', '.join(empty)} would hold no clip (at least 1 each)")
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} already exists; remove it to generate the demo dataset again")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        rng = np.random.default_rng(seed)
        captions = []
        for split, clips in (splits or DEMO_SPLITS).items():
            captions += _write_split(staging, split, clips, rng, layout)
        write_text_model(staging, captions, seed=seed)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=default_data_dir(), help="directories.data_dir (default: %(default)s)")
    parser.add_argument("--folder-name", default="clotho_demo", help="clotho_v2.folder_name (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=LAYOUTS, default="mixed", help="mixed (the demo) or ordered events")
    parser.add_argument("--clips", type=bounded(int, 1), nargs=3, metavar=("DEV", "VAL", "EVAL"),
                        help=f"clips per split (default: {' '.join(map(str, DEMO_SPLITS.values()))})")
    parser.add_argument("--if-missing", action="store_true", help="do nothing if the folder already exists")
    args = parser.parse_args()
    folder = Path(args.data_dir).expanduser() / args.folder_name
    if args.if_missing and folder.exists():
        print(f"demo dataset already at {folder}")
        return
    splits = dict(zip(DEMO_SPLITS, args.clips)) if args.clips else None
    generate_demo_dataset(folder, splits, seed=args.seed, layout=args.layout)
    print(f"demo dataset written to {folder}")


if __name__ == "__main__":
    main()
