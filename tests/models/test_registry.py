import pytest
import torch

from danlu.errors import DanluError
from danlu.models import create_model, list_models, register_model, registry

# (name, create_model kwargs, input shape without batch)
_SHAPES = {"lenet": (1, 28, 28), "inception_resnet_v1": (3, 80, 80),  # FaceNet's net takes at least 75x75
           "dlib_resnet": (3, 104, 104)}  # dlib's at least 103x103
_CASES = [(n, {"in_channels": 1} if n == "lenet" else {}, _SHAPES.get(n, (3, 32, 32))) for n in list_models()]
_CASES.append(("lenet", {"in_channels": 3, "input_size": 32}, (3, 32, 32)))


@pytest.mark.parametrize("name,kw,shape", _CASES, ids=[f"{n}-{s[0]}x{s[1]}" for n, _, s in _CASES])
def test_forward_backward(name, kw, shape):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, **kw).train()
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname


def test_inception_resnet_v1_names_its_smallest_input():
    """75 px is the smallest side its five unpadded stride-2 stages take; below, the recipe error names the size
    instead of a convolution's traceback at the first step."""
    with pytest.raises(DanluError, match=r"input_size >= 75 .*got 74"):
        create_model("inception_resnet_v1", input_size=74)
    model = create_model("inception_resnet_v1", num_classes=3, input_size=75).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 75, 75)).shape == (1, 3)


def test_list_models():
    names = list_models()
    assert names == sorted(names) and {"lenet", "minigooglenet", "resnet18", "resnet34", "resnet50"} <= set(names)
    with_tv = list_models(include_torchvision=True)
    assert with_tv == sorted(with_tv) and "tv:resnet50" in with_tv and set(names) < set(with_tv)


@pytest.mark.parametrize("name", ["tv:resnet18", "tv:mobilenet_v3_small"])
def test_torchvision_in_channels(name):
    model = create_model(name, num_classes=5, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 64)).shape == (2, 5)


def test_unknown_name():
    with pytest.raises(DanluError) as e:
        create_model("nosuchnet")
    msg = str(e.value)
    assert "nosuchnet" in msg and "resnet18" in msg and "\n" not in msg


def test_typo_suggestion():
    with pytest.raises(DanluError, match="did you mean 'resnet18'"):
        create_model("resnt18")
    with pytest.raises(DanluError, match="tv:mobilenet_v2"):
        create_model("mobilenet_v2")
    with pytest.raises(DanluError, match="tv:resnet50"):
        create_model("tv:resnet5")


@pytest.mark.parametrize("name", ["lenet", "resnet18", "tv:resnet18"])
def test_bad_kwarg(name):
    with pytest.raises(DanluError) as e:
        create_model(name, bogus_arg=1)
    msg = str(e.value)
    assert name in msg and "bogus_arg" in msg and "\n" not in msg


def test_register_model(monkeypatch):
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))  # keep the global registry clean

    @register_model
    def _tiny_test_net(num_classes: int = 10, in_channels: int = 3, **kw):
        return torch.nn.Conv2d(in_channels, num_classes, 1, **kw)

    assert "_tiny_test_net" in list_models()
    assert create_model("_tiny_test_net", num_classes=4, in_channels=2).out_channels == 4


def test_lenet_matches_caffe():
    model = create_model("lenet", in_channels=1)
    assert model.fc1.in_features == 800 and model.fc1.out_features == 500
    assert (model.conv1.out_channels, model.conv1.kernel_size) == (20, (5, 5))
    assert (model.conv2.out_channels, model.conv2.kernel_size) == (50, (5, 5))


def test_minigooglenet_param_count():
    n = sum(p.numel() for p in create_model("minigooglenet").parameters())
    print(f"minigooglenet parameters: {n:,}")
    assert n == 1_652_826  # the Keras summary's trainable params (total 1,656,250 adds BN moving mean/var)
