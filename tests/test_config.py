"""Tests of config.Config: defaults (torchvision's COCO Mask R-CNN), v2, overrides, validation, to_dict/from_dict.

Expected defaults come from torchvision's maskrcnn_resnet50_fpn / maskrcnn_resnet50_fpn_v2 and from
the Mask R-CNN and FPN papers; the rest are hand-written values.
"""

import json

import pytest
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn

from config import COCO_CLASS_NAMES, Config


@pytest.fixture(scope="module")
def torchvision_defaults():
    return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)


def test_defaults_are_torchvision_maskrcnn_resnet50_fpn(torchvision_defaults):
    tv = torchvision_defaults
    c = Config()
    assert c.VARIANT == "v1" and c.BACKBONE == "resnet50"
    # Transform.
    assert (c.IMAGE_MIN_DIM,) == tuple(tv.transform.min_size) and c.IMAGE_MIN_DIM_TRAIN == (c.IMAGE_MIN_DIM,)
    assert c.IMAGE_MAX_DIM == tv.transform.max_size
    assert list(c.PIXEL_MEAN) == tv.transform.image_mean and list(c.PIXEL_STD) == tv.transform.image_std
    assert c.IMAGE_SIZE_DIVISOR == tv.transform.size_divisible
    # Anchors and RPN.
    generator = tv.rpn.anchor_generator
    assert tuple((s,) for s in c.ANCHOR_SIZES) == generator.sizes
    assert all(tuple(c.ANCHOR_RATIOS) == r for r in generator.aspect_ratios)
    assert c.RPN_PRE_NMS_TOP_N_TRAIN == tv.rpn._pre_nms_top_n["training"]
    assert c.RPN_PRE_NMS_TOP_N_TEST == tv.rpn._pre_nms_top_n["testing"]
    assert c.RPN_POST_NMS_TOP_N_TRAIN == tv.rpn._post_nms_top_n["training"]
    assert c.RPN_POST_NMS_TOP_N_TEST == tv.rpn._post_nms_top_n["testing"]
    assert c.RPN_NMS_THRESHOLD == tv.rpn.nms_thresh
    assert c.RPN_SCORE_THRESHOLD == tv.rpn.score_thresh
    assert c.RPN_MIN_SIZE == tv.rpn.min_size
    assert c.RPN_FG_IOU_THRESHOLD == tv.rpn.proposal_matcher.high_threshold
    assert c.RPN_BG_IOU_THRESHOLD == tv.rpn.proposal_matcher.low_threshold
    assert c.RPN_BATCH_SIZE_PER_IMAGE == tv.rpn.fg_bg_sampler.batch_size_per_image
    assert c.RPN_POSITIVE_FRACTION == tv.rpn.fg_bg_sampler.positive_fraction
    assert c.RPN_CONVS == 1
    # RoI heads.
    heads = tv.roi_heads
    assert c.ROI_FG_IOU_THRESHOLD == heads.proposal_matcher.high_threshold
    assert c.ROI_BG_IOU_THRESHOLD == heads.proposal_matcher.low_threshold
    assert c.ROI_BATCH_SIZE_PER_IMAGE == heads.fg_bg_sampler.batch_size_per_image
    assert c.ROI_POSITIVE_FRACTION == heads.fg_bg_sampler.positive_fraction
    assert (c.BOX_POOL_SIZE, c.BOX_POOL_SIZE) == tuple(heads.box_roi_pool.output_size)
    assert (c.MASK_POOL_SIZE, c.MASK_POOL_SIZE) == tuple(heads.mask_roi_pool.output_size)
    assert c.POOL_SAMPLING_RATIO == heads.box_roi_pool.sampling_ratio == heads.mask_roi_pool.sampling_ratio
    assert c.POOL_ALIGNED is False
    assert (c.POOL_CANONICAL_SIZE, c.POOL_CANONICAL_LEVEL) == (224, 4)  # FPN paper, eq. 1
    assert tuple(c.BOX_CODER_WEIGHTS) == tuple(heads.box_coder.weights)
    assert c.SMOOTH_L1_BETA == pytest.approx(1 / 9)
    assert c.BOX_HEAD_CONVS == 0 and c.BOX_HEAD_DIM == heads.box_head.fc6.out_features
    assert c.MASK_HEAD_CONVS == 4 and c.MASK_HEAD_CHANNELS == 256
    assert c.DETECTION_MIN_CONFIDENCE == heads.score_thresh
    assert c.DETECTION_NMS_THRESHOLD == heads.nms_thresh
    assert c.DETECTION_MAX_INSTANCES == heads.detections_per_img
    assert c.NUM_CLASSES == heads.box_predictor.cls_score.out_features == 91
    assert c.FPN_CHANNELS == tv.backbone.out_channels
    # torchvision's COCO v1 weights: frozen BN with eps 0 (torchvision overwrites the eps after loading).
    assert c.NORM == "frozen_bn" and c.FROZEN_BN_EPS == 0.0
    assert c.TRAINABLE_BACKBONE_LAYERS == 3
    assert c.LABELS_ARE_CATEGORY_IDS is True
    assert c.CLASS_NAMES == COCO_CLASS_NAMES and len(c.CLASS_NAMES) == 91
    assert c.CLASS_NAMES[1] == "person" and c.CLASS_NAMES[90] == "toothbrush" and c.CLASS_NAMES[12] == "N/A"
    assert c.RPN_FOCAL_LOSS is False and c.BOX_FOCAL_LOSS is False


def test_mask_size_is_twice_the_mask_pool_size():
    assert Config().MASK_SIZE == 28
    assert Config(MASK_POOL_SIZE=7).MASK_SIZE == 14
    assert "MASK_SIZE" not in Config().keys()


def test_v2():
    c = Config.v2()
    assert (c.VARIANT, c.NORM, c.RPN_CONVS, c.BOX_HEAD_CONVS) == ("v2", "bn", 2, 4)
    assert c.NUM_CLASSES == 91 and c.BACKBONE == "resnet50"
    c = Config.v2(NUM_CLASSES=4, RPN_CONVS=1)
    assert (c.VARIANT, c.NUM_CLASSES, c.RPN_CONVS, c.BOX_HEAD_CONVS) == ("v2", 4, 1, 4)


def test_overrides_are_per_instance():
    c = Config(NUM_CLASSES=4, NAME="shapes")
    assert (c.NUM_CLASSES, c.NAME) == (4, "shapes")
    assert Config().NUM_CLASSES == 91 and Config.NUM_CLASSES == 91 and Config().NAME == "coco"
    c.override(["NUM_CLASSES=5"])
    assert Config().NUM_CLASSES == 91


def test_subclass():
    class ShapesConfig(Config):
        NAME = "shapes"
        NUM_CLASSES = 1 + 3
        MY_SETTING = 7

    c = ShapesConfig()
    assert (c.NAME, c.NUM_CLASSES) == ("shapes", 4)
    assert "MY_SETTING" in c.keys()
    assert len(c.CLASS_NAMES) == 4 and c.CLASS_NAMES[0] == "__background__"
    assert ShapesConfig(MY_SETTING=8).MY_SETTING == 8
    copy = ShapesConfig.from_dict(c.to_dict())
    assert type(copy) is ShapesConfig and copy.to_dict() == c.to_dict()


def test_class_names_follow_num_classes():
    c = Config(NUM_CLASSES=4)
    assert c.CLASS_NAMES == ("__background__", "person", "bicycle", "car")
    c = Config(NUM_CLASSES=95)
    assert len(c.CLASS_NAMES) == 95 and c.CLASS_NAMES[:91] == COCO_CLASS_NAMES
    c = Config(NUM_CLASSES=3, CLASS_NAMES=("bg", "cat", "dog"))
    assert c.CLASS_NAMES == ("bg", "cat", "dog")


def test_to_dict_from_dict_round_trip():
    c = Config.v2(NUM_CLASSES=4, ANCHOR_RATIOS=(0.5, 1.0), IMAGE_MIN_DIM_TRAIN=(640, 672), FOCAL_ALPHA=0.25,
                  NAME="run")
    d = c.to_dict()
    assert set(d) == set(c.keys())
    assert d["ANCHOR_RATIOS"] == [0.5, 1.0] and d["NUM_CLASSES"] == 4 and d["VARIANT"] == "v2"
    # JSON-friendly, as it goes into checkpoints.
    restored = Config.from_dict(json.loads(json.dumps(d)))
    for key in c.keys():
        assert getattr(restored, key) == getattr(c, key), key
        assert type(getattr(restored, key)) is type(getattr(c, key)), key
    assert restored.ANCHOR_RATIOS == (0.5, 1.0) and restored.IMAGE_MIN_DIM_TRAIN == (640, 672)
    # Through torch.save too (a checkpoint's "config").
    assert Config.from_dict(d).to_dict() == d


def test_from_dict_rejects_unknown_keys():
    d = Config().to_dict()
    d["NOT_A_SETTING"] = 1
    with pytest.raises(KeyError, match="NOT_A_SETTING"):
        Config.from_dict(d)


@pytest.mark.parametrize("assignment, key, value", [
    ("NUM_CLASSES=4", "NUM_CLASSES", 4),
    ("ANCHOR_RATIOS=(0.5,1.0)", "ANCHOR_RATIOS", (0.5, 1.0)),
    ("ANCHOR_RATIOS=(0.5, 1.0, 2.0)", "ANCHOR_RATIOS", (0.5, 1.0, 2.0)),
    ("NAME=foo", "NAME", "foo"),
    ("NAME='bar'", "NAME", "bar"),
    ("POOL_ALIGNED=True", "POOL_ALIGNED", True),
    ("FOCAL_ALPHA=None", "FOCAL_ALPHA", None),
    ("FOCAL_ALPHA=0.25", "FOCAL_ALPHA", 0.25),
    ("DETECTION_MIN_CONFIDENCE=5e-2", "DETECTION_MIN_CONFIDENCE", 0.05),
    ("BACKBONE=resnet18", "BACKBONE", "resnet18"),
    ("IMAGE_MIN_DIM_TRAIN=(640, 672, 704)", "IMAGE_MIN_DIM_TRAIN", (640, 672, 704)),
    ("NAME=a=b", "NAME", "a=b"),
])
def test_override_parses_literals(assignment, key, value):
    c = Config()
    assert c.override([assignment]) is c
    assert getattr(c, key) == value
    assert type(getattr(c, key)) is type(value)


def test_override_several_and_revalidates():
    c = Config().override(["NUM_CLASSES=4", "BACKBONE=resnet34", "NAME=shapes"])
    assert (c.NUM_CLASSES, c.BACKBONE, c.NAME) == (4, "resnet34", "shapes")
    assert len(c.CLASS_NAMES) == 4  # validate() ran after the change


def test_override_unknown_key_names_it():
    with pytest.raises(KeyError, match="NUM_CLASS"):
        Config().override(["NUM_CLASS=4"])
    with pytest.raises(KeyError, match="WHATEVER"):
        Config(WHATEVER=1)


def test_override_without_equals():
    with pytest.raises(ValueError, match="KEY=VALUE"):
        Config().override(["NUM_CLASSES"])


@pytest.mark.parametrize("settings, match", [
    (dict(BACKBONE="resnet17"), "BACKBONE"),
    (dict(BACKBONE="vgg16"), "BACKBONE"),
    (dict(VARIANT="v3"), "VARIANT"),
    (dict(NORM="batchnorm"), "NORM"),
    (dict(TRAINABLE_BACKBONE_LAYERS=6), "TRAINABLE_BACKBONE_LAYERS"),
    (dict(TRAINABLE_BACKBONE_LAYERS=-1), "TRAINABLE_BACKBONE_LAYERS"),
    (dict(NUM_CLASSES=1), "NUM_CLASSES"),
    (dict(NUM_CLASSES=4.0), "NUM_CLASSES"),
    (dict(ANCHOR_SIZES=(32, 64, 128, 256)), "ANCHOR_SIZES"),
])
def test_validation(settings, match):
    with pytest.raises(ValueError, match=match):
        Config(**settings)


def test_override_bad_value_raises_value_error():
    with pytest.raises(ValueError, match="BACKBONE"):
        Config().override(["BACKBONE=resnet17"])


def test_keys_and_display(capsys):
    c = Config(NAME="shown")
    keys = c.keys()
    assert keys == sorted(keys)
    assert all(k.isupper() for k in keys)
    for expected in ("NAME", "NUM_CLASSES", "BACKBONE", "IMAGE_MIN_DIM", "DETECTION_MIN_CONFIDENCE", "FOCAL_GAMMA"):
        assert expected in keys
    c.display()
    out = capsys.readouterr().out
    lines = out.splitlines()
    for key in keys:
        assert any(line.split() and line.split()[0] == key for line in lines), key
    assert any(line.split()[:2] == ["NAME", "shown"] for line in lines if line.strip())
    assert "Config" in repr(c)


def test_config_goes_into_a_checkpoint(tmp_path):
    c = Config(NUM_CLASSES=4, NAME="ckpt")
    path = tmp_path / "c.pth"
    torch.save({"config": c.to_dict()}, path)
    restored = Config.from_dict(torch.load(path, weights_only=True)["config"])
    assert restored.to_dict() == c.to_dict()


# ----------------------------------------------------------------------------------------------------
# Typed settings: every value is checked against the type of the attribute's default, and its range


@pytest.mark.parametrize("text, value", [
    ("false", False), ("False", False), ("FALSE", False), ("0", False), ("no", False), ("No", False),
    ("true", True), ("True", True), ("1", True), ("yes", True), ("YES", True),
])
def test_override_reads_booleans(text, value):
    c = Config().override([f"RPN_FOCAL_LOSS={text}"])
    assert c.RPN_FOCAL_LOSS is value


@pytest.mark.parametrize("assignment, key, value", [
    ("LEARNING_RATE=1", "LEARNING_RATE", 1.0),  # an int for a float setting becomes a float
    ("IMAGE_MIN_DIM_TRAIN=800", "IMAGE_MIN_DIM_TRAIN", (800,)),  # one number for a tuple of numbers
    ("LR_STEPS=[5, 6]", "LR_STEPS", (5, 6)),
    ("FOCAL_ALPHA=none", "FOCAL_ALPHA", None),
    ("NAME=123", "NAME", "123"),  # a str setting keeps the text
    ("TRAINING_STAGES=((0, 'heads'), (2, 'all'))", "TRAINING_STAGES", ((0, "heads"), (2, "all"))),
])
def test_override_reads_values_as_the_settings_type(assignment, key, value):
    got = getattr(Config().override([assignment]), key)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("assignment, expected", [
    ("RPN_FOCAL_LOSS=maybe", "a bool (true/false, 1/0, yes/no)"),
    ("RPN_FOCAL_LOSS=2", "a bool (true/false, 1/0, yes/no)"),
    ("BATCH_SIZE=2.5", "an int >= 1"),
    ("BATCH_SIZE=0", "an int >= 1"),
    ("CHECKPOINT_PERIOD=-5", "an int >= 1"),
    ("LOG_PERIOD=0", "an int >= 1"),
    ("LEARNING_RATE=abc", "a float >= 0"),
    ("LEARNING_RATE=nan", "a float >= 0"),
    ("RPN_NMS_THRESHOLD=1.5", "a float in [0, 1]"),
    ("ROI_POSITIVE_FRACTION=-0.1", "a float in [0, 1]"),
    ("FOCAL_ALPHA=2", "a float in [0, 1] or None"),
    ("IMAGE_MIN_DIM_TRAIN=(640.5,)", "a tuple of int >= 1"),
    ("ANCHOR_RATIOS=(0.5, -1)", "a tuple of float > 0"),
    ("LR_STEPS=None", "a tuple of int >= 0"),
    ("MAX_ITERS=true", "an int >= 1"),
])
def test_override_refuses_values_of_the_wrong_type_or_range(assignment, expected):
    key, _, text = assignment.partition("=")
    with pytest.raises(ValueError) as error:
        Config().override([assignment])
    message = str(error.value)
    assert f"{key} must be {expected}; got" in message
    assert text in message  # the value received


def test_unknown_key_names_the_nearest_setting():
    with pytest.raises(KeyError, match="did you mean LEARNING_RATE"):
        Config().override(["LERNING_RATE=0.1"])
    with pytest.raises(KeyError, match="did you mean NUM_CLASSES"):
        Config(NUM_CLASS=4)


@pytest.mark.parametrize("settings, message", [
    (dict(RPN_FOCAL_LOSS="false"), "RPN_FOCAL_LOSS must be a bool"),
    (dict(HFLIP=1), "HFLIP must be a bool"),
    (dict(MAX_ITERS=0), "MAX_ITERS must be an int >= 1"),
    (dict(MASK_THRESHOLD=1.5), "MASK_THRESHOLD must be a float in [0, 1]"),
    (dict(NAME=5), "NAME must be a str"),
])
def test_config_and_from_dict_check_types(settings, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        Config(**settings)
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        Config.from_dict({**Config().to_dict(), **settings})


def test_a_subclass_keeps_the_types_of_config():
    class Mine(Config):
        HFLIP = "no"  # a str where Config has a bool

    with pytest.raises(ValueError, match="HFLIP must be a bool"):
        Mine()
    assert type(Config(LEARNING_RATE=1).LEARNING_RATE) is float
