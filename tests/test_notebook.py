"""examples/quickstart.ipynb runs top to bottom (with tiny parameters), so it cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import write_parquet_dataset

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def test_quickstart_notebook_executes(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    data = write_parquet_dataset(tmp_path / "pq", n_per_class=8, size=8)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert "EPOCHS = " in params.source  # the cell the test overrides is the one users edit
    params.source += (f"\nDATA = {str(data)!r}\nEPOCHS = 1\nBATCH_SIZE = 8\n"
                      f"CLASSIFIER_EPOCHS = 2\nOUT_DIR = {str(tmp_path / 'runs')!r}\n"
                      "DEVICE = 'cpu'\n")
    # The kernel inherits this process's environment: private cache, offline, no progress bars.
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    assert "validation accuracy of the reloaded classifier" in outputs
    assert "predicted 'c" in outputs
    assert (tmp_path / "runs" / "classifier" / "classifier.safetensors").is_file()
