"""Drawing with matplotlib: detections and ground truth (boxes, translucent masks with outlines, labels).

In a notebook `display_instances(...)` returns a figure that shows inline; with `save_path=` it writes a
PNG at the image's own resolution instead. Works headless: without a display, matplotlib's Agg
backend is used.

    python visualize.py --weights runs/demo/last.pth --data data/shapes --out runs/demo/pictures
"""

import argparse
import colorsys
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


def color(index: int):
    """A stable, saturated RGB colour (floats in [0, 1]) for a class id or an instance index."""
    hue = (index * 0.618033988749895) % 1.0  # golden-ratio steps spread hues evenly
    return colorsys.hsv_to_rgb(hue, 0.85, 1.0)


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
    boxes = np.zeros((0, 4)) if boxes is None else np.asarray(boxes, np.float32).reshape(-1, 4)
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
    shown = blend_masks(image, masks, colors, alpha) if show_masks and masks is not None else image
    ax.imshow(shown, interpolation="nearest")
    ax.set_xlim(-0.5, image.shape[1] - 0.5)
    ax.set_ylim(image.shape[0] - 0.5, -0.5)
    ax.axis("off")
    for i in range(count):
        rgb = colors[i]
        x1, y1, x2, y2 = boxes[i]
        if show_boxes:
            ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor=rgb,
                                   linewidth=line_width, linestyle="--"))
        if show_masks and masks is not None:
            padded = np.pad(masks[i], 1).astype(np.uint8)  # closes contours at the image border
            for contour in find_contours(padded, 0.5):
                ax.add_patch(Polygon(contour[:, ::-1] - 1, closed=True, fill=False, edgecolor=rgb,
                                     linewidth=line_width))
        if show_labels:
            name = class_names[class_ids[i]] if class_ids[i] < len(class_names) else str(class_ids[i])
            text = f"{name} {scores[i]:.2f}" if scores is not None else name
            # Above the box, or just inside it when the box touches the top of the image.
            above = y1 >= 1.6 * font_size
            ax.text(x1, y1 - 2 if above else y1 + 2, text, color="white", fontsize=font_size,
                    verticalalignment="bottom" if above else "top",
                    bbox={"facecolor": rgb, "alpha": 0.8, "pad": 1, "edgecolor": "none"})


def display_instances(image, boxes, masks, class_ids, class_names, scores=None, title=None, ax=None,
                      save_path=None, **options):
    """Shows an image with its instances: dashed boxes, translucent masks with solid outlines, and
    "class score" labels, in a colour per class (color_by="class") or per instance ("instance").

    image: HxWx3 uint8 RGB. boxes [N, 4] (x1, y1, x2, y2), masks [N, H, W] bool (or None),
    class_ids [N], scores [N] or None; N may be 0. With `ax`, draws there; otherwise makes a figure
    of the image's own size in pixels and returns it (a notebook shows it), or writes it to
    `save_path` as a PNG of exactly HxW pixels. Options: colors, color_by, show_boxes, show_masks,
    show_labels, alpha, line_width, font_size.
    """
    image = check_image(image)
    if ax is not None:
        draw_instances(ax, image, boxes, masks, class_ids, class_names, scores, **options)
        if title:
            ax.set_title(title)
        return ax.figure
    height, width = image.shape[:2]
    size = (width / DPI, height / DPI)
    # A file needs no pyplot figure (which a notebook would also show); Agg draws it.
    figure = Figure(figsize=size, dpi=DPI) if save_path else plt.figure(figsize=size, dpi=DPI)
    fill_figure(figure, image, boxes, masks, class_ids, class_names, scores, title, **options)
    if save_path:
        FigureCanvasAgg(figure)
        os.makedirs(os.path.dirname(os.path.abspath(save_path)), exist_ok=True)
        figure.savefig(save_path, dpi=DPI)
    return figure


def render_instances(image, boxes, masks, class_ids, class_names, scores=None, title=None, **options) -> np.ndarray:
    """display_instances drawn into an HxWx3 uint8 array instead of a figure."""
    image = check_image(image)
    figure = Figure(figsize=(image.shape[1] / DPI, image.shape[0] / DPI), dpi=DPI)
    canvas = FigureCanvasAgg(figure)
    fill_figure(figure, image, boxes, masks, class_ids, class_names, scores, title, **options)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


DPI = 100


def check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be HxWx3 uint8 RGB; got {image.shape} {image.dtype}")
    return image


def fill_figure(figure, image, boxes, masks, class_ids, class_names, scores, title, **options):
    """Draws on one Axes that covers the whole figure, with the title in a box at the top left."""
    axes = figure.add_axes((0, 0, 1, 1))
    draw_instances(axes, image, boxes, masks, class_ids, class_names, scores, **options)
    if title:
        axes.text(4, 4, title, color="white", fontsize=options.get("font_size", 9), verticalalignment="top",
                  bbox={"facecolor": "black", "alpha": 0.6, "pad": 2})


def enlarge(image, boxes, masks, factor: int):
    """Nearest-neighbour enlargement of an image with its boxes and masks (small images get legible labels)."""
    image = image.repeat(factor, 0).repeat(factor, 1)
    boxes = np.asarray(boxes, np.float32) * factor
    masks = None if masks is None else np.asarray(masks).repeat(factor, 1).repeat(factor, 2)
    return image, boxes, masks


############################################################
#  Command line: detections on validation images
############################################################


def draw_detections(model, dataset, out, count=8, scale=4, min_score=0.5):
    """Writes <out>/<image id>.png (ground truth left, detections right) for the first `count` images
    of a CocoDataset, and <out>/../detections.png with all of them in a grid. Returns the grid's path."""
    os.makedirs(out, exist_ok=True)
    names = model.config.CLASS_NAMES
    rows = []
    for index in range(min(count, len(dataset))):
        tensor, target = dataset[index]
        image = (tensor * 255).round().byte().permute(1, 2, 0).numpy()  # the file's uint8 pixels again
        image_id = target["image_id"]
        result = model.detect([image])[0]
        keep = result["scores"] >= min_score
        gt = render_instances(*enlarge(image, target["boxes"].numpy(), target["masks"].numpy(), scale),
                              target["labels"].numpy(), names, title="ground truth")
        pred = render_instances(*enlarge(image, result["boxes"][keep], result["masks"][keep], scale),
                                result["class_ids"][keep], names, result["scores"][keep], title="detections")
        pair = np.concatenate([gt, np.full((gt.shape[0], 8, 3), 255, np.uint8), pred], axis=1)
        plt.imsave(os.path.join(out, f"{image_id:06d}.png"), pair)
        rows.append(pair)
    grid_path = os.path.join(os.path.dirname(os.path.abspath(out)), "detections.png")
    gap = np.full((8, rows[0].shape[1], 3), 255, np.uint8)
    plt.imsave(grid_path, np.concatenate([part for row in rows for part in (row, gap)][:-1], axis=0))
    return grid_path


def main(argv=None):
    import torch

    import coco

    parser = argparse.ArgumentParser(description="Draw ground truth and detections on validation images.")
    parser.add_argument("--weights", required=True, help="checkpoint written by train.py")
    parser.add_argument("--config", default="shapes", help="preset when the checkpoint has no config")
    parser.add_argument("--data", default="data/shapes")
    parser.add_argument("--split", help="default: the config's VAL_SPLIT")
    parser.add_argument("--out", required=True, help="folder for the pictures")
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--scale", type=int, default=4, help="enlarge small images by this factor")
    parser.add_argument("--min-score", type=float, default=0.5)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    model = coco.model_for_evaluation(args.config, args.weights).eval()
    dataset = coco.CocoDataset(args.data, args.split or model.config.VAL_SPLIT, model.config.LABELS_ARE_CATEGORY_IDS)
    grid = draw_detections(model, dataset, args.out, args.count, args.scale, args.min_score)
    print(f"pictures written to {args.out} and {grid}")


if __name__ == "__main__":
    main()
