"""Geometry of what visualize.py draws, for tests/test_visualize.py: where a picture may differ from the
image under it, worked out from the inputs and the documented layout alone (never with visualize's helpers).

Positions are in display pixels of the picture: a box (x1, y1, x2, y2) of an image drawn at `scale`, whose
panel starts at image pixel `origin`, has its outline on the lines x = (x1 - origin_x) * scale, ...; image
pixel (row, col) covers rows row * scale .. (row + 1) * scale - 1; a point (x, y) given in pixel centres
(what matplotlib's imshow uses) sits at ((x + 0.5 - origin_x) * scale, ...). Distances are measured from
the centres of the display pixels.
"""

import numpy as np
from scipy.ndimage import distance_transform_edt, maximum_filter
from scipy.spatial import cKDTree

DPI = 100
GAP = 8
MARGIN = 3.0  # display px: half the widest outline (1.5 pt = 2.1 px wide), snapping to the grid, antialiasing
EM = 0.75  # a generous width of one character of DejaVu Sans, in ems
LINE = 1.25  # the height of a line of text (ascent and descent), in ems


def points_to_px(points: float) -> float:
    return points * DPI / 72


def enlarge(image: np.ndarray, scale: int) -> np.ndarray:
    """Each pixel a scale x scale block (nearest neighbour)."""
    return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)


def changed(picture: np.ndarray, expected: np.ndarray, tolerance: float = 2 / 255) -> np.ndarray:
    """Where two float RGB pictures differ by more than the rounding of a uint8."""
    return np.abs(picture - expected).max(axis=2) > tolerance


def dilate(region: np.ndarray, radius: float) -> np.ndarray:
    """Pixels whose centre is within `radius` of a pixel centre in `region`."""
    return distance_transform_edt(~region) <= radius


def distance_to(shape, points, limit=np.inf) -> np.ndarray:
    """Distance from each pixel's centre to the nearest of `points` ([K, 2] display (x, y)); inf if none, or if
    farther than `limit`."""
    points = np.asarray(points, np.float64).reshape(-1, 2)
    if points.shape[0] == 0:
        return np.full(shape, np.inf)
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    centres = np.stack([cols.ravel() + 0.5, rows.ravel() + 0.5], axis=1)
    return cKDTree(points).query(centres, distance_upper_bound=limit)[0].reshape(shape)


def near(shape, points, radius: float = MARGIN) -> np.ndarray:
    """Pixels whose centre is within `radius` of one of the points (measured only for the pixels in squares
    around the points, which is quicker on large pictures)."""
    points = np.asarray(points, np.float64).reshape(-1, 2)
    out = np.zeros(shape, bool)
    if points.shape[0] == 0:
        return out
    seeds = np.zeros(shape, bool)  # the pixels holding the points, clipped into the picture
    seeds[np.floor(points[:, 1]).clip(0, shape[0] - 1).astype(int), np.floor(points[:, 0]).clip(0, shape[1] - 1)
          .astype(int)] = True
    rows, cols = np.nonzero(maximum_filter(seeds, size=2 * int(np.ceil(radius)) + 3))
    distance = cKDTree(points).query(np.stack([cols + 0.5, rows + 0.5], axis=1), distance_upper_bound=radius + 1)[0]
    out[rows, cols] = distance <= radius
    return out


def seen_near(changes: np.ndarray, points, radius: float = MARGIN) -> bool:
    """Whether a pixel within `radius` of the points changed."""
    points = np.asarray(points, np.float64).reshape(-1, 2)
    left, top = np.floor(points.min(0) - radius).astype(int).clip(0)
    right, bottom = np.ceil(points.max(0) + radius + 1).astype(int)
    window = changes[top:bottom, left:right]
    return window.size > 0 and bool(window[near(window.shape, points - (left, top), radius)].any())


def segment(a, b, step: float = 0.25) -> np.ndarray:
    """Points every `step` pixels from a to b (display (x, y))."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = max(2, int(np.ceil(np.hypot(*(b - a)) / step)) + 1)
    return a + np.linspace(0, 1, n)[:, None] * (b - a)


def box_corners(box, scale: int, origin=(0, 0)):
    """The box's corners (x1, y1, x2, y2) in display pixels."""
    x1, y1, x2, y2 = np.asarray(box, np.float64)
    return ((x1 - origin[0]) * scale, (y1 - origin[1]) * scale, (x2 - origin[0]) * scale, (y2 - origin[1]) * scale)


def outline_points(boxes, scale: int, origin=(0, 0)) -> np.ndarray:
    """Points along the outlines of the boxes."""
    parts = [np.zeros((0, 2))]
    for box in boxes:
        x1, y1, x2, y2 = box_corners(box, scale, origin)
        corners = [(x1, y1), (x2, y1), (x2, y2), (x1, y2), (x1, y1)]
        parts += [segment(a, b) for a, b in zip(corners, corners[1:])]
    return np.concatenate(parts)


def rectangle(shape, left, top, right, bottom) -> np.ndarray:
    """Pixels whose centre lies in [left, right] x [top, bottom] (display coordinates)."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return (cols + 0.5 >= left) & (cols + 0.5 <= right) & (rows + 0.5 >= top) & (rows + 0.5 <= bottom)


def text_size(text: str, font_size: float):
    """A bound on the width and height in pixels of one line of text."""
    em = points_to_px(font_size)
    return len(text) * EM * em, LINE * em


def title_area(shape, title: str, font_size: float = 9) -> np.ndarray:
    """The title's box: 3 px from the panel's top-left corner, 2 pt of padding around the text."""
    width, height = text_size(title, font_size)
    pad = points_to_px(2)
    return rectangle(shape, 0, 0, 3 + width + pad + MARGIN, 3 + height + pad + MARGIN)


def label_area(shape, box, text: str, font_size: float, scale: int, origin=(0, 0)) -> np.ndarray:
    """A box's label: text starting at its top-left corner, its bottom 2 image pixels above the box, or its top
    2 pixels below the box's top when the box's top is less than 1.6 * font_size pixels from the image's top;
    1 pt of padding."""
    width, height = text_size(text, font_size)
    pad = points_to_px(1)
    x, y = box[0] - origin[0], box[1] - origin[1]
    left = (x + 0.5) * scale - pad - MARGIN
    right = (x + 0.5) * scale + width + pad + MARGIN
    if box[1] >= 1.6 * font_size:
        bottom = (y - 2 + 0.5) * scale + pad + MARGIN
        return rectangle(shape, left, bottom - height - 2 * pad - 2 * MARGIN, right, bottom)
    top = (y + 2 + 0.5) * scale - pad - MARGIN
    return rectangle(shape, left, top, right, top + height + 2 * pad + 2 * MARGIN)


def mask_outline_distance(mask: np.ndarray, scale: int) -> np.ndarray:
    """Distance from each display pixel's centre to the border of the mask's (enlarged) pixels; the picture's
    edge counts as a border (outlines are closed there)."""
    big = np.pad(enlarge(mask, scale), 1)
    inside = distance_transform_edt(big)
    outside = distance_transform_edt(~big)
    return (np.where(big, inside, outside) - 0.5)[1:-1, 1:-1]


def near_mask_outline(mask: np.ndarray, scale: int) -> np.ndarray:
    """Pixels the mask's outline may touch: find_contours cuts the corners of pixels, by up to 0.36 pixel."""
    return mask_outline_distance(mask, scale) <= MARGIN + 0.36 * scale


def outline_coverage(changes: np.ndarray, box, scale: int, origin=(0, 0), skip=None) -> float:
    """The fraction of the positions along the box's sides, away from its corners and the picture's edges (and
    from the pixels in `skip`), where a pixel within 1 px of the side changed (None when there are none)."""
    height, width = changes.shape
    x1, y1, x2, y2 = box_corners(box, scale, origin)
    hits = []
    for line, start, end, horizontal in ((y1, x1, x2, True), (y2, x1, x2, True), (x1, y1, y2, False),
                                         (x2, y1, y2, False)):
        across = np.arange(int(np.floor(line - 1.5)), int(np.ceil(line + 1.5)))
        across = across[np.abs(across + 0.5 - line) <= 1]
        limit = height if horizontal else width
        if line < 1.5 or line > limit - 1.5 or across.size == 0:
            continue  # on the picture's edge, half outside it
        along = np.arange(int(np.ceil(start + 2)), int(np.floor(end - 2)))
        along = along[(along >= 0) & (along < (width if horizontal else height))]
        for position in along:
            band = (across, position) if horizontal else (position, across)
            if skip is None or not skip[band].any():
                hits.append(changes[band].any())
    return float(np.mean(hits)) if hits else None


def layout(shapes, columns: int):
    """compose's documented layout: the (top, left) of each panel of the given (height, width) shapes and the
    picture's (height, width); rows of `columns` panels, GAP pixels apart, each as high as its highest panel."""
    rows = [shapes[i : i + columns] for i in range(0, len(shapes), columns)]
    positions, top, width = [], 0, 0
    for row in rows:
        left = 0
        for shape in row:
            positions.append((top, left))
            left += shape[1] + GAP
        width = max(width, left - GAP)
        top += max(shape[0] for shape in row) + GAP
    return positions, (top - GAP, width)


def panels(picture: np.ndarray, shapes, columns: int):
    """The panels cut out of a composed picture, after checking its size and that the rest is white."""
    positions, size = layout(shapes, columns)
    assert picture.shape[:2] == size
    covered = np.zeros(size, bool)
    cut = []
    for (top, left), (height, width) in zip(positions, shapes):
        covered[top : top + height, left : left + width] = True
        cut.append(picture[top : top + height, left : left + width])
    np.testing.assert_array_equal(picture[~covered], 1.0)  # the gaps and the ends of short rows
    return cut
