"""The README's cifar10-mini table: its two commands, run as a user runs them, and the table.

    python bench/mini_table.py [--data ../shared/datasets/cifar10-mini]

Runs, each in its own process and in a temporary folder (so ``runs/mini`` is
``TMP/runs/mini``), exactly the commands the README's Evaluation section gives:

    simclr pretrain --data DATA --epochs 1 --batch-size 64 --image-size 16 --out runs/mini \\
        --monitor-knn 1
    simclr evaluate runs/mini --protocols knn,linear,fractions,finetune --finetune-epochs 1 \\
        --baseline random

then prints the README's abridged table (top-1 of kNN at the first k, the linear probe, the 10%
label fraction and fine-tuning; the lines of ``eval.md``) and the line under it (date, CPU
cores, the verdict sentence ``simclr run`` prints), then each command's wall time with the load
average. Rerun it whenever a default that these commands use changes, and paste the table and
the line under it into the README.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from simclr_kit.evaluation.tables import markdown_table, result_verdict

MINI = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-mini"
PRETRAIN = ["pretrain", "--data", "{data}", "--epochs", "1", "--batch-size", "64",
            "--image-size", "16", "--out", "runs/mini", "--monitor-knn", "1"]
EVALUATE = ["evaluate", "runs/mini", "--protocols", "knn,linear,fractions,finetune",
            "--finetune-epochs", "1", "--baseline", "random"]


def abridged(rows: list[dict]) -> list[dict]:
    """The README's lines: top-1 of kNN (the first k), linear, the 10% fraction, fine-tune."""
    knn_k = next((r["hyperparameters"]["k"] for r in rows if r["protocol"] == "knn"), None)
    keep = []
    for r in rows:
        if r["metric"] != "top1":
            continue
        if r["protocol"] == "knn" and r["hyperparameters"]["k"] != knn_k:
            continue
        if r["protocol"] == "fractions" and r.get("subset") != "10%":
            continue
        keep.append(r)
    return keep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=MINI, help="the cifar10-mini Parquet folder")
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"{args.data} not found: pass --data PATH/cifar10-mini")
    simclr = Path(sys.executable).with_name("simclr")
    seconds = []
    with tempfile.TemporaryDirectory() as tmp:
        for command in (PRETRAIN, EVALUATE):
            words = [w.format(data=args.data.resolve()) for w in command]
            started = time.perf_counter()
            done = subprocess.run([str(simclr), *words], cwd=tmp, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True,
                                  env=dict(os.environ, TQDM_DISABLE="1"))
            seconds.append(time.perf_counter() - started)
            if done.returncode:  # the progress bars stay quiet; a failure shows its end
                sys.exit(f"simclr {' '.join(words)} failed:\n{done.stderr[-3000:]}")
        result = json.loads((Path(tmp) / "runs" / "mini" / "eval.json").read_text())
    print(markdown_table(abridged(result["results"])), end="")
    print(f"\n(Rows abridged; {datetime.date.today()}, {os.cpu_count()}-core CPU. "
          f"{result_verdict(result)}.)\n")
    print(f"wall time (s): pretrain {seconds[0]:.0f}, evaluate {seconds[1]:.0f}; "
          f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
