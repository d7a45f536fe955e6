"""demo.ipynb runs top to bottom, headless, in a real Jupyter kernel (nbclient + ipykernel).

The notebook's parameters cell is overridden the way papermill does it: a cell inserted after it sets a
tiny data set and a missing checkpoint, so the notebook takes its "train a short run" branch; a second
execution then finds that run's checkpoint and loads it. Any error in a cell fails the test.
"""

import os

import pytest
from helpers_notebook import ROOT, committed_parameters_cell, pictures, printed, run_notebook

import shapes

NOTEBOOK = os.path.join(ROOT, "demo.ipynb")
# Pictures the notebook draws: curves, anchors, proposals, refinement, masks, comparison, the three training
# views (RPN targets, sampled RoIs, mask targets), 3 more comparisons, the photo's detections, its proposals
# and its refinement.
PICTURES = 15


def test_notebook_is_committed_without_outputs():
    assert "CHECKPOINT" in committed_parameters_cell(NOTEBOOK)


@pytest.fixture(scope="module")
def data(module_tmp_path):
    root = module_tmp_path / "shapes"
    shapes.generate(root, train=16, val=4, size=64, seed=0)
    return root


def test_notebook_trains_a_short_run_then_loads_it(data, tmp_path):
    run = tmp_path / "run"
    first = run_notebook(NOTEBOOK, CHECKPOINT=str(tmp_path / "missing.pth"), DATA=str(data), SHORT_RUN=str(run),
                         SHORT_RUN_ITERS=2)
    assert "training a short run of 2 steps" in printed(first)
    assert (run / "last.pth").exists() and (run / "log.jsonl").exists()
    assert len(pictures(first)) == PICTURES

    second = run_notebook(NOTEBOOK, CHECKPOINT=str(run / "last.pth"), DATA=str(data),
                          SHORT_RUN=str(tmp_path / "unused"))
    assert "training a short run" not in printed(second)
    assert f"{run / 'last.pth'}: classes ('square', 'circle', 'triangle', 'star')" in printed(second)
    assert not (tmp_path / "unused").exists()
    assert len(pictures(second)) == PICTURES
