"""demo.ipynb runs top to bottom, headless, in a real Jupyter kernel (nbclient + ipykernel).

The notebook's parameters cell is overridden the way papermill does it: a cell inserted after it sets a
tiny data set and a missing checkpoint, so the notebook takes its "train a short run" branch; a second
execution then finds that run's checkpoint and loads it. Any error in a cell fails the test.
"""

import os

import nbformat
import pytest
from nbclient import NotebookClient

import shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "demo.ipynb")
# Pictures the notebook draws: curves, anchors, proposals, refinement, masks, comparison, the three training
# views (RPN targets, sampled RoIs, mask targets), 3 more comparisons, the photo's detections, its proposals
# and its refinement.
PICTURES = 15


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def run_notebook(**parameters):
    """Executes demo.ipynb in the repository root with `parameters` overriding its parameters cell."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    overrides = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(overrides))
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    return notebook


def pictures(notebook):
    return [output for cell in code_cells(notebook) for output in cell.outputs
            if output.output_type in ("display_data", "execute_result") and "image/png" in output.get("data", {})]


def printed(notebook):
    return "".join(output.text for cell in code_cells(notebook) for output in cell.outputs
                   if output.output_type == "stream")


def test_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    for cell in code_cells(notebook):
        assert cell.outputs == [] and cell.execution_count is None, f"outputs left in: {cell.source[:60]!r}"
    tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1 and "CHECKPOINT" in tagged[0].source


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("notebook") / "shapes"
    shapes.generate(root, train=16, val=4, size=64, seed=0)
    return root


def test_notebook_trains_a_short_run_then_loads_it(data, tmp_path):
    run = tmp_path / "run"
    first = run_notebook(CHECKPOINT=str(tmp_path / "missing.pth"), DATA=str(data), SHORT_RUN=str(run),
                         SHORT_RUN_ITERS=2)
    assert "training a short run of 2 steps" in printed(first)
    assert (run / "last.pth").exists() and (run / "log.jsonl").exists()
    assert len(pictures(first)) == PICTURES

    second = run_notebook(CHECKPOINT=str(run / "last.pth"), DATA=str(data), SHORT_RUN=str(tmp_path / "unused"))
    assert "training a short run" not in printed(second)
    assert f"{run / 'last.pth'}: classes ('square', 'circle', 'triangle', 'star')" in printed(second)
    assert not (tmp_path / "unused").exists()
    assert len(pictures(second)) == PICTURES
