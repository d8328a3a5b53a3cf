"""danlu.engine.params: the optimizer's parameter groups (timm's no-decay rule, the head apart at head_lr_mult) and
freezing by 'backbone' or by name prefix, with one-line refusals."""
import pytest
import torch
from torch import nn

from danlu.engine.params import freeze, param_groups
from danlu.errors import DanluError
from danlu.models import create_model


def test_groups_follow_timms_rule_and_put_the_head_apart():
    model = create_model("tv:resnet18", num_classes=3)
    groups = param_groups(model, head="fc", weight_decay=0.1, exclude_norm_bias=True, head_lr_mult=10)
    names = {id(p): n for n, p in model.named_parameters()}
    got = [(g["weight_decay"], g["lr_mult"], sorted(names[id(p)] for p in g["params"])) for g in groups]
    named = list(model.named_parameters())
    no_decay = lambda n, p: p.ndim <= 1 or n.endswith(".bias")  # noqa: E731 (timm's param_groups_weight_decay)
    body = [(n, p) for n, p in named if not n.startswith("fc.")]
    assert got == [(0.1, 1.0, sorted(n for n, p in body if not no_decay(n, p))),
                   (0.0, 1.0, sorted(n for n, p in body if no_decay(n, p))),
                   (0.1, 10, ["fc.weight"]), (0.0, 10, ["fc.bias"])]
    assert any(n.endswith("bn1.weight") for n in got[1][2])  # a norm's scale: 1-d, no decay
    one = param_groups(model, head=None, weight_decay=0.1, exclude_norm_bias=False)
    assert len(one) == 1 and len(one[0]["params"]) == len(named)


def test_bad_freeze_requests_are_one_line():
    model = create_model("lenet", num_classes=10, in_channels=1)
    with pytest.raises(DanluError, match=r"model.freeze: 'conv9' names no parameter of LeNet; expected .*conv1"):
        freeze(model, ["conv9"], None)
    with pytest.raises(DanluError, match="would freeze every parameter"):
        freeze(model, ["conv1", "conv2", "fc1", "fc2"], None)
    with pytest.raises(DanluError, match="found no classifier"):
        freeze(model, "backbone", None)


class _Layers(nn.Module):
    """Names that share a beginning: layer1 and layer10, and a head."""

    def __init__(self):
        super().__init__()
        self.layer1, self.layer10, self.fc = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 3)


def test_a_prefix_freezes_that_module_only_not_every_name_that_starts_alike():
    model = _Layers()
    frozen = freeze(model, ["layer1"], head="fc")
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == {"layer1.weight", "layer1.bias"}
    assert [id(p) for p in frozen] == [id(model.layer1.weight), id(model.layer1.bias)]
    with pytest.raises(DanluError, match="'layer' names no parameter"):  # a prefix of a name is not a module
        freeze(_Layers(), ["layer"], head="fc")


def test_backbone_freezes_everything_but_the_head_and_every_parameter_keeps_its_group():
    """Frozen parameters stay in the groups (no gradient: the optimizer leaves them alone), so unfreezing later
    changes nothing in the optimizer's shape and a snapshot's optimizer state still fits."""
    model = _Layers()
    freeze(model, "backbone", head="fc")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    groups = param_groups(model, head="fc", weight_decay=0.1, head_lr_mult=5)
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in model.parameters())
    assert [(g["weight_decay"], g["lr_mult"], len(g["params"])) for g in groups] == \
        [(0.1, 1.0, 2), (0.0, 1.0, 2), (0.1, 5, 1), (0.0, 5, 1)]


def test_a_head_at_the_bodys_lr_is_not_split_off():
    """head_lr_mult 1: the head's parameters join the body's groups (two groups, not four)."""
    groups = param_groups(_Layers(), head="fc", weight_decay=0.1, head_lr_mult=1.0)
    assert [(g["weight_decay"], g["lr_mult"], len(g["params"])) for g in groups] == [(0.1, 1.0, 3), (0.0, 1.0, 3)]
    opt = torch.optim.SGD(groups, lr=0.1)  # a torch optimizer takes them as they are
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
