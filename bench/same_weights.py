"""Whether two runs ended with the same weights, bit for bit: for checking that a change to
the code leaves training as it was.

    git worktree add /tmp/before REV
    PYTHONPATH=/tmp/before/src python -m simclr_kit run --out /tmp/w/before-demo
    PYTHONPATH=src python -m simclr_kit run --out /tmp/w/after-demo
    python bench/same_weights.py /tmp/w/before-demo /tmp/w/after-demo

Compares the tensors of each run's latest checkpoint (``model.safetensors``; its metadata names
the run's own folder, so the files themselves differ) and exits 1 when any differs.
"""

from __future__ import annotations

import sys

import torch
from safetensors.torch import load_file

from simclr_kit.checkpoint_files import latest_checkpoint


def main(a: str, b: str) -> int:
    files = [latest_checkpoint(run) / "model.safetensors" for run in (a, b)]
    first, second = (load_file(f) for f in files)
    differ = sorted(k for k in first.keys() | second.keys()
                    if k not in first or k not in second or not torch.equal(first[k], second[k]))
    print(f"{files[0]} vs {files[1]}: {len(first)} tensors, "
          + ("bit-identical" if not differ else f"{len(differ)} differ: {differ[:5]}"))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
