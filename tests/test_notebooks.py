"""The notebooks in notebooks/ run top to bottom on a fresh kernel, and are stored without outputs."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import NoSuchKernel

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300


def test_notebooks_exist():
    names = {p.stem for p in NOTEBOOKS}
    assert {"hf_trainer_hooks", "analyse_runs", "imax_vs_dmax"} <= names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"{path.name} cell {i} has outputs: strip them"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path):
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    # The "python3" kernel spec launches `python`, which jupyter_client maps to sys.executable:
    # the notebook runs in this interpreter's environment (the venv with dynamics installed).
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},
        extra_arguments=["--HistoryManager.enabled=False"],
    )
    try:
        client.execute()
    except NoSuchKernel:  # pragma: no cover - environment problem, not a notebook bug
        pytest.fail(f"no 'python3' Jupyter kernel: pip install ipykernel into {sys.prefix}")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
