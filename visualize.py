"""Drawing with matplotlib: detections, ground truth, and a view of each stage of the network.

    display_instances     boxes, translucent masks with outlines, "class score" labels
    display_comparison    ground truth beside predictions
    display_anchors       the anchors of each FPN level: the grid of centres and one cell's anchors
    display_proposals     RPN proposals before and after NMS, in the image's own pixels
    display_refinement    each detection's proposal (dashed) and the box it was refined to (solid)
    display_mask_predictions   the M x M mask probabilities of each detection before pasting
    plot_training_curves  losses, learning rate and AP from a run's log.jsonl

The stage views take what `model.detect(images, return_intermediates=True)` returns in
r["intermediates"]. Every function returns a matplotlib figure (a notebook shows it), or with
`save_path=` writes a PNG instead. Pictures of images are drawn at exactly `scale` times the
image's size in pixels, panels side by side with GAP white pixels between them. Without a display
matplotlib's Agg backend is used.

    python visualize.py --weights runs/demo/last.pth --out runs/demo/pictures   # what make demo draws
"""

import argparse
import colorsys
import math
import os

import matplotlib

if not os.environ.get("DISPLAY") and "inline" not in matplotlib.get_backend().lower():
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Polygon, Rectangle  # noqa: E402
from skimage.measure import find_contours  # noqa: E402

import utils  # noqa: E402

DPI = 100
GAP = 8  # white pixels between panels


############################################################
#  Colours, pictures and panels
############################################################


def color(index: int):
    """A stable, saturated RGB colour (floats in [0, 1]) for a class id or an instance index."""
    hue = (index * 0.618033988749895) % 1.0  # golden-ratio steps spread hues evenly
    return colorsys.hsv_to_rgb(hue, 0.85, 1.0)


def check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be HxWx3 uint8 RGB; got {image.shape} {image.dtype}")
    return image


def check_scale(scale) -> int:
    if not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"scale must be a whole number >= 1; got {scale!r}")
    return int(scale)


def boxes_array(boxes, name="boxes") -> np.ndarray:
    boxes = np.zeros((0, 4), np.float32) if boxes is None else np.asarray(boxes, np.float32)
    if boxes.size == 0:
        return boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must be [N, 4] (x1, y1, x2, y2); got shape {boxes.shape}")
    return boxes


def render(height: int, width: int, draw, scale: int = 1, title=None, font_size=9, origin=(0, 0)) -> np.ndarray:
    """A picture of exactly (scale * height, scale * width) pixels: one Axes covers it, with data
    coordinates in image pixels, pixel origin = (x, y) at the top left; draw(ax) fills it. Returns
    uint8 RGB; what nothing covers is light grey."""
    figure = Figure(figsize=(width * scale / DPI, height * scale / DPI), dpi=DPI, facecolor="0.85")
    canvas = FigureCanvasAgg(figure)
    ax = figure.add_axes((0, 0, 1, 1))
    draw(ax)
    ax.set_xlim(origin[0] - 0.5, origin[0] + width - 0.5)
    ax.set_ylim(origin[1] + height - 0.5, origin[1] - 0.5)
    ax.axis("off")
    if title:
        ax.annotate(title, (0, 1), xycoords="axes fraction", xytext=(3, -3), textcoords="offset pixels",
                    color="white", fontsize=font_size, verticalalignment="top",
                    bbox={"facecolor": "black", "alpha": 0.6, "pad": 2, "edgecolor": "none"})
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def compose(panels: list[np.ndarray], columns: int) -> np.ndarray:
    """Panels row by row, `columns` to a row, left-aligned with GAP white pixels between them; each
    row is as high as its highest panel, and the picture as wide as its widest row."""
    rows = [panels[i : i + max(1, columns)] for i in range(0, len(panels), max(1, columns))]
    heights = [max(p.shape[0] for p in row) for row in rows]
    widths = [sum(p.shape[1] for p in row) + GAP * (len(row) - 1) for row in rows]
    out = np.full((sum(heights) + GAP * (len(rows) - 1), max(widths), 3), 255, np.uint8)
    top = 0
    for row, height in zip(rows, heights):
        left = 0
        for panel in row:
            out[top : top + panel.shape[0], left : left + panel.shape[1]] = panel
            left += panel.shape[1] + GAP
        top += height + GAP
    return out


def new_figure(width_px: int, height_px: int, save_path=None):
    """A figure of the given size: a pyplot one (a notebook shows it), or a bare one to save to a file."""
    size = (width_px / DPI, height_px / DPI)
    return Figure(figsize=size, dpi=DPI) if save_path else plt.figure(figsize=size, dpi=DPI)


def save(figure, save_path):
    FigureCanvasAgg(figure)
    os.makedirs(os.path.dirname(os.path.abspath(save_path)), exist_ok=True)
    figure.savefig(save_path, dpi=DPI)


def show(picture: np.ndarray, save_path=None):
    """A figure that shows `picture` pixel for pixel, or with save_path a PNG of exactly its size."""
    if save_path:
        os.makedirs(os.path.dirname(os.path.abspath(save_path)), exist_ok=True)
        plt.imsave(save_path, picture)
    figure = new_figure(picture.shape[1], picture.shape[0], save_path)
    ax = figure.add_axes((0, 0, 1, 1))
    ax.imshow(picture, interpolation="nearest")
    ax.axis("off")
    return figure


def show_image(ax, image):
    ax.imshow(image, interpolation="nearest")


def draw_box(ax, box, rgb, line_width=1.5, linestyle="-"):
    x1, y1, x2, y2 = box
    ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor=rgb,
                           linewidth=line_width, linestyle=linestyle))


def draw_label(ax, x, y, text, rgb, font_size):
    """A label above (x, y), or just below it when there is no room above."""
    above = y >= 1.6 * font_size
    ax.text(x, y - 2 if above else y + 2, text, color="white", fontsize=font_size,
            verticalalignment="bottom" if above else "top",
            bbox={"facecolor": rgb, "alpha": 0.8, "pad": 1, "edgecolor": "none"})


def label_text(class_id, class_names, score=None) -> str:
    name = class_names[class_id] if 0 <= class_id < len(class_names) else str(class_id)
    return name if score is None else f"{name} {score:.2f}"


############################################################
#  Detections and ground truth
############################################################


def blend_masks(image: np.ndarray, masks: np.ndarray, colors, alpha: float) -> np.ndarray:
    """The image with each mask's pixels mixed with its colour (float RGB in [0, 1])."""
    out = image.astype(np.float32) / 255.0
    for mask, rgb in zip(masks, colors):
        out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(rgb, np.float32)
    return out


def draw_instances(ax, image, boxes, masks, class_ids, class_names, scores=None, colors=None, color_by="class",
                   show_boxes=True, show_masks=True, show_labels=True, alpha=0.5, line_width=1.5,
                   font_size=9):
    """Draws one image with its instances on a matplotlib Axes (see display_instances)."""
    boxes = boxes_array(boxes)
    count = boxes.shape[0]
    class_ids = np.asarray(class_ids if class_ids is not None else [], np.int64).reshape(-1)
    masks = None if masks is None else np.asarray(masks).astype(bool).reshape(-1, *image.shape[:2])
    if class_ids.shape[0] != count or (masks is not None and masks.shape[0] != count):
        raise ValueError(f"boxes ({count}), class_ids ({class_ids.shape[0]}) and masks "
                         f"({None if masks is None else masks.shape[0]}) must describe the same instances")
    if scores is not None and len(scores) != count:
        raise ValueError(f"scores has {len(scores)} entries for {count} instances")
    if colors is None:
        colors = [color(int(c) if color_by == "class" else i) for i, c in enumerate(class_ids)]
    show_image(ax, blend_masks(image, masks, colors, alpha) if show_masks and masks is not None else image)
    ax.set_xlim(-0.5, image.shape[1] - 0.5)
    ax.set_ylim(image.shape[0] - 0.5, -0.5)
    ax.axis("off")
    for i in range(count):
        rgb = colors[i]
        if show_boxes:
            draw_box(ax, boxes[i], rgb, line_width, "--")
        if show_masks and masks is not None:
            padded = np.pad(masks[i], 1).astype(np.uint8)  # closes contours at the image border
            for contour in find_contours(padded, 0.5):
                ax.add_patch(Polygon(contour[:, ::-1] - 1, closed=True, fill=False, edgecolor=rgb,
                                     linewidth=line_width))
        if show_labels:
            text = label_text(int(class_ids[i]), class_names, None if scores is None else scores[i])
            draw_label(ax, boxes[i][0], boxes[i][1], text, rgb, font_size)


def render_instances(image, boxes, masks, class_ids, class_names, scores=None, title=None, scale=1,
                     **options) -> np.ndarray:
    """display_instances drawn into a (scale * H) x (scale * W) x 3 uint8 array instead of a figure."""
    image = check_image(image)
    scale = check_scale(scale)
    return render(image.shape[0], image.shape[1],
                  lambda ax: draw_instances(ax, image, boxes, masks, class_ids, class_names, scores, **options),
                  scale, title, options.get("font_size", 9))


def display_instances(image, boxes, masks, class_ids, class_names, scores=None, title=None, ax=None,
                      save_path=None, scale=1, **options):
    """Shows an image with its instances: dashed boxes, translucent masks with solid outlines, and
    "class score" labels, in a colour per class (color_by="class") or per instance ("instance").

    image: HxWx3 uint8 RGB. boxes [N, 4] (x1, y1, x2, y2), masks [N, H, W] bool (or None),
    class_ids [N], scores [N] or None; N may be 0. With `ax`, draws there; otherwise makes a figure
    of `scale` times the image's size in pixels and returns it (a notebook shows it), or writes it
    to `save_path` as a PNG of exactly that size. Options: colors, color_by, show_boxes, show_masks,
    show_labels, alpha, line_width, font_size.
    """
    image = check_image(image)
    if ax is not None:
        draw_instances(ax, image, boxes, masks, class_ids, class_names, scores, **options)
        if title:
            ax.set_title(title)
        return ax.figure
    return show(render_instances(image, boxes, masks, class_ids, class_names, scores, title, scale, **options),
                save_path)


def display_comparison(image, ground_truth: dict, predictions: dict, class_names, min_score=0.0, scale=1,
                       save_path=None, **options):
    """Ground truth (left) beside predictions (right), as display_instances draws them.

    ground_truth: boxes, masks, and class_ids or labels (a CocoDataset target works). predictions:
    what model.detect returns for the image (boxes, masks, class_ids, scores); those scoring below
    min_score are left out.
    """
    return show(render_comparison(image, ground_truth, predictions, class_names, min_score, scale, **options),
                save_path)


def render_comparison(image, ground_truth: dict, predictions: dict, class_names, min_score=0.0, scale=1,
                      **options) -> np.ndarray:
    """display_comparison drawn into a uint8 array."""
    image = check_image(image)
    gt = {k: v.numpy() if hasattr(v, "numpy") else v for k, v in ground_truth.items()}
    keep = np.asarray(predictions["scores"]) >= min_score
    left = render_instances(image, gt.get("boxes"), gt.get("masks"), gt.get("class_ids", gt.get("labels")),
                            class_names, title="ground truth", scale=scale, **options)
    right = render_instances(image, np.asarray(predictions["boxes"])[keep], np.asarray(predictions["masks"])[keep],
                             np.asarray(predictions["class_ids"])[keep], class_names,
                             np.asarray(predictions["scores"])[keep], title="predictions", scale=scale, **options)
    return compose([left, right], 2)


############################################################
#  Stage views: anchors, proposals, refinement, 28x28 masks
############################################################


def anchor_cells(anchors: np.ndarray):
    """The distinct anchor centres of one level, and for each anchor the index of its centre."""
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    return np.unique(np.round(centres, 3), axis=0, return_inverse=True)


def display_anchors(image, anchors, strides=None, sizes=None, columns=3, scale=1, save_path=None, font_size=9):
    """The anchors of each FPN level, one panel per level: a dot at every anchor centre (every k-th
    row and column when they would be closer than 5 pixels on the picture), and the anchors of the
    cell nearest the image's centre, one colour per aspect ratio. A panel reaches beyond the image
    (in grey) as far as those anchors do.

    anchors: a list with one [A, 4] array per level in the image's pixels (intermediates["anchors"]);
    strides, sizes: per level, for the titles (intermediates["anchor_strides"], ["anchor_sizes"]).
    """
    image = check_image(image)
    scale = check_scale(scale)
    height, width = image.shape[:2]
    if len(anchors) == 0:
        return show(render(height, width, lambda ax: show_image(ax, image), scale, "no anchors", font_size),
                    save_path)
    panels = []
    for level, level_anchors in enumerate(anchors):
        level_anchors = boxes_array(level_anchors, f"anchors[{level}]")
        name = f"P{level + 2}"
        if strides is not None:
            name += f", stride {strides[level]}"
        if sizes is not None:
            name += f", size {sizes[level]}"
        if level_anchors.shape[0] == 0:
            panels.append(render(height, width, lambda ax: show_image(ax, image), scale, f"{name}: no anchors",
                                 font_size))
            continue
        centres, cell = anchor_cells(level_anchors)
        per_cell = level_anchors.shape[0] // centres.shape[0]
        title = f"{name}: {per_cell} per cell, {level_anchors.shape[0]} anchors"
        middle = np.argmin(np.hypot(centres[:, 0] - width / 2, centres[:, 1] - height / 2))
        shown_anchors = level_anchors[cell == middle]
        left, top = np.floor(np.minimum(shown_anchors.min(0)[:2], 0)).astype(int)
        right, bottom = np.ceil(np.maximum(shown_anchors.max(0)[2:], (width, height))).astype(int)

        def draw(ax, centres=centres, shown_anchors=shown_anchors):
            show_image(ax, image)
            xs, ys = np.unique(centres[:, 0]), np.unique(centres[:, 1])
            spacing = min(np.diff(xs).min() if xs.size > 1 else width, np.diff(ys).min() if ys.size > 1 else height)
            step = max(1, math.ceil(5 / (spacing * scale)))
            shown = np.isin(centres[:, 0], xs[::step]) & np.isin(centres[:, 1], ys[::step])
            # Box corners are pixel edges (see draw_box): the centre of pixel (i, j) is at (i + 0.5, j + 0.5).
            ax.plot(centres[shown, 0] - 0.5, centres[shown, 1] - 0.5, "o", color="white", markersize=1.5,
                    markeredgewidth=0, alpha=0.8)
            for index, box in enumerate(shown_anchors):
                draw_box(ax, box, color(index + 1), 1.5)

        panels.append(render(bottom - top, right - left, draw, scale, title, font_size, origin=(left, top)))
    return show(compose(panels, columns), save_path)


def score_colors(scores):
    """Colours from dark (low score) to bright yellow (high), on matplotlib's plasma scale."""
    scores = np.asarray(scores, np.float32)
    if scores.size == 0:
        return []
    low, high = float(scores.min()), float(scores.max())
    return plt.get_cmap("plasma")((scores - low) / max(high - low, 1e-6))[:, :3]


def display_proposals(image, proposals_before_nms, scores_before_nms, proposals, scores, count=50, scale=1,
                      save_path=None, font_size=9):
    """RPN proposals in the image's pixels: the `count` best before NMS (left) and after it (right),
    coloured by objectness (plasma: dark is low, yellow is high), the best drawn on top."""
    image = check_image(image)
    scale = check_scale(scale)
    panels = []
    for name, boxes, box_scores in (("before NMS", proposals_before_nms, scores_before_nms),
                                    ("after NMS", proposals, scores)):
        boxes = boxes_array(boxes, f"proposals {name}")
        box_scores = np.asarray(box_scores, np.float32).reshape(-1)
        if box_scores.shape[0] != boxes.shape[0]:
            raise ValueError(f"{boxes.shape[0]} proposals {name} but {box_scores.shape[0]} scores")
        best = np.argsort(-box_scores, kind="stable")[:count][::-1]  # the best drawn last, on top
        colours = score_colors(box_scores[best])

        def draw(ax, shown=boxes[best], colours=colours):
            show_image(ax, image)
            for box, rgb in zip(shown, colours):
                draw_box(ax, box, rgb, 1.0)

        title = f"{name}: best {len(best)} of {boxes.shape[0]}"
        panels.append(render(image.shape[0], image.shape[1], draw, scale, title, font_size))
    return show(compose(panels, 2), save_path)


def display_refinement(image, proposals, boxes, class_ids, class_names, scores=None, scale=1, save_path=None,
                       font_size=9):
    """Box refinement: each detection's proposal (dashed) and its final box (solid), their corners
    joined by thin lines, in one colour per detection. proposals: intermediates["detection_proposals"]."""
    image = check_image(image)
    scale = check_scale(scale)
    proposals = boxes_array(proposals, "proposals")
    boxes = boxes_array(boxes)
    class_ids = np.asarray(class_ids, np.int64).reshape(-1)
    if not proposals.shape[0] == boxes.shape[0] == class_ids.shape[0]:
        raise ValueError(f"proposals ({proposals.shape[0]}), boxes ({boxes.shape[0]}) and class_ids "
                         f"({class_ids.shape[0]}) must describe the same detections")

    def draw(ax):
        show_image(ax, image)
        for i, (proposal, box) in enumerate(zip(proposals, boxes)):
            rgb = color(i)
            draw_box(ax, proposal, rgb, 1.0, "--")
            draw_box(ax, box, rgb, 1.5)
            for a, b in ((0, 1), (2, 3)):  # top-left and bottom-right corners
                ax.plot([proposal[a] - 0.5, box[a] - 0.5], [proposal[b] - 0.5, box[b] - 0.5], color=rgb,
                        linewidth=0.75)
            draw_label(ax, box[0], box[1], label_text(int(class_ids[i]), class_names,
                                                      None if scores is None else scores[i]), rgb, font_size)

    title = f"refinement of {len(boxes)}: proposal (dashed) to box (solid)"
    return show(render(image.shape[0], image.shape[1], draw, scale, title, font_size), save_path)


def display_mask_predictions(mask_probs, class_ids, class_names, scores=None, threshold=0.5, columns=8, scale=4,
                             save_path=None, font_size=8):
    """The mask head's output before pasting: each detection's M x M probabilities for its class
    (viridis: dark 0, yellow 1), the `threshold` contour in white, and its label. mask_probs [D, M, M]:
    intermediates["mask_probs"]."""
    scale = check_scale(scale)
    mask_probs = np.asarray(mask_probs, np.float32)
    if mask_probs.ndim != 3 or mask_probs.shape[1] != mask_probs.shape[2]:
        raise ValueError(f"mask_probs must be [D, M, M]; got shape {mask_probs.shape}")
    class_ids = np.asarray(class_ids, np.int64).reshape(-1)
    if class_ids.shape[0] != mask_probs.shape[0] or (scores is not None and len(scores) != len(class_ids)):
        raise ValueError(f"mask_probs ({mask_probs.shape[0]}), class_ids ({class_ids.shape[0]}) and scores "
                         f"({None if scores is None else len(scores)}) must describe the same detections")
    size = mask_probs.shape[1]
    if mask_probs.shape[0] == 0:
        blank = np.zeros((size, size, 3), np.uint8)
        return show(render(size, size, lambda ax: show_image(ax, blank), scale, "no detections", font_size),
                    save_path)
    panels = []
    for i, probs in enumerate(mask_probs):
        def draw(ax, probs=probs):
            ax.imshow(probs, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            if probs.min() < threshold < probs.max():
                ax.contour(probs, levels=[threshold], colors="white", linewidths=1.0)

        title = label_text(int(class_ids[i]), class_names, None if scores is None else scores[i])
        panels.append(render(size, size, draw, scale, title, font_size))
    return show(compose(panels, columns), save_path)


############################################################
#  Training curves
############################################################


def read_log(path) -> list[dict]:
    """The records of a run's log.jsonl (path to the file or to the run's folder); a last line cut
    short by a killed run is skipped."""
    return utils.read_jsonl(os.path.join(path, "log.jsonl") if os.path.isdir(path) else path)


def plot_training_curves(log, save_path=None, width=1200, height=350):
    """Three panels from train.py's log: every loss term (log scale), the learning rate, and the
    COCO AP (bbox and segm) of each evaluation. log: path to log.jsonl or to the run's folder, or
    the records themselves. The figure is width x height pixels."""
    records = read_log(log) if isinstance(log, (str, os.PathLike)) else list(log)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    figure = new_figure(width, height, save_path)
    axes = figure.subplots(1, 3)
    figure.subplots_adjust(left=0.05, right=0.99, bottom=0.15, top=0.9, wspace=0.25)
    loss_ax, lr_ax, ap_ax = axes
    iterations = [r["iteration"] for r in steps]
    for key in [k for k in (steps[0] if steps else {}) if k.startswith("loss")]:
        values = [r.get(key, np.nan) for r in steps]
        loss_ax.plot(iterations, values, label=key, linewidth=2.0 if key == "loss" else 1.0)
    if steps:
        loss_ax.set_yscale("log")
        loss_ax.legend(fontsize=7)
        lr_ax.plot(iterations, [r["lr"] for r in steps], color="black")
    for task, style in (("bbox", "--"), ("segm", "-")):
        points = [(r["iteration"], r["eval"][task]["AP"]) for r in evals if task in r["eval"]]
        if points:
            ap_ax.plot(*zip(*points), style, marker="o", label=f"{task} AP")
    if evals:
        ap_ax.legend(fontsize=7)
    for ax, title, empty in ((loss_ax, "losses", not steps), (lr_ax, "learning rate", not steps),
                             (ap_ax, "COCO AP", not evals)):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if empty:
            ax.text(0.5, 0.5, "no records yet", transform=ax.transAxes, ha="center", va="center", color="gray")
    if save_path:
        save(figure, save_path)
    return figure


############################################################
#  The pictures of `make demo`
############################################################


def stage_views(model, image, out, name, target=None, min_score=0.5, scale=3):
    """Runs model.detect on one image and writes every view of it to <out>/<name>_<view>.png:
    detections (ground truth beside them when `target` is given), anchors, proposals, refinement and
    masks (the 28x28 predictions). Returns {view: path}."""
    result = model.detect([image], return_intermediates=True)[0]
    stages = result["intermediates"]
    keep = result["scores"] >= min_score
    kept = {key: result[key][keep] for key in ("boxes", "masks", "class_ids", "scores")}
    names = model.config.CLASS_NAMES
    paths = {view: os.path.join(out, f"{name}_{view}.png")
             for view in ("detections", "anchors", "proposals", "refinement", "masks")}
    if target is not None:
        display_comparison(image, target, kept, names, scale=scale, save_path=paths["detections"])
    else:
        display_instances(image, kept["boxes"], kept["masks"], kept["class_ids"], names, kept["scores"],
                          scale=scale, save_path=paths["detections"])
    display_anchors(image, stages["anchors"], stages["anchor_strides"], stages["anchor_sizes"], scale=scale,
                    save_path=paths["anchors"])
    display_proposals(image, stages["proposals_before_nms"], stages["proposal_scores_before_nms"],
                      stages["proposals"], stages["proposal_scores"], scale=scale, save_path=paths["proposals"])
    display_refinement(image, stages["detection_proposals"][keep], kept["boxes"], kept["class_ids"], names,
                       kept["scores"], scale=scale, save_path=paths["refinement"])
    display_mask_predictions(stages["mask_probs"][keep], kept["class_ids"], names, kept["scores"],
                             model.config.MASK_THRESHOLD, save_path=paths["masks"])
    return paths


def dataset_image(dataset, index):
    """Image index of a CocoDataset as the file's HxWx3 uint8 pixels, with its target."""
    tensor, target = dataset[index]
    return (tensor * 255).round().byte().permute(1, 2, 0).numpy(), target


def draw_detections(model, dataset, out, count=8, scale=4, min_score=0.5):
    """Writes <out>/<image id>.png (ground truth left, detections right) for the first `count` images
    of a CocoDataset, and <out>/../detections.png with all of them in a grid. Returns the grid's path."""
    os.makedirs(out, exist_ok=True)
    rows = []
    for index in range(min(count, len(dataset))):
        image, target = dataset_image(dataset, index)
        rows.append(render_comparison(image, target, model.detect([image])[0], model.config.CLASS_NAMES, min_score,
                                      scale))
        plt.imsave(os.path.join(out, f"{target['image_id']:06d}.png"), rows[-1])
    grid_path = os.path.join(os.path.dirname(os.path.abspath(out)), "detections.png")
    plt.imsave(grid_path, compose(rows, 1))
    return grid_path


def sample_image():
    """scikit-image's coffee photo: a real image for the demo (shapes models see a circle in the cup)."""
    import skimage.data

    return skimage.data.coffee()


def main(argv=None):
    import torch

    import coco
    from config import named_config
    from model import MaskRCNN

    parser = argparse.ArgumentParser(description="Draw ground truth beside detections on validation images, "
                                                 "every stage view, and the training curves.")
    parser.add_argument("--weights", required=True, help="checkpoint written by train.py")
    parser.add_argument("--config", default="shapes", help="preset when the checkpoint has no config")
    parser.add_argument("--data", help="data root (default: the shapes data set's folder for --config shapes)")
    parser.add_argument("--split", help="default: the config's VAL_SPLIT")
    parser.add_argument("--out", required=True, help="folder for the pictures")
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--scale", type=int, default=3, help="enlarge small images by this factor")
    parser.add_argument("--min-score", type=float, default=0.5)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    model = MaskRCNN.from_checkpoint(args.weights, config=named_config(args.config)).eval()
    data = coco.data_root(args.config, args.data)
    dataset = coco.CocoDataset(data, args.split or model.config.VAL_SPLIT, model.config.LABELS_ARE_CATEGORY_IDS)
    grid = draw_detections(model, dataset, args.out, args.count, args.scale, args.min_score)
    image, target = dataset_image(dataset, 0)
    stage_views(model, image, args.out, "val", target, args.min_score, args.scale)
    stage_views(model, sample_image(), args.out, "coffee", None, args.min_score, 1)
    log = os.path.join(os.path.dirname(os.path.abspath(args.weights)), "log.jsonl")
    if os.path.exists(log):
        plot_training_curves(log, save_path=os.path.join(args.out, "training_curves.png"))
    print(f"pictures written to {args.out} and {grid}")


if __name__ == "__main__":
    main()
