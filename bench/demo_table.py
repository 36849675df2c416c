"""The README's demo table: ``simclr run --seed S`` for several seeds, as a new user runs it.

    python bench/demo_table.py --seeds 0 1 2 [-- EXTRA SIMCLR RUN FLAGS]

Each seed runs the real command in its own process (wall time includes the ~8 s of importing
torch), then the table of top-1 accuracies is printed in Markdown with the mean and each run's
wall time. Extra flags after ``--`` go to every ``simclr run`` (e.g. ``-- --epochs 10``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def top1(result: dict, encoder: str, protocol: str) -> float:
    return next(r["value"] for r in result["results"] if r["encoder"] == encoder
                and r["protocol"] == protocol and r["metric"] == "top1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("extra", nargs="*", help="flags for every simclr run (after --)")
    args = parser.parse_args()
    simclr = Path(sys.executable).with_name("simclr")
    rows, seconds = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            out = Path(tmp) / f"seed{seed}"
            started = time.perf_counter()
            subprocess.run([str(simclr), "run", "--seed", str(seed), "--out", str(out),
                            *args.extra], check=True, stdout=subprocess.DEVNULL,
                           env=dict(os.environ, TQDM_DISABLE="1"))
            seconds.append(time.perf_counter() - started)
            result = json.loads((out / "eval.json").read_text())
            rows.append([top1(result, e, p) for p in ("knn", "linear")
                         for e in ("simclr", "random-init")])
    print("| seed | kNN, SimCLR | kNN, random init | linear, SimCLR | linear, random init |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for seed, row in zip(args.seeds, rows):
        print(f"| {seed} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    means = [sum(col) / len(col) for col in zip(*rows)]
    print("| mean | " + " | ".join(f"{v:.2f}" for v in means) + " |")
    knn_gaps = [r[0] - r[1] for r in rows]
    linear_gaps = [r[2] - r[3] for r in rows]
    print(f"\nkNN gap per seed: {', '.join(f'{g:+.2f}' for g in knn_gaps)}; "
          f"linear gap per seed: {', '.join(f'{g:+.2f}' for g in linear_gaps)}")
    print(f"wall time of each simclr run (s): {', '.join(f'{s:.0f}' for s in seconds)}; "
          f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
