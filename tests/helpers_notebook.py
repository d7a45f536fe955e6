"""Running a notebook of the repository headless, as tests/test_notebook.py and test_custom_notebook.py do:
in a real Jupyter kernel (nbclient + ipykernel), with its `parameters` cell overridden the way papermill
does it (a cell inserted after it), and reading back what it showed and printed."""

import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def committed_parameters_cell(path) -> str:
    """The source of the notebook's one `parameters` cell, after checking that the committed notebook is
    valid and carries no outputs (they would show a reader another run's results)."""
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for cell in code_cells(notebook):
        assert cell.outputs == [] and cell.execution_count is None, f"outputs left in: {cell.source[:60]!r}"
    tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{len(tagged)} cells tagged parameters"
    return tagged[0].source


def run_notebook(path, **parameters):
    """Executes the notebook at `path` in the repository root with `parameters` overriding its parameters
    cell; any error in a cell raises."""
    notebook = nbformat.read(path, as_version=4)
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
