"""model.pretrained=facenet:vggface2 / facenet:casia-webface for inception_resnet_v1: facenet-pytorch's
InceptionResnetV1 weights in danlu's model (the same embeddings), the recipe values and their checks, the release files
from the cache folder, from a server the test starts, or one line naming file and folder when they cannot be had.
These machines cannot download the releases: every weights file here is a random facenet-pytorch model's, made by the
test."""
import hashlib
import io

import pytest
import torch
from torch import nn

from danlu.config import load_recipe
from danlu.errors import DanluError
from danlu.models import create_model, pretrained
from danlu.models.pretrained import FACENET, FACENET_DATA, check_data, facenet_state, load_pretrained, weights_for
from tests.data.datafiles import file_server  # noqa: F401 (fixture)

FACENET_SETS = ("facenet:vggface2", "facenet:casia-webface")
DATA = [f"data.scale={FACENET_DATA['scale']}", f"data.mean={FACENET_DATA['mean']}", f"data.std={FACENET_DATA['std']}"]


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("DANLU_OFFLINE", raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints"


def _randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Running statistics and affine parameters away from their 0 / 1 defaults, so that a mapping that misplaces or
    drops one changes the outputs (fresh BatchNorm layers all look alike)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            m.weight.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


@pytest.fixture(scope="module")
def reference():
    """facenet-pytorch's InceptionResnetV1, random weights and no download (pretrained=None), with a 7-class
    classifier `logits` as the release files have one (8,631 / 10,575 classes there)."""
    fp = pytest.importorskip("facenet_pytorch", reason="facenet-pytorch is a test extra (pip install facenet-pytorch "
                                                        "--no-deps)")
    torch.manual_seed(0)
    ref = fp.InceptionResnetV1(pretrained=None, classify=True, num_classes=7).eval()
    with torch.no_grad():
        _randomize_batchnorm(ref)
    return ref


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)  # as facenet-pytorch's release files: a torch.save'd state dict
    return buf.getvalue()


def test_facenet_pytorch_weights_give_the_same_embeddings_and_logits(reference):
    model = create_model("inception_resnet_v1", num_classes=7, test_flip=False).eval()
    result = model.load_state_dict(facenet_state(reference.state_dict(), softmax_head=True), strict=True)
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    torch.manual_seed(1)
    x = (torch.randint(0, 256, (3, 3, 160, 160)).float() - 127.5) / 128  # fixed_image_standardization
    with torch.no_grad():
        reference.classify = True
        want_logits = reference(x)  # (3, 7)
        reference.classify = False
        want = reference(x)  # (3, 512), unit length
        got, got_logits = model.embed(x), model(x)
    diff = (got - want).abs().max().item()
    print(f"max abs difference: embeddings {diff:.3g}, logits {(got_logits - want_logits).abs().max().item():.3g}")
    assert diff <= 1e-5 and torch.allclose(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    assert torch.allclose(got.norm(dim=1), torch.ones(3))


def test_a_cosine_head_leaves_facenets_classifier_unused(reference):
    from danlu.models.weights import fit_weights

    model = create_model("inception_resnet_v1", num_classes=7, head="arcface")
    state = facenet_state(reference.state_dict(), softmax_head=False)
    report = fit_weights(model, state, "facenet", key="model.pretrained")
    assert report["unused"] == ["logits.bias", "logits.weight"] and report["fresh"] == ["head.weight"]
    got, want = model.state_dict(), reference.state_dict()
    assert torch.equal(got["backbone.last_bn.running_var"], want["last_bn.running_var"])


def test_true_means_vggface2_for_inception_resnet_v1_and_the_library_default_elsewhere():
    assert weights_for("inception_resnet_v1", True) == "facenet:vggface2"
    assert weights_for("inception_resnet_v1", "facenet:casia-webface") == "facenet:casia-webface"
    assert weights_for("tv:resnet18", True) == "tv:resnet18"
    for name in FACENET_SETS:
        r = load_recipe(overrides=["model.name=inception_resnet_v1", f"model.pretrained={name}"])
        assert r.model.pretrained == name
    src = pretrained.published("facenet:vggface2")
    assert src.url == "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180402-114759-vggface2.pt"
    assert pretrained.published("facenet:casia-webface").file == "20180408-102900-casia-webface.pt"


@pytest.mark.parametrize("overrides, words", [
    (["model.pretrained=facenet:vggface"], ["model.pretrained=facenet:vggface", "expected a boolean", "did you mean "
                                            "'facenet:vggface2'", "facenet:vggface2, facenet:casia-webface"]),
    (["model.name=tv:resnet18", "model.pretrained=facenet:vggface2"],
     ["facenet:vggface2 are weights of inception_resnet_v1, not of model.name=tv:resnet18"]),
    (["model.name=inception_resnet_v1", "model.pretrained=facenet:casia-webface", "model.init=runs/x"],
     ["model.pretrained=facenet:casia-webface and model.init=runs/x: expected one of them"]),
])
def test_named_weights_are_checked_in_the_recipe(overrides, words):
    with pytest.raises(DanluError) as e:
        load_recipe(overrides=overrides)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_the_data_must_be_standardized_as_facenet_pytorch_does():
    check_data("facenet:vggface2", 1.0, [127.5] * 3, [128.0] * 3)  # FACENET_DATA exactly
    check_data("facenet:vggface2", 1 / 255, [0.5], [128 / 255])  # the same numbers in 0..1 units
    check_data("facenet:vggface2", 1 / 255, [0.5] * 3, [0.5] * 3)  # the face recipe's (x - 127.5) / 127.5: 0.4% off
    check_data("tv:resnet18", 1 / 255, None, None)  # torchvision's and timm's weights: not checked
    with pytest.raises(DanluError, match=r"^model.pretrained=facenet:casia-webface: the weights expect RGB faces "
                                         r"standardized as \(x - 127.5\) / 128 .*got data.scale=0.00392157 "
                                         r"data.mean=null data.std=null data.normalize=channel; expected data.scale=1 "
                                         r"data.mean=\[127.5, 127.5, 127.5\] data.std=\[128.0, 128.0, 128.0\]"):
        check_data("facenet:casia-webface", 1 / 255, None, None, "channel")


def test_offline_is_one_line_naming_file_and_folder(torch_home, monkeypatch):
    monkeypatch.setenv("DANLU_OFFLINE", "1")
    with pytest.raises(DanluError) as e:
        load_pretrained(create_model("inception_resnet_v1", num_classes=2), "facenet:vggface2", 2, 3)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("model.pretrained: cannot download facenet:vggface2's weights (DANLU_")
    for part in ("place 20180402-114759-vggface2.pt (SHA-256 281cebca", f"in {torch_home}/",
                 "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180402-114759-vggface2.pt"):
        assert part in msg


def test_cli_offline_exits_2_naming_the_file_and_where_to_place_it(tmp_path):
    from conftest import run_cli, sets

    r = run_cli("train", "--out", str(tmp_path / "run"), "--device", "cpu",
                *sets("model.name=inception_resnet_v1", "model.pretrained=facenet:vggface2", "data.name=synthetic",
                      "data.size=75", "data.channels=3", "data.num_classes=4", "data.train_size=16",
                      "data.test_size=8", *DATA, "run.max_iter=1"),
                env={"TORCH_HOME": str(tmp_path / "torch"), "DANLU_OFFLINE": "1"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "20180402-114759-vggface2.pt" in r.stderr and str(tmp_path / "torch" / "hub" / "checkpoints") in r.stderr
    assert not (tmp_path / "run").exists()


def test_download_from_a_server_is_hash_checked_and_loads(reference, torch_home, monkeypatch,
                                                          file_server):  # noqa: F811
    data = _file_bytes(reference.state_dict())
    file = FACENET["facenet:vggface2"][0]
    file_server.files[file] = data
    monkeypatch.setattr(pretrained, "FACENET_URL", file_server.url)
    monkeypatch.setitem(pretrained.FACENET, "facenet:vggface2", (file, sha256_bytes(data)))  # this file's, not 281c..
    model = create_model("inception_resnet_v1", num_classes=7)
    report = load_pretrained(model, "facenet:vggface2", 7, 3)
    assert (torch_home / file).read_bytes() == data and not (torch_home / f"{file}.sha256").exists()
    assert (report["loaded"], report["of"], report["fresh"], report["unused"]) == (716, 716, [], [])
    assert torch.equal(model.state_dict()["head.weight"], reference.state_dict()["logits.weight"])


def test_a_download_that_fails_the_published_hash_is_refused_and_not_kept(reference, torch_home, monkeypatch,
                                                                          file_server):  # noqa: F811
    file = FACENET["facenet:vggface2"][0]
    file_server.files[file] = _file_bytes(reference.state_dict())  # not the release: its SHA-256 is another
    monkeypatch.setattr(pretrained, "FACENET_URL", file_server.url)
    with pytest.raises(DanluError, match=r"^model.pretrained: cannot download facenet:vggface2's weights \("
                                         r"RuntimeError: invalid hash value.*\); place 20180402-114759-vggface2.pt"):
        load_pretrained(create_model("inception_resnet_v1", num_classes=2), "facenet:vggface2", 2, 3)
    assert not any(torch_home.iterdir())


def test_without_a_published_hash_the_first_download_records_it(reference, torch_home, monkeypatch,
                                                                file_server):  # noqa: F811
    data = _file_bytes(reference.state_dict())
    file = FACENET["facenet:casia-webface"][0]
    file_server.files[file] = data
    monkeypatch.setattr(pretrained, "FACENET_URL", file_server.url)
    load_pretrained(create_model("inception_resnet_v1", num_classes=2), "facenet:casia-webface", 2, 3)
    record = torch_home / f"{file}.sha256"
    assert record.read_text() == f"{sha256_bytes(data)}  {file}\n"
    n = len(file_server.requests)
    report = load_pretrained(create_model("inception_resnet_v1", num_classes=2), "facenet:casia-webface", 2, 3)
    assert len(file_server.requests) == n  # from the folder, checked against the record
    assert report["fresh"] == ["head.weight [7, 512] (model [2, 512])", "head.bias [7] (model [2])"]
    (torch_home / file).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # damaged since
    with pytest.raises(DanluError, match=rf"{file}: its SHA-256 begins [0-9a-f]{{12}}, its first use recorded "
                                         rf"{sha256_bytes(data)[:12]} in {file}.sha256 \(a broken or another file\); "
                                         rf"delete both, or place {file} \(no checksum published\)"):
        load_pretrained(create_model("inception_resnet_v1", num_classes=2), "facenet:casia-webface", 2, 3)


def test_a_run_starts_from_a_placed_file_with_the_datas_channels_and_classes(reference, torch_home):
    import danlu
    from danlu.engine.build import build

    file = FACENET["facenet:casia-webface"][0]
    torch_home.mkdir(parents=True)
    (torch_home / file).write_bytes(_file_bytes(reference.state_dict()))
    overrides = ["model.name=inception_resnet_v1", "model.pretrained=facenet:casia-webface", "data.name=synthetic",
                 "data.size=75", "data.channels=1", "data.num_classes=4", "data.batch_size=4", "precision=fp32"]
    train, test = danlu.load_dataset("synthetic", size=75, channels=1, num_classes=4, train_size=16, test_size=8)
    with pytest.raises(DanluError, match=r"model.pretrained=facenet:casia-webface: the weights expect RGB faces"):
        build(load_recipe(overrides=overrides), train, test, torch.device("cpu"))  # data.scale 1/255, no mean
    b = build(load_recipe(overrides=overrides + DATA), train, test, torch.device("cpu"))
    got, want = b.model.state_dict(), reference.state_dict()
    assert torch.allclose(got["backbone.conv2d_1a.conv.weight"], want["conv2d_1a.conv.weight"].sum(1, keepdim=True))
    k = "repeat_2.3.branch1.2.bn.running_mean"
    assert torch.equal(got[f"backbone.{k}"], want[k])
    assert b.init["adapted"] == ["backbone.conv2d_1a.conv.weight"] and len(b.init["fresh"]) == 2  # the 4-class head
    assert (torch_home / f"{file}.sha256").is_file()
