import pytest
import torch

from danlu.data.augment import Augment, _crop, _shift, channel_mean_std, per_pixel_mean
from danlu.errors import DanluError


def batch(B=6, C=3, H=8, W=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, C, H, W), generator=g, dtype=torch.uint8)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def ref_shift(x, dy, dx):  # slow reference: edge-replicated shift, one pixel at a time
    B, C, H, W = x.shape
    out = torch.empty_like(x)
    for b in range(B):
        for i in range(H):
            for j in range(W):
                out[b, :, i, j] = x[b, :, min(max(i - int(dy[b]), 0), H - 1), min(max(j - int(dx[b]), 0), W - 1)]
    return out


def ref_crop(x, pad, oy, ox):  # slow reference: zero pad, then window at (oy, ox)
    B, C, H, W = x.shape
    out = torch.zeros_like(x)
    for b in range(B):
        for i in range(H):
            for j in range(W):
                si, sj = i + int(oy[b]) - pad, j + int(ox[b]) - pad
                if 0 <= si < H and 0 <= sj < W:
                    out[b, :, i, j] = x[b, :, si, sj]
    return out


def test_eval_path_exact():
    x = batch()
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    y = Augment(shift=0.1, flip=True, crop=2, mean=mean, std=std)(x, train=False)
    expect = (x.float() * (1 / 255) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.equal(y, expect)
    assert torch.equal(Augment(scale=1.0)(x), x.float())  # identity, no normalization


def test_is_identity():
    assert Augment().is_identity
    assert Augment(mean=[0.5] * 3, std=[0.2] * 3).is_identity
    assert not Augment(flip=True).is_identity
    assert not Augment(shift=0.1).is_identity
    assert not Augment(crop=4).is_identity


def test_shift_matches_reference():
    x = batch()
    dy = torch.tensor([0, 1, -2, 3, -8, 7])
    dx = torch.tensor([0, -1, 2, -3, 9, -10])
    assert torch.equal(_shift(x, dy, dx), ref_shift(x, dy, dx))
    # a hand-checked case: shift right by one replicates the first column
    y = _shift(x[:1], torch.tensor([0]), torch.tensor([1]))
    assert torch.equal(y[0, :, :, 0], x[0, :, :, 0]) and torch.equal(y[0, :, :, 1:], x[0, :, :, :-1])


def test_crop_matches_reference():
    x = batch()
    pad = 3
    oy = torch.tensor([0, 3, 6, 1, 5, 2])
    ox = torch.tensor([6, 3, 0, 4, 2, 5])
    assert torch.equal(_crop(x, pad, oy, ox), ref_crop(x, pad, oy, ox))
    assert torch.equal(_crop(x, pad, torch.full((6,), 3), torch.full((6,), 3)), x)  # centre window = input


def test_flip_follows_draws():
    x = batch(B=32)
    aug = Augment(flip=True, scale=1.0)
    p = aug._draw(32, 8, 10, gen(1), x.device)  # same seed -> the draws __call__ will make
    y = aug(x, gen(1))
    expect = torch.where(p["flip"][:, None, None, None], x.flip(3), x).float()
    assert torch.equal(y, expect)
    assert 0 < int(p["flip"].sum()) < 32
    assert not torch.equal(aug(x, gen(2)), y)  # a different seed flips different samples


def test_composed_matches_separate_ops():
    x = batch(B=16, H=12, W=12)
    aug = Augment(shift=0.2, flip=True, crop=2, scale=1.0)
    p = aug._draw(16, 12, 12, gen(5), x.device)
    expect = _shift(_crop(x, 2, p["oy"], p["ox"]), p["dy"], p["dx"])
    expect = torch.where(p["flip"][:, None, None, None], expect.flip(3), expect).float()
    assert torch.equal(aug(x, gen(5)), expect)


@pytest.mark.parametrize("crop,flip", [(3, True), (3, False), (0, True)])
def test_the_cpu_slice_path_equals_the_gathers(crop, flip):
    from danlu.data.augment import _crop_flip_by_slices, _gather2d

    x = batch(B=16, H=12, W=9)
    aug = Augment(flip=flip, crop=crop, scale=1.0)
    p = aug._draw(16, 12, 9, gen(7), x.device)
    rows, cols = torch.arange(12).expand(16, 12), torch.arange(9).expand(16, 9)
    if flip:
        cols = torch.where(p["flip"][:, None], 8 - cols, cols)
    xp = x
    if crop:
        rows, cols = rows + p["oy"][:, None], cols + p["ox"][:, None]
        xp = torch.nn.functional.pad(x, (crop,) * 4)
    assert torch.equal(_crop_flip_by_slices(x, p, crop), _gather2d(xp, rows, cols))


@pytest.mark.parametrize("channels,mean,layout", [(3, "channel", torch.preserve_format), (3, "pixel", torch.channels_last),
                                                  (1, None, torch.preserve_format)])
@pytest.mark.parametrize("crop,flip,scale", [(3, True, 1 / 255), (0, True, 1.0), (4, False, 1 / 255)])
def test_the_cpu_numpy_path_equals_the_batched_ops(channels, mean, layout, crop, flip, scale):
    """On a CPU, Augment crops, flips, converts and normalizes image by image in numpy: bitwise the values (and the
    layout) of the batched torch ops it replaces."""
    from danlu.data.augment import _PER_IMAGE, _crop_flip_by_slices, _crop_flip_normalize_cpu

    H, W = 190, 181  # an image of at least _PER_IMAGE values, the size from which Augment takes that path
    x = batch(B=5, C=channels, H=H, W=W)
    assert x[0].numel() >= _PER_IMAGE
    m = {"channel": torch.rand(channels).tolist(), "pixel": torch.rand(channels, H, W), None: None}[mean]
    s = (torch.rand(channels) + 0.1).tolist() if mean else None
    aug = Augment(flip=flip, crop=crop, scale=scale, mean=m, std=s)
    aug.memory_format = layout
    p = aug._draw(5, H, W, gen(3), x.device)
    expect = _crop_flip_by_slices(x, p, crop).to(torch.float32, memory_format=layout).mul_(scale)
    if aug.mean is not None:
        expect.sub_(aug.mean).div_(aug.std)
    for got in (aug(x, gen(3)), _crop_flip_normalize_cpu(x, p, crop, scale, aug.mean, aug.std, layout)):
        assert torch.equal(got, expect) and got.stride() == expect.stride()
    for size in ((H, W), (8, 8))[:1 if mean == "pixel" else 2]:  # an empty batch (a rank's share can end before its
        # last test batch), on either path
        assert aug(batch(B=0, C=channels, H=size[0], W=size[1]), gen(3)).shape == (0, channels, *size)


def test_shift_offsets_in_range():
    aug = Augment(shift=0.1)
    p = aug._draw(10000, 32, 20, gen(0), torch.device("cpu"))
    assert int(p["dy"].min()) == -3 and int(p["dy"].max()) == 3  # round(0.1 * 32)
    assert int(p["dx"].min()) == -2 and int(p["dx"].max()) == 2  # round(0.1 * 20)
    p = Augment(crop=4)._draw(10000, 32, 32, gen(0), torch.device("cpu"))
    assert int(p["oy"].min()) == 0 and int(p["oy"].max()) == 8


def test_determinism_and_generator_state():
    x = batch(B=16)
    aug = Augment(shift=0.1, flip=True, crop=2, mean=[0.5] * 3)
    g = gen(7)
    a1, a2 = aug(x, g), aug(x, g)
    assert not torch.equal(a1, a2)  # the generator advanced
    h = gen(7)
    assert torch.equal(aug(x, h), a1) and torch.equal(aug(x, h), a2)
    state = g.get_state()  # resuming from a saved state replays the same augmentation
    a3 = aug(x, g)
    g2 = torch.Generator()
    g2.set_state(state)
    assert torch.equal(aug(x, g2), a3)
    assert a1.dtype == torch.float32 and a1.shape == x.shape


def test_per_pixel_mean_subtraction():
    x = batch(B=50, seed=3)
    m = per_pixel_mean(x, chunk=7)  # chunks that do not divide the set
    assert m.shape == (3, 8, 10) and m.dtype == torch.float32
    assert torch.allclose(m, x.double().mean(0).float() / 255, atol=1e-6)
    y = Augment(mean=m)(x, train=False)
    assert y.mean(0).abs().max() < 1e-5


def test_channel_mean_std():
    x = batch(B=40, seed=4)
    mean, std = channel_mean_std(x, chunk=9)
    xs = x.double() / 255
    assert mean == pytest.approx(xs.mean((0, 2, 3)).tolist(), abs=1e-9)
    assert std == pytest.approx(xs.std((0, 2, 3), unbiased=False).tolist(), abs=1e-9)
    y = Augment(mean=mean, std=std)(x, train=False)
    assert y.mean((0, 2, 3)).abs().max() < 1e-5 and (y.std((0, 2, 3), unbiased=False) - 1).abs().max() < 1e-5


def test_bad_args():
    with pytest.raises(DanluError, match="augment.shift"):
        Augment(shift=1.5)
    with pytest.raises(DanluError, match="augment.crop"):
        Augment(crop=-1)
    with pytest.raises(ValueError):
        Augment()(torch.zeros(2, 3, 4, 4))  # float input


@pytest.mark.cuda  # scripts/gpu_check.sh selects it with -m cuda; tests/conftest.py skips it without CUDA
def test_cuda_input_with_cpu_generator():
    x = batch(B=16)
    aug = Augment(shift=0.1, flip=True, crop=2, mean=[0.5] * 3, std=[0.25] * 3)
    y = aug(x.cuda(), gen(3))  # draws on the generator's device, then moved to the input's
    assert y.device.type == "cuda" and torch.equal(y.cpu(), aug(x, gen(3)))


def test_an_augmentation_is_its_recipe_field_and_its_code(monkeypatch):
    """Every `augment` key reaches data.augment.Augment as the argument of the same name (engine/build.py copies
    none by hand): a new one needs its field in config.AugmentCfg and its code in Augment, nothing else. Shown with
    a dummy one added to both in place."""
    import inspect

    from pydantic import Field, create_model

    from danlu import config
    from danlu.config import AugmentCfg, load_recipe
    from danlu.data import augment
    from danlu.engine.build import build_augment

    assert set(AugmentCfg.model_fields) <= set(inspect.signature(augment.Augment).parameters)
    seen = {}
    base = augment.Augment.__init__

    def init(self, *, invert: float = 0.0, **kw):  # the dummy augmentation's code
        seen["invert"] = invert
        base(self, **kw)

    dummy = create_model("AugmentCfg", __base__=AugmentCfg, invert=(float, Field(0.0, ge=0, le=1)))  # its field
    monkeypatch.setattr(augment.Augment, "__init__", init)
    monkeypatch.setitem(config.Recipe.model_fields, "augment", config.Recipe.model_fields["augment"])
    monkeypatch.setattr(config.Recipe.model_fields["augment"], "annotation", dummy)
    config.Recipe.model_rebuild(force=True)
    try:
        recipe = load_recipe("lenet_mnist5k", ["augment.invert=0.5"])
        build_augment(recipe)
    finally:
        monkeypatch.undo()
        config.Recipe.model_rebuild(force=True)
    assert seen == {"invert": 0.5}
