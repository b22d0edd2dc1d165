"""Does a pooling learn, and how much does it vary? Test metrics of `demo` runs over data sets and seeds.

    python -m benchmarks.bench_learning --data-dir /tmp/learning --datasets mixed:0 ordered:1 \\
        --aggregates mean TAP TAP_own_caption --seeds 409194 1 2 [--set key=value ...] [--label NAME] \\
        [--reference LABEL]

Each data set is generated once (`layout:seed`, in the Clotho layout, with its own tokenizer and tiny
RoBERTa); every (data set, aggregate, seed) is one real run of `python -m experiments.ex_dcase24 with demo`
with the published TAP keys (5 s windows, hop 5, dropout 0.1). Results are appended to
`<data-dir>/results.jsonl` as they finish (a rerun skips what is there), then summarised as mean and range;
with `--reference`, each variant also as its difference from the reference variant seed by seed.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from data_loaders.demo_data import DEMO_SPLITS, LAYOUTS, TEXT_MODEL_FOLDER, generate_demo_dataset
from models.pooling import AGGREGATIONS
from utils.metrics import chance_metrics

REPO = Path(__file__).resolve().parents[1]
PUBLISHED_TAP_KEYS = ["tap_hyperparams.p_dropout_weights=0.1", "tap_hyperparams.p_dropout_proj=0.1",
                      "audio_features.segment_length=5", "audio_features.hop_length=5"]
SMALL_SPLITS = {"development": 160, "validation": 40, "evaluation": 40}


def dataset_spec(text: str) -> str:
    """A `type=` for argparse: `layout:seed`, checked before the first data set is written or run trains."""
    layout, _, seed = text.partition(":")
    if layout not in LAYOUTS or not seed.isdigit():
        raise argparse.ArgumentTypeError(f"expected layout:seed, the layout {' or '.join(LAYOUTS)} and the seed an "
                                         f"integer >= 0 (e.g. ordered:1), got {text!r}")
    return text


def dataset(data_dir: Path, spec: str) -> tuple[str, int]:
    """`layout:seed` -> folder name below data_dir and its test-split size (generated if absent)."""
    layout, seed = spec.split(":")
    splits = DEMO_SPLITS if layout == "mixed" else SMALL_SPLITS
    name = f"{layout}_seed{seed}"
    if not (data_dir / name).exists():
        generate_demo_dataset(data_dir / name, splits, seed=int(seed), layout=layout)
    return name, splits["evaluation"]


def run(data_dir: Path, folder: str, aggregate: str, seed: int, extra: list[str]) -> dict:
    return run_demo_on(data_dir, folder, [*PUBLISHED_TAP_KEYS, f"audio_features.aggregate={aggregate}", f"seed={seed}",
                                          *extra])


def run_demo_on(data_dir: Path, folder: str, settings: list[str], command_name: str | None = None) -> dict:
    """`python -m experiments.ex_dcase24 [command] with demo` on a generated data set: its result and minutes."""
    command = [sys.executable, "-m", "experiments.ex_dcase24", *([command_name] if command_name else []), "with",
               "demo", f"directories.data_dir={data_dir}", f"clotho_v2.folder_name={folder}", "stand_in_models=False",
               f"sentence_features.model={folder}/{TEXT_MODEL_FOLDER}", *settings]
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                               capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stderr[-3000:]}")
    result_line = [line for line in completed.stderr.splitlines() if "Result: {" in line][-1]
    return {"result": ast.literal_eval(result_line.split("Result: ", 1)[1]),
            "minutes": round((time.perf_counter() - started) / 60, 2)}


def paired_differences(rows: list[dict], reference: str) -> dict[tuple[str, str, str], list[float]]:
    """(label, data set, pooling) -> its mAP@10 minus the reference label's, seed by seed. Seeds spread these runs
    more than most changes move them; a difference taken within a seed cancels what the seed does to both."""
    reference_scores = {(row["dataset"], row["aggregate"], row["seed"]): row["result"]["mAP@10"]
                        for row in rows if row["label"] == reference}
    differences: dict[tuple[str, str, str], list[float]] = {}
    for row in rows:
        same_run = (row["dataset"], row["aggregate"], row["seed"])
        if row["label"] != reference and same_run in reference_scores:
            differences.setdefault((row["label"], row["dataset"], row["aggregate"]), []).append(
                row["result"]["mAP@10"] - reference_scores[same_run])
    return differences


def variant_columns(label: str, spec: str, aggregate: str) -> str:
    return f"{label:<14} {spec:<12} {aggregate:<16}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--datasets", type=dataset_spec, nargs="+", default=["mixed:0", "ordered:1"],
                        help="layout:seed")
    parser.add_argument("--aggregates", nargs="+", choices=AGGREGATIONS, default=list(AGGREGATIONS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[409194, 1, 2])
    parser.add_argument("--set", nargs="*", default=[], dest="extra",
                        help="more config updates: key=value, or a named config (fast_gpu)")
    parser.add_argument("--label", default="", help="name of this variant in the results file")
    parser.add_argument("--reference", help="a label: print every other label's per-seed difference from it")
    args = parser.parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    results_path = args.data_dir / "results.jsonl"
    done = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.exists() else []
    for spec in args.datasets:
        folder, test_clips = dataset(args.data_dir, spec)
        for aggregate in args.aggregates:
            for seed in args.seeds:
                key = {"label": args.label, "dataset": spec, "aggregate": aggregate, "seed": seed}
                if any(all(row.get(k) == v for k, v in key.items()) for row in done):
                    continue
                row = {**key, **run(args.data_dir, folder, aggregate, seed, args.extra),
                       "chance": chance_metrics(test_clips)["mAP@10"], "settings": args.extra}
                print(json.dumps(row), flush=True)
                done.append(row)
                with open(results_path, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
    print(f"\n{variant_columns('label', 'data set', 'aggregate')} mAP@10 mean [min, max] over seeds (chance)")
    groups: dict[tuple, list[dict]] = {}
    for row in done:
        groups.setdefault((row["label"], row["dataset"], row["aggregate"]), []).append(row)
    for (label, spec, aggregate), rows in sorted(groups.items()):
        scores = [row["result"]["mAP@10"] for row in rows]
        print(f"{variant_columns(label, spec, aggregate)} {statistics.mean(scores):.3f} [{min(scores):.3f}, "
              f"{max(scores):.3f}] n={len(scores)} ({rows[0]['chance']:.3f})")
    if args.reference:
        print(f"\nmAP@10 minus {args.reference}'s on the same data set, pooling and seed: mean [min, max]")
        for (label, spec, aggregate), differences in sorted(paired_differences(done, args.reference).items()):
            print(f"{variant_columns(label, spec, aggregate)} {statistics.mean(differences):+.3f} "
                  f"[{min(differences):+.3f}, {max(differences):+.3f}] n={len(differences)}")


if __name__ == "__main__":
    main()
