"""Tests of loading weight and checkpoint files: MaskRCNN.load_weights refuses a checkpoint of another
network (strict) with the keys listed, and loads what fits with strict=False; files are loaded with
weights_only=True (a pickled object that would run code is refused, and does not run); a file cut short
is an error that names it.

Oracles: the key sets of torchvision's ResNet-18 / ResNet-34 and of our own models built from two
configs (which keys one has and the other lacks is plain set arithmetic on their state dicts), and a
marker file that a pickled object would create if it were unpickled.
"""

import pathlib

import pytest
import torch
import torchvision
from helpers_model import small_config

import utils
from model import MaskRCNN


def random_state(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in model.state_dict().items()}


def test_a_resnet34_checkpoint_does_not_load_into_a_resnet18_model(tmp_path):
    source = MaskRCNN(small_config(BACKBONE="resnet34"))
    path = tmp_path / "resnet34.pth"
    torch.save(source.state_dict(), path)
    model = MaskRCNN(small_config(BACKBONE="resnet18"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # ResNet-34 has 3, 4, 6, 3 blocks per stage, ResNet-18 2, 2, 2, 2: the extra blocks are not in the model.
    extra = sorted(set(source.state_dict()) - set(before))
    assert extra and all(k.startswith("backbone.body.layer") for k in extra)
    with pytest.raises(ValueError) as error:
        model.load_weights(str(path))
    message = str(error.value)
    assert str(path) in message and "strict=False" in message
    assert f"{len(extra)} tensors ({', '.join(extra[:5])}, ... and {len(extra) - 5} more) in it are not in" in message
    assert "0 tensors of the model are not in it" in message
    for key, value in model.state_dict().items():  # nothing was loaded
        assert torch.equal(value, before[key]), key


def test_a_resnet18_checkpoint_into_a_resnet34_model_lists_the_missing_keys():
    source = MaskRCNN(small_config(BACKBONE="resnet18"))
    model = MaskRCNN(small_config(BACKBONE="resnet34"))
    absent = sorted(set(model.state_dict()) - set(source.state_dict()))
    with pytest.raises(ValueError) as error:
        model.load_weights(source.state_dict())
    assert f"{len(absent)} tensors ({', '.join(absent[:5])}, ... and {len(absent) - 5} more) of the model" in str(
        error.value)


def test_strict_false_loads_what_fits_and_reports_the_rest():
    source = MaskRCNN(small_config(BACKBONE="resnet34"))
    state = random_state(source)
    model = MaskRCNN(small_config(BACKBONE="resnet18"))
    report = model.load_weights(state, strict=False)
    own = model.state_dict()
    assert set(report["unexpected"]) == set(state) - set(own)
    assert set(report["loaded"]) == set(own) & set(state) and report["missing"] == []
    for key in report["loaded"]:
        assert torch.equal(own[key], state[key]), key


def test_an_imagenet_resnet_of_another_depth_is_refused_and_the_right_one_loads():
    model = MaskRCNN(small_config(BACKBONE="resnet18", NORM="frozen_bn", FROZEN_BN_EPS=1e-5))
    resnet34 = torchvision.models.resnet34(weights=None).state_dict()
    with pytest.raises(ValueError, match=r"ImageNet ResNet does not fit.*backbone\.body\.layer1\.2\."):
        model.load_weights(resnet34)
    # The right depth is a partial load (backbone only): the heads are missing, and that is no error.
    report = model.load_weights(torchvision.models.resnet18(weights=None).state_dict())
    assert report["loaded"] and all(k.startswith("backbone.body.") for k in report["loaded"])
    assert any(k.startswith("roi_heads.") for k in report["missing"])


def test_a_checkpoint_lacking_excluded_keys_still_loads():
    # Fine-tuning from weights without the class-specific layers: exclude=("heads",) says they are not wanted.
    source = MaskRCNN(small_config())
    state = {k: v for k, v in random_state(source).items() if not k.startswith("roi_heads.box_predictor.")}
    model = MaskRCNN(small_config())
    with pytest.raises(ValueError, match="roi_heads.box_predictor"):
        model.load_weights(dict(state))
    report = model.load_weights(dict(state), exclude=("heads",))
    assert {k for k in report["missing"] if k.startswith("roi_heads.box_predictor.")} == {
        k for k in source.state_dict() if k.startswith("roi_heads.box_predictor.")}


class RunsCode:
    """Unpickling this creates a file: what a malicious checkpoint could do instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    model = MaskRCNN(small_config())
    path = tmp_path / "evil.pth"
    torch.save({"model": model.state_dict(), "payload": RunsCode(str(marker))}, path)
    with pytest.raises(ValueError) as error:
        model.load_weights(str(path))
    assert str(path) in str(error.value) and "weights_only=True" in str(error.value)
    with pytest.raises(ValueError, match="weights_only=True"):
        MaskRCNN.from_checkpoint(str(path))
    assert not marker.exists()


def test_a_file_cut_short_names_the_file(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save(MaskRCNN(small_config()).state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(utils.UnreadableFileError) as error:
        MaskRCNN(small_config()).load_weights(str(path))
    assert str(path) in str(error.value) and "incomplete or corrupt" in str(error.value)
