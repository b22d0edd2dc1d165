"""Does stage 2 help on the demo? Stage 1 -> embeddings -> stage 2 over data sets and seeds, test metrics of both.

    python -m benchmarks.bench_stage2 --data-dir /tmp/stage2 --datasets mixed:0 ordered:1 --seeds 409194 1 2

For each (data set, seed): a stage-1 `demo` run (mean pooling, the published defaults), its embeddings of the
training set (`cmd_generate_embeddings`, load_last=best), and a stage-2 run with salsa's keys (`load_parameters`,
`load_last=best loss_weight=0.0 distill_weight=1.0 distill_from`) and another seed. Results are appended to
`<data-dir>/stage2.jsonl` as they finish (a rerun skips what is there).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.bench_learning import dataset, dataset_spec, run_demo_on
from utils.metrics import chance_metrics


def newest_run(data_dir: Path) -> Path:
    return max((data_dir / "runs").iterdir(), key=lambda folder: folder.stat().st_mtime)


def stage1_then_stage2(data_dir: Path, folder: str, seed: int, extra: list[str]) -> dict:
    stage1 = run_demo_on(data_dir, folder, [f"seed={seed}", *extra])
    run = str(newest_run(data_dir))
    embeddings = run_demo_on(data_dir, folder, [f"load_parameters={run}"], "cmd_generate_embeddings")
    stage2 = run_demo_on(data_dir, folder, [f"seed={seed + 1}", f"load_parameters={run}", "load_last=best",
                                            "loss_weight=0.0", "distill_weight=1.0", f"distill_from={run}", *extra])
    return {"stage1": stage1["result"], "stage2": stage2["result"], "embeddings": embeddings["result"],
            "minutes": round(stage1["minutes"] + embeddings["minutes"] + stage2["minutes"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--datasets", type=dataset_spec, nargs="+", default=["mixed:0"], help="layout:seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[409194, 1, 2])
    parser.add_argument("--set", nargs="*", default=[], dest="extra", help="further key=value settings (both stages)")
    args = parser.parse_args()
    results_file = args.data_dir / "stage2.jsonl"
    done = {(r["dataset"], r["seed"]) for r in map(json.loads, results_file.read_text().splitlines())} \
        if results_file.exists() else set()
    for spec in args.datasets:
        folder, test_clips = dataset(args.data_dir, spec)
        for seed in args.seeds:
            if (spec, seed) in done:
                continue
            record = {"dataset": spec, "seed": seed, "extra": args.extra, **stage1_then_stage2(
                args.data_dir, folder, seed, args.extra), "chance": chance_metrics(test_clips)["mAP@10"]}
            with open(results_file, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
    records = [json.loads(line) for line in results_file.read_text().splitlines()]
    for spec in args.datasets:
        rows = [r for r in records if r["dataset"] == spec]
        gains = [r["stage2"]["mAP@10"] - r["stage1"]["mAP@10"] for r in rows]
        if gains:
            print(f"{spec}: stage 1 " + " / ".join(f"{r['stage1']['mAP@10']:.3f}" for r in rows)
                  + ", stage 2 " + " / ".join(f"{r['stage2']['mAP@10']:.3f}" for r in rows)
                  + f", mean change {statistics.mean(gains):+.3f} [{min(gains):+.3f}, {max(gains):+.3f}]")


if __name__ == "__main__":
    main()
