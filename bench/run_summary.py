"""What a timed pretraining run did, from its metrics.jsonl (and eval.json when it has one):

    python bench/run_summary.py RUN_DIR BATCH_SIZE

the length a time budget chose, the epochs and wall time, the stored frames, the steady-state
images/s (median of the logged intervals after the first tenth, which holds compilation) and
the kNN accuracy of ``simclr evaluate --protocols knn``. Used by bench/gpu_check.sh.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from simclr_kit.checkpoint_files import latest_checkpoint
from simclr_kit.report.metrics import read_metrics


def main(run: Path, batch: int) -> None:
    records = read_metrics(run / "metrics.jsonl")
    first = next(r for r in records if r["kind"] == "run")
    fit = next((r for r in records if r["kind"] == "budget"), None)
    done = [r for r in records if r["kind"] == "done"][-1]
    meta = json.loads((latest_checkpoint(run) / "model.json").read_text())
    train = [r["images_per_s"] for r in records if r["kind"] == "train"]
    steady = sorted(train[len(train) // 10:])
    print(f"{first['images']} images stored as frames of longer side {meta['store_size']} px, "
          f"views at {meta['image_size']} px; {first['steps_per_epoch']} steps per epoch")
    if fit:
        print(f"budget: {fit['minutes']} min -> {fit['epochs']} epochs "
              f"({fit['seconds_per_step'] * 1000:.1f} ms/step measured after warm-up)")
    print(f"epochs done: {done['epoch']}; training wall time {done['wall_s']:.1f} s "
          f"(compilation and checkpoints included)")
    if steady:
        median = steady[len(steady) // 2]
        print(f"steady state: {median:,.0f} images/s = {1000 * batch / median:.0f} ms/step = "
              f"{first['steps_per_epoch'] * batch / median:.2f} s/epoch (median of "
              f"{len(steady)} logged intervals)")
    if (run / "eval.json").is_file():
        for r in json.loads((run / "eval.json").read_text())["results"]:
            if r["protocol"] == "knn" and r["metric"] == "top1":
                print(f"kNN top-1, {r['encoder']} (k={r['hyperparameters'].get('k')}, "
                      f"{r['split']} split): {r['value']:.2f}%")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
