"""models/dlib_resnet.py: dlib's face ResNet as a registered face model: shapes, dlib's zero-padded residual sum,
the folded inference form, training (every parameter learns)."""
import pytest
import torch
import torch.nn.functional as F

import danlu.models.dlib_resnet  # noqa: F401 (registers dlib_resnet)
from danlu.errors import DanluError
from danlu.models.dlib_resnet import MIN_INPUT, Affine, DlibResNet, _add_padded, fuse_affine
from danlu.models.face import FaceModel
from danlu.models.registry import create_model, model_info


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Affine layers away from the identity, so that folding them is really tested."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, Affine):
            m.weight.data = 0.5 + torch.rand(m.weight.shape, generator=g)
            m.bias.data = 0.1 * torch.randn(m.bias.shape, generator=g)
    return model


def test_shapes_at_150_pixels_as_dlib_computes_them():
    model = DlibResNet().eval()
    x = torch.randn(2, 3, 150, 150)
    sizes = []
    hooks = [b.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[1:]))) for b in model.blocks]
    assert model(x).shape == (2, 128)
    for h in hooks:
        h.remove()
    # level4 at 35, then the down blocks: 17, 8, then 4 (3x3 conv branch, 4x4 pooled shortcut) and 2 (1x1 and 2x2)
    assert sizes == [(32, 35, 35)] * 3 + [(64, 17, 17)] * 4 + [(128, 8, 8)] * 3 + [(256, 4, 4)] * 3 + [(256, 2, 2)]
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 29


def test_add_padded_counts_missing_elements_as_zero():
    a, b = torch.randn(2, 4, 3, 3), torch.randn(2, 2, 4, 4)
    want = torch.zeros(2, 4, 4, 4)
    want[:, :, :3, :3] += a
    want[:, :2] += b
    assert torch.equal(_add_padded(a, b), want)
    assert torch.equal(_add_padded(b, b), 2 * b)


def test_folding_affine_into_the_convolutions_keeps_the_function():
    model = _randomised(DlibResNet()).eval()
    fused = fuse_affine(model)
    assert not any(isinstance(m, Affine) for m in fused.modules())
    assert any(isinstance(m, Affine) for m in model.modules())  # the original is left alone
    x = torch.randn(2, 3, 150, 150)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fused.to(memory_format=torch.channels_last)(x), model(x), rtol=1e-4, atol=1e-4)


def test_registered_as_a_face_model_that_trains():
    assert model_info("dlib_resnet").face
    model = create_model("dlib_resnet", num_classes=5, in_channels=1, head="arcface", scale=32.0)
    assert isinstance(model, FaceModel) and isinstance(model.backbone, DlibResNet)
    x, y = torch.randn(4, 1, 150, 150), torch.tensor([0, 1, 2, 3])
    logits = model(x)
    assert logits.shape == (4, 5)
    F.cross_entropy(logits, y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.eval()
    e = model.embed(x)
    assert e.shape == (4, 128) and torch.allclose(e.norm(dim=1), torch.ones(4), atol=1e-5)


def test_affine_is_the_same_in_training_and_evaluation():
    model = _randomised(DlibResNet())
    x = torch.randn(2, 3, 150, 150)
    with torch.no_grad():
        torch.testing.assert_close(model.train()(x), model.eval()(x))


def test_the_smallest_input_is_named_in_the_recipe_error():
    """Each down block's first 3x3 convolution is unpadded: below 103 px the last one would get a 2x2 map."""
    with pytest.raises(DanluError, match=r"input_size >= 103 .*got 102"):
        create_model("dlib_resnet", input_size=102)
    model = create_model("dlib_resnet", num_classes=3, input_size=MIN_INPUT).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, MIN_INPUT, MIN_INPUT)).shape == (1, 3)
        with pytest.raises(RuntimeError):
            model.backbone(torch.randn(1, 3, MIN_INPUT - 1, MIN_INPUT - 1))
