"""Tests of loading detectron2's model-zoo weights and of the switches that reproduce detectron2's inference
(the d2_r50_fpn_3x preset). detectron2 cannot be installed here, so nothing is compared with detectron2 itself.

Oracles: plain float64 references of detectron2's behaviour written in this file from the facts in
shared/research/detectron2.md (ResNet with the stride in the first 1x1 conv and FrozenBN eps 1e-5, FPN,
RPN head, box and mask heads, all read by detectron2's own parameter names; anchors; resize sizes; the
level formula; the grid_sample mask paste; and the whole inference from the normalised input on, compared
at the tolerances of the torchvision tests: boxes 1e-3 px, scores 1e-4, mask IoU 0.99); PIL's bilinear
resize of uint8 images (what detectron2's ResizeShortestEdge uses); torchvision.ops.roi_align (what
detectron2's ROIAlign calls); and hand-computed cases (480 x 640 resized, one cell's anchors, a box at a
level boundary, a pasted 2 x 2 mask, the class reordering, clipped and dropped boxes, a marker file that
a refused pickle would have created).
"""

import json
import math
import os
import pickle
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers_model import assert_same_detections, smooth_image
from PIL import Image

import coco
import detect
import model as model_module
import utils
from config import COCO_CLASS_NAMES, CONFIGS, Config, Detectron2R50FPN3xConfig, named_config
from model import MaskRCNN, cell_anchors, generate_anchors, paste_masks, preprocess, pyramid_levels, resized_size

DEPTHS = (3, 4, 6, 3)  # ResNet-50's bottlenecks per stage (res2-res5)
NUM_FOREGROUND = 80


def small_d2_config(**overrides):
    """The detectron2 preset with narrow heads and small images (ResNet-50 stays: STRIDE_IN_1X1 needs it)."""
    settings = dict(FPN_CHANNELS=32, BOX_HEAD_DIM=64, MASK_HEAD_CHANNELS=32, IMAGE_MIN_DIM=64, IMAGE_MAX_DIM=96,
                    RPN_PRE_NMS_TOP_N_TEST=200, RPN_POST_NMS_TOP_N_TEST=100)
    settings.update(overrides)
    return Detectron2R50FPN3xConfig(**settings)


def detectron2_state(config, seed=0) -> dict:
    """{detectron2 name: float32 numpy array} of a random Mask R-CNN R50-FPN in detectron2's layout
    (modeling/backbone/resnet.py, fpn.py, rpn.py, roi_heads/*.py), with the widths of `config`. Weights are
    scaled by 1 / sqrt(fan-in) and the FrozenBN statistics chosen so activations stay near 1; the running
    variances are small (0.001-0.01) so that eps 1e-5 matters. Box deltas are small, as a trained model's:
    large random ones make proposals of almost no height, whose pooling float32 and float64 round apart."""
    rng = np.random.default_rng(seed)
    state = {}

    def conv(name, out_channels, in_channels, kernel, bias=False, gain=1.0):
        fan_in = in_channels * kernel * kernel
        state[name + ".weight"] = (gain * rng.standard_normal((out_channels, in_channels, kernel, kernel))
                                   / math.sqrt(fan_in)).astype(np.float32)
        if bias:
            state[name + ".bias"] = (0.1 * rng.standard_normal(out_channels)).astype(np.float32)

    def frozen_bn(name, channels):
        var = rng.uniform(0.001, 0.01, channels)
        state[name + ".norm.running_var"] = var.astype(np.float32)
        state[name + ".norm.running_mean"] = (0.1 * rng.standard_normal(channels) * np.sqrt(var)).astype(np.float32)
        state[name + ".norm.weight"] = (np.sqrt(var) * rng.uniform(0.5, 1.0, channels)).astype(np.float32)
        state[name + ".norm.bias"] = (0.1 * rng.standard_normal(channels)).astype(np.float32)

    conv("backbone.bottom_up.stem.conv1", 64, 3, 7)
    frozen_bn("backbone.bottom_up.stem.conv1", 64)
    in_channels = 64
    for stage, (width, depth) in enumerate(zip((64, 128, 256, 512), DEPTHS)):
        for i in range(depth):
            prefix = f"backbone.bottom_up.res{stage + 2}.{i}"
            if i == 0:
                conv(prefix + ".shortcut", width * 4, in_channels, 1)
                frozen_bn(prefix + ".shortcut", width * 4)
            shapes = ((in_channels, width, 1), (width, width, 3), (width, width * 4, 1))
            for j, (cin, cout, kernel) in enumerate(shapes):
                conv(f"{prefix}.conv{j + 1}", cout, cin, kernel)
                frozen_bn(f"{prefix}.conv{j + 1}", cout)
            in_channels = width * 4
    c = config.FPN_CHANNELS
    for k, cin in zip(range(2, 6), (256, 512, 1024, 2048)):
        conv(f"backbone.fpn_lateral{k}", c, cin, 1, bias=True)
        conv(f"backbone.fpn_output{k}", c, c, 3, bias=True)
    conv("proposal_generator.rpn_head.conv", c, c, 3, bias=True)
    conv("proposal_generator.rpn_head.objectness_logits", 3, c, 1, bias=True)
    conv("proposal_generator.rpn_head.anchor_deltas", 12, c, 1, bias=True, gain=0.2)  # boxes near their anchors
    dim, pool = config.BOX_HEAD_DIM, config.BOX_POOL_SIZE
    layers = (("fc1", dim, c * pool * pool, 1.0), ("fc2", dim, dim, 1.0), ("cls_score", NUM_FOREGROUND + 1, dim, 1.0),
              ("bbox_pred", 4 * NUM_FOREGROUND, dim, 0.2))  # small box deltas, as the RPN's
    for name, cout, cin, gain in layers:
        head = "box_predictor" if name in ("cls_score", "bbox_pred") else "box_head"
        weight = gain * rng.standard_normal((cout, cin)) / math.sqrt(cin)
        state[f"roi_heads.{head}.{name}.weight"] = weight.astype(np.float32)
        state[f"roi_heads.{head}.{name}.bias"] = (0.1 * rng.standard_normal(cout)).astype(np.float32)
    m = config.MASK_HEAD_CHANNELS
    for i in range(4):
        conv(f"roi_heads.mask_head.mask_fcn{i + 1}", m, c if i == 0 else m, 3, bias=True)
    state["roi_heads.mask_head.deconv.weight"] = (rng.standard_normal((m, m, 2, 2)) / math.sqrt(m)).astype(np.float32)
    state["roi_heads.mask_head.deconv.bias"] = (0.1 * rng.standard_normal(m)).astype(np.float32)
    conv("roi_heads.mask_head.predictor", NUM_FOREGROUND, m, 1, bias=True)
    # What detectron2's loader drops: old files' anchors and the input statistics.
    for level in range(5):
        state[f"proposal_generator.anchor_generator.cell_anchors.{level}"] = np.zeros((3, 4), np.float32)
    state["pixel_mean"] = np.array([103.53, 116.28, 123.675], np.float32).reshape(3, 1, 1)
    state["pixel_std"] = np.ones((3, 1, 1), np.float32)
    return state


def write_detectron2_pickle(path, state):
    """The model zoo's format (detection_checkpoint.py): a pickled {"model": {name: array}, "__author__": ...}."""
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "Detectron2 Model Zoo", "matching_heuristics": False}, f, protocol=2)


@pytest.fixture(scope="module")
def d2(module_tmp_path):
    """(config, detectron2 state as float64 tensors, our model loaded from the .pkl)."""
    config = small_d2_config()
    state = detectron2_state(config)
    path = module_tmp_path / "model_final.pkl"
    write_detectron2_pickle(path, state)
    model = MaskRCNN(config).eval()
    report = model.load_weights(str(path))
    assert report["missing"] == [] and report["unexpected"] == [] and report["skipped_shape"] == []
    reference = {k: torch.from_numpy(v).double() for k, v in state.items()}
    return config, reference, model


# ----------------------------------------------------------------------------------------------------
# Float64 references of detectron2's layers, reading its parameter names


def ref_frozen_bn(x, d, name):
    scale = d[name + ".norm.weight"] / torch.sqrt(d[name + ".norm.running_var"] + 1e-5)  # eps 1e-5
    shift = d[name + ".norm.bias"] - d[name + ".norm.running_mean"] * scale
    return x * scale[None, :, None, None] + shift[None, :, None, None]


def ref_conv_bn(x, d, name, stride=1, padding=0):
    return ref_frozen_bn(F.conv2d(x, d[name + ".weight"], stride=stride, padding=padding), d, name)


def ref_resnet(x, d):
    """C2-C5 of detectron2's ResNet-50 with STRIDE_IN_1X1: the first 1x1 conv of res3-5's first block subsamples."""
    x = F.max_pool2d(F.relu(ref_conv_bn(x, d, "backbone.bottom_up.stem.conv1", 2, 3)), 3, 2, 1)
    outputs = []
    for stage, depth in enumerate(DEPTHS):
        for i in range(depth):
            name = f"backbone.bottom_up.res{stage + 2}.{i}"
            stride = 2 if i == 0 and stage > 0 else 1
            shortcut = ref_conv_bn(x, d, name + ".shortcut", stride) if i == 0 else x
            out = F.relu(ref_conv_bn(x, d, name + ".conv1", stride))
            out = F.relu(ref_conv_bn(out, d, name + ".conv2", 1, 1))
            x = F.relu(ref_conv_bn(out, d, name + ".conv3") + shortcut)
        outputs.append(x)
    return outputs


def ref_fpn(features, d):
    """P2-P6: lateral 1x1, top-down nearest upsampling by 2, 3x3 output convs, P6 = max_pool(k1, s2) of P5."""
    def conv(x, name, padding):
        return F.conv2d(x, d[name + ".weight"], d[name + ".bias"], padding=padding)

    inner = conv(features[3], "backbone.fpn_lateral5", 0)
    results = [conv(inner, "backbone.fpn_output5", 1)]
    for k in (4, 3, 2):
        inner = conv(features[k - 2], f"backbone.fpn_lateral{k}", 0) + F.interpolate(inner, scale_factor=2.0,
                                                                                    mode="nearest")
        results.insert(0, conv(inner, f"backbone.fpn_output{k}", 1))
    return results + [F.max_pool2d(results[-1], 1, 2, 0)]


def relative_error(got, expected):
    return ((got.double() - expected).abs().max() / expected.abs().max()).item()


# ----------------------------------------------------------------------------------------------------
# Presets and class ids


def ref_mask_head(pooled, d):
    """detectron2's MaskRCNNConvUpsampleHead in float64 on its own parameter names: four 3x3 convs + ReLU,
    a stride-2 deconv + ReLU, the 1x1 predictor. pooled [R, C, 14, 14] -> [R, 80, 28, 28] logits."""
    y = pooled
    for i in range(1, 5):
        y = F.relu(F.conv2d(y, d[f"roi_heads.mask_head.mask_fcn{i}.weight"], d[f"roi_heads.mask_head.mask_fcn{i}.bias"],
                            padding=1))
    y = F.relu(F.conv_transpose2d(y, d["roi_heads.mask_head.deconv.weight"], d["roi_heads.mask_head.deconv.bias"],
                                  stride=2))
    return F.conv2d(y, d["roi_heads.mask_head.predictor.weight"], d["roi_heads.mask_head.predictor.bias"])


def test_presets_are_registered_with_detectron2s_settings():
    assert CONFIGS["d2_r50_fpn_3x"] is Detectron2R50FPN3xConfig
    c = named_config("d2_r50_fpn_3x")
    assert named_config("d2_r101_fpn_3x").BACKBONE == "resnet101" and c.BACKBONE == "resnet50"
    assert c.STRIDE_IN_1X1 and c.FROZEN_BN_EPS == 1e-5 and c.INPUT_FORMAT == "BGR255"
    assert c.PIXEL_MEAN == (103.530, 116.280, 123.675) and c.PIXEL_STD == (1.0, 1.0, 1.0)
    assert (c.IMAGE_MIN_DIM, c.IMAGE_MAX_DIM, c.RESIZE_ROUNDING) == (800, 1333, "round")
    assert not c.ANCHOR_ROUND and c.ANCHOR_STRIDES == (4, 8, 16, 32, 64)
    assert (c.RPN_PRE_NMS_TOP_N_TEST, c.RPN_POST_NMS_TOP_N_TEST, c.RPN_POST_NMS_TOP_N_TRAIN) == (1000, 1000, 1000)
    assert c.RPN_MIN_SIZE == 0 and c.RPN_MIN_SIZE_STRICT and c.RPN_NMS_ON_LOGITS
    assert c.POOL_ALIGNED and c.POOL_SAMPLING_RATIO == 0 and c.POOL_LEVEL_FORMULA == "detectron2"
    assert (c.DETECTION_MIN_CONFIDENCE, c.DETECTION_NMS_THRESHOLD, c.DETECTION_MAX_INSTANCES) == (0.05, 0.5, 100)
    assert c.DETECTION_MIN_SIZE == 0 and c.RESCALE_CLIP_AND_DROP_EMPTY
    assert c.MASK_PASTE == "grid_sample" and c.MASK_THRESHOLD_INCLUSIVE and c.MASK_THRESHOLD == 0.5
    # The default config keeps torchvision's behaviour.
    d = Config()
    assert (d.STRIDE_IN_1X1, d.INPUT_FORMAT, d.RESIZE_ROUNDING, d.ANCHOR_ROUND, d.ANCHOR_STRIDES) == (
        False, "RGB", "floor", True, ())
    assert (d.RPN_NMS_ON_LOGITS, d.POOL_LEVEL_FORMULA, d.MASK_PASTE, d.RESCALE_CLIP_AND_DROP_EMPTY) == (
        False, "torchvision", "torchvision", False)


def test_labels_map_to_coco_category_ids(tmp_path):
    # detectron2's class j (0..79) is the j-th COCO category by id (builtin_meta.py); ours is j + 1, which
    # coco.py's CocoDataset maps back to the category id when LABELS_ARE_CATEGORY_IDS is False.
    c = named_config("d2_r50_fpn_3x")
    categories = [{"id": i, "name": name} for i, name in enumerate(COCO_CLASS_NAMES) if i and name != "N/A"]
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(
        {"images": [{"id": 1, "file_name": "1.jpg", "height": 10, "width": 10}], "annotations": [],
         "categories": categories}))
    dataset = coco.CocoDataset(str(tmp_path), "val2017", c.LABELS_ARE_CATEGORY_IDS)
    assert c.NUM_CLASSES == dataset.num_classes == 81 and tuple(dataset.class_names) == c.CLASS_NAMES
    assert (dataset.label_to_category[1], dataset.label_to_category[12], dataset.label_to_category[80]) == (1, 13, 90)
    assert (c.CLASS_NAMES[1], c.CLASS_NAMES[12], c.CLASS_NAMES[80]) == ("person", "stop sign", "toothbrush")


def test_config_checks_the_new_settings():
    with pytest.raises(ValueError, match="ANCHOR_STRIDES"):
        Config(ANCHOR_STRIDES=(4, 8, 16))
    with pytest.raises(ValueError, match="PIXEL_MEAN must be in"):
        Config(PIXEL_MEAN=(103.5, 116.3, 123.7))  # 0-255 statistics with RGB [0, 1] input
    with pytest.raises(ValueError, match="INPUT_FORMAT"):
        Config(INPUT_FORMAT="BGR")
    with pytest.raises(ValueError, match="STRIDE_IN_1X1 needs a bottleneck"):
        MaskRCNN(Config(BACKBONE="resnet18", STRIDE_IN_1X1=True))


# ----------------------------------------------------------------------------------------------------
# Loading


def test_the_class_reordering_by_hand():
    # Two foreground classes: detectron2's cls_score rows are (class 0, class 1, background); ours
    # (background, class 0, class 1). bbox_pred and the mask predictor get zero rows for background.
    state = {
        "backbone.bottom_up.stem.conv1.weight": np.zeros((1,), np.float32),
        "roi_heads.box_predictor.cls_score.weight": np.array([[0.0, 0.5], [1.0, 1.5], [2.0, 2.5]], np.float32),
        "roi_heads.box_predictor.cls_score.bias": np.array([0.0, 1.0, 2.0], np.float32),
        "roi_heads.box_predictor.bbox_pred.bias": np.arange(8, dtype=np.float32) + 1,
        "roi_heads.mask_head.predictor.bias": np.array([7.0, 8.0], np.float32),
    }
    got = model_module.convert_state_dict({"model": state})
    assert got["roi_heads.box_predictor.cls_score.weight"].tolist() == [[2.0, 2.5], [0.0, 0.5], [1.0, 1.5]]
    assert got["roi_heads.box_predictor.cls_score.bias"].tolist() == [2.0, 0.0, 1.0]
    assert got["roi_heads.box_predictor.bbox_pred.bias"].tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert got["roi_heads.mask_predictor.mask_fcn_logits.bias"].tolist() == [0.0, 7.0, 8.0]
    assert set(got) == {"backbone.body.conv1.weight", "roi_heads.box_predictor.cls_score.weight",
                        "roi_heads.box_predictor.cls_score.bias", "roi_heads.box_predictor.bbox_pred.bias",
                        "roi_heads.mask_predictor.mask_fcn_logits.bias"}


def test_pkl_and_pth_load_every_tensor(d2, tmp_path):
    config, reference, model = d2
    own = model.state_dict()
    # Tensors compared by their detectron2 name (the reordered class rows are checked by hand above).
    pairs = {
        "backbone.bottom_up.res4.5.conv2.norm.running_var": "backbone.body.layer3.5.bn2.running_var",
        "backbone.bottom_up.res3.0.shortcut.weight": "backbone.body.layer2.0.downsample.0.weight",
        "backbone.fpn_output3.bias": "backbone.fpn.layer_blocks.1.0.bias",
        "proposal_generator.rpn_head.anchor_deltas.weight": "rpn.head.bbox_pred.weight",
        "roi_heads.box_head.fc2.weight": "roi_heads.box_head.fc7.weight",
        "roi_heads.mask_head.mask_fcn4.weight": "roi_heads.mask_head.3.0.weight",
        "roi_heads.mask_head.deconv.weight": "roi_heads.mask_predictor.conv5_mask.weight",
    }
    for theirs, ours in pairs.items():
        assert torch.equal(own[ours].double(), reference[theirs]), ours
    # detectron2's .pth (a training run's output: torch.save of {"model": tensors, ...}) loads the same.
    path = tmp_path / "model_final.pth"
    tensors = {k: torch.from_numpy(v.numpy().astype(np.float32)) for k, v in reference.items()}
    torch.save({"model": tensors, "iteration": 269999, "optimizer": {}}, path)
    again = MaskRCNN(config).eval()
    again.load_weights(str(path))
    for key, value in again.state_dict().items():
        assert torch.equal(value, own[key]), key


def test_a_pickle_holding_another_global_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"x": Payload()}, "__author__": "?"}, protocol=2))
    with pytest.raises(utils.UnreadableFileError) as error:
        MaskRCNN(small_d2_config()).load_weights(str(path))
    message = str(error.value)
    assert str(path) in message and f"{os.system.__module__}.system" in message
    assert not marker.exists()
    truncated = tmp_path / "cut.pkl"
    write_detectron2_pickle(truncated, {"a": np.zeros(1000, np.float32)})
    truncated.write_bytes(truncated.read_bytes()[:2000])
    with pytest.raises(utils.UnreadableFileError, match="cut.pkl is incomplete or corrupt"):
        utils.load_file(str(truncated))


def test_zoo_names_without_a_network(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    url = ("https://dl.fbaipublicfiles.com/detectron2/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x/137849600/"
           "model_final_f10217.pkl")
    with pytest.raises(RuntimeError) as error:
        utils.load_state_dict("d2_r50_fpn_3x")
    assert url in str(error.value) and str(tmp_path) in str(error.value) and "copy" in str(error.value)
    # A file already in the cache is loaded without the network.
    write_detectron2_pickle(tmp_path / "checkpoints" / "model_final_f10217.pkl", {"a": np.ones(2, np.float32)})
    assert utils.load_state_dict("d2_r50_fpn_3x")["model"]["a"].tolist() == [1.0, 1.0]


# ----------------------------------------------------------------------------------------------------
# The network against float64 references in detectron2's names


def test_backbone_follows_the_stride_in_1x1_reference(d2):
    config, d, model = d2
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = ref_resnet(x, d)
    with torch.no_grad():
        got = model.backbone.body(x.float())
        for g, e in zip(got, expected):
            assert g.shape == e.shape and relative_error(g, e) < 1e-4
        # Both switches act: the stride on the 3x3 conv, or eps 0, give other features.
        for change in (dict(STRIDE_IN_1X1=False), dict(FROZEN_BN_EPS=0.0)):
            other = MaskRCNN(small_d2_config(**change)).eval()
            other.load_state_dict(model.state_dict())
            assert relative_error(other.backbone.body(x.float())[-1], expected[-1]) > 1e-3
        got = model.backbone.fpn(list(got))
    for g, e in zip(got, ref_fpn(expected, d)):
        assert g.shape == e.shape and relative_error(g, e) < 1e-4


def test_heads_follow_the_reference(d2):
    config, d, model = d2
    g = torch.Generator().manual_seed(1)
    c = config.FPN_CHANNELS
    feature = torch.randn(1, c, 8, 12, generator=g, dtype=torch.float64)
    hidden = F.relu(F.conv2d(feature, d["proposal_generator.rpn_head.conv.weight"],
                             d["proposal_generator.rpn_head.conv.bias"], padding=1))
    logits = F.conv2d(hidden, d["proposal_generator.rpn_head.objectness_logits.weight"],
                      d["proposal_generator.rpn_head.objectness_logits.bias"])  # (1, A, H, W)
    deltas = F.conv2d(hidden, d["proposal_generator.rpn_head.anchor_deltas.weight"],
                      d["proposal_generator.rpn_head.anchor_deltas.bias"])  # (1, A * 4, H, W)
    pooled = torch.randn(5, c, 7, 7, generator=g, dtype=torch.float64)
    x = F.relu(F.linear(pooled.flatten(1), d["roi_heads.box_head.fc1.weight"], d["roi_heads.box_head.fc1.bias"]))
    x = F.relu(F.linear(x, d["roi_heads.box_head.fc2.weight"], d["roi_heads.box_head.fc2.bias"]))
    scores = F.softmax(F.linear(x, d["roi_heads.box_predictor.cls_score.weight"],
                                d["roi_heads.box_predictor.cls_score.bias"]), -1)[:, :-1]  # background last
    boxes = F.linear(x, d["roi_heads.box_predictor.bbox_pred.weight"], d["roi_heads.box_predictor.bbox_pred.bias"])
    mask_in = torch.randn(5, c, 14, 14, generator=g, dtype=torch.float64)
    masks = ref_mask_head(mask_in, d)
    with torch.no_grad():
        got_logits, got_deltas = model.rpn.head([feature.float()])
        got_class, got_boxes = model.roi_heads.box_predictor(model.roi_heads.box_head(pooled.float()))
        got_masks = model.roi_heads.mask_predictor(model.roi_heads.mask_head(mask_in.float()))
    # Our (y, x, anchor) order and (anchor, y, x, 4) deltas, from detectron2's conv outputs.
    assert relative_error(got_logits[0], logits[0].permute(1, 2, 0).reshape(-1)) < 1e-5
    assert relative_error(got_deltas[0], deltas[0].view(3, 4, 8, 12).permute(2, 3, 0, 1).reshape(-1, 4)) < 1e-5
    # Our class j + 1 is detectron2's class j; our column 0 is background.
    assert relative_error(F.softmax(got_class.double(), -1)[:, 1:], scores) < 1e-5
    assert relative_error(got_boxes[:, 4:], boxes) < 1e-5
    assert relative_error(got_masks[:, 1:], masks) < 1e-5


def test_end_to_end_with_the_random_detectron2_weights(d2):
    config, _, model = d2
    image = (smooth_image(60, 90, seed=3).permute(1, 2, 0) * 255).round().byte().numpy()
    result = model.detect([image], return_intermediates=True)[0]
    boxes = result["boxes"]
    assert boxes.shape[0] == result["scores"].shape[0] == result["class_ids"].shape[0] == result["masks"].shape[0]
    assert result["masks"].shape[1:] == (60, 90) and result["masks"].dtype == bool
    assert ((result["class_ids"] >= 1) & (result["class_ids"] <= 80)).all() and (result["scores"] > 0.05).all()
    # Clipped to the image, and no empty box (RESCALE_CLIP_AND_DROP_EMPTY).
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= 90).all() and (boxes[:, 1::2] <= 60).all()
    assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()
    assert result["intermediates"]["anchor_strides"] == [4, 8, 16, 32, 64]


# ----------------------------------------------------------------------------------------------------
# Preprocessing: BGR 0-255 and detectron2's resize


def test_resize_rounding_by_hand():
    assert resized_size(480, 640, 800, 1333, "round") == (800, 1067)  # 640 * 800 / 480 = 1066.67
    assert resized_size(480, 640, 800, 1333) == (800, 1066)  # torchvision's floor
    assert resized_size(500, 2000, 800, 1333, "round") == (333, 1333)  # the long side caps: 800 x 3200 * 1333 / 3200
    assert resized_size(640, 480, 800, 1333, "round") == (1067, 800)


def d2_output_shape(h, w, short, longest):
    """detectron2's ResizeShortestEdge.get_output_shape (augmentation_impl.py), in float64."""
    scale = short / min(h, w)
    new_h, new_w = (short, scale * w) if h < w else (scale * h, short)
    if max(new_h, new_w) > longest:
        new_h, new_w = new_h * longest / max(new_h, new_w), new_w * longest / max(new_h, new_w)
    return int(new_h + 0.5), int(new_w + 0.5)


def test_resize_rounding_follows_detectron2_on_many_sizes():
    rng = np.random.default_rng(0)
    for h, w in rng.integers(100, 3000, size=(500, 2)).tolist():
        assert resized_size(h, w, 800, 1333, "round") == d2_output_shape(h, w, 800, 1333), (h, w)


@pytest.mark.parametrize("height, width, min_size", [(48, 64, 80), (200, 300, 80)])  # enlarged, shrunk
def test_bgr255_input_follows_a_pil_resize(height, width, min_size):
    config = small_d2_config(IMAGE_MIN_DIM=min_size)
    image = (smooth_image(height, width, seed=1).permute(1, 2, 0) * 255).round().byte().numpy()  # RGB
    batch, _ = preprocess([utils.image_to_tensor(image)], config)
    h, w = batch.image_sizes[0]
    assert (h, w) == d2_output_shape(height, width, min_size, config.IMAGE_MAX_DIM)
    # detectron2: BGR uint8, PIL bilinear to (w, h), then (x - mean) / std in the model.
    resized = np.asarray(Image.fromarray(image[..., ::-1].copy()).resize((w, h), Image.BILINEAR))
    expected = (torch.from_numpy(resized.astype(np.float64)).permute(2, 0, 1)
                - torch.tensor(config.PIXEL_MEAN, dtype=torch.float64)[:, None, None])
    got = batch.tensor[0, :, :h, :w].double()
    # PIL resizes in two passes, rounding to uint8 after each (up to 1 in all, 0.35 on average); ours stays in
    # float. A wrong sampling grid (align_corners, no antialiasing when shrinking) is off by several units.
    assert (got - expected).abs().max() <= 1.5 and (got - expected).abs().mean() < 0.5
    assert batch.tensor[0, :, h:].abs().sum() == 0 and batch.tensor[0, :, :, w:].abs().sum() == 0  # zero padding


# ----------------------------------------------------------------------------------------------------
# Anchors, proposals, pooling


def test_one_cells_anchors_by_hand():
    s = math.sqrt(2)
    exact = cell_anchors(32, (0.5, 1.0, 2.0), torch.float64, "cpu", rounded=False)
    # ratio h / w = 0.5: w = 32 * sqrt(2), h = 32 / sqrt(2).
    expected = torch.tensor([[-16 * s, -8 * s, 16 * s, 8 * s], [-16, -16, 16, 16], [-8 * s, -16 * s, 8 * s, 16 * s]],
                            dtype=torch.float64)
    torch.testing.assert_close(exact, expected, rtol=0, atol=1e-12)
    assert cell_anchors(32, (0.5, 1.0, 2.0), torch.float64, "cpu").tolist()[0] == [-23, -11, 23, 11]


def d2_anchors(grid_sizes, strides, sizes, ratios):
    """detectron2's DefaultAnchorGenerator (anchor_generator.py) in float64: per size w = sqrt(size^2 / ratio),
    h = ratio * w, centred on 0; shifts arange(0, n * stride, stride); (y, x, anchor) order per level."""
    levels = []
    for (gh, gw), stride, size in zip(grid_sizes, strides, sizes):
        cell = []
        for ratio in ratios:
            w = math.sqrt(size * size / ratio)
            h = ratio * w
            cell.append([-w / 2, -h / 2, w / 2, h / 2])
        sy, sx = torch.meshgrid(torch.arange(0, gh * stride, stride, dtype=torch.float64),
                                torch.arange(0, gw * stride, stride, dtype=torch.float64), indexing="ij")
        shifts = torch.stack([sx.reshape(-1), sy.reshape(-1)] * 2, dim=1)
        levels.append((shifts[:, None] + torch.tensor(cell, dtype=torch.float64)[None]).reshape(-1, 4))
    return torch.cat(levels)


def test_anchors_follow_detectron2_with_explicit_strides():
    # An 800 x 800 input: P5 is 25 x 25 and P6 13 x 13, where torchvision's stride would be 800 // 13 = 61.
    config = small_d2_config()
    grids = [(200, 200), (100, 100), (50, 50), (25, 25), (13, 13)]
    features = [torch.empty(0, 0, *g) for g in grids]
    got = generate_anchors(features, (800, 800), config)
    expected = d2_anchors(grids, (4, 8, 16, 32, 64), config.ANCHOR_SIZES, config.ANCHOR_RATIOS)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-4)
    # The last anchor: P6's last cell (12 strides), size 512, h / w = 2, so w = 512 / sqrt(2).
    assert got[-1, 0].item() == pytest.approx(12 * 64 - 256 / math.sqrt(2), abs=1e-3)
    assert generate_anchors(features, (800, 800), Config())[-1, 0].item() == 12 * 61 - 181  # torchvision's


def test_rpn_ranks_on_logits_and_drops_empty_proposals():
    # Two overlapping anchors whose probabilities are both 1.0 in float32 (logits 20 and 25), and one
    # left of the image, clipped to zero width.
    anchors = torch.tensor([[10.0, 10, 50, 50], [11, 11, 51, 51], [-30, 10, -10, 50]])
    objectness = torch.tensor([[20.0, 25.0, 0.0]])
    assert torch.sigmoid(objectness[0, 0]) == torch.sigmoid(objectness[0, 1]) == 1.0
    deltas = torch.zeros(1, 3, 4)

    def proposals(**overrides):
        rpn = model_module.RPN(small_d2_config(**overrides))
        return rpn.select_proposals(objectness, deltas, anchors, [3], [(60, 60)], 10, 10)[0].boxes.tolist()

    assert proposals() == [[11, 11, 51, 51]]  # the higher logit survives NMS, the empty box is dropped
    assert [0, 10, 0, 50] in proposals(RPN_MIN_SIZE_STRICT=False)  # w >= 0 keeps it


def test_level_formula_at_a_boundary_by_hand():
    # sqrt(area) / 224 = 1 - 5e-7: log2 = -7.2e-7, which torchvision's + 1e-6 (outside the log) lifts to
    # level 4 and detectron2's + 1e-8 (inside) leaves at level 3.
    side = 224 * math.sqrt(1 - 1e-6)
    boxes = torch.tensor([[0.0, 0.0, side, side], [0, 0, 112, 112], [0, 0, 448, 448]])
    assert pyramid_levels(boxes, 224, 4, "torchvision").tolist() == [4, 3, 5]
    assert pyramid_levels(boxes, 224, 4, "detectron2").tolist() == [3, 3, 5]
    # And detectron2's formula as written, float32 as detectron2 computes it, on random boxes near boundaries.
    g = torch.Generator().manual_seed(0)
    sides = (224 * 2.0 ** torch.randint(-3, 3, (2000,), generator=g)) * (1 + 1e-6 * torch.randn(2000, generator=g))
    boxes = torch.stack([torch.zeros(2000), torch.zeros(2000), sides, sides], 1).float()
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    expected = torch.floor(4 + torch.log2(torch.sqrt(area) / 224 + 1e-8))
    assert torch.equal(pyramid_levels(boxes, 224, 4, "detectron2"), expected)


def test_pooling_follows_torchvisions_aligned_adaptive_roi_align():
    # detectron2's ROIAlignV2 is torchvision's roi_align(aligned=True, sampling_ratio=0) on the box's level.
    config = small_d2_config()
    g = torch.Generator().manual_seed(2)
    features = [torch.randn(1, 4, 128 // 2**k, 192 // 2**k, generator=g) for k in range(4)]  # P2-P5 of 512 x 768
    boxes = torch.tensor([[3.3, 4.1, 40.2, 30.7], [10.0, 20.5, 200.4, 250.9], [0.5, 0.5, 700.0, 500.0],
                          [100.2, 50.3, 400.7, 350.1]])
    got = model_module.PyramidRoIAlign(7, config)(features, [boxes], [(512, 768)])
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    levels = torch.floor(4 + torch.log2(torch.sqrt(area) / 224 + 1e-8)).clamp(2, 5).long() - 2
    for i, level in enumerate(levels.tolist()):
        expected = torchvision.ops.roi_align(features[level], [boxes[i : i + 1]], 7, 1 / 2 ** (level + 2), 0, True)
        torch.testing.assert_close(got[i : i + 1], expected, rtol=1e-5, atol=1e-5)
    assert sorted(set(levels.tolist())) == [0, 1, 2, 3]


# ----------------------------------------------------------------------------------------------------
# Output: rescaling and mask pasting


def test_boxes_are_clipped_and_empty_ones_dropped_after_rescaling(monkeypatch):
    # A 40 x 50 image resized to 64 x 80 (ratio 0.625): boxes in the resized pixels.
    boxes = torch.tensor([[-16.0, 16, 48, 48], [32, 32, 32, 48], [72, 8, 96, 32]])

    def fake_heads(features, proposals, image_sizes):
        return [{"boxes": boxes.clone(), "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([1, 2, 3]),
                 "masks": torch.ones(3, 1, 28, 28), "proposal_index": torch.tensor([0, 1, 2])}]

    image = torch.rand(3, 40, 50)
    got = {}
    for switch in (True, False):
        model = MaskRCNN(small_d2_config(RESCALE_CLIP_AND_DROP_EMPTY=switch)).eval()
        monkeypatch.setattr(model.roi_heads, "forward", fake_heads)
        with torch.no_grad():
            got[switch] = model([image])[0]
    assert got[True]["boxes"].tolist() == [[0, 10, 30, 30], [45, 5, 50, 20]]
    assert got[True]["labels"].tolist() == [1, 3] and got[True]["masks"].shape == (2, 1, 40, 50)
    assert got[False]["boxes"].tolist() == [[-10, 10, 30, 30], [20, 20, 20, 30], [45, 5, 60, 20]]


def test_a_pasted_2x2_mask_by_hand():
    # Box (0, 0, 4, 4): pixel centres 0.5 .. 3.5 read the 2-sample mask at -0.25, 0.25, 0.75, 1.25, so a
    # mask [1, 0] along an axis gives 0.75, 0.75, 0.25, 0 (zero beyond the mask's border).
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    box = torch.tensor([[0.0, 0.0, 4.0, 4.0]])
    profile = torch.tensor([0.75, 0.75, 0.25, 0.0])
    got = paste_masks(mask, box, (5, 5), mode="grid_sample")[0, 0]
    torch.testing.assert_close(got[:4, :4], profile[:, None] * profile[None, :], rtol=0, atol=1e-7)
    assert got[4].abs().max() == 0 and got[:, 4].abs().max() == 0
    # A flat 0.5 mask is 0.5 inside: kept by >= (detectron2's), not by > (torchvision's).
    half = paste_masks(torch.full((1, 1, 2, 2), 0.5), box, (4, 4), 0.5, mode="grid_sample", inclusive=True)[0, 0]
    assert half.tolist() == [[False] * 4] + [[False, True, True, False]] * 2 + [[False] * 4]
    assert not paste_masks(torch.full((1, 1, 2, 2), 0.5), box, (4, 4), 0.5, mode="grid_sample")[0, 0].any()


def test_grid_sample_paste_follows_detectron2s_paste_in_float64():
    # detectron2's _do_paste_mask: pixel centres + 0.5, normalised to [-1, 1] over the float box, grid_sample.
    g = torch.Generator().manual_seed(4)
    masks = torch.rand(4, 1, 28, 28, generator=g, dtype=torch.float64)
    boxes = torch.tensor([[10.3, 12.6, 50.2, 40.9], [-20.4, -5.2, 30.7, 25.1], [70.5, 50.5, 130.3, 95.8],
                          [33.2, 33.4, 33.8, 34.1]], dtype=torch.float64)
    ys = (torch.arange(70, dtype=torch.float64) + 0.5)[None] - boxes[:, 1:2]
    xs = (torch.arange(100, dtype=torch.float64) + 0.5)[None] - boxes[:, 0:1]
    gy = ys / (boxes[:, 3:4] - boxes[:, 1:2]) * 2 - 1  # (N, H)
    gx = xs / (boxes[:, 2:3] - boxes[:, 0:1]) * 2 - 1  # (N, W)
    grid = torch.stack([gx[:, None, :].expand(-1, 70, -1), gy[:, :, None].expand(-1, -1, 100)], dim=3)
    expected = F.grid_sample(masks, grid, align_corners=False)[:, 0]
    got = paste_masks(masks.float(), boxes.float(), (70, 100), mode="grid_sample")[:, 0]
    # Ours computes the positions in float32 (as detectron2 does): the box under a pixel wide amplifies that.
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=5e-5)
    thresholded = paste_masks(masks.float(), boxes.float(), (70, 100), 0.5, mode="grid_sample", inclusive=True)
    agree = (thresholded[:, 0] == (expected >= 0.5)).double().mean()
    assert agree > 0.999


# ----------------------------------------------------------------------------------------------------
# The whole inference against a float64 reference of detectron2's, from the network's input on


def ref_decode(deltas, boxes, weights):
    """detectron2's Box2BoxTransform.apply_deltas (box_regression.py): deltas [N, 4] on boxes [N, 4]."""
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ctr_x, ctr_y = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dw = (deltas[:, 2] / ww).clamp(max=math.log(1000.0 / 16))
    dh = (deltas[:, 3] / wh).clamp(max=math.log(1000.0 / 16))
    x, y = deltas[:, 0] / wx * widths + ctr_x, deltas[:, 1] / wy * heights + ctr_y
    w, h = torch.exp(dw) * widths, torch.exp(dh) * heights
    return torch.stack([x - 0.5 * w, y - 0.5 * h, x + 0.5 * w, y + 0.5 * h], dim=1)


def ref_clip(boxes, h, w):
    return torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                        boxes[:, 3].clamp(0, h)], dim=1)


def ref_nonempty(boxes):
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def ref_pool(features, boxes, size):
    """ROIPooler with ROIAlignV2: level floor(4 + log2(sqrt(area) / 224 + 1e-8)) in 2..5, torchvision's
    roi_align(aligned=True, sampling_ratio=0) at 1 / stride."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    levels = torch.floor(4 + torch.log2(torch.sqrt(area) / 224 + 1e-8)).clamp(2, 5).long()
    out = torch.zeros(len(boxes), features[0].shape[1], size, size, dtype=torch.float64)
    for level in range(2, 6):
        index = torch.where(levels == level)[0]
        if len(index):
            out[index] = torchvision.ops.roi_align(features[level - 2], [boxes[index]], size, 1 / 2**level, 0, True)
    return out


def ref_detectron2_inference(x, image_size, original, config, d):
    """detectron2's GeneralizedRCNN.inference + detector_postprocess on the normalised, padded input x
    [1, 3, H, W] (float64), from detectron2.md: boxes in the original image, scores, labels (ours: + 1),
    mask probabilities pasted by grid_sample."""
    h, w = image_size
    features = ref_fpn(ref_resnet(x, d), d)
    grids = [f.shape[-2:] for f in features]
    anchors = d2_anchors(grids, (4, 8, 16, 32, 64), config.ANCHOR_SIZES, config.ANCHOR_RATIOS).split(
        [3 * g[0] * g[1] for g in grids])
    boxes, logits, levels = [], [], []
    for level, (feature, level_anchors) in enumerate(zip(features, anchors)):
        hidden = F.relu(F.conv2d(feature, d["proposal_generator.rpn_head.conv.weight"],
                                 d["proposal_generator.rpn_head.conv.bias"], padding=1))
        logit = F.conv2d(hidden, d["proposal_generator.rpn_head.objectness_logits.weight"],
                         d["proposal_generator.rpn_head.objectness_logits.bias"])[0].permute(1, 2, 0).reshape(-1)
        delta = F.conv2d(hidden, d["proposal_generator.rpn_head.anchor_deltas.weight"],
                         d["proposal_generator.rpn_head.anchor_deltas.bias"])[0]
        delta = delta.view(3, 4, *delta.shape[-2:]).permute(2, 3, 0, 1).reshape(-1, 4)  # (H * W * A, 4)
        top = logit.topk(min(config.RPN_PRE_NMS_TOP_N_TEST, len(logit))).indices
        boxes.append(ref_decode(delta[top], level_anchors[top], (1.0, 1.0, 1.0, 1.0)))
        logits.append(logit[top])
        levels.append(torch.full((len(top),), level))
    boxes, logits, levels = ref_clip(torch.cat(boxes), h, w), torch.cat(logits), torch.cat(levels)
    keep = ref_nonempty(boxes)
    boxes, logits, levels = boxes[keep], logits[keep], levels[keep]
    proposals = boxes[torchvision.ops.batched_nms(boxes, logits, levels, 0.7)[: config.RPN_POST_NMS_TOP_N_TEST]]

    x = ref_pool(features[:4], proposals, 7).flatten(1)
    x = F.relu(F.linear(x, d["roi_heads.box_head.fc1.weight"], d["roi_heads.box_head.fc1.bias"]))
    x = F.relu(F.linear(x, d["roi_heads.box_head.fc2.weight"], d["roi_heads.box_head.fc2.bias"]))
    scores = F.softmax(F.linear(x, d["roi_heads.box_predictor.cls_score.weight"],
                                d["roi_heads.box_predictor.cls_score.bias"]), -1)[:, :-1]  # (R, 80)
    deltas = F.linear(x, d["roi_heads.box_predictor.bbox_pred.weight"], d["roi_heads.box_predictor.bbox_pred.bias"])
    per_class = ref_decode(deltas.reshape(-1, 4), proposals.repeat_interleave(80, 0), (10.0, 10.0, 5.0, 5.0))
    per_class = ref_clip(per_class, h, w).view(-1, 80, 4)
    rows, classes = torch.where(scores > 0.05)
    boxes, scores = per_class[rows, classes], scores[rows, classes]
    keep = torchvision.ops.batched_nms(boxes, scores, classes, 0.5)[:100]
    boxes, scores, classes = boxes[keep], scores[keep], classes[keep]

    mask_logits = ref_mask_head(ref_pool(features[:4], boxes, 14), d)
    masks = mask_logits[torch.arange(len(classes)), classes].sigmoid()  # (D, 28, 28)

    height, width = original
    boxes = ref_clip(boxes * torch.tensor([width / w, height / h] * 2, dtype=torch.float64), height, width)
    keep = ref_nonempty(boxes)
    boxes, scores, classes, masks = boxes[keep], scores[keep], classes[keep], masks[keep]
    gy = ((torch.arange(height, dtype=torch.float64) + 0.5)[None] - boxes[:, 1:2]) / (boxes[:, 3:4] - boxes[:, 1:2])
    gx = ((torch.arange(width, dtype=torch.float64) + 0.5)[None] - boxes[:, 0:1]) / (boxes[:, 2:3] - boxes[:, 0:1])
    grid = torch.stack([gx[:, None, :].expand(-1, height, -1), gy[:, :, None].expand(-1, -1, width)], dim=3) * 2 - 1
    pasted = F.grid_sample(masks[:, None], grid, align_corners=False)
    return {"boxes": boxes, "scores": scores, "labels": classes + 1, "masks": pasted}


def test_inference_follows_the_detectron2_reference(d2):
    config, d, model = d2
    image = smooth_image(60, 90, seed=5)
    batch, _ = preprocess([image], config)
    expected = ref_detectron2_inference(batch.tensor.double(), batch.image_sizes[0], (60, 90), config, d)
    with torch.no_grad():
        got = model.infer([image])[0]
    assert_same_detections(expected, got, min_detections=10)
    # The masks as detect() gives them: thresholded at >= 0.5.
    inclusive = expected["masks"] >= 0.5
    agree = (model.infer([image], mask_threshold=0.5)[0]["masks"] == inclusive).double().mean()
    assert agree > 0.999


def test_category_ids_of_the_80_classes_are_cocos():
    """detect.py writes COCO results without a data set from CATEGORY_IDS: COCO's ids skip the 11 unused
    ones (12 is unused, so the 12th class, stop sign, is category 13; the 80th, toothbrush, is 90)."""
    config = Detectron2R50FPN3xConfig()
    ids = dict(enumerate(config.CATEGORY_IDS, start=1))
    assert len(ids) == 80
    assert (ids[1], ids[11], ids[12], ids[80]) == (1, 11, 13, 90)
    assert (config.CLASS_NAMES[12], config.CLASS_NAMES[80]) == ("stop sign", "toothbrush")
    result = {"boxes": np.array([[1.0, 2.0, 5.0, 8.0]], np.float32), "class_ids": np.array([12]),
              "scores": np.array([0.9], np.float32), "mask_crops": [np.ones((6, 4), bool)],
              "mask_origins": np.array([[2, 1]])}
    entry = detect.coco_results(result, 7, 10, 10, ids)[0]
    assert entry["category_id"] == 13 and entry["image_id"] == 7
