"""Tests of the focal-loss switches of model.py: sigmoid_focal_loss, softmax_focal_loss, mask_loss with
focal = (gamma, alpha), and RPN_FOCAL_LOSS / BOX_FOCAL_LOSS / MASK_FOCAL_LOSS in a whole model.

Oracles: values computed by hand from the focal-loss formula (Lin et al., 2017), FL = -alpha_t
(1 - p_t)^gamma log p_t, at logits where the probabilities are simple fractions (the arithmetic is in
the comments), and torch.nn.functional's cross entropies for gamma = 0 (no alpha).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers_model import shapes_sample, small_config

from config import Config
from model import (
    AssignedTargets,
    BalancedSample,
    MaskRCNN,
    mask_loss,
    rpn_losses,
    sigmoid_focal_loss,
    softmax_focal_loss,
)

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)


# ----------------------------------------------------------------------------------------------------
# Hand-computed values


@pytest.mark.parametrize(
    "logit, target, gamma, alpha, expected",
    [
        # logit 0: p = 0.5, BCE = ln 2, (1 - p_t)^2 = 0.25.
        (0.0, 1.0, 2.0, None, 0.25 * LN2),
        (0.0, 1.0, 2.0, 0.25, 0.25 * 0.25 * LN2),  # a positive is weighted by alpha
        # logit ln 3: p = 0.75. Positive: p_t = 0.75, BCE = ln 4 / 3, (0.25)^2.
        (LN3, 1.0, 2.0, None, 0.0625 * (LN4 - LN3)),
        # Negative: p_t = 0.25, BCE = -ln 0.25 = ln 4, (0.75)^2 = 0.5625; alpha 0.25 weighs it 0.75.
        (LN3, 0.0, 2.0, None, 0.5625 * LN4),
        (LN3, 0.0, 2.0, 0.25, 0.75 * 0.5625 * LN4),
        (LN3, 0.0, 0.0, 0.25, 0.75 * LN4),  # gamma 0: alpha-weighted BCE
        (LN3, 0.0, 1.0, None, 0.75 * LN4),  # gamma 1: (1 - p_t)^1
    ],
)
def test_sigmoid_focal_loss_by_hand(logit, target, gamma, alpha, expected):
    got = sigmoid_focal_loss(torch.tensor([logit], dtype=torch.float64), torch.tensor([target], dtype=torch.float64),
                             gamma, alpha)
    assert got.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "label, gamma, alpha, expected",
    [
        # Logits (0, ln 3): softmax (0.25, 0.75). Class 1 (foreground): -ln 0.75 (0.25)^2.
        (1, 2.0, None, 0.0625 * (LN4 - LN3)),
        (1, 2.0, 0.25, 0.25 * 0.0625 * (LN4 - LN3)),
        # Class 0 (background): -ln 0.25 (0.75)^2, weighted by 1 - alpha.
        (0, 2.0, None, 0.5625 * LN4),
        (0, 2.0, 0.25, 0.75 * 0.5625 * LN4),
        (0, 0.0, None, LN4),  # gamma 0: the cross entropy
    ],
)
def test_softmax_focal_loss_by_hand(label, gamma, alpha, expected):
    logits = torch.tensor([[0.0, LN3]], dtype=torch.float64)
    got = softmax_focal_loss(logits, torch.tensor([label]), gamma, alpha)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_mask_loss_focal_by_hand():
    # One foreground RoI of class 2 (of 3), 2x2 mask. The other classes' logits must be ignored, so
    # they are extreme. Class 2's pixels, as (logit, target): (0, 1), (ln 3, 1), (ln 3, 0), (-ln 3, 0).
    # Per pixel with gamma 2 (see above; (-ln 3, 0) is (ln 3, 1) mirrored): 0.25 ln 2,
    # 0.0625 (ln 4 - ln 3), 0.5625 ln 4, 0.0625 (ln 4 - ln 3); the loss is their mean.
    logits = torch.full((1, 3, 2, 2), 50.0, dtype=torch.float64)
    logits[0, 2] = torch.tensor([[0.0, LN3], [LN3, -LN3]], dtype=torch.float64)
    targets = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]], dtype=torch.float64)
    labels = torch.tensor([2])
    pixels = [0.25 * LN2, 0.0625 * (LN4 - LN3), 0.5625 * LN4, 0.0625 * (LN4 - LN3)]
    assert mask_loss(logits, labels, targets, (2.0, None)).item() == pytest.approx(sum(pixels) / 4, rel=1e-12)
    # alpha 0.25: the two positives weigh 0.25, the two negatives 0.75.
    weighted = [0.25 * pixels[0], 0.25 * pixels[1], 0.75 * pixels[2], 0.75 * pixels[3]]
    assert mask_loss(logits, labels, targets, (2.0, 0.25)).item() == pytest.approx(sum(weighted) / 4, rel=1e-12)
    # gamma 0 and no alpha: the plain BCE, which is also the default: (ln 2 + (ln 4 - ln 3) + ln 4 + (ln 4 - ln 3)) / 4.
    bce = (LN2 + 2 * (LN4 - LN3) + LN4) / 4
    assert mask_loss(logits, labels, targets, (0.0, None)).item() == pytest.approx(bce, rel=1e-12)
    assert mask_loss(logits, labels, targets).item() == pytest.approx(bce, rel=1e-12)


def test_gamma_zero_equals_cross_entropy_on_random_values():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, 7, 7, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(1, 4, (6,), generator=g)
    targets = torch.rand(6, 7, 7, generator=g, dtype=torch.float64)  # soft targets, as roi_align makes them
    own = logits[torch.arange(6), labels]
    expected = F.binary_cross_entropy_with_logits(own, targets)
    torch.testing.assert_close(mask_loss(logits, labels, targets, (0.0, None)), expected, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------------
# The switches in a whole model

LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")
SWITCHES = [("RPN_FOCAL_LOSS", "loss_objectness"), ("BOX_FOCAL_LOSS", "loss_classifier"),
            ("MASK_FOCAL_LOSS", "loss_mask")]


@pytest.fixture(scope="module")
def model_and_samples():
    torch.manual_seed(0)
    model = MaskRCNN(small_config()).train()
    a, target_a = shapes_sample(150, 200, [(10, 20, 60, 80), (100, 30, 180, 90)], [1, 2])
    b, target_b = shapes_sample(160, 160, [(20, 20, 90, 70)], [3], seed=1)
    return model, [a, b], [target_a, target_b]


def losses_with(model_and_samples, **settings):
    source, images, targets = model_and_samples
    model = MaskRCNN(small_config(**settings)).train()
    model.load_state_dict(source.state_dict())
    torch.manual_seed(1)  # the same samples of anchors and RoIs in every call
    return {k: v.item() for k, v in model(images, targets).items()}


@pytest.mark.parametrize("switch, affected", SWITCHES)
def test_each_switch_changes_only_its_loss(model_and_samples, switch, affected):
    default = losses_with(model_and_samples)
    # gamma 0 and no alpha: exactly the ordinary losses.
    plain = losses_with(model_and_samples, **{switch: True, "FOCAL_GAMMA": 0.0, "FOCAL_ALPHA": None})
    for name in LOSS_NAMES:
        assert math.isclose(plain[name], default[name], rel_tol=1e-6, abs_tol=1e-7), name
    # gamma 2: every factor (1 - p_t)^2 is below 1, so the affected loss falls (by little where the
    # untrained model is confidently wrong, as on the masks); the others stay.
    focal = losses_with(model_and_samples, **{switch: True, "FOCAL_GAMMA": 2.0})
    assert focal[affected] < default[affected]
    for name in set(LOSS_NAMES) - {affected}:
        assert math.isclose(focal[name], default[name], rel_tol=1e-6, abs_tol=1e-7), name


# ----------------------------------------------------------------------------------------------------
# RetinaNet's normalisation and prior, for the RPN


def rpn_objectness_loss(**settings):
    """loss_objectness of one image with 4 anchors, all sampled: logits (0, ln 3, ln 3, -ln 3), the first
    anchor positive."""
    logits = torch.tensor([[0.0, LN3, LN3, -LN3]], dtype=torch.float64)
    labels = torch.tensor([1, 0, 0, 0])
    assigned = [AssignedTargets(labels, torch.tensor([0, -1, -1, -1]), torch.zeros(4, 4, dtype=torch.float64),
                                torch.zeros(4, dtype=torch.bool))]
    samples = [BalancedSample(labels == 1, labels == 0)]
    config = Config(**settings)
    return rpn_losses(logits, torch.zeros(1, 4, 4, dtype=torch.float64), assigned, samples, config)["loss_objectness"]


def test_rpn_objectness_normalised_by_positives_by_hand():
    # Focal, gamma 2 (per anchor, see test_sigmoid_focal_loss_by_hand): the positive at logit 0 gives
    # 0.25 ln 2, the negatives at ln 3 0.5625 ln 4 each, the negative at -ln 3 (p = 0.25, p_t = 0.75)
    # 0.0625 (ln 4 - ln 3).
    terms = [0.25 * LN2, 0.5625 * LN4, 0.5625 * LN4, 0.0625 * (LN4 - LN3)]
    focal = dict(RPN_FOCAL_LOSS=True, FOCAL_GAMMA=2.0)
    assert rpn_objectness_loss(**focal).item() == pytest.approx(sum(terms) / 4, rel=1e-12)
    # Over the positives: one positive, so the sum.
    assert rpn_objectness_loss(**focal, RPN_OBJECTNESS_NORMALISER="positives").item() == pytest.approx(
        sum(terms), rel=1e-12)
    # Also for the BCE: (ln 2 + 2 ln 4 + (ln 4 - ln 3)) over one positive.
    assert rpn_objectness_loss(RPN_OBJECTNESS_NORMALISER="positives").item() == pytest.approx(
        LN2 + 3 * LN4 - LN3, rel=1e-12)


def test_rpn_prior_probability_sets_the_first_objectness():
    torch.manual_seed(0)
    head = MaskRCNN(small_config(RPN_PRIOR_PROBABILITY=0.01)).rpn.head
    torch.testing.assert_close(torch.sigmoid(head.cls_logits.bias.double()),
                               torch.full_like(head.cls_logits.bias, 0.01, dtype=torch.float64), rtol=1e-6, atol=0)
    assert torch.equal(MaskRCNN(small_config()).rpn.head.cls_logits.bias, torch.zeros_like(head.cls_logits.bias))


@pytest.mark.parametrize("setting, message", [("RPN_PRIOR_PROBABILITY=0", "RPN_PRIOR_PROBABILITY"),
                                              ("RPN_PRIOR_PROBABILITY=1", r"in \(0, 1\)"),
                                              ("RPN_OBJECTNESS_NORMALISER=anchors", "samples")])
def test_retinanet_settings_are_checked(setting, message):
    with pytest.raises(ValueError, match=message):
        Config().override([setting])
