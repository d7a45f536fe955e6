"""custom_data.ipynb (labelme folder, convert, check, fine-tune, evaluate per class, new images) runs top to
bottom, headless, in a real Jupyter kernel (nbclient + ipykernel).

The parameters cell is overridden the way papermill does it: a cell inserted after it puts the run folder
in tmp_path and makes the labelme folder, the network and the training tiny. The oracles are what the notebook
must have done, read back from the files it wrote and from its outputs: a labelme JSON file beside every
image, a converted data set whose classes are the shapes' four, a checkpoint after the asked number of steps,
the per-class table naming those classes, and one picture per drawing step; run again in the same folder, the
notebook keeps the labelme folder and trains anew. Any error in a cell fails the test.
"""

import json
import os
import re

import torch
from helpers_notebook import ROOT, committed_parameters_cell, pictures, printed, run_notebook

import shapes

NOTEBOOK = os.path.join(ROOT, "custom_data.ipynb")
# Pictures the notebook draws: a converted image's ground truth, the training curves, the confusion matrix
# and the detections on a new image.
PICTURES = 4
TINY = [
    "BACKBONE=resnet18", "NORM=bn", "TRAINABLE_BACKBONE_LAYERS=5", "TRAINING_STAGES=()", "IMAGE_MIN_DIM=64",
    "IMAGE_MAX_DIM=64", "IMAGE_MIN_DIM_TRAIN=(64,)", "FPN_CHANNELS=16", "BOX_HEAD_DIM=32", "MASK_HEAD_CHANNELS=16",
    "MASK_HEAD_CONVS=1", "ANCHOR_SIZES=(8, 16, 32, 64, 128)", "RPN_PRE_NMS_TOP_N_TRAIN=50",
    "RPN_POST_NMS_TOP_N_TRAIN=30", "RPN_PRE_NMS_TOP_N_TEST=50", "RPN_POST_NMS_TOP_N_TEST=30",
    "ROI_BATCH_SIZE_PER_IMAGE=16", "RPN_BATCH_SIZE_PER_IMAGE=32", "BATCH_SIZE=2", "NUM_WORKERS=0", "WARMUP_ITERS=1",
]  # fmt: skip


def test_notebook_is_committed_without_outputs():
    source = committed_parameters_cell(NOTEBOOK)
    assert all(name in source for name in ("RUN =", "LABELME_DIR =", "WEIGHTS =", "ITERS =", "SETTINGS ="))


def test_notebook_goes_from_a_labelme_folder_to_detections_and_runs_again(tmp_path):
    run = tmp_path / "tutorial"
    parameters = dict(RUN=str(run), SHAPES_IMAGES=16, SHAPES_SIZE=64, SETTINGS=TINY, SCALE=1)
    notebook = run_notebook(NOTEBOOK, ITERS=2, **parameters)
    text = printed(notebook)
    # The labelme folder: one JSON file beside each of the 16 images, naming its image.
    labelme = sorted(p.name for p in (run / "labelme").iterdir())
    assert len(labelme) == 32 and [p for p in labelme if p.endswith(".json")] == [
        p.replace(".png", ".json") for p in labelme if p.endswith(".png")]
    assert json.loads((run / "labelme" / "000000.json").read_text())["imagePath"] == "000000.png"
    # Converted: every image in train or val, the classes those of the shapes (category ids by sorted name).
    annotations = run / "data" / "annotations"
    splits = {s: json.loads((annotations / f"instances_{s}.json").read_text()) for s in ("train", "val")}
    assert sum(len(d["images"]) for d in splits.values()) == 16 and all(d["images"] for d in splits.values())
    assert [c["name"] for c in splits["train"]["categories"]] == sorted(shapes.CLASSES)
    assert "0 errors, 0 warnings in train, val" in text
    # Trained for ITERS steps, on the classes of the data.
    checkpoint = torch.load(run / "train" / "last.pth", map_location="cpu", weights_only=False)
    assert checkpoint["iteration"] == 2
    assert tuple(checkpoint["config"]["CLASS_NAMES"]) == ("__background__", *sorted(shapes.CLASSES))
    # Evaluated per class: the last per-class table printed (coco.py evaluate's) has a row for every class,
    # and the confusion matrix was written.
    table = text.rsplit("per class (%):\n", 1)[1].splitlines()
    assert table[0].split()[0] == "class"
    assert sorted(line.split()[0] for line in table[1:5]) == sorted(shapes.CLASSES)
    assert (run / "train" / "eval_val.json").exists() and (run / "train" / "eval_val_confusion.png").exists()
    # The new images are the 4 validation images of the shapes, which the labelme folder left out.
    detected = re.findall(r"^(.*\.png): \d+ detections with a score of at least", text, re.MULTILINE)
    assert detected == [str(run / "shapes" / "val" / f"{i:06d}.png") for i in range(4)]
    assert len(pictures(notebook)) == PICTURES


    # Run again in the same folder: the labelme folder is kept, converted afresh, and a new run trains over the first.
    labelme = {p.name: p.stat().st_mtime_ns for p in (run / "labelme").iterdir()}
    again = run_notebook(NOTEBOOK, ITERS=3, **parameters)
    assert {p.name: p.stat().st_mtime_ns for p in (run / "labelme").iterdir()} == labelme
    assert torch.load(run / "train" / "last.pth", map_location="cpu", weights_only=False)["iteration"] == 3
    assert len(pictures(again)) == PICTURES
