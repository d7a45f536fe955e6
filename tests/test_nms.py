"""Tests of nms.nms and nms.batched_nms (torch.ops.maskrcnn.nms / batched_nms).

The specification is torchvision.ops.nms: no "+1" in widths, a box is suppressed when its IoU with a
kept, higher-scoring box is strictly greater than the threshold, the result is sorted by decreasing
score and equal scores keep the input order. Expected values come from torchvision, from a plain
PyTorch float64 reference written here, or from hand computation; never from the code under test.
"""

import pytest
import torch
import torchvision

import nms

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")

SIZES = [0, 1, 2, 10, 100, 1000, 5000]
THRESHOLDS = [0.0, 0.3, 0.5, 0.7, 1.0]
DTYPES = [torch.float32, torch.float64]


# ----------------------------------------------------------------------------------------------------
# Helpers


def random_boxes(n, dtype=torch.float32, image=1000.0, device="cpu"):
    """n boxes (x1, y1, x2, y2) in clusters of about 8 jittered copies, so that the IoUs between boxes
    spread over the whole (0, 1) range instead of being almost all 0. Uses the global RNG."""
    clusters = max(n // 8, 1)
    centres = torch.rand(clusters, 2, dtype=torch.float64) * image
    sizes = 4 + torch.rand(clusters, 2, dtype=torch.float64) * (image / 5)
    pick = torch.randint(0, clusters, (n,))
    centre = centres[pick] + torch.randn(n, 2, dtype=torch.float64) * sizes[pick] * 0.15
    size = sizes[pick] * (1 + 0.2 * torch.randn(n, 2, dtype=torch.float64)).clamp(min=0.2)
    return torch.cat([centre - size / 2, centre + size / 2], dim=1).to(device=device, dtype=dtype)


def dyadic(boxes):
    """Rounds coordinates to multiples of 1/16. torchvision's batched_nms (up to 1000 boxes on CPU)
    adds a per-group offset to the coordinates; with such coordinates (and < 2^20 after the offset)
    that addition is exact in float32, so its IoUs are exactly the per-group ones."""
    return (boxes * 16).round() / 16


def distinct_scores(n, dtype=torch.float32, device="cpu"):
    """Scores without ties: torchvision's batched_nms sorts its final result with a non-stable sort
    above 1000 boxes on CPU, so with ties its order is not specified."""
    return (torch.randperm(n).to(torch.float64) / max(n, 1)).to(device=device, dtype=dtype)


def pairwise_iou(boxes):
    """[N, N] IoU matrix, torchvision's formula (no +1): inter / (area_i + area_j - inter)."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    lt = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area[:, None] + area[None, :] - inter)


def reference_nms(boxes, scores, threshold):
    """The greedy algorithm, spelled out: boxes by decreasing score (stable), keep a box unless a kept
    box overlaps it with IoU > threshold. NaN IoUs (two zero-area boxes) never suppress."""
    boxes, scores = boxes.double(), scores.double()
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()
    over = pairwise_iou(boxes) > threshold  # NaN > t is False
    removed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in order:
        if removed[i]:
            continue
        keep.append(i)
        removed |= over[i]
    return torch.tensor(keep, dtype=torch.int64)


def reference_batched_nms(boxes, scores, idxs, threshold, nms_fn):
    """Per-group nms with `nms_fn`, mapped back to global indices, then sorted by decreasing score with
    ties in input order (sorting by index first makes the stable score sort do that)."""
    kept = [torch.zeros(0, dtype=torch.int64)]
    for group in torch.unique(idxs).tolist():
        members = torch.nonzero(idxs == group).flatten()
        kept.append(members[nms_fn(boxes[members], scores[members], threshold)])
    kept = torch.cat(kept).sort().values
    return kept[torch.sort(scores[kept], descending=True, stable=True).indices]


def assert_keep_equal(got, expected):
    assert got.dtype == torch.int64
    assert got.dim() == 1
    assert got.tolist() == expected.tolist()


# ----------------------------------------------------------------------------------------------------
# nms against torchvision


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("n", SIZES)
def test_nms_matches_torchvision(n, threshold, dtype):
    torch.manual_seed(1000 * n + int(threshold * 10) + (7 if dtype == torch.float64 else 0))
    boxes = random_boxes(n, dtype)
    scores = torch.rand(n, dtype=dtype)  # float32 ties are likely at 5000 boxes: both sorts are stable
    expected = torchvision.ops.nms(boxes, scores, threshold)
    assert_keep_equal(nms.nms(boxes, scores, threshold), expected)
    # The registered op gives the same answer as the Python wrapper.
    assert_keep_equal(torch.ops.maskrcnn.nms(boxes, scores, threshold), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nms_matches_torchvision_on_odd_boxes(dtype):
    # Zero-area, inverted (x2 < x1), negative and far-away boxes: whatever the arithmetic gives,
    # it must be torchvision's.
    torch.manual_seed(11)
    n = 400
    boxes = random_boxes(n, dtype, image=50.0) - 25  # around the origin: negative coordinates
    kind = torch.randint(0, 5, (n,))
    boxes[kind == 1, 2] = boxes[kind == 1, 0]  # zero width
    boxes[kind == 2, 3] = boxes[kind == 2, 1]  # zero height
    boxes[kind == 3, 2:] = boxes[kind == 3, :2]  # a point
    boxes[kind == 4] = boxes[kind == 4][:, [2, 3, 0, 1]]  # inverted
    far = torch.rand(n) < 0.2
    boxes[far] += torch.tensor([-1e5, 1e5, -1e5, 1e5], dtype=dtype)
    scores = torch.rand(n, dtype=dtype)
    for threshold in THRESHOLDS:
        assert_keep_equal(nms.nms(boxes, scores, threshold), torchvision.ops.nms(boxes, scores, threshold))


# ----------------------------------------------------------------------------------------------------
# nms against the float64 reference and hand-computed cases


@pytest.mark.parametrize("threshold", [0.0, 0.2, 0.5, 0.65, 0.9])
@pytest.mark.parametrize("n", [3, 50, 300, 800])
def test_nms_matches_reference(n, threshold):
    torch.manual_seed(n + int(100 * threshold))
    boxes = random_boxes(n, torch.float64)
    scores = torch.rand(n, dtype=torch.float64)
    assert_keep_equal(nms.nms(boxes, scores, threshold), reference_nms(boxes, scores, threshold))


# A = [0, 0, 10, 10] (area 100), B = [1, 1, 11, 11] (area 100), C = [0, 0, 10, 5] (area 50),
# D = [20, 20, 30, 30] (area 100, far from the others).
# IoU(A, B) = 9*9 / (100 + 100 - 81) = 81/119 = 0.6807
# IoU(A, C) = 10*5 / (100 + 50 - 50) = 50/100 = 0.5 exactly
# IoU(B, C) = 9*4 / (100 + 50 - 36) = 36/114 = 0.3158
# IoU(D, anything) = 0
# Scores: D 0.95 > A 0.9 > B 0.8 > C 0.7, so the visiting order is D, A, B, C (indices 3, 0, 1, 2).
HAND_BOXES = [[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 5], [20, 20, 30, 30]]
HAND_SCORES = [0.9, 0.8, 0.7, 0.95]
HAND_CASES = [
    # 0.3: B goes (0.68 > 0.3 with A), C goes (0.5 > 0.3 with A).
    (0.3, [3, 0]),
    # 0.5: B goes (0.68), C stays: IoU(A, C) = 0.5 is not strictly greater than 0.5.
    (0.5, [3, 0, 2]),
    # 0.49: now C goes too (0.5 > 0.49).
    (0.49, [3, 0]),
    # 0.7: B stays (0.68), C stays (0.5 with A, 0.32 with B).
    (0.7, [3, 0, 1, 2]),
    # 0.0: any overlap suppresses; D and A do not overlap.
    (0.0, [3, 0]),
    # 1.0: an IoU is never > 1.
    (1.0, [3, 0, 1, 2]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold, expected", HAND_CASES)
def test_nms_hand_computed(threshold, expected, dtype):
    boxes = torch.tensor(HAND_BOXES, dtype=dtype)
    scores = torch.tensor(HAND_SCORES, dtype=dtype)
    assert nms.nms(boxes, scores, threshold).tolist() == expected


def test_nms_threshold_compared_like_torchvision_in_double():
    # Box B = [0, 0, 3, 1] lies inside A = [0, 0, 10, 1]: IoU = 3 / (10 + 3 - 3) = 3/10, exactly.
    # In float64 that is the double 0.3, not > 0.3: B is kept. In float32 it is float32(0.3) =
    # 0.30000001192..., which torchvision compares with the double 0.3: greater, so B is suppressed
    # (a plain float32 comparison with float32(0.3) would keep it).
    boxes = torch.tensor([[0, 0, 10, 1], [0, 0, 3, 1]])
    scores = torch.tensor([1.0, 0.5])
    assert nms.nms(boxes.double(), scores.double(), 0.3).tolist() == [0, 1]
    assert nms.nms(boxes.float(), scores.float(), 0.3).tolist() == [0]
    assert torchvision.ops.nms(boxes.float(), scores.float(), 0.3).tolist() == [0]
    # float32(0.7) = 0.69999998... < 0.7, so the 7/10 case is kept in both precisions.
    boxes = torch.tensor([[0, 0, 10, 1], [0, 0, 7, 1]])
    for dtype in DTYPES:
        assert nms.nms(boxes.to(dtype), scores.to(dtype), 0.7).tolist() == [0, 1]


# ----------------------------------------------------------------------------------------------------
# nms edge cases


@pytest.mark.parametrize("dtype", DTYPES)
def test_nms_empty(dtype):
    keep = nms.nms(torch.zeros(0, 4, dtype=dtype), torch.zeros(0, dtype=dtype), 0.5)
    assert keep.dtype == torch.int64 and keep.shape == (0,)
    keep = nms.batched_nms(
        torch.zeros(0, 4, dtype=dtype), torch.zeros(0, dtype=dtype), torch.zeros(0, dtype=torch.int64), 0.5
    )
    assert keep.dtype == torch.int64 and keep.shape == (0,)


def test_no_boxes_keep_nothing_without_further_checks_as_torchvision():
    # torchvision's batched_nms returns an empty int64 tensor for any empty `boxes`, before looking at the
    # other arguments (its own test passes None for them); code written against it does the same to ours.
    for boxes in (torch.empty(0), torch.empty((0,), dtype=torch.int64), torch.empty(0, 5)):
        expected = torchvision.ops.batched_nms(boxes, None, None, None)
        for keep in (nms.batched_nms(boxes, None, None, None), nms.nms(boxes, None, None)):
            assert keep.dtype == expected.dtype == torch.int64 and keep.shape == expected.shape == (0,)
            assert keep.device == boxes.device


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_nms_one_box(threshold):
    boxes = torch.tensor([[1.0, 2.0, 3.0, 5.0]])
    assert_keep_equal(nms.nms(boxes, torch.tensor([0.3]), threshold), torch.tensor([0]))
    assert_keep_equal(
        nms.batched_nms(boxes, torch.tensor([0.3]), torch.tensor([4]), threshold), torch.tensor([0])
    )


def test_nms_zero_area_boxes():
    boxes = torch.tensor(
        [
            [2.0, 2.0, 2.0, 2.0],  # 0: a point
            [2.0, 2.0, 2.0, 2.0],  # 1: the same point: IoU = 0/0 = NaN, not > t, kept (as torchvision)
            [0.0, 0.0, 4.0, 4.0],  # 2: contains the point: IoU = 0 / 16 = 0
            [1.0, 3.0, 5.0, 3.0],  # 3: zero height (a segment)
            [1.0, 3.0, 5.0, 3.0],  # 4: the same segment: NaN again, kept
            [3.0, 0.0, 3.0, 9.0],  # 5: zero width
        ]
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    for threshold in THRESHOLDS:
        expected = torchvision.ops.nms(boxes, scores, threshold)
        assert expected.tolist() == [0, 1, 2, 3, 4, 5]
        assert_keep_equal(nms.nms(boxes, scores, threshold), expected)
        assert_keep_equal(nms.nms(boxes.double(), scores.double(), threshold), expected)


def test_nms_negative_and_far_coordinates():
    # The same configuration as HAND_CASES, shifted far into negative and huge coordinates; the
    # shifts are powers of two times integers, so the float64 IoUs are unchanged.
    base = torch.tensor(HAND_BOXES, dtype=torch.float64)
    scores = torch.tensor(HAND_SCORES, dtype=torch.float64)
    for shift in (-64.0, -(2.0**20), 2.0**30):
        boxes = base + shift
        for threshold, expected in HAND_CASES:
            assert nms.nms(boxes, scores, threshold).tolist() == expected


def test_nms_identical_boxes_keep_first_of_equal_scores():
    boxes = torch.tensor([[10.0, 10.0, 20.0, 30.0]]).repeat(7, 1)
    # All scores equal: the stable order visits index 0 first; it suppresses all others (IoU 1).
    assert nms.nms(boxes, torch.full((7,), 0.5), 0.5).tolist() == [0]
    # The best scores tie at indices 2, 4 and 5: the first of them (2) is kept.
    scores = torch.tensor([0.1, 0.5, 0.9, 0.3, 0.9, 0.9, 0.2])
    assert nms.nms(boxes, scores, 0.5).tolist() == [2]
    assert nms.nms(boxes, scores, 0.999).tolist() == [2]  # IoU 1 > 0.999
    # IoU 1 is not > 1: nothing is suppressed; ties in input order.
    assert nms.nms(boxes, scores, 1.0).tolist() == [2, 4, 5, 1, 3, 6, 0]


def test_nms_equal_scores_keep_input_order():
    # Disjoint boxes (nothing suppressed): the result is a stable sort by decreasing score.
    boxes = torch.tensor([[10.0 * i, 0.0, 10.0 * i + 5, 5.0] for i in range(8)])
    scores = torch.tensor([0.5, 0.9, 0.5, 0.1, 0.9, 0.5, 0.1, 0.9])
    expected = [1, 4, 7, 0, 2, 5, 3, 6]
    for dtype in DTYPES:
        assert nms.nms(boxes.to(dtype), scores.to(dtype), 0.5).tolist() == expected
    # And with many ties among overlapping boxes, still torchvision's (stable) answer.
    torch.manual_seed(5)
    boxes = random_boxes(2000)
    scores = torch.randint(0, 10, (2000,)).float()
    for threshold in THRESHOLDS:
        assert_keep_equal(nms.nms(boxes, scores, threshold), torchvision.ops.nms(boxes, scores, threshold))
        assert_keep_equal(
            nms.nms(boxes.double(), scores.double(), threshold), reference_nms(boxes, scores, threshold)
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nms_cpu_low_precision_is_float32_on_the_same_values(dtype):
    # float16/bfloat16 boxes are compared in float32, which holds their values exactly.
    torch.manual_seed(3)
    boxes = random_boxes(500, image=200.0).to(dtype)
    scores = torch.rand(500).to(dtype)  # many ties after rounding: both sides are stable
    for threshold in (0.3, 0.5, 0.7):
        expected = torchvision.ops.nms(boxes.float(), scores.float(), threshold)
        assert_keep_equal(nms.nms(boxes, scores, threshold), expected)


# ----------------------------------------------------------------------------------------------------
# batched_nms


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups", [1, 3, 80])
@pytest.mark.parametrize("n", [10, 500, 1000, 1001, 4500])
def test_batched_nms_matches_torchvision(n, groups, dtype):
    # 1000 boxes is torchvision's switch on CPU between the coordinate-offset trick and a per-group
    # loop: both sides are covered.
    torch.manual_seed(17 * n + groups)
    boxes = dyadic(random_boxes(n, torch.float64)).to(dtype)
    scores = distinct_scores(n, dtype)
    idxs = torch.randint(0, groups, (n,))
    for threshold in (0.3, 0.5, 0.7):
        expected = torchvision.ops.batched_nms(boxes, scores, idxs, threshold)
        assert_keep_equal(nms.batched_nms(boxes, scores, idxs, threshold), expected)
        assert_keep_equal(torch.ops.maskrcnn.batched_nms(boxes, scores, idxs, threshold), expected)


@pytest.mark.parametrize("groups", [1, 3, 80])
def test_batched_nms_equals_per_group_nms(groups):
    # Arbitrary float coordinates (no rounding trick needed) and many score ties: the result is the
    # union of per-group nms, by decreasing score, ties in input order.
    torch.manual_seed(23 + groups)
    n = 3000
    boxes = random_boxes(n, image=300.0)
    scores = torch.randint(0, 50, (n,)).float() / 50
    idxs = torch.randint(0, groups, (n,)) * 5 - 7  # arbitrary, negative and non-consecutive group ids
    for threshold in (0.0, 0.5, 0.7):
        got = nms.batched_nms(boxes, scores, idxs, threshold)
        assert_keep_equal(got, reference_batched_nms(boxes, scores, idxs, threshold, torchvision.ops.nms))
        assert_keep_equal(got, reference_batched_nms(boxes, scores, idxs, threshold, nms.nms))
    boxes, scores = boxes[:400].double(), scores[:400].double()
    idxs = idxs[:400]
    expected = reference_batched_nms(boxes, scores, idxs, 0.5, reference_nms)
    assert_keep_equal(nms.batched_nms(boxes, scores, idxs, 0.5), expected)


def test_batched_nms_groups_never_suppress_each_other():
    boxes = torch.tensor([[5.0, 5.0, 15.0, 25.0]]).repeat(12, 1)
    scores = torch.tensor([0.1, 0.2, 0.9, 0.4, 0.5, 0.6, 0.7, 0.8, 0.3, 0.25, 0.15, 0.05])
    # Every box in its own group: all kept, by decreasing score.
    idxs = torch.arange(12)
    expected = torch.sort(scores, descending=True).indices
    assert_keep_equal(nms.batched_nms(boxes, scores, idxs, 0.5), expected)
    # Four groups of identical boxes: only the best of each group survives.
    idxs = torch.arange(12) % 4
    # group 0: indices 0, 4, 8 -> best 4 (0.5); group 1: 1, 5, 9 -> 5 (0.6);
    # group 2: 2, 6, 10 -> 2 (0.9); group 3: 3, 7, 11 -> 7 (0.8). By score: 2, 7, 5, 4.
    assert nms.batched_nms(boxes, scores, idxs, 0.5).tolist() == [2, 7, 5, 4]
    # A single group behaves like nms.
    assert nms.batched_nms(boxes, scores, torch.zeros(12, dtype=torch.int64), 0.5).tolist() == [2]


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int16, torch.uint8, torch.int8])
def test_batched_nms_accepts_any_integer_idxs(idx_dtype):
    torch.manual_seed(31)
    boxes = random_boxes(300)
    scores = distinct_scores(300)
    idxs = torch.randint(0, 5, (300,))
    expected = torchvision.ops.batched_nms(boxes, scores, idxs, 0.5)
    assert_keep_equal(nms.batched_nms(boxes, scores, idxs.to(idx_dtype), 0.5), expected)


# ----------------------------------------------------------------------------------------------------
# torch.compile


def test_nms_torch_compile_fullgraph_matches_eager():
    # One compilation (a few seconds); dynamic=False so the test does not recompile per size.
    torch.manual_seed(41)

    def detect(boxes, scores, idxs):
        return nms.nms(boxes, scores, 0.5), nms.batched_nms(boxes, scores, idxs, 0.6)

    compiled = torch.compile(detect, fullgraph=True, dynamic=False)
    boxes = random_boxes(600)
    scores = torch.rand(600)
    idxs = torch.randint(0, 4, (600,))
    got_nms, got_batched = compiled(boxes, scores, idxs)
    assert_keep_equal(got_nms, torchvision.ops.nms(boxes, scores, 0.5))
    assert_keep_equal(got_batched, nms.batched_nms(boxes, scores, idxs, 0.6))


def test_nms_opcheck():
    # Schema, fake (meta) implementation with its data-dependent output size, and autograd registration.
    torch.manual_seed(43)
    boxes = random_boxes(80)
    scores = torch.rand(80)
    torch.library.opcheck(torch.ops.maskrcnn.nms.default, (boxes, scores, 0.5))
    torch.library.opcheck(
        torch.ops.maskrcnn.batched_nms.default, (boxes, scores, torch.randint(0, 3, (80,)), 0.5)
    )


# ----------------------------------------------------------------------------------------------------
# Bad input


def _boxes(n=4, dtype=torch.float32):
    return torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=dtype).repeat(n, 1)


BAD_NMS_INPUTS = [
    ("boxes [N, 5]", lambda: (torch.rand(4, 5), torch.rand(4)), "boxes"),
    ("boxes 1-D", lambda: (torch.rand(4), torch.rand(1)), "boxes"),
    ("boxes 3-D", lambda: (torch.rand(2, 4, 4), torch.rand(2)), "boxes"),
    ("boxes not a tensor", lambda: ([[0.0, 0.0, 1.0, 1.0]], torch.rand(1)), "boxes"),
    ("integer boxes", lambda: (_boxes().long(), torch.rand(4)), "boxes"),
    ("scores [N+1]", lambda: (_boxes(), torch.rand(5)), "scores"),
    ("scores [N, 1]", lambda: (_boxes(), torch.rand(4, 1)), "scores"),
    ("scores float64, boxes float32", lambda: (_boxes(), torch.rand(4, dtype=torch.float64)), "scores"),
]


@pytest.mark.parametrize("make, name", [c[1:] for c in BAD_NMS_INPUTS], ids=[c[0] for c in BAD_NMS_INPUTS])
def test_nms_bad_input_raises_value_error(make, name):
    boxes, scores = make()
    with pytest.raises(ValueError, match=rf"(^|: ){name}\b"):
        nms.nms(boxes, scores, 0.5)
    n = boxes.shape[0] if isinstance(boxes, torch.Tensor) else 1
    with pytest.raises(ValueError, match=rf"(^|: ){name}\b"):
        nms.batched_nms(boxes, scores, torch.zeros(n, dtype=torch.int64), 0.5)


BAD_IDXS = [
    ("float idxs", lambda: torch.zeros(4)),
    ("bool idxs", lambda: torch.zeros(4, dtype=torch.bool)),
    ("idxs [N+1]", lambda: torch.zeros(5, dtype=torch.int64)),
    ("idxs [N-1]", lambda: torch.zeros(3, dtype=torch.int64)),
    ("idxs [N, 1]", lambda: torch.zeros(4, 1, dtype=torch.int64)),
    ("idxs a list", lambda: [0, 0, 0, 0]),
]


@pytest.mark.parametrize("make", [c[1] for c in BAD_IDXS], ids=[c[0] for c in BAD_IDXS])
def test_batched_nms_bad_idxs_raises_value_error(make):
    with pytest.raises(ValueError, match=r"(^|: )idxs\b"):
        nms.batched_nms(_boxes(), torch.rand(4), make(), 0.5)


def test_nms_op_checks_its_inputs_in_cpp():
    # The registered ops, called directly (no Python wrapper), fail cleanly.
    with pytest.raises(RuntimeError, match=r"\bboxes\b"):
        torch.ops.maskrcnn.nms(torch.rand(4, 5), torch.rand(4), 0.5)
    with pytest.raises(RuntimeError, match=r"\bboxes\b"):
        torch.ops.maskrcnn.nms(torch.rand(4), torch.rand(4), 0.5)
    with pytest.raises(RuntimeError, match=r"\bscores\b"):
        torch.ops.maskrcnn.nms(_boxes(), torch.rand(5), 0.5)
    with pytest.raises(RuntimeError, match=r"\bboxes\b"):
        torch.ops.maskrcnn.batched_nms(torch.rand(4, 3), torch.rand(4), torch.zeros(4, dtype=torch.long), 0.5)
    with pytest.raises(RuntimeError, match=r"\bidxs\b"):
        torch.ops.maskrcnn.batched_nms(_boxes(), torch.rand(4), torch.zeros(4), 0.5)
    with pytest.raises(RuntimeError, match=r"\bidxs\b"):
        torch.ops.maskrcnn.batched_nms(_boxes(), torch.rand(4), torch.zeros(3, dtype=torch.int64), 0.5)


# ----------------------------------------------------------------------------------------------------
# CUDA


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 2, 100, 1000, 5000])
def test_cuda_nms_matches_cpu_and_torchvision(n, dtype):
    torch.manual_seed(51 + n)
    boxes = random_boxes(n, dtype)
    scores = torch.rand(n, dtype=dtype)
    for threshold in THRESHOLDS:
        expected = torchvision.ops.nms(boxes, scores, threshold)
        got = nms.nms(boxes.cuda(), scores.cuda(), threshold)
        assert got.device.type == "cuda"
        assert_keep_equal(got.cpu(), expected)
        assert_keep_equal(torchvision.ops.nms(boxes.cuda(), scores.cuda(), threshold).cpu(), expected)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_nms_low_precision_matches_cpu(dtype):
    # Both devices compare the IoUs in float32 on the same float16/bfloat16 values. The coordinates
    # are on a grid (1/8 for float16, 1 for bfloat16) in [0, 256), where every coordinate and every
    # difference of two is exact in the low precision; the scores are distinct integers, also exact.
    torch.manual_seed(53)
    n = 2000
    step = 0.125 if dtype == torch.float16 else 1.0
    boxes = ((random_boxes(n, image=200.0) / step).round() * step).clamp(0, 255).to(dtype)
    scores = torch.randperm(n).to(dtype)
    for threshold in (0.3, 0.5, 0.7):
        expected = torchvision.ops.nms(boxes.float(), scores.float(), threshold)
        assert_keep_equal(nms.nms(boxes.cuda(), scores.cuda(), threshold).cpu(), expected)
        assert_keep_equal(nms.nms(boxes, scores, threshold), expected)
        if dtype == torch.float16:
            # torchvision's CUDA float16 kernel takes the differences in float16: exact on this grid.
            assert_keep_equal(torchvision.ops.nms(boxes.cuda(), scores.cuda(), threshold).cpu(), expected)


@requires_cuda
@pytest.mark.parametrize("n", [1000, 6000, 30000])
def test_cuda_batched_nms_80_classes(n):
    torch.manual_seed(57 + n)
    boxes = dyadic(random_boxes(n, torch.float64)).float()
    scores = distinct_scores(n)
    idxs = torch.randint(0, 80, (n,))
    for threshold in (0.5, 0.7):
        expected = reference_batched_nms(boxes, scores, idxs, threshold, torchvision.ops.nms)
        got = nms.batched_nms(boxes.cuda(), scores.cuda(), idxs.cuda(), threshold)
        assert_keep_equal(got.cpu(), expected)
        assert_keep_equal(nms.batched_nms(boxes, scores, idxs, threshold), expected)
        tv = torchvision.ops.batched_nms(boxes.cuda(), scores.cuda(), idxs.cuda(), threshold)
        assert_keep_equal(tv.cpu(), expected)


@requires_cuda
def test_cuda_batched_nms_groups_never_suppress_each_other():
    boxes = torch.tensor([[5.0, 5.0, 15.0, 25.0]], device="cuda").repeat(300, 1)
    scores = distinct_scores(300, device="cuda")
    idxs = torch.arange(300, device="cuda") % 100
    got = nms.batched_nms(boxes, scores, idxs, 0.5).cpu()
    expected = reference_batched_nms(boxes.cpu(), scores.cpu(), idxs.cpu(), 0.5, torchvision.ops.nms)
    assert got.numel() == 100
    assert_keep_equal(got, expected)


@requires_cuda
def test_cuda_bad_device_mix_raises_value_error():
    boxes = _boxes().cuda()
    with pytest.raises(ValueError, match=r"(^|: )scores\b"):
        nms.nms(boxes, torch.rand(4), 0.5)
    with pytest.raises(ValueError, match=r"(^|: )idxs\b"):
        nms.batched_nms(boxes, torch.rand(4, device="cuda"), torch.zeros(4, dtype=torch.int64), 0.5)
