"""danlu's loop against a plain PyTorch loop: the same batches give the same weights."""
import copy

import pytest
import torch
import torch.nn.functional as F

import danlu
from danlu.data.loader import DeviceLoader


def test_danlu_loop_equals_a_plain_pytorch_loop(tmp_path):
    train, test = danlu.load_dataset("synthetic", train_size=256, test_size=64)
    torch.manual_seed(0)
    model = danlu.create_model("lenet", num_classes=10, in_channels=1)
    plain = copy.deepcopy(model)
    recipe = {"data": {"batch_size": 32}, "augment": "none",
              "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4,
                        "wd_exclude_norm_bias": False},
              "run": {"max_iter": 20, "test_interval": 1000, "snapshot_every": 0, "seed": 4, "tensorboard": False}}
    result = danlu.train(recipe, model=model, train_data=train, test_data=test, out=tmp_path / "run", quiet=True)

    opt = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loader = DeviceLoader(train.images, train.labels, 32, device="cpu", seed=4)  # the same seeded order
    steps = 0
    for epoch in range(3):
        for x, y in loader.epoch(epoch):
            if steps == 20:
                break
            loss = F.cross_entropy(plain(x.float().mul_(1 / 255)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
    for (name, a), b in zip(result.model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name


def test_schedule_reaches_the_optimizer(tmp_path):
    train, test = danlu.load_dataset("synthetic", train_size=128, test_size=32)
    recipe = {"data": {"batch_size": 32}, "optim": {"lr": 0.1},
              "schedule": {"policy": "step", "stepsize": 4, "gamma": 0.5},
              "run": {"max_iter": 10, "display": 1, "snapshot_every": 0, "tensorboard": False}}
    danlu.train(recipe, train_data=train, test_data=test, out=tmp_path / "run", quiet=True)
    import json

    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
           if '"train"' in line]
    # iteration it (0-based) uses 0.1 * 0.5 ** (it // 4); the event at iteration k reports the rate of step k-1
    assert lrs == [0.1 * 0.5 ** ((k - 1) // 4) for k in range(1, 11)]


def test_test_flip_averages_the_logits_of_each_image_and_its_mirror_image():
    from danlu.data.augment import Augment
    from danlu.data.loader import DeviceLoader
    from danlu.engine.distributed import Dist
    from danlu.tasks.classification import evaluate
    from danlu.engine.precision import Precision

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 5, 6)).eval()  # not mirror-symmetric
    x, y = torch.randint(0, 256, (10, 3, 4, 5), dtype=torch.uint8), torch.randint(0, 6, (10,))
    loader, aug, p = DeviceLoader(x, y, 4, device="cpu", shuffle=False, drop_last=False), Augment(), \
        Precision("fp32", "cpu")
    flipped = evaluate(model, loader, aug, p, Dist(), flip=True)
    with torch.no_grad():
        z = aug(x, train=False)
        logits = (model(z) + model(z.flip(-1))) / 2
    want = torch.nn.functional.cross_entropy(logits, y).item()
    assert flipped["loss"] == pytest.approx(want, rel=1e-6)
    assert flipped["acc"] == (logits.argmax(1) == y).float().mean().item()
    assert evaluate(model, loader, aug, p, Dist())["loss"] != pytest.approx(want, rel=1e-6)  # and it differs
