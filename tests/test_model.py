"""Tests of model.MaskRCNN: equivalence with torchvision's Mask R-CNN (v1 and v2), detect(), training,
focal loss, config switches, weight loading and input validation.

Expected values come from torchvision (its models, ops and published weight URLs), from formulas written
here, or from hand computation; otherwise a test compares two ways of running the code under test that
must agree (e.g. a config switch that must not change anything, or detect() against forward()).
Images are small (~200-300 px) and the torchvision models are built once per module, to keep this fast.
"""

import logging
import math
import urllib.error
from types import SimpleNamespace

import numpy as np
import pytest
import skimage.io
import torch
import torchvision
from helpers_model import (
    assert_same_detections,
    make_detecting,
    pair_near_ties,
    randomise_norms,
    shapes_sample,
    small_config,
    smooth_image,
)
from torch import nn
from torchvision.models.detection import maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

import model as model_module
from config import Config
from model import FrozenBatchNorm2d, MaskRCNN, PyramidRoIAlign, sigmoid_focal_loss, softmax_focal_loss

# Small images and fewer proposals / detections than the COCO defaults, set the same way on both sides.
MIN_DIM, MAX_DIM = 200, 300
TV_SETTINGS = dict(
    min_size=MIN_DIM, max_size=MAX_DIM, rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=200,
    box_detections_per_img=30,
)
OUR_SETTINGS = dict(
    IMAGE_MIN_DIM=MIN_DIM, IMAGE_MAX_DIM=MAX_DIM, RPN_PRE_NMS_TOP_N_TEST=200, RPN_POST_NMS_TOP_N_TEST=200,
    DETECTION_MAX_INSTANCES=30,
)
# Image sets (H, W): one image whose size is limited by MAX_DIM (scale 300/260, not an integer), and a batch
# of two different sizes (one downscaled, one upscaled), so padding and per-image sizes matter.
IMAGE_SETS = {"single": [(150, 260)], "batch": [(320, 240), (170, 190)]}


def image_set(name):
    return [smooth_image(h, w, seed=i + 10 * len(name)) for i, (h, w) in enumerate(IMAGE_SETS[name])]


def build_pair(variant, directory):
    """torchvision's random model (made to detect), its state_dict saved to a file, and ours loaded from it."""
    torch.manual_seed(0)
    if variant == "v1":
        # Without weights torchvision uses nn.BatchNorm2d (eps 1e-5): our frozen BN with that eps is the same
        # in eval mode.
        tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91, **TV_SETTINGS)
        config = Config(NORM="frozen_bn", FROZEN_BN_EPS=1e-5, **OUR_SETTINGS)
    else:
        tv = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91, **TV_SETTINGS)
        config = Config.v2(**OUR_SETTINGS)
    make_detecting(tv).eval()
    path = directory / f"torchvision_{variant}.pth"
    torch.save(tv.state_dict(), path)
    ours = MaskRCNN(config)
    report = ours.load_weights(str(path))
    ours.eval()
    return SimpleNamespace(tv=tv, ours=ours, config=config, path=path, report=report, reference={})


@pytest.fixture(scope="module")
def v1(module_tmp_path):
    return build_pair("v1", module_tmp_path)


@pytest.fixture(scope="module")
def v2(module_tmp_path):
    return build_pair("v2", module_tmp_path)


def reference(pair, name):
    """torchvision's detections on an image set (computed once per module)."""
    if name not in pair.reference:
        with torch.no_grad():
            pair.reference[name] = pair.tv(image_set(name))
    return pair.reference[name]


@pytest.fixture(scope="module")
def small_detector():
    """A small random model (ours) that makes ~100 detections with distinct scores on a 150-200 px image."""
    torch.manual_seed(0)
    return make_detecting(MaskRCNN(small_config()), cls_factor=5.0, rpn_factor=30.0).eval()


def detections(model, images):
    with torch.no_grad():
        return model.eval()(images)


@pytest.fixture(scope="module")
def small_reference(small_detector):
    """small_detector's detections on one image, and the shape of its mask predictor's output."""
    shapes = []
    hook = small_detector.roi_heads.mask_predictor.register_forward_hook(
        lambda m, i, o: shapes.append(tuple(o.shape)))
    try:
        (out,) = detections(small_detector, [smooth_image(150, 200, seed=7)])
    finally:
        hook.remove()
    return SimpleNamespace(out=out, mask_logits_shape=shapes[0])


def clone_with(source, config):
    """A model built from `config` with the weights of `source`."""
    model = MaskRCNN(config)
    model.load_state_dict(source.state_dict())
    return model.train(source.training)


def train_samples():
    a, target_a = shapes_sample(150, 200, [(10, 20, 60, 80), (100, 30, 180, 90), (40, 100, 120, 140)], [1, 2, 3])
    b, target_b = shapes_sample(160, 160, [(20, 20, 90, 70), (60, 90, 150, 150)], [3, 1], seed=1)
    return [a, b], [target_a, target_b]


def empty_target(height, width):
    return {
        "boxes": torch.zeros((0, 4)),
        "labels": torch.zeros((0,), dtype=torch.int64),
        "masks": torch.zeros((0, height, width), dtype=torch.uint8),
    }


LOSS_NAMES = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}


def legacy_key(key):
    """torchvision's old spelling of a current key (the inverse of what load_weights must undo)."""
    parts = key.split(".")
    if parts[:2] == ["backbone", "fpn"] and parts[2] in ("inner_blocks", "layer_blocks"):
        assert parts[4] == "0", key
        return ".".join(parts[:4] + parts[5:])  # backbone.fpn.inner_blocks.i.0.weight -> ...inner_blocks.i.weight
    if key.startswith("rpn.head.conv.0.0."):
        return "rpn.head.conv." + parts[-1]
    if key.startswith("roi_heads.mask_head."):
        assert parts[4] in ("weight", "bias"), key
        return f"roi_heads.mask_head.mask_fcn{int(parts[2]) + 1}.{parts[4]}"
    return key


# ----------------------------------------------------------------------------------------------------
# Equivalence with torchvision


@pytest.mark.parametrize("images", sorted(IMAGE_SETS))
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_same_detections_as_torchvision(variant, images, request):
    pair = request.getfixturevalue(variant)
    expected = reference(pair, images)
    with torch.no_grad():
        got = pair.ours(image_set(images))
    assert len(got) == len(expected)
    for (h, w), e, g in zip(IMAGE_SETS[images], expected, got):
        assert e["masks"].shape[-2:] == (h, w)  # at the size of the image as given
        assert_same_detections(e, g, min_detections=10)


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_full_torchvision_checkpoint_loads_completely(variant, request):
    pair = request.getfixturevalue(variant)
    report = pair.report
    assert report["skipped_shape"] == []
    assert report["excluded"] == []
    assert report["unexpected"] == []
    tv_state = pair.tv.state_dict()
    ours = pair.ours.state_dict()
    for key in report["loaded"]:
        assert torch.equal(ours[key], tv_state[key]), key
    # Every tensor of our model comes from the checkpoint: nothing is left as initialised.
    assert report["missing"] == []


def test_legacy_key_spelling_loads_the_same(v1, tmp_path):
    state = torch.load(v1.path)
    legacy = {legacy_key(k): v for k, v in state.items()}
    renamed = [k for k in state if legacy_key(k) != k]
    assert len(renamed) == 4 * 2 * 2 + 2 + 4 * 2  # FPN inner + layer blocks, RPN conv, 4 mask head convs
    assert "backbone.fpn.inner_blocks.0.weight" in legacy and "roi_heads.mask_head.mask_fcn4.bias" in legacy
    path = tmp_path / "legacy.pth"
    torch.save(legacy, path)
    ours = MaskRCNN(v1.config)
    report = ours.load_weights(str(path))
    assert report["missing"] == [] and report["unexpected"] == [] and report["skipped_shape"] == []
    expected_state = v1.ours.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, expected_state[key]), key
    ours.eval()
    with torch.no_grad():
        got = ours(image_set("single"))
    assert_same_detections(reference(v1, "single")[0], got[0])


def test_training_losses_match_torchvision(v1):
    """Same weights, same images and targets: the same five losses. Every anchor and every proposal is
    sampled (huge batch sizes), so that the random sampling cannot make the two differ."""
    big = 10**6
    tv = maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91, min_size=MIN_DIM, max_size=MAX_DIM,
        rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=300, rpn_batch_size_per_image=big,
        box_batch_size_per_image=big,
    )
    tv.load_state_dict(v1.tv.state_dict())
    tv.train()
    for module in tv.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()  # fixed statistics, as our frozen BN
    config = Config(
        NORM="frozen_bn", FROZEN_BN_EPS=1e-5, IMAGE_MIN_DIM=MIN_DIM, IMAGE_MAX_DIM=MAX_DIM,
        IMAGE_MIN_DIM_TRAIN=(MIN_DIM,), RPN_PRE_NMS_TOP_N_TRAIN=300, RPN_POST_NMS_TOP_N_TRAIN=300,
        RPN_BATCH_SIZE_PER_IMAGE=big, ROI_BATCH_SIZE_PER_IMAGE=big,
    )
    ours = MaskRCNN(config)
    ours.load_weights(str(v1.path))
    ours.train()
    a, target_a = shapes_sample(150, 200, [(10, 20, 60, 80), (100, 30, 180, 90), (40, 100, 120, 140)], [1, 2, 3])
    b, target_b = shapes_sample(240, 180, [(20, 20, 90, 70), (60, 90, 150, 150)], [3, 1], seed=1)
    target_a["labels"] = torch.tensor([1, 17, 90])
    expected = tv([a, b], [target_a, target_b])
    got = ours([a, b], [target_a, target_b])
    assert set(got) == set(expected) == LOSS_NAMES
    for name in LOSS_NAMES:
        assert math.isclose(got[name].item(), expected[name].item(), rel_tol=1e-4, abs_tol=1e-6), (
            name, got[name].item(), expected[name].item())


def test_v1_and_v2_module_trees_match_torchvision(v1, v2):
    for pair in (v1, v2):
        tv_shapes = {k: tuple(v.shape) for k, v in pair.tv.state_dict().items()}
        ours_shapes = {k: tuple(v.shape) for k, v in pair.ours.state_dict().items()}
        if pair is v1:  # frozen BN has no counter
            tv_shapes = {k: s for k, s in tv_shapes.items() if not k.endswith("num_batches_tracked")}
        assert ours_shapes == tv_shapes


def test_v2_has_the_v2_modules(v2):
    ours = v2.ours
    assert len([m for m in ours.rpn.head.conv.modules() if isinstance(m, nn.Conv2d)]) == 2
    box_convs = [m for m in ours.roi_heads.box_head.modules() if isinstance(m, nn.Conv2d)]
    assert len(box_convs) == 4
    assert sum(isinstance(m, nn.BatchNorm2d) for m in ours.roi_heads.box_head.modules()) == 4
    linears = [m for m in ours.roi_heads.box_head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(256 * 7 * 7, 1024)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in ours.backbone.fpn.modules()) == 8
    assert sum(isinstance(m, nn.BatchNorm2d) for m in ours.roi_heads.mask_head.modules()) == 4
    assert sum(isinstance(m, nn.BatchNorm2d) for m in ours.backbone.body.modules()) == 53
    v1_model = MaskRCNN(Config(NUM_CLASSES=4))
    assert len([m for m in v1_model.rpn.head.conv.modules() if isinstance(m, nn.Conv2d)]) == 1
    assert not any(isinstance(m, nn.BatchNorm2d) for m in v1_model.modules())
    assert [type(m).__name__ for m in v1_model.roi_heads.box_head.children()] == ["Linear", "Linear"]


# ----------------------------------------------------------------------------------------------------
# detect()


def test_detect_matches_forward_on_arrays_and_paths(small_detector, tmp_path):
    a = (smooth_image(150, 200, seed=3) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    b = (smooth_image(170, 140, seed=4) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path = tmp_path / "b.png"
    skimage.io.imsave(path, b, check_contrast=False)
    small_detector.train()  # detect() switches to eval and back
    results = small_detector.detect([a, str(path)])
    assert small_detector.training
    small_detector.eval()
    tensors = [torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in (a, b)]
    with torch.no_grad():
        outputs = small_detector(tensors)
    assert len(results) == 2
    for image, r, o in zip((a, b), results, outputs):
        n = o["boxes"].shape[0]
        assert n >= 10
        assert set(r) == {"boxes", "class_ids", "scores", "masks"}
        assert isinstance(r["boxes"], np.ndarray) and r["boxes"].dtype == np.float32 and r["boxes"].shape == (n, 4)
        assert r["class_ids"].dtype == np.int64 and r["class_ids"].shape == (n,)
        assert r["scores"].shape == (n,)
        assert r["masks"].dtype == np.bool_ and r["masks"].shape == (n, *image.shape[:2])
        np.testing.assert_allclose(r["boxes"], o["boxes"].numpy(), rtol=0, atol=1e-4)
        np.testing.assert_allclose(r["scores"], o["scores"].numpy(), rtol=0, atol=1e-6)
        np.testing.assert_array_equal(r["class_ids"], o["labels"].numpy())
        np.testing.assert_array_equal(r["masks"], (o["masks"][:, 0] > 0.5).numpy())
        assert r["masks"].any(axis=(1, 2)).sum() >= n // 2  # real masks, not all empty


def test_no_detections_gives_empty_outputs_of_the_right_shapes(small_detector):
    model = clone_with(small_detector, small_config(DETECTION_MIN_CONFIDENCE=1.0)).eval()
    with torch.no_grad():
        (out,) = model([smooth_image(150, 200)])
    assert out["boxes"].shape == (0, 4) and out["scores"].shape == (0,) and out["labels"].shape == (0,)
    assert out["masks"].shape == (0, 1, 150, 200)
    (r,) = model.detect([np.zeros((150, 200, 3), dtype=np.uint8)])
    assert r["boxes"].shape == (0, 4) and r["masks"].shape == (0, 150, 200) and r["masks"].dtype == np.bool_


# ----------------------------------------------------------------------------------------------------
# detect(..., return_intermediates=True): each stage checked against torchvision's own stages

def torchvision_stages(tv, images):
    """torchvision's resized image sizes, FPN features, anchors, proposals and pre-paste detections (in the
    resized image), caught with forward hooks during one inference."""
    caught = {}
    hooks = [
        tv.transform.register_forward_hook(lambda m, i, o: caught.update(sizes=o[0].image_sizes,
                                                                        padded=o[0].tensors.shape[-2:])),
        tv.backbone.register_forward_hook(lambda m, i, o: caught.update(features=o)),
        tv.rpn.anchor_generator.register_forward_hook(lambda m, i, o: caught.update(anchors=o)),
        tv.rpn.register_forward_hook(lambda m, i, o: caught.update(proposals=o[0])),
        # Copies: torchvision's post-processing then rescales and pastes into these same dicts.
        tv.roi_heads.register_forward_hook(lambda m, i, o: caught.update(detections=[dict(d) for d in o[0]])),
    ]
    try:
        with torch.no_grad():
            tv(images)
    finally:
        for hook in hooks:
            hook.remove()
    return SimpleNamespace(**caught)


def to_uint8(image):
    return (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("images", sorted(IMAGE_SETS))
def test_intermediates_match_torchvision_stages(v1, images):
    arrays = [to_uint8(im) for im in image_set(images)]
    tensors = [torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays]
    tv = torchvision_stages(v1.tv, tensors)
    results = v1.ours.detect(arrays, return_intermediates=True)
    plain = v1.ours.detect(arrays)
    for i, (array, r) in enumerate(zip(arrays, results)):
        # The normal outputs do not change when the intermediates are asked for.
        assert "intermediates" not in plain[i]
        for key in ("boxes", "class_ids", "scores", "masks"):
            np.testing.assert_array_equal(r[key], plain[i][key])
        stages = r["intermediates"]
        (height, width), (orig_h, orig_w) = tv.sizes[i], array.shape[:2]
        np.testing.assert_allclose(stages["resize_scale"], (height / orig_h, width / orig_w), rtol=1e-6)
        to_resized = np.array([width / orig_w, height / orig_h] * 2, np.float32)

        # Anchors: per level, in the image's pixels; torchvision's are all levels at once, in the resized image.
        # Strides are the padded width over the feature width (not always 64 on P6, which rounds up).
        assert stages["anchor_strides"] == [tv.padded[1] // f.shape[-1] for f in tv.features.values()]
        assert stages["anchor_strides"][:4] == [4, 8, 16, 32]
        assert stages["anchor_sizes"] == [32, 64, 128, 256, 512]
        counts = [f.shape[-2] * f.shape[-1] * 3 for f in tv.features.values()]
        assert [a.shape for a in stages["anchors"]] == [(n, 4) for n in counts]
        np.testing.assert_allclose(np.concatenate(stages["anchors"]) * to_resized, tv.anchors[i].numpy(), atol=1e-3)

        # Proposals after NMS are torchvision's (up to the order of near-equal scores, which CPUs round
        # differently); NMS per level of the ones before gives them again.
        after = stages["proposals"] * to_resized
        pair_near_ties(tv.proposals[i], after, stages["proposal_scores"], box_atol=1e-3)
        before = torch.from_numpy(stages["proposals_before_nms"])
        keep = torchvision.ops.batched_nms(before, torch.from_numpy(stages["proposal_scores_before_nms"]),
                                           torch.from_numpy(stages["proposal_levels_before_nms"]),
                                           v1.config.RPN_NMS_THRESHOLD)[: v1.config.RPN_POST_NMS_TOP_N_TEST]
        p = pair_near_ties(before[keep], stages["proposals"], stages["proposal_scores"], box_atol=0)
        np.testing.assert_array_equal(stages["proposal_scores_before_nms"][keep.numpy()], stages["proposal_scores"][p])
        assert before.shape[0] > after.shape[0]

        # The 28x28 mask probabilities are torchvision's before pasting. Detections are paired by box, since
        # scores equal to 1e-6 may come in either order.
        n = r["boxes"].shape[0]
        assert n >= 10
        expected = tv.detections[i]
        distance = np.abs((r["boxes"] * to_resized)[:, None] - expected["boxes"].numpy()[None]).max(-1)
        pair = distance.argmin(1)
        assert distance[np.arange(n), pair].max() < 1e-3 and len(set(pair)) == n
        expected = {key: value[torch.from_numpy(pair)] for key, value in expected.items()}
        np.testing.assert_array_equal(r["class_ids"], expected["labels"].numpy())
        np.testing.assert_allclose(stages["mask_probs"], expected["masks"][:, 0].numpy(), atol=1e-4)

        # Each detection's proposal, run through torchvision's box head and decoded for its class, gives
        # the detection's box and score.
        proposals = torch.from_numpy(stages["detection_proposals"] * to_resized)
        assert proposals.shape == (n, 4)
        heads = v1.tv.roi_heads
        with torch.no_grad():
            pooled = heads.box_roi_pool({k: f[i : i + 1] for k, f in tv.features.items()}, [proposals],
                                        [tv.sizes[i]])
            logits, deltas = heads.box_predictor(heads.box_head(pooled))
        labels = torch.from_numpy(r["class_ids"])
        decoded = heads.box_coder.decode(deltas, [proposals])[torch.arange(n), labels]
        decoded = torchvision.ops.clip_boxes_to_image(decoded, tv.sizes[i])
        np.testing.assert_allclose(decoded.numpy(), expected["boxes"].numpy(), atol=1e-3)
        scores = torch.softmax(logits, -1)[torch.arange(n), labels]
        np.testing.assert_allclose(scores.numpy(), r["scores"], atol=1e-5)


def test_intermediates_without_detections(small_detector):
    model = clone_with(small_detector, small_config(DETECTION_MIN_CONFIDENCE=1.0)).eval()
    (r,) = model.detect([to_uint8(smooth_image(150, 200))], return_intermediates=True)
    stages = r["intermediates"]
    assert r["boxes"].shape == (0, 4)
    assert stages["detection_proposals"].shape == (0, 4)
    assert stages["mask_probs"].shape == (0, model.config.MASK_SIZE, model.config.MASK_SIZE)
    assert stages["proposals"].shape[0] > 0  # the RPN still proposes
    assert stages["proposal_scores"].shape == (stages["proposals"].shape[0],)


# ----------------------------------------------------------------------------------------------------
# Training


def test_training_losses_are_finite_and_positive():
    torch.manual_seed(0)
    model = MaskRCNN(small_config()).train()
    images, targets = train_samples()
    losses = model(images, targets)
    assert set(losses) == LOSS_NAMES
    for name, value in losses.items():
        assert value.dim() == 0, name
        assert torch.isfinite(value), name
        assert value.item() > 0, name


def test_image_without_objects():
    torch.manual_seed(0)
    model = MaskRCNN(small_config()).train()
    empty_image = smooth_image(150, 200, seed=5)
    losses = model([empty_image], [empty_target(150, 200)])
    assert set(losses) == LOSS_NAMES
    for name, value in losses.items():
        assert torch.isfinite(value), name
    # Nothing to regress or segment; the classifiers still learn "background".
    assert losses["loss_rpn_box_reg"].item() == 0
    assert losses["loss_box_reg"].item() == 0
    assert losses["loss_mask"].item() == 0
    assert losses["loss_objectness"].item() > 0 and losses["loss_classifier"].item() > 0
    sum(losses.values()).backward()
    # Mixed with an image with objects.
    images, targets = train_samples()
    losses = model([empty_image, images[0]], [empty_target(150, 200), targets[0]])
    for name, value in losses.items():
        assert torch.isfinite(value) and value.item() > 0, name


def test_backward_reaches_every_trainable_parameter():
    torch.manual_seed(0)
    model = MaskRCNN(small_config()).train()
    images, targets = train_samples()
    sum(model(images, targets).values()).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == len(list(model.parameters()))  # TRAINABLE_BACKBONE_LAYERS=5: everything trains
    no_grad = [n for n, p in trainable if p.grad is None]
    assert no_grad == []
    non_finite = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    assert non_finite == []
    assert any(p.grad.abs().sum() > 0 for n, p in trainable if n.startswith("backbone.body.conv1"))


def whole_image_crowd(height, width):
    """A target with no objects and one crowd region covering the whole image."""
    return {**empty_target(height, width), "crowd_boxes": torch.tensor([[0.0, 0.0, width, height]])}


@pytest.mark.parametrize("case", ["crowd over the whole image", "ROI_BATCH_SIZE_PER_IMAGE=0",
                                  "RPN_BATCH_SIZE_PER_IMAGE=0", "v2 heads, ROI_BATCH_SIZE_PER_IMAGE=0"])
def test_no_sampled_rois_or_anchors_give_zero_losses_that_reach_every_parameter(case):
    # Nothing sampled: the losses over no samples are 0 (not NaN, not a crash), and backward still gives every
    # parameter a gradient (zero for the heads that saw no sample), as DDP requires of every step.
    torch.manual_seed(0)
    settings = {"ROI_BATCH_SIZE_PER_IMAGE=0": dict(ROI_BATCH_SIZE_PER_IMAGE=0),
                "RPN_BATCH_SIZE_PER_IMAGE=0": dict(RPN_BATCH_SIZE_PER_IMAGE=0),
                "v2 heads, ROI_BATCH_SIZE_PER_IMAGE=0": dict(ROI_BATCH_SIZE_PER_IMAGE=0, VARIANT="v2",
                                                             BOX_HEAD_CONVS=2, RPN_CONVS=2)}.get(case, {})
    model = MaskRCNN(small_config(**settings)).train()
    images, targets = train_samples()
    if case == "crowd over the whole image":
        images, targets = images[:1], [whole_image_crowd(*images[0].shape[-2:])]
    losses = model(images, targets)
    assert set(losses) == LOSS_NAMES
    rpn_case = case.startswith("RPN")
    empty = ["loss_objectness", "loss_rpn_box_reg"] if rpn_case else ["loss_classifier", "loss_box_reg", "loss_mask"]
    assert [losses[name].item() for name in empty] == [0] * len(empty)
    assert all(torch.isfinite(value) for value in losses.values())
    assert losses["loss_classifier" if rpn_case else "loss_objectness"].item() > 0  # the other part still learns
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []
    unsampled = "rpn.head." if rpn_case else "roi_heads."
    heads = [(n, p) for n, p in model.named_parameters() if n.startswith(unsampled)]
    assert heads and all(p.grad.abs().max() == 0 for n, p in heads)


def test_sgd_steps_reduce_the_loss():
    torch.manual_seed(0)
    # The backbone is frozen to save time; FPN, RPN and heads train.
    model = MaskRCNN(small_config(TRAINABLE_BACKBONE_LAYERS=0)).train()
    images, targets = train_samples()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.003, momentum=0.9)
    totals = []
    for _ in range(30):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        totals.append(loss.item())
    assert all(math.isfinite(t) for t in totals)
    first, last = np.mean(totals[:3]), np.mean(totals[-3:])
    assert last < 0.6 * first, totals


@pytest.mark.parametrize("layers", [0, 1, 3, 5])
def test_trainable_backbone_layers_freeze_as_torchvision(layers):
    model = MaskRCNN(small_config(NORM="bn", TRAINABLE_BACKBONE_LAYERS=layers))
    reference = resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, norm_layer=nn.BatchNorm2d, trainable_layers=layers
    )
    expected = {n: p.requires_grad for n, p in reference.body.named_parameters()}
    got = {n: p.requires_grad for n, p in model.backbone.body.named_parameters()}
    assert got == expected
    # Hand-written expectation too: the top `layers` of layer4, layer3, layer2, layer1, conv1 (+ bn1 with 5).
    stages = ["layer4", "layer3", "layer2", "layer1", "conv1"][:layers] + (["bn1"] if layers == 5 else [])
    for name, requires_grad in got.items():
        assert requires_grad == (name.split(".")[0] in stages), name
    others = [p for n, p in model.named_parameters() if not n.startswith("backbone.body.")]
    assert others and all(p.requires_grad for p in others)  # FPN, RPN and heads always train


def test_trainable_backbone_layers_3_with_frozen_bn():
    model = MaskRCNN(small_config(NORM="frozen_bn", TRAINABLE_BACKBONE_LAYERS=3))
    for name, parameter in model.backbone.body.named_parameters():
        stage = name.split(".")[0]
        assert parameter.requires_grad == (stage in ("layer2", "layer3", "layer4")), name
    assert not model.backbone.body.conv1.weight.requires_grad
    assert all(not p.requires_grad for p in model.backbone.body.layer1.parameters())


@pytest.mark.parametrize("norm, kind", [("frozen_bn", FrozenBatchNorm2d), ("bn", nn.BatchNorm2d), ("gn", nn.GroupNorm)])
def test_norm_switch(norm, kind):
    body = MaskRCNN(small_config(NORM=norm, FROZEN_BN_EPS=0.25)).backbone.body
    norms = [m for m in body.modules() if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d, nn.GroupNorm))]
    assert len(norms) == 20  # ResNet-18: stem, 8 blocks x 2, 3 downsamples
    assert all(type(m) is kind for m in norms)
    if norm == "frozen_bn":
        assert all(m.eps == 0.25 for m in norms)
        assert all(len(list(m.parameters())) == 0 for m in norms)  # nothing trains
    if norm == "gn":
        assert all(m.num_groups == 32 for m in norms)


@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_frozen_batch_norm_matches_torchvision(eps):
    g = torch.Generator().manual_seed(0)
    ours, tv = FrozenBatchNorm2d(8, eps=eps), torchvision.ops.FrozenBatchNorm2d(8, eps=eps)
    for name in ("weight", "bias", "running_mean"):
        value = torch.randn(8, generator=g)
        getattr(ours, name).copy_(value)
        getattr(tv, name).copy_(value)
    var = torch.rand(8, generator=g) + 0.1
    ours.running_var.copy_(var)
    tv.running_var.copy_(var)
    x = torch.randn(2, 8, 5, 6, generator=g)
    torch.testing.assert_close(ours(x), tv(x), atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Focal loss


def test_focal_losses_reduce_to_the_ordinary_losses():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1000, generator=g) * 3
    targets = (torch.rand(1000, generator=g) > 0.7).float()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, 0.0, None), expected, atol=1e-6, rtol=0)
    class_logits = torch.randn(500, 7, generator=g) * 3
    labels = torch.randint(0, 7, (500,), generator=g)
    expected = torch.nn.functional.cross_entropy(class_logits, labels)
    torch.testing.assert_close(softmax_focal_loss(class_logits, labels, 0.0, None), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
@pytest.mark.parametrize("alpha", [None, 0.25, 0.75])
def test_sigmoid_focal_loss_matches_torchvision(gamma, alpha):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(300, generator=g) * 3
    targets = (torch.rand(300, generator=g) > 0.5).float()
    expected = torchvision.ops.sigmoid_focal_loss(
        logits, targets, alpha=-1 if alpha is None else alpha, gamma=gamma, reduction="mean"
    )
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, gamma, alpha), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("alpha", [None, 0.25])
def test_softmax_focal_loss_matches_formula(gamma, alpha):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(200, 5, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 5, (200,), generator=g)
    p_y = torch.softmax(logits, dim=1)[torch.arange(200), labels]
    loss = -((1 - p_y) ** gamma) * torch.log(p_y)
    if alpha is not None:
        loss = loss * torch.where(labels > 0, torch.tensor(alpha), torch.tensor(1 - alpha)).double()
    expected = loss.mean().float()
    got = softmax_focal_loss(logits.float(), labels, gamma, alpha)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_focal_loss_down_weights_easy_examples():
    # Confident and correct: focal << cross entropy. Confident and wrong: almost the same.
    easy_logits = torch.full((10,), 4.0)
    ones = torch.ones(10)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(easy_logits, ones)
    assert sigmoid_focal_loss(easy_logits, ones, 2.0, None) < 0.01 * bce
    hard = sigmoid_focal_loss(-easy_logits, ones, 2.0, None)
    assert 0.9 * torch.nn.functional.binary_cross_entropy_with_logits(-easy_logits, ones) < hard
    class_logits = torch.zeros(10, 4)
    class_logits[:, 2] = 5.0
    right, wrong = torch.full((10,), 2), torch.full((10,), 1)
    ce = torch.nn.functional.cross_entropy(class_logits, right)
    assert softmax_focal_loss(class_logits, right, 2.0, None) < 0.01 * ce
    ce_wrong = torch.nn.functional.cross_entropy(class_logits, wrong)
    assert softmax_focal_loss(class_logits, wrong, 2.0, None) > 0.9 * ce_wrong


def test_focal_alpha_weights_positives_and_negatives():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(100, generator=g)
    ones, zeros = torch.ones(100), torch.zeros(100)
    bce_pos = torch.nn.functional.binary_cross_entropy_with_logits(logits, ones)
    bce_neg = torch.nn.functional.binary_cross_entropy_with_logits(logits, zeros)
    torch.testing.assert_close(sigmoid_focal_loss(logits, ones, 0.0, 0.25), 0.25 * bce_pos)
    torch.testing.assert_close(sigmoid_focal_loss(logits, zeros, 0.0, 0.25), 0.75 * bce_neg)
    class_logits = torch.randn(100, 3, generator=g)
    foreground, background = torch.full((100,), 2), torch.zeros(100, dtype=torch.int64)
    ce_fg = torch.nn.functional.cross_entropy(class_logits, foreground)
    ce_bg = torch.nn.functional.cross_entropy(class_logits, background)
    torch.testing.assert_close(softmax_focal_loss(class_logits, foreground, 0.0, 0.25), 0.25 * ce_fg)
    torch.testing.assert_close(softmax_focal_loss(class_logits, background, 0.0, 0.25), 0.75 * ce_bg)


def losses_with(base, images, targets, seed=0, **settings):
    model = clone_with(base, small_config(**settings))
    torch.manual_seed(seed)
    return {k: v.item() for k, v in model(images, targets).items()}


@pytest.mark.parametrize("switch, affected", [("RPN_FOCAL_LOSS", "loss_objectness"),
                                              ("BOX_FOCAL_LOSS", "loss_classifier")])
def test_focal_loss_switches(switch, affected):
    torch.manual_seed(0)
    base = MaskRCNN(small_config()).train()
    images, targets = train_samples()
    default = losses_with(base, images, targets)
    # gamma 0 and no alpha: exactly the ordinary losses (same seed, so the same samples).
    plain = losses_with(base, images, targets, **{switch: True, "FOCAL_GAMMA": 0.0, "FOCAL_ALPHA": None})
    for name in LOSS_NAMES:
        assert math.isclose(plain[name], default[name], rel_tol=1e-6, abs_tol=1e-7), name
    # gamma 2: only the affected loss changes, and it gets smaller (every factor (1 - p_t)^2 is < 1).
    focal = losses_with(base, images, targets, **{switch: True, "FOCAL_GAMMA": 2.0})
    assert focal[affected] < 0.9 * default[affected]
    for name in LOSS_NAMES - {affected}:
        assert math.isclose(focal[name], default[name], rel_tol=1e-6, abs_tol=1e-7), name
    # The switch off: FOCAL_GAMMA alone changes nothing.
    off = losses_with(base, images, targets, FOCAL_GAMMA=2.0, FOCAL_ALPHA=0.25)
    for name in LOSS_NAMES:
        assert math.isclose(off[name], default[name], rel_tol=1e-6, abs_tol=1e-7), name


# ----------------------------------------------------------------------------------------------------
# Other config switches


def test_detection_max_instances_caps(small_detector, small_reference):
    images = [smooth_image(150, 200, seed=7)]
    full = small_reference.out
    assert full["boxes"].shape[0] > 7
    (capped,) = detections(clone_with(small_detector, small_config(DETECTION_MAX_INSTANCES=7)), images)
    assert capped["boxes"].shape[0] == 7
    torch.testing.assert_close(capped["boxes"], full["boxes"][:7])
    torch.testing.assert_close(capped["scores"], full["scores"][:7])
    assert torch.equal(capped["labels"], full["labels"][:7])


def test_detection_min_confidence_filters(small_detector, small_reference):
    images = [smooth_image(150, 200, seed=7)]
    full = small_reference.out
    threshold = float(full["scores"].median())
    assert float(full["scores"].min()) < threshold
    (kept,) = detections(clone_with(small_detector, small_config(DETECTION_MIN_CONFIDENCE=threshold)), images)
    # Greedy NMS: dropping low scores first does not change which higher-scoring boxes survive.
    expected = full["scores"] > threshold
    assert 0 < kept["scores"].shape[0] == int(expected.sum())
    assert bool((kept["scores"] > threshold).all())
    torch.testing.assert_close(kept["boxes"], full["boxes"][expected])
    torch.testing.assert_close(kept["scores"], full["scores"][expected])


@pytest.mark.parametrize("name, layer3_blocks", [("resnet18", 2), ("resnet34", 6), ("resnet50", 6),
                                                 ("resnet101", 23)])
def test_backbone_depth(name, layer3_blocks):
    model = MaskRCNN(Config(BACKBONE=name, NUM_CLASSES=4, FPN_CHANNELS=32, BOX_HEAD_DIM=32, MASK_HEAD_CHANNELS=32))
    body = model.backbone.body
    assert len(body.layer3) == layer3_blocks
    # Exactly torchvision's ResNet trunk: same names and shapes (without fc and BN counters).
    reference = getattr(torchvision.models, name)(weights=None).state_dict()
    expected = {k: tuple(v.shape) for k, v in reference.items()
                if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert {k: tuple(v.shape) for k, v in body.state_dict().items()} == expected
    in_channels = [m[0].in_channels for m in model.backbone.fpn.inner_blocks]
    assert in_channels == ([64, 128, 256, 512] if name in ("resnet18", "resnet34") else [256, 512, 1024, 2048])


def pyramid_features(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, 256 // s, 192 // s, generator=g) for s in (4, 8, 16, 32)]


@pytest.mark.parametrize("aligned", [False, True])
def test_pyramid_roi_align_matches_torchvision(aligned):
    features = pyramid_features()
    boxes = [torch.tensor([[10.0, 12.0, 40.0, 30.0], [5.5, 7.25, 180.0, 250.0], [60.0, 20.0, 150.0, 130.0]]),
             torch.tensor([[0.0, 0.0, 192.0, 256.0], [100.3, 50.2, 112.9, 140.1]])]
    config = Config(POOL_ALIGNED=aligned)
    got = PyramidRoIAlign(7, config)(features, boxes, [(256, 192), (256, 192)])
    # FPN eq. 1 by hand: level = floor(4 + log2(sqrt(area) / 224)), clamped to 2..5.
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], dim=1) for i, b in enumerate(boxes)])
    expected = torch.empty_like(got)
    for j, roi in enumerate(rois):
        side = math.sqrt((roi[3] - roi[1]).item() * (roi[4] - roi[2]).item())
        level = min(max(math.floor(4 + math.log2(side / 224) + 1e-6), 2), 5)
        expected[j] = torchvision.ops.roi_align(features[level - 2], roi[None], 7, spatial_scale=2.0**-level,
                                                sampling_ratio=2, aligned=aligned)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if not aligned:  # torchvision's own multi-scale pooler
        pooler = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
        tv = pooler({str(i): f for i, f in enumerate(features)}, boxes, [(256, 192), (256, 192)])
        torch.testing.assert_close(got, tv, atol=1e-5, rtol=1e-5)


def test_pool_aligned_changes_detections(small_detector, small_reference):
    images = [smooth_image(150, 200, seed=7)]
    plain = small_reference.out
    (aligned,) = detections(clone_with(small_detector, small_config(POOL_ALIGNED=True)), images)
    n = min(len(plain["scores"]), len(aligned["scores"]))
    assert n > 0
    assert not torch.allclose(plain["scores"][:n], aligned["scores"][:n])


def test_mask_pool_size_sets_the_mask_resolution(small_detector, small_reference):
    config = small_config(MASK_POOL_SIZE=7)
    assert config.MASK_SIZE == 14
    model = clone_with(small_detector, config)  # no parameter depends on the pooled size
    assert model.roi_heads.mask_roi_pool.output_size == 7
    shapes = []
    model.roi_heads.mask_predictor.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    (out,) = detections(model, [smooth_image(150, 200, seed=9)])
    assert shapes and shapes[0][1:] == (4, 14, 14)
    assert out["masks"].shape[1:] == (1, 150, 200) and out["masks"].shape[0] == out["boxes"].shape[0] > 0
    assert small_reference.mask_logits_shape[1:] == (4, 28, 28)  # the default: twice 14
    # Training with the smaller masks.
    torch.manual_seed(0)
    images, targets = train_samples()
    losses = model.train()(images, targets)
    assert torch.isfinite(losses["loss_mask"]) and losses["loss_mask"].item() > 0


def test_channels_last_switch_changes_only_the_layout(small_detector, small_reference):
    assert small_detector.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    model = clone_with(small_detector, small_config(CHANNELS_LAST=False))
    assert model.backbone.body.conv1.weight.is_contiguous()
    assert not model.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    (out,) = detections(model, [smooth_image(150, 200, seed=7)])
    assert_same_detections(small_reference.out, out, min_detections=10)


def test_memory_format_follows_the_mode(small_detector, monkeypatch):
    # CHANNELS_LAST None picks a layout per mode (model.memory_format_for, which depends on the CPU; here
    # replaced by one that differs between the modes): the conv weights must follow each change of mode, stay
    # the same Parameter objects (an optimizer holds them), and never become inference tensors when eval()
    # runs inside torch.inference_mode(). The losses are those of the NCHW model.
    def per_mode(channels_last, training, device):
        return torch.contiguous_format if training else torch.channels_last

    monkeypatch.setattr(model_module, "memory_format_for", per_mode)
    model = clone_with(small_detector, small_config(CHANNELS_LAST=None)).train()
    nchw = clone_with(small_detector, small_config(CHANNELS_LAST=False)).train()
    weight = model.backbone.body.conv1.weight
    for training in (False, True, False, True):
        with torch.inference_mode():
            model.train(training)
        layout = torch.contiguous_format if training else torch.channels_last
        assert model.memory_format == layout and weight.is_contiguous(memory_format=layout)
        assert weight.is_contiguous() == training
        assert model.backbone.body.conv1.weight is weight and not weight.is_inference()
    torch.manual_seed(0)
    images, targets = train_samples()
    got = model(images, targets)
    torch.manual_seed(0)
    expected = nchw(images, targets)
    sum(got.values()).backward()
    for name in expected:
        assert math.isclose(got[name].item(), expected[name].item(), rel_tol=1e-4, abs_tol=1e-6), name
    assert weight.grad is not None and torch.isfinite(weight.grad).all()


@pytest.mark.parametrize("setting, training, device, capability, channels_last", [
    (None, True, "cpu", "AVX2", False),  # CPU training: NCHW without AVX-512 (config.py says what was measured)
    (None, True, "cpu", "AVX512", True),
    (None, False, "cpu", "AVX2", True),
    (None, True, "cuda", "AVX2", True),
    (True, True, "cpu", "AVX2", True),  # an explicit setting holds in both modes, on any CPU
    (False, False, "cpu", "AVX512", False),
])
def test_memory_format_rule(setting, training, device, capability, channels_last, monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    expected = torch.channels_last if channels_last else torch.contiguous_format
    assert model_module.memory_format_for(setting, training, torch.device(device)) == expected


def test_anchor_ratios_set_the_anchors_per_location():
    model = MaskRCNN(small_config(ANCHOR_RATIOS=(0.5, 1.0)))
    assert model.rpn.head.cls_logits.out_channels == 2
    assert model.rpn.head.bbox_pred.out_channels == 8
    torch.manual_seed(0)
    images, targets = train_samples()
    losses = model.train()(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())


# ----------------------------------------------------------------------------------------------------
# load_weights


def randomised_state(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
            for k, v in module.state_dict().items()}


def test_imagenet_checkpoint_loads_into_the_backbone_only(tmp_path):
    state = randomised_state(torchvision.models.resnet18(weights=None))
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    model = MaskRCNN(small_config(NORM="frozen_bn", FROZEN_BN_EPS=1e-5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = model.load_weights(str(path))
    after = model.state_dict()
    body_keys = sorted(k for k in after if k.startswith("backbone.body."))
    assert sorted(report["loaded"]) == body_keys
    for key in body_keys:
        assert torch.equal(after[key], state[key[len("backbone.body."):]]), key
    for key in after:
        if not key.startswith("backbone.body."):
            assert torch.equal(after[key], before[key]), key  # untouched
    assert sorted(report["missing"]) == sorted(k for k in after if not k.startswith("backbone.body."))
    assert any(k.startswith("roi_heads.box_predictor.") for k in report["missing"])
    assert not any("fc." in k for k in report["loaded"] + report["unexpected"])  # the classifier is dropped
    assert report["skipped_shape"] == [] and report["excluded"] == []
    assert [k for k in report["unexpected"] if not k.endswith("num_batches_tracked")] == []


def test_imagenet_checkpoint_reports_nothing_unexpected(tmp_path):
    """torchvision's ResNet state_dict has BN counters (num_batches_tracked); frozen BN has none. They are no
    weights (the Mask R-CNN path drops them silently), so they must not be reported (and logged) as
    unexpected keys."""
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    report = MaskRCNN(small_config(NORM="frozen_bn", FROZEN_BN_EPS=1e-5)).load_weights(str(path))
    assert report["unexpected"] == []


def test_imagenet_name_downloads_the_configs_backbone(monkeypatch):
    state = torchvision.models.resnet18(weights=None).state_dict()
    urls = []

    def fake_download(url, *args, **kwargs):
        urls.append(url)
        return state

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    model = MaskRCNN(small_config(NORM="frozen_bn"))
    report = model.load_weights("imagenet")
    assert urls == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url]
    assert report["loaded"] and all(k.startswith("backbone.body.") for k in report["loaded"])


@pytest.mark.parametrize("name", ["coco", "coco_v2", "imagenet"])
def test_named_weights_without_network_raise_a_clear_error(name, monkeypatch):
    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    expected_url = {
        "coco": torchvision.models.detection.MaskRCNN_ResNet50_FPN_Weights.COCO_V1.url,
        "coco_v2": torchvision.models.detection.MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1.url,
        "imagenet": torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url,
    }[name]
    model = MaskRCNN(small_config(NORM="frozen_bn"))
    with pytest.raises(RuntimeError) as error:
        model.load_weights(name)
    message = str(error.value)
    assert torch.hub.get_dir() in message and "copy" in message
    assert expected_url in message


def test_missing_weights_file(tmp_path):
    model = MaskRCNN(small_config())
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        model.load_weights(str(tmp_path / "nope.pth"))


HEAD_KEYS = {
    "roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
    "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias",
    "roi_heads.mask_predictor.mask_fcn_logits.weight", "roi_heads.mask_predictor.mask_fcn_logits.bias",
}


@pytest.fixture(scope="module")
def four_class_config():
    return Config(NUM_CLASSES=4, NORM="frozen_bn", FROZEN_BN_EPS=1e-5, **OUR_SETTINGS)


def test_exclude_heads_for_fine_tuning(v1, four_class_config):
    model = MaskRCNN(four_class_config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = model.load_weights(str(v1.path), exclude=("heads",))
    assert set(report["excluded"]) == HEAD_KEYS
    assert report["skipped_shape"] == [] and report["unexpected"] == []
    assert set(report["missing"]) == HEAD_KEYS
    state, tv_state = model.state_dict(), v1.tv.state_dict()
    assert set(report["loaded"]) == set(state) - HEAD_KEYS
    for key in state:
        if key in HEAD_KEYS:
            assert torch.equal(state[key], before[key]), key
        else:
            assert torch.equal(state[key], tv_state[key]), key


def test_shape_mismatch_is_skipped_and_logged(v1, four_class_config, caplog):
    model = MaskRCNN(four_class_config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="model"):
        report = model.load_weights(str(v1.path))
    skipped = {entry.split()[0] for entry in report["skipped_shape"]}
    assert skipped == HEAD_KEYS
    assert report["excluded"] == [] and report["unexpected"] == []
    assert set(report["missing"]) == HEAD_KEYS
    assert "roi_heads.box_predictor.cls_score.weight" in caplog.text
    assert any(r.levelno >= logging.WARNING for r in caplog.records)
    state = model.state_dict()
    for key in HEAD_KEYS:
        assert torch.equal(state[key], before[key]), key
    assert torch.equal(state["backbone.body.conv1.weight"], v1.tv.state_dict()["backbone.body.conv1.weight"])


def test_exclude_by_prefix_and_regex(tmp_path):
    torch.manual_seed(1)
    source = randomise_norms(MaskRCNN(small_config()), seed=3)
    path = tmp_path / "ckpt.pth"
    torch.save(source.state_dict(), path)
    model = MaskRCNN(small_config())
    report = model.load_weights(str(path), exclude=("rpn.", r"roi_heads\.mask_head\.\d+\.0\.weight"))
    state = source.state_dict()
    expected_excluded = {k for k in state if k.startswith("rpn.")} | {
        k for k in state if k.startswith("roi_heads.mask_head.") and k.endswith(".0.weight")}
    assert set(report["excluded"]) == expected_excluded
    assert set(report["loaded"]) == set(state) - expected_excluded


@pytest.mark.parametrize("layout", ["file", "dict", "ours", "module", "ours+module"])
def test_checkpoint_layouts(layout, tmp_path):
    torch.manual_seed(1)
    source = randomise_norms(MaskRCNN(small_config()), seed=3)
    state = source.state_dict()
    if layout in ("module", "ours+module"):
        saved = {"module." + k: v for k, v in state.items()}
    else:
        saved = dict(state)
    if layout.startswith("ours"):
        saved = {"model": saved, "iteration": 3, "config": source.config.to_dict()}
    torch.manual_seed(2)
    model = MaskRCNN(small_config())
    if layout == "dict":
        report = model.load_weights(saved)
    else:
        path = tmp_path / "ckpt.pth"
        torch.save(saved, path)
        report = model.load_weights(str(path))
    assert report["missing"] == [] and report["unexpected"] == [] and report["skipped_shape"] == []
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_convert_state_dict_renames_legacy_keys():
    legacy = {
        "backbone.fpn.inner_blocks.2.weight": 1, "backbone.fpn.layer_blocks.3.bias": 2, "rpn.head.conv.weight": 3,
        "roi_heads.mask_head.mask_fcn1.weight": 4, "roi_heads.mask_head.mask_fcn4.bias": 5,
        "backbone.body.layer1.0.bn1.running_mean": 6, "roi_heads.box_head.fc6.weight": 7,
    }
    assert dict(model_module.convert_state_dict(legacy)) == {
        "backbone.fpn.inner_blocks.2.0.weight": 1, "backbone.fpn.layer_blocks.3.0.bias": 2,
        "rpn.head.conv.0.0.weight": 3, "roi_heads.mask_head.0.0.weight": 4, "roi_heads.mask_head.3.0.bias": 5,
        "backbone.body.layer1.0.bn1.running_mean": 6, "roi_heads.box_head.fc6.weight": 7,
    }


# ----------------------------------------------------------------------------------------------------
# Input validation


@pytest.fixture(scope="module")
def checker():
    return MaskRCNN(small_config())


def good_target(height=100, width=120):
    target = {
        "boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]),
        "labels": torch.tensor([1]),
        "masks": torch.zeros((1, height, width), dtype=torch.uint8),
    }
    target["masks"][0, 10:60, 10:50] = 1
    return target


@pytest.mark.parametrize("images, match", [
    (torch.rand(3, 100, 120), r"images must be a non-empty list"),
    ([], r"images must be a non-empty list"),
    ([torch.rand(100, 120, 3)], r"images\[0\] must be \[3, H, W\]"),
    ([torch.rand(3, 100, 120), torch.rand(1, 100, 120)], r"images\[1\] must be \[3, H, W\]"),
    ([torch.rand(4, 100, 120)], r"images\[0\] must be \[3, H, W\]"),
    ([torch.rand(100, 120)], r"images\[0\] must be \[3, H, W\]"),
    ([(torch.rand(3, 100, 120) * 255).to(torch.uint8)], r"images\[0\] must be floating point"),
    ([np.zeros((3, 100, 120), dtype=np.float32)], r"images\[0\] must be a torch.Tensor"),
    ([torch.rand(3, 100, 120), torch.rand(3, 100, 120) * 255], r"images\[1\] has values from .*; image tensors must "
                                                               r"be in \[0, 1\] \(divide 0-255 images by 255\)"),
])
def test_bad_images(checker, images, match):
    checker.eval()
    with pytest.raises(ValueError, match=match):
        checker(images)


def one_pixel_image(value):
    image = torch.zeros(3, 100, 120)
    image[1, 40, 50] = value
    return image


@pytest.mark.parametrize("value, match", [(float("nan"), r"images\[1\] has 1 NaN and 0 infinite values"),
                                          (255.0, r"images\[1\] has values from 0 to 255; .* must be in \[0, 1\]"),
                                          (-1.0, r"images\[1\] has values from -1 to 0; .* must be in \[0, 1\]")])
@pytest.mark.parametrize("entry", ["forward", "training", "infer"])
def test_every_entry_checks_the_image_values(checker, entry, value, match):
    # A NaN pixel or a 0-255 image would give no detections (or NaN losses) and no error.
    images = [torch.rand(3, 100, 120), one_pixel_image(value)]
    with pytest.raises(ValueError, match=match):
        if entry == "infer":
            checker.eval().infer(images)
        elif entry == "training":
            checker.train()(images, [good_target(), good_target()])
        else:
            checker.eval()(images)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_images_of_other_float_dtypes_are_converted(small_detector, small_reference, dtype):
    # Converted to the model's float32 first: a float64 image gives the float32 image's detections exactly, a
    # float16 one those of its float32 value.
    image = smooth_image(150, 200, seed=7)
    (out,) = detections(small_detector, [image.to(dtype)])
    expected = small_reference.out if dtype == torch.float64 else detections(small_detector, [image.half().float()])[0]
    assert out["boxes"].dtype == torch.float32 and len(out["boxes"]) > 0
    for key in ("boxes", "scores", "labels", "masks"):
        assert torch.equal(out[key], expected[key]), key


@pytest.mark.parametrize("height, width", [(1, 1000), (1000, 1)])
def test_images_of_extreme_aspect_ratio(small_detector, height, width):
    # The resize would make the short side 0 pixels; it keeps 1, and the detections lie inside the image.
    image = smooth_image(height, width, seed=1)
    (out,) = detections(small_detector, [image])
    (r,) = small_detector.detect([(image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()])
    for boxes, masks in ((out["boxes"], out["masks"][:, 0]), (torch.from_numpy(r["boxes"]), r["masks"])):
        assert masks.shape == (boxes.shape[0], height, width)
        assert torch.isfinite(boxes).all()
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()


def test_gradients_reach_the_input_images(small_detector):
    # Inference with an image that requires grad (attribution, adversarial examples): d(sum of scores)/d(image).
    model = clone_with(small_detector, small_detector.config).eval()
    image = smooth_image(150, 200, seed=7).requires_grad_()
    (out,) = model([image])
    assert len(out["scores"]) > 0
    out["scores"].sum().backward()
    assert image.grad is not None and image.grad.shape == image.shape
    assert torch.isfinite(image.grad).all() and image.grad.abs().max() > 0


def test_detect_names_the_image_and_the_dtype_it_refuses(checker):
    good = np.zeros((100, 120, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"images\[1\]: image must be uint8 \(0-255\); got float32"):
        checker.detect([good, good.astype(np.float32)])


def test_detect_thresholds_masks_while_pasting(small_detector, monkeypatch):
    # detect() must not make full-size float masks (9 GB for 80 detections on a 20 MP photo): every paste it
    # asks for is thresholded, and its masks are that paste's bool output.
    calls = []
    original = model_module.paste_masks

    def spy(masks, boxes, size, threshold=None, **kwargs):
        calls.append(threshold)
        return original(masks, boxes, size, threshold, **kwargs)

    monkeypatch.setattr(model_module, "paste_masks", spy)
    image = (smooth_image(150, 200, seed=7) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    (r,) = small_detector.detect([image])
    assert calls == [small_detector.config.MASK_THRESHOLD]
    assert r["masks"].dtype == np.bool_ and len(r["masks"]) > 0


def test_training_requires_targets(checker):
    checker.train()
    with pytest.raises(ValueError, match="targets"):
        checker([torch.rand(3, 100, 120)])


def _with(**changes):
    target = good_target()
    target.update(changes)
    return target


@pytest.mark.parametrize("target, match", [
    (_with(boxes=torch.tensor([[50.0, 10.0, 10.0, 60.0]])), r"targets\[0\]\['boxes'\]\[0\].*x2 <= x1"),
    (_with(boxes=torch.tensor([[10.0, 60.0, 50.0, 10.0]])), r"targets\[0\]\['boxes'\]\[0\].*y2 <= y1"),
    (_with(boxes=torch.tensor([[10.0, 10.0, 130.0, 60.0]])), r"targets\[0\]\['boxes'\]\[0\].*outside the image"),
    (_with(boxes=torch.tensor([[-5.0, 10.0, 30.0, 60.0]])), r"targets\[0\]\['boxes'\]\[0\].*outside the image"),
    (_with(boxes=torch.tensor([[10.0, 10.0, 50.0, 101.0]])), r"targets\[0\]\['boxes'\]\[0\].*outside the image"),
    (_with(boxes=torch.tensor([10.0, 10.0, 50.0, 60.0])), r"targets\[0\]\['boxes'\] must be \[K, 4\]"),
    (_with(boxes=torch.tensor([[10.0, 10.0, 50.0, 60.0, 1.0]])), r"targets\[0\]\['boxes'\] must be \[K, 4\]"),
    (_with(boxes=torch.tensor([[10, 10, 50, 60]])), r"targets\[0\]\['boxes'\] must be floating point"),
    (_with(boxes=torch.tensor([[10.0, float("nan"), 50.0, 60.0]])), r"targets\[0\]\['boxes'\] has non-finite"),
    (_with(labels=torch.tensor([0])), r"targets\[0\]\['labels'\] must be in 1\.\.3"),
    (_with(labels=torch.tensor([4])), r"targets\[0\]\['labels'\] must be in 1\.\.3"),
    (_with(labels=torch.tensor([1.0])), r"targets\[0\]\['labels'\] must be an integer tensor"),
    (_with(labels=torch.tensor([1, 2])), r"targets\[0\]\['labels'\] must be an integer tensor \[K\] with K = 1"),
    (_with(masks=torch.zeros((1, 50, 60), dtype=torch.uint8)), r"targets\[0\]\['masks'\] must be \[K, H, W\]"),
    (_with(masks=torch.zeros((2, 100, 120), dtype=torch.uint8)), r"targets\[0\]\['masks'\] must be \[K, H, W\]"),
    ({"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([1])},
     r"targets\[0\]\['masks'\] must be \[K, H, W\]"),
])
def test_bad_targets(checker, target, match):
    checker.train()
    with pytest.raises(ValueError, match=match):
        checker([torch.rand(3, 100, 120)], [target])


def test_bad_target_count(checker):
    checker.train()
    with pytest.raises(ValueError, match="one dict per image"):
        checker([torch.rand(3, 100, 120)], [good_target(), good_target()])


def test_good_targets_pass_validation(checker):
    # The same checks accept valid targets, boxes touching the image border included.
    checker.train()
    target = _with(boxes=torch.tensor([[0.0, 0.0, 120.0, 100.0]]))
    losses = checker([torch.rand(3, 100, 120)], [target])
    assert set(losses) == LOSS_NAMES


@pytest.mark.parametrize("image", [
    np.zeros((100, 120, 3), dtype=np.float32),
    np.zeros((100, 120, 4), dtype=np.uint8),
    np.zeros((100, 120), dtype=np.uint8),
    np.zeros((100, 120, 1), dtype=np.uint8),
    torch.zeros((3, 100, 120)),
])
def test_detect_rejects_bad_images(checker, image):
    with pytest.raises(ValueError, match="image"):
        checker.detect([image])


def test_detect_wants_a_list(checker):
    with pytest.raises(ValueError, match="list"):
        checker.detect(np.zeros((100, 120, 3), dtype=np.uint8))


############################################################
#  Crowd regions
############################################################


def test_inside_crowd_by_hand():
    # Crowd region [0, 0, 10, 10]. Box A lies inside it (IoA 1); box B overlaps it by half its area
    # (IoA 0.5); box C by 80% (IoA 0.8); box D is elsewhere.
    boxes = torch.tensor([[2.0, 2, 6, 6], [5, 0, 15, 10], [2, 0, 12, 10], [20, 20, 30, 30]])
    target = {"crowd_boxes": torch.tensor([[0.0, 0, 10, 10]])}
    assert model_module.inside_crowd(boxes, target, 0.7).tolist() == [True, False, True, False]
    assert model_module.inside_crowd(boxes, target, 0.4).tolist() == [True, True, True, False]
    assert not model_module.inside_crowd(boxes, {}, 0.7).any()


def test_crowd_regions_are_neither_positive_nor_negative():
    # An image whose only object is a crowd region: every anchor inside it is left out of the RPN's
    # sampled negatives, so its objectness loss is the same whatever the head predicts there.
    torch.manual_seed(0)
    config = small_config()
    model = MaskRCNN(config).train()
    image, target = shapes_sample(128, 128, [(20, 20, 90, 90)], [1])
    crowd_target = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64),
                    "masks": torch.zeros((0, 128, 128), dtype=torch.uint8),
                    "crowd_boxes": target["boxes"].clone()}
    anchors = model_module.generate_anchors(model.backbone(image[None]), (128, 128), config)
    inside = model_module.inside_crowd(anchors, crowd_target, config.CROWD_IGNORE_THRESHOLD)
    assert inside.any() and not inside.all()
    labels_seen = []
    original = model_module.sample_balanced

    def spy(labels, batch_size, fraction):
        labels_seen.append(labels.clone())
        return original(labels, batch_size, fraction)

    model_module.sample_balanced = spy
    try:
        losses = model([image, image], [crowd_target, {k: v for k, v in crowd_target.items() if k != "crowd_boxes"}])
    finally:
        model_module.sample_balanced = original
    assert all(torch.isfinite(v) for v in losses.values())
    rpn_with_crowd, rpn_without = labels_seen[0], labels_seen[1]
    assert (rpn_with_crowd[inside] == -1).all() and (rpn_with_crowd[~inside] == 0).all()
    assert (rpn_without == 0).all()  # no objects and no crowd: every anchor is a negative
