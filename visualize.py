"""Drawing with matplotlib: detections, ground truth, and a view of each stage of the network.

    display_instances     boxes, translucent masks with outlines, "class score" labels
    display_comparison    ground truth beside predictions
    display_anchors       the anchors of each FPN level: the grid of centres and one cell's anchors
    display_proposals     RPN proposals before and after NMS, in the image's own pixels
    display_refinement    each detection's proposal (dashed) and the box it was refined to (solid)
    display_mask_predictions   the M x M mask probabilities of each detection before pasting
    display_rpn_targets   training: positive anchors with the boxes they regress to, sampled negatives
    display_sampled_rois  training: the RoIs sampled for the heads, foreground by class
    display_mask_targets  training: each foreground RoI's M x M mask target beside its image crop
    plot_training_curves  losses, learning rate and AP from a run's log.jsonl
    anchor_coverage       each ground-truth box's best anchor IoU over a data set (plot_anchor_coverage)

The stage views take what `model.detect(images, return_intermediates=True)` returns in
r["intermediates"]; the training views one dict of `model.training_targets(images, targets)`.
Every function returns a matplotlib figure (a notebook shows it), or with `save_path=` writes a PNG
instead. Pictures of images are drawn at exactly `scale` times the image's size in pixels, panels
side by side with GAP white pixels between them. Without a display matplotlib's Agg backend is used.

    python visualize.py --weights runs/demo/last.pth --out runs/demo/pictures   # what make demo draws
    python visualize.py --inspect-data --config shapes --data data/shapes --out runs/coverage
"""

import argparse
import colorsys
import math
import os
import sys

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
        title = label_text(int(class_ids[i]), class_names, None if scores is None else scores[i])
        panels.append(render(size, size, lambda ax, probs=probs: draw_probabilities(ax, probs, threshold), scale,
                             title, font_size))
    return show(compose(panels, columns), save_path)


def draw_probabilities(ax, probs: np.ndarray, threshold: float):
    """probs [M, M] in [0, 1] as viridis colours (dark 0, yellow 1), the `threshold` contour in white."""
    ax.imshow(probs, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    if probs.min() < threshold < probs.max():
        ax.contour(probs, levels=[threshold], colors="white", linewidths=1.0)


############################################################
#  Training views: RPN targets, sampled RoIs, mask targets
############################################################

FAINT = (1.0, 1.0, 1.0, 0.35)  # RGBA of negative and background boxes (drawn 0.75 pt wide): seen, not read


def require(targets: dict, *keys):
    missing = [key for key in keys if key not in targets]
    if missing:
        raise ValueError(f"targets has no {', '.join(missing)}: expected a dict of model.training_targets; got keys "
                         f"{sorted(targets)}")


def target_arrays(targets: dict, boxes_key: str, keys=()) -> list[np.ndarray]:
    """targets[boxes_key] as [N, 4] boxes, then targets[key] for each key as an [N] array: the entries of a
    dict that model.training_targets returns. A ValueError names a missing or mismatched key."""
    require(targets, boxes_key, *keys)
    boxes = boxes_array(targets[boxes_key], f"targets['{boxes_key}']")
    arrays = [boxes]
    for key in keys:
        values = np.asarray(targets[key])
        if values.shape != (boxes.shape[0],):
            raise ValueError(f"targets['{key}'] must be [{boxes.shape[0]}] (one per targets['{boxes_key}']); got "
                             f"shape {values.shape}")
        arrays.append(values)
    return arrays


def check_matches(matched: np.ndarray, chosen: np.ndarray, gt_count: int, key: str) -> np.ndarray:
    """matched[chosen] as indices into the gt_count ground-truth boxes; a ValueError names `key` otherwise."""
    picked = matched[chosen].astype(np.int64)
    if picked.size and (picked.min() < 0 or picked.max() >= gt_count):
        raise ValueError(f"targets['{key}'] must index targets['gt_boxes'] ({gt_count} boxes) where it is used; got "
                         f"{sorted(set(picked.tolist()))}")
    return picked


def display_rpn_targets(image, targets: dict, scale=1, save_path=None, font_size=9):
    """The RPN's training targets on one image: each ground-truth box (solid) with the positive anchors
    matched to it, whose boxes it regresses them to (dashed), one colour per ground-truth box; the negative
    anchors the sampler drew for the loss, faint (thin, translucent white); crowd regions dotted white.
    Ignored anchors (IoU between the thresholds, or in a crowd region) are not drawn: the title counts them.

    targets: one dict of model.training_targets (image's own pixels): gt_boxes, crowd_boxes, anchors,
    anchor_labels (1, 0, -1, -2), anchor_sampled and anchor_matched_gt.
    """
    image = check_image(image)
    scale = check_scale(scale)
    (gt_boxes,) = target_arrays(targets, "gt_boxes")
    crowd_boxes = boxes_array(targets.get("crowd_boxes"), "targets['crowd_boxes']")
    anchors, labels, sampled, matched = target_arrays(targets, "anchors",
                                                      ("anchor_labels", "anchor_sampled", "anchor_matched_gt"))
    positive = labels == 1
    negative = (labels == 0) & sampled.astype(bool)
    owners = check_matches(matched, positive, gt_boxes.shape[0], "anchor_matched_gt")

    def draw(ax):
        show_image(ax, image)
        for anchor in anchors[negative]:
            draw_box(ax, anchor, FAINT, 0.75)
        for box in crowd_boxes:
            draw_box(ax, box, "white", 1.0, ":")
        for anchor, owner in zip(anchors[positive], owners):
            draw_box(ax, anchor, color(owner), 1.0, "--")
        for index, box in enumerate(gt_boxes):
            draw_box(ax, box, color(index), 1.5)

    title = (f"RPN targets: {positive.sum()} positive (dashed), {negative.sum()} negative sampled (faint), "
             f"{(labels == -1).sum()} ignored, {(labels == -2).sum()} in crowds")
    return show(render(image.shape[0], image.shape[1], draw, scale, title, font_size), save_path)


def sampled_rois(targets: dict):
    """The sampled RoIs of a training_targets dict: rois [R, 4], foreground [R] bool, and of the F foreground
    ones (in order) class_ids [F] and the indices of their ground-truth boxes [F]; gt_boxes [G, 4] and
    gt_class_ids [G]."""
    gt_boxes, gt_class_ids = target_arrays(targets, "gt_boxes", ("gt_class_ids",))
    rois, class_ids, matched = target_arrays(targets, "rois", ("roi_class_ids", "roi_matched_gt"))
    foreground = class_ids > 0
    owners = check_matches(matched, foreground, gt_boxes.shape[0], "roi_matched_gt")
    return rois, foreground, class_ids[foreground], owners, gt_boxes, gt_class_ids.astype(np.int64)


def display_sampled_rois(image, targets: dict, class_names, scale=1, save_path=None, font_size=9):
    """The RoIs sampled for the box and mask heads on one image: foreground RoIs in their class's colour,
    background RoIs faint (thin, translucent white), and the class name at the corner of each ground-truth
    box that has foreground RoIs.

    targets: one dict of model.training_targets (image's own pixels): gt_boxes, gt_class_ids, rois,
    roi_class_ids (0 = background) and roi_matched_gt.
    """
    image = check_image(image)
    scale = check_scale(scale)
    rois, foreground, class_ids, owners, gt_boxes, gt_class_ids = sampled_rois(targets)

    def draw(ax):
        show_image(ax, image)
        for box in rois[~foreground]:
            draw_box(ax, box, FAINT, 0.75)
        for box, class_id in zip(rois[foreground], class_ids):
            draw_box(ax, box, color(int(class_id)), 1.0)
        for owner in np.unique(owners):
            class_id = int(gt_class_ids[owner])
            draw_label(ax, gt_boxes[owner][0], gt_boxes[owner][1], label_text(class_id, class_names), color(class_id),
                       font_size)

    title = f"sampled RoIs: {foreground.sum()} foreground (by class), {(~foreground).sum()} background (faint)"
    return show(render(image.shape[0], image.shape[1], draw, scale, title, font_size), save_path)


def roi_crop(picture: np.ndarray, box, size: int) -> np.ndarray:
    """The pixels of `picture` ([H, W, ...]) nearest the centres of a size x size grid of bins over the box
    (x1, y1, x2, y2): the region the box's mask target covers, resized to size x size."""
    x1, y1, x2, y2 = np.asarray(box, np.float64)
    centres = (np.arange(size) + 0.5) / size
    rows = np.floor(y1 + centres * (y2 - y1)).astype(int).clip(0, picture.shape[0] - 1)
    cols = np.floor(x1 + centres * (x2 - x1)).astype(int).clip(0, picture.shape[1] - 1)
    return picture[rows][:, cols]


def display_mask_targets(image, targets: dict, class_names, masks=None, columns=4, threshold=0.5, scale=4,
                         save_path=None, font_size=8):
    """The mask head's training targets: for each foreground RoI, the image inside it resized to M x M (nearest
    pixel to each bin's centre) with its ground-truth object's mask blended in (half the pixel, half the class
    colour), titled with the class; beside it the M x M mask target (viridis: dark 0, yellow 1, the
    `threshold` contour in white). `columns` pairs to a row.

    targets: one dict of model.training_targets: gt_boxes, gt_class_ids, rois, roi_class_ids, roi_matched_gt
    and mask_targets [F, M, M] (F foreground RoIs, in their order among the rois). masks: the target's
    masks [G, H, W] (what was given to training_targets), or None to show the image alone.
    """
    image = check_image(image)
    scale = check_scale(scale)
    if not isinstance(columns, (int, np.integer)) or columns < 1:
        raise ValueError(f"columns must be a whole number >= 1; got {columns!r}")
    rois, foreground, class_ids, owners, gt_boxes, _ = sampled_rois(targets)
    boxes = rois[foreground]
    require(targets, "mask_targets")
    mask_targets = np.asarray(targets["mask_targets"], np.float32)
    if mask_targets.ndim != 3 or mask_targets.shape[0] != len(boxes) or mask_targets.shape[1] != mask_targets.shape[2]:
        raise ValueError(f"targets['mask_targets'] must be [F, M, M] with F = {len(boxes)} foreground rois; got "
                         f"shape {mask_targets.shape}")
    if masks is not None:
        masks = np.asarray(masks).astype(bool)
        if masks.shape != (gt_boxes.shape[0], *image.shape[:2]):
            raise ValueError(f"masks must be [{gt_boxes.shape[0]}, {image.shape[0]}, {image.shape[1]}] (one per "
                             f"targets['gt_boxes'], the image's size); got shape {masks.shape}")
    size = mask_targets.shape[1]
    if len(boxes) == 0:
        blank = np.zeros((size, size, 3), np.uint8)
        return show(render(size, size, lambda ax: show_image(ax, blank), scale, "no foreground RoIs", font_size),
                    save_path)
    panels = []
    for box, class_id, owner, target in zip(boxes, class_ids, owners, mask_targets):
        crop = roi_crop(image, box, size)
        if masks is not None:
            crop = blend_masks(crop, roi_crop(masks[owner], box, size)[None], [color(int(class_id))], 0.5)
        panels.append(render(size, size, lambda ax, crop=crop: show_image(ax, crop), scale,
                             label_text(int(class_id), class_names), font_size))
        panels.append(render(size, size, lambda ax, target=target: draw_probabilities(ax, target, threshold), scale))
    return show(compose(panels, 2 * columns), save_path)


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
#  Anchor coverage of a data set
############################################################

# COCOeval's object sizes (areaRng), by box area in the original image.
SIZE_GROUPS = (("small", 0, 32**2), ("medium", 32**2, 96**2), ("large", 96**2, math.inf))


def dataset_boxes(dataset):
    """(image_id, height, width, boxes [G, 4] (x1, y1, x2, y2) in the image's pixels) for each image of a
    CocoDataset, from its annotations alone (no pixels are read). Crowd regions are left out, as the RPN's
    matcher leaves them out."""
    for image_id in dataset.image_ids:
        info = dataset.coco.imgs[image_id]
        boxes = np.array([box for box, _ in dataset.objects[image_id]], np.float32).reshape(-1, 4)
        yield image_id, info["height"], info["width"], boxes


def coverage_summary(entries: list[dict]) -> dict:
    """count, mean and median best IoU, low_quality and no_positive (counts) of some of a report's boxes."""
    ious = np.array([e["best_iou"] for e in entries], np.float64)
    return {"count": len(entries), "mean_best_iou": float(ious.mean()) if entries else None,
            "median_best_iou": float(np.median(ious)) if entries else None,
            "low_quality": sum(e["low_quality"] for e in entries),
            "no_positive": sum(e["positives"] == 0 for e in entries)}


def anchor_coverage(samples, config) -> dict:
    """How well the anchors fit a data set's ground-truth boxes, as training's RPN sees them.

    samples: (image_id, height, width, boxes [G, 4] in the image's pixels) per image (dataset_boxes).
    Each image is resized as training resizes it, once for each of IMAGE_MIN_DIM_TRAIN (model.resize_scale
    with IMAGE_MAX_DIM), and its boxes are matched to the anchors of that input (model.anchors_for_input)
    by the RPN's own Matcher (RPN_FG_IOU_THRESHOLD, RPN_BG_IOU_THRESHOLD, low-quality matches allowed).

    Returns a JSON-ready dict: "settings"; "boxes", one entry per box and training size: image_id, box,
    area (in the original image), size ("small" below 32^2, "medium" below 96^2, else "large", COCO's
    ranges), min_size, best_iou (with any anchor), level (of the anchor with the best IoU; 0 = P2),
    positives (anchors the matcher assigns to the box: 0 when its best anchors are taken by other boxes),
    low_quality (best IoU below RPN_FG_IOU_THRESHOLD: only the low-quality rule can match it); and "groups":
    coverage_summary of all boxes ("all"), of each size and of each level ("P2" ...).
    """
    import torch

    import model

    matcher = model.Matcher(config.RPN_FG_IOU_THRESHOLD, config.RPN_BG_IOU_THRESHOLD, True)
    cache, entries = {}, []
    for image_id, height, width, boxes in samples:
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        for min_size in config.IMAGE_MIN_DIM_TRAIN:
            size = model.resized_size(height, width, min_size, config.IMAGE_MAX_DIM, config.RESIZE_ROUNDING)
            if size not in cache:
                cache[size] = model.anchors_for_input(*size, config)
            anchors, levels = cache[size]
            ratio = np.array([size[1] / width, size[0] / height] * 2, np.float32)  # per axis, as preprocess
            iou = utils.box_iou(torch.from_numpy(boxes * ratio), anchors)  # (G, A)
            matches = matcher(iou)
            positives = torch.bincount(matches[matches >= 0], minlength=len(boxes))
            best_iou, best = iou.max(dim=1)
            for g in range(len(boxes)):
                entries.append({
                    "image_id": image_id, "box": boxes[g].tolist(), "area": float(areas[g]),
                    "size": next(name for name, low, high in SIZE_GROUPS if low <= areas[g] < high),
                    "min_size": min_size, "best_iou": float(best_iou[g]), "level": int(levels[best[g]]),
                    "positives": int(positives[g]), "low_quality": bool(best_iou[g] < config.RPN_FG_IOU_THRESHOLD),
                })
    groups = {"all": coverage_summary(entries)}
    groups.update({name: coverage_summary([e for e in entries if e["size"] == name]) for name, _, _ in SIZE_GROUPS})
    groups.update({f"P{level + 2}": coverage_summary([e for e in entries if e["level"] == level])
                   for level in range(len(config.ANCHOR_SIZES))})
    settings = {"config": config.NAME, "IMAGE_MIN_DIM_TRAIN": list(config.IMAGE_MIN_DIM_TRAIN),
                "IMAGE_MAX_DIM": config.IMAGE_MAX_DIM, "IMAGE_SIZE_DIVISOR": config.IMAGE_SIZE_DIVISOR,
                "ANCHOR_SIZES": list(config.ANCHOR_SIZES), "ANCHOR_RATIOS": list(config.ANCHOR_RATIOS),
                "RPN_FG_IOU_THRESHOLD": config.RPN_FG_IOU_THRESHOLD,
                "RPN_BG_IOU_THRESHOLD": config.RPN_BG_IOU_THRESHOLD}
    return {"settings": settings, "groups": groups, "boxes": entries}


def coverage_table(report: dict) -> str:
    """The report's groups as a text table, one line per group."""
    threshold = report["settings"]["RPN_FG_IOU_THRESHOLD"]
    lines = [f"{'group':8} {'boxes':>8} {'mean IoU':>9} {'median':>7} {f'IoU < {threshold}':>12} {'no positive':>12}"]
    for name, group in report["groups"].items():
        count = group["count"]
        if count == 0:
            lines.append(f"{name:8} {0:>8}")
            continue
        lines.append(f"{name:8} {count:>8} {group['mean_best_iou']:>9.3f} {group['median_best_iou']:>7.3f} "
                     f"{group['low_quality']:>5} {group['low_quality'] / count:>5.1%} "
                     f"{group['no_positive']:>5} {group['no_positive'] / count:>5.1%}")
    return "\n".join(lines)


def plot_anchor_coverage(report: dict, save_path=None, width=800, height=400, bins=20):
    """A histogram of the best anchor IoU of the report's boxes, stacked by COCO size (small, medium, large),
    in `bins` equal bins over [0, 1], with the RPN's thresholds as dashed lines. width x height pixels."""
    figure = new_figure(width, height, save_path)
    ax = figure.add_axes((0.08, 0.13, 0.9, 0.78))
    edges = np.linspace(0, 1, bins + 1)
    groups = [[e["best_iou"] for e in report["boxes"] if e["size"] == name] for name, _, _ in SIZE_GROUPS]
    ax.hist(groups, bins=edges, stacked=True, label=[name for name, _, _ in SIZE_GROUPS],
            color=[color(i + 1) for i in range(len(SIZE_GROUPS))])
    settings = report["settings"]
    for key in ("RPN_BG_IOU_THRESHOLD", "RPN_FG_IOU_THRESHOLD"):
        ax.axvline(settings[key], color="black", linestyle="--", linewidth=1.0)
    ax.set_xlim(0, 1)
    ax.set_xlabel("best IoU with an anchor (dashed: the RPN's negative and positive thresholds)", fontsize=8)
    ax.set_ylabel("ground-truth boxes", fontsize=8)
    ax.set_title(f"anchor coverage: {len(report['boxes'])} boxes, anchors {settings['ANCHOR_SIZES']}", fontsize=10)
    ax.legend(fontsize=8)
    ax.tick_params(labelsize=7)
    if save_path:
        save(figure, save_path)
    return figure


def inspect_data(argv=None):
    """python visualize.py --inspect-data --config NAME --data DIR --out DIR [--split SPLIT] [--set K=V ...]:
    the anchor coverage of a data set, printed, in <out>/anchor_coverage.json and anchor_coverage.png."""
    import json

    from tqdm import tqdm

    import coco
    from config import named_config

    parser = argparse.ArgumentParser(description="Anchor coverage of a data set: each ground-truth box's best "
                                                 "anchor IoU as training resizes it, by object size and FPN level.")
    parser.add_argument("--inspect-data", action="store_true", required=True)
    parser.add_argument("--config", required=True, help="preset (coco, shapes, ...)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--data", required=True, help="data root with annotations/ and the image folders")
    parser.add_argument("--split", help="default: the config's TRAIN_SPLIT")
    parser.add_argument("--out", required=True, help="folder for anchor_coverage.json and anchor_coverage.png")
    args = parser.parse_args(argv)
    config = named_config(args.config).override(args.set)
    dataset = coco.CocoDataset(args.data, args.split or config.TRAIN_SPLIT, config.LABELS_ARE_CATEGORY_IDS)
    report = anchor_coverage(tqdm(dataset_boxes(dataset), total=len(dataset), desc="images"), config)
    os.makedirs(args.out, exist_ok=True)
    utils.atomic_write(os.path.join(args.out, "anchor_coverage.json"),
                       lambda f: json.dump(report, f, indent=1), mode="w")
    plot_anchor_coverage(report, save_path=os.path.join(args.out, "anchor_coverage.png"))
    print(coverage_table(report))
    print(f"written to {os.path.join(args.out, 'anchor_coverage.json')} and anchor_coverage.png")
    return report


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


def training_views(model, image, target, out, name, scale=3):
    """Runs model.training_targets on one image and its target (as CocoDataset gives it) and writes
    <out>/<name>_rpn_targets.png, <name>_sampled_rois.png and <name>_mask_targets.png (the masks at their own
    default scale). Returns {view: path}."""
    targets = model.training_targets([image], [target])[0]
    names = model.config.CLASS_NAMES
    paths = {view: os.path.join(out, f"{name}_{view}.png") for view in ("rpn_targets", "sampled_rois", "mask_targets")}
    display_rpn_targets(image, targets, scale=scale, save_path=paths["rpn_targets"])
    display_sampled_rois(image, targets, names, scale=scale, save_path=paths["sampled_rois"])
    display_mask_targets(image, targets, names, target["masks"], save_path=paths["mask_targets"])
    return paths


def dataset_image(dataset, index):
    """Image index of a CocoDataset as the file's HxWx3 uint8 pixels, with its target."""
    tensor, target = dataset[index]
    return (tensor * 255).round().byte().permute(1, 2, 0).numpy(), target


def draw_detections(model, dataset, out, count=8, scale=4, min_score=0.5):
    """Writes <out>/<image id>.png (ground truth left, detections right) for the first `count` images
    of a CocoDataset, and <out>/detections.png with all of them in a grid. Returns the grid's path.
    Like every command, it writes inside `out` only."""
    os.makedirs(out, exist_ok=True)
    rows = []
    for index in range(min(count, len(dataset))):
        image, target = dataset_image(dataset, index)
        rows.append(render_comparison(image, target, model.detect([image])[0], model.config.CLASS_NAMES, min_score,
                                      scale))
        plt.imsave(os.path.join(out, f"{target['image_id']:06d}.png"), rows[-1])
    grid_path = os.path.join(out, "detections.png")
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

    if "--inspect-data" in (sys.argv[1:] if argv is None else argv):
        return inspect_data(argv)
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
    training_views(model, image, target, args.out, "val", args.scale)
    stage_views(model, sample_image(), args.out, "coffee", None, args.min_score, 1)
    log = os.path.join(os.path.dirname(os.path.abspath(args.weights)), "log.jsonl")
    if os.path.exists(log):
        plot_training_curves(log, save_path=os.path.join(args.out, "training_curves.png"))
    print(f"pictures written to {args.out} and {grid}")


if __name__ == "__main__":
    main()
