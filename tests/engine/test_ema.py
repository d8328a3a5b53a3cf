"""danlu.engine.ema: the weights' moving average (optim.ema) follows its formula for every floating tensor, copies
the integer ones, starts over from the model on request, and round-trips through a snapshot's state dict."""
import torch

from danlu.engine.ema import EMA


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))


def _move(model: torch.nn.Module) -> None:
    """One 'training step': every weight moves, and BatchNorm's running statistics and step counter too."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model(torch.randn(8, 3))


def test_the_average_follows_its_formula():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = EMA(model, decay=0.9)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(8, 3))  # BatchNorm's running statistics and step counter move
        ema.update()
        for k, v in model.state_dict().items():
            want[k] = 0.9 * want[k] + 0.1 * v if v.is_floating_point() else v.clone()
    for k, v in ema.state_dict().items():
        assert torch.allclose(v, want[k], atol=1e-6, rtol=0) and v.dtype == want[k].dtype, k
    assert ema.state_dict()["1.num_batches_tracked"].item() == 3
    assert all(not p.requires_grad for p in ema.model.parameters())


def test_the_average_is_a_copy_that_moves_only_on_update():
    model = _model()
    ema = EMA(model, decay=0.5)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    _move(model)
    assert all(torch.equal(v, start[k]) for k, v in ema.state_dict().items())  # not the model's own tensors
    assert not ema.model.training  # evaluated as it is: BatchNorm on its running statistics


def test_reset_starts_the_average_again_from_the_model_now():
    """A resumed run whose snapshot holds no average: the average restarts from the resumed weights."""
    model = _model()
    ema = EMA(model, decay=0.9)
    _move(model)
    ema.reset()
    now = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(v, now[k]) for k, v in ema.state_dict().items())
    _move(model)
    ema.update()  # and goes on from there
    w = model.state_dict()["0.weight"]
    assert torch.allclose(ema.state_dict()["0.weight"], 0.9 * now["0.weight"] + 0.1 * w, atol=1e-6, rtol=0)


def test_a_loaded_average_goes_on_as_the_saved_one_would():
    model = _model()
    ema = EMA(model, decay=0.8)
    _move(model)
    ema.update()
    saved = {k: v.clone() for k, v in ema.state_dict().items()}
    _move(model)
    ema.update()
    resumed = EMA(model, decay=0.8)  # a new run's average, loaded from the snapshot
    resumed.load_state_dict(saved)
    # the step after the snapshot, again, from the loaded average: the same result as the uninterrupted one
    again = {k: 0.8 * saved[k] + 0.2 * v if v.is_floating_point() else v
             for k, v in model.state_dict().items()}
    resumed.update()
    for k, v in resumed.state_dict().items():
        assert torch.allclose(v, again[k], atol=1e-6, rtol=0), k
        assert torch.allclose(v, ema.state_dict()[k], atol=1e-6, rtol=0), k
