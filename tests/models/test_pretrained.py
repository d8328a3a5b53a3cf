"""model.pretrained: the library's published weights from the cache folder, downloaded (hash-checked) from a server
the test starts, or one line naming file, checksum, URL and folder when they cannot be had. These machines cannot
download weights: every weights file here is made by the test (`published` pointed at it)."""
import dataclasses
import io
import sys

import pytest
import torch
from safetensors.torch import save_file

import danlu
from danlu.config import load_recipe
from danlu.engine.build import build
from danlu.errors import DanluError
from danlu.io import sha256
from danlu.models import create_model, pretrained
from danlu.models.pretrained import Published, load_pretrained, published
from tests.data.datafiles import file_server  # noqa: F401 (fixture)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("DANLU_OFFLINE", raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints"


def reference_file(name: str, folder, url_base="http://127.0.0.1:9/", corrupt=False, **kw) -> tuple[Published, dict]:
    """A 1000-class, RGB model's weights saved as torchvision names its files (NAME-<sha256 prefix>.pth), and the
    Published record that points at it (the file is not yet in `folder`: returned as bytes in .data)."""
    torch.manual_seed(123)
    ref = create_model(name, num_classes=1000, in_channels=3, **kw).state_dict()
    buf = io.BytesIO()
    torch.save(ref, buf)
    data = buf.getvalue()
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    file = f"{name[3:]}-{digest[:8]}.pth"
    if corrupt:
        data = data[:-1] + bytes([data[-1] ^ 1])
    src = Published(name, url_base + file, file, digest[:8], folder)
    return src, {"state": ref, "data": data}


def test_torchvisions_default_weights_are_named_from_its_url(torch_home):
    src = published("tv:resnet18")
    assert src.url == "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    assert (src.file, src.sha256, src.folder) == ("resnet18-f37072fd.pth", "f37072fd", torch_home)
    with pytest.raises(DanluError, match=r"^model.pretrained=true: lenet has no published weights; expected a tv:"):
        published("lenet")


def test_offline_is_one_line_naming_file_checksum_url_and_folder(torch_home, monkeypatch):
    monkeypatch.setenv("DANLU_OFFLINE", "1")
    model = create_model("tv:resnet18", num_classes=2)
    with pytest.raises(DanluError) as e:
        load_pretrained(model, "tv:resnet18", 2, 3)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("model.pretrained: cannot download tv:resnet18's weights (DANLU_OFFLINE")
    for part in ("resnet18-f37072fd.pth", "SHA-256 begins f37072fd",
                 "https://download.pytorch.org/models/resnet18-f37072fd.pth", f"{torch_home}/"):
        assert part in msg


def test_cli_offline_exits_2_before_writing_anything(tmp_path):
    from conftest import run_cli, sets

    r = run_cli("train", "--out", str(tmp_path / "run"), "--device", "cpu",
                *sets("model.name=tv:resnet18", "model.pretrained=true", "data.name=synthetic", "data.size=32",
                      "data.channels=3", "run.max_iter=1"),
                env={"TORCH_HOME": str(tmp_path / "torch"), "DANLU_OFFLINE": "1"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "resnet18-f37072fd.pth" in r.stderr and str(tmp_path / "torch" / "hub" / "checkpoints") in r.stderr
    assert not (tmp_path / "run").exists()


def test_a_placed_file_is_used_without_the_network_channels_and_classes_adapt(torch_home, monkeypatch):
    src, ref = reference_file("tv:resnet18", torch_home)
    torch_home.mkdir(parents=True)
    (torch_home / src.file).write_bytes(ref["data"])
    monkeypatch.setattr(pretrained, "published", lambda name: src)  # its URL leads nowhere: port 9
    recipe = load_recipe(overrides=["model.name=tv:resnet18", "model.pretrained=true", "data.name=synthetic",
                                    "data.size=32", "data.channels=1", "data.num_classes=2", "precision=fp32"])
    train, test = danlu.load_dataset("synthetic", size=32, channels=1, num_classes=2, train_size=64, test_size=16)
    b = build(recipe, train, test, torch.device("cpu"))
    got, want = b.model.state_dict(), ref["state"]
    assert torch.allclose(got["conv1.weight"], want["conv1.weight"].sum(1, keepdim=True))  # RGB summed: 1 channel
    assert all(torch.equal(got[k], want[k]) for k in want if not k.startswith(("conv1.", "fc.")))
    assert got["fc.weight"].shape == (2, 512)  # a fresh classifier for the data's 2 classes
    assert b.init["key"] == "model.pretrained" and b.init["adapted"] == ["conv1.weight"]
    assert [f.split()[0] for f in b.init["fresh"]] == ["fc.weight", "fc.bias"]
    from danlu.models.weights import describe

    assert describe(b.init).startswith(f"model.pretrained tv:resnet18 ({src.file}): ")


def test_download_from_a_server_is_checked_cached_and_reused(torch_home, monkeypatch, file_server):  # noqa: F811
    src, ref = reference_file("tv:squeezenet1_1", torch_home, url_base=file_server.url)
    file_server.files[src.file] = ref["data"]
    monkeypatch.setattr(pretrained, "published", lambda name: src)
    model = create_model("tv:squeezenet1_1", num_classes=3)
    report = load_pretrained(model, "tv:squeezenet1_1", 3, 3)
    assert (torch_home / src.file).read_bytes() == ref["data"] and sha256(torch_home / src.file).startswith(src.sha256)
    assert torch.equal(model.state_dict()["features.0.weight"], ref["state"]["features.0.weight"])
    assert [f.split()[0] for f in report["fresh"]] == ["classifier.1.weight", "classifier.1.bias"]  # a 1x1 conv
    n = len(file_server.requests)
    load_pretrained(create_model("tv:squeezenet1_1", num_classes=3), "tv:squeezenet1_1", 3, 3)
    assert len(file_server.requests) == n  # from the folder this time


def test_a_download_that_fails_its_hash_is_refused_and_not_kept(torch_home, monkeypatch, file_server):  # noqa: F811
    src, ref = reference_file("tv:squeezenet1_1", torch_home, url_base=file_server.url, corrupt=True)
    file_server.files[src.file] = ref["data"]
    monkeypatch.setattr(pretrained, "published", lambda name: src)
    with pytest.raises(DanluError, match=r"^model.pretrained: cannot download tv:squeezenet1_1's weights \("
                                         r"RuntimeError: invalid hash value.*\); place squeezenet1_1-"):
        load_pretrained(create_model("tv:squeezenet1_1", num_classes=3), "tv:squeezenet1_1", 3, 3)
    assert not any(torch_home.iterdir())


def test_unreachable_server_names_what_to_place(torch_home, monkeypatch):
    src, _ = reference_file("tv:squeezenet1_1", torch_home)  # port 9: nothing listens
    monkeypatch.setattr(pretrained, "published", lambda name: src)
    with pytest.raises(DanluError, match=rf"cannot download .*URLError.*; place {src.file} \(SHA-256 begins "
                                         rf"{src.sha256}\) from {src.url} in {torch_home}/"):
        load_pretrained(create_model("tv:squeezenet1_1", num_classes=3), "tv:squeezenet1_1", 3, 3)


def test_a_placed_file_with_another_checksum_is_refused(torch_home, monkeypatch):
    src, ref = reference_file("tv:squeezenet1_1", torch_home, corrupt=True)
    torch_home.mkdir(parents=True)
    (torch_home / src.file).write_bytes(ref["data"])
    monkeypatch.setattr(pretrained, "published", lambda name: src)
    with pytest.raises(DanluError, match=rf"{src.file}: its SHA-256 begins [0-9a-f]{{8}}, expected {src.sha256} "
                                         rf"\(a broken or another file\); delete it"):
        load_pretrained(create_model("tv:squeezenet1_1", num_classes=3), "tv:squeezenet1_1", 3, 3)


def test_densenets_old_key_names_are_mapped(torch_home, monkeypatch):
    src, ref = reference_file("tv:densenet121", torch_home)
    old = {k.replace("norm1", "norm.1").replace("conv2", "conv.2"): v + 0.5 for k, v in ref["state"].items()
           if not k.endswith("num_batches_tracked")}  # files of that time have no BatchNorm step counter
    buf = io.BytesIO()
    torch.save(old, buf)
    torch_home.mkdir(parents=True)
    (torch_home / src.file).write_bytes(buf.getvalue())
    monkeypatch.setattr(pretrained, "published", lambda name: dataclasses.replace(src, sha256=None))
    model = create_model("tv:densenet121", num_classes=2)
    report = load_pretrained(model, "tv:densenet121", 2, 3)
    for k in ("features.denseblock1.denselayer1.norm1.weight", "features.denseblock1.denselayer1.conv2.weight"):
        assert torch.equal(model.state_dict()[k], ref["state"][k] + 0.5), k
    assert report["unused"] == [] and len(report["fresh"]) == 2  # the classifier only


def test_inception_is_built_with_the_input_transform_its_weights_expect():
    recipe = load_recipe(overrides=["model.name=tv:inception_v3", "model.pretrained=true"])
    from danlu.engine.build import build_model

    assert build_model(recipe, (3, 75, 75), 2).transform_input is True
    assert build_model(load_recipe(overrides=["model.name=tv:inception_v3"]), (3, 75, 75), 2).transform_input is False


def test_pretrained_and_init_together_are_refused():
    with pytest.raises(DanluError, match="model.pretrained=true and model.init=runs/x: expected one of them"):
        load_recipe(overrides=["model.name=tv:resnet18", "model.pretrained=true", "model.init=runs/x"])


# ---------------------------------------------------------------- timm (an optional extra)


def test_timm_names_without_timm_say_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # as where it is not installed
    with pytest.raises(DanluError, match=r"timm library is not installed; expected `pip install 'danlu\[timm\]'`"):
        create_model("timm:resnet18", num_classes=2)


@pytest.fixture
def timm():
    return pytest.importorskip("timm", reason="timm is an optional extra (pip install 'danlu[timm]')")


def test_timm_weights_placed_in_the_folder_load_through_timms_loader(timm, torch_home):
    src = published("timm:resnet18")
    assert src.url == "https://huggingface.co/timm/resnet18.a1_in1k/resolve/main/model.safetensors"
    assert src.path == torch_home / "timm--resnet18.a1_in1k.safetensors"
    torch.manual_seed(5)
    ref = timm.create_model("resnet18", num_classes=1000).state_dict()
    torch_home.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in ref.items()}, str(src.path))
    recipe = load_recipe(overrides=["model.name=timm:resnet18", "model.pretrained=true", "model.freeze=backbone",
                                    "data.name=synthetic", "data.size=32", "data.channels=1", "data.num_classes=2",
                                    "precision=fp32"])
    train, test = danlu.load_dataset("synthetic", size=32, channels=1, num_classes=2, train_size=64, test_size=16)
    b = build(recipe, train, test, torch.device("cpu"))
    got = b.model.state_dict()
    assert torch.allclose(got["conv1.weight"], ref["conv1.weight"].sum(1, keepdim=True))
    assert all(torch.equal(got[k], ref[k]) for k in ref if not k.startswith(("conv1.", "fc.")))
    assert got["fc.weight"].shape == (2, 512) and b.init["fresh"] == ["fc.weight", "fc.bias"]
    trains = [n for n, p in b.model.named_parameters() if p.requires_grad]
    assert trains == ["fc.weight", "fc.bias"]  # freeze: backbone leaves timm's classifier


def test_timm_offline_and_failed_downloads_are_one_line(timm, torch_home, monkeypatch):
    model = create_model("timm:resnet18", num_classes=2)
    monkeypatch.setenv("DANLU_OFFLINE", "1")
    with pytest.raises(DanluError, match=r"^model.pretrained: cannot download timm:resnet18's weights \(DANLU_OFFLINE"
                                         r" is set\); place timm--resnet18.a1_in1k.safetensors \(no checksum"):
        load_pretrained(model, "timm:resnet18", 2, 3)
    monkeypatch.delenv("DANLU_OFFLINE")

    def no_network(*a, **k):
        raise OSError("Network is unreachable")

    import timm.models._builder as builder

    monkeypatch.setattr(builder, "load_state_dict_from_hf", no_network)
    monkeypatch.setattr(builder, "load_state_dict_from_url", no_network)
    with pytest.raises(DanluError, match=r"cannot download timm:resnet18's weights \(OSError: Network is "
                                         r"unreachable\); place timm--resnet18.a1_in1k.safetensors .* from "
                                         r"https://huggingface.co/timm/resnet18.a1_in1k/resolve/main/model.safetensors"):
        load_pretrained(model, "timm:resnet18", 2, 3)


def test_unknown_timm_models_and_tags(timm):
    with pytest.raises(DanluError, match=r"unknown timm model 'timm:resnet19'.*did you mean"):
        create_model("timm:resnet19", num_classes=2)
    with pytest.raises(DanluError, match=r"timm:resnet18.nope: Invalid pretrained tag"):
        published("timm:resnet18.nope")


def test_with_several_processes_rank_0_fetches_before_the_others_read(monkeypatch):
    from danlu.engine.build import _load_pretrained

    calls = []
    monkeypatch.setattr(pretrained, "load_pretrained", lambda *a, **k: calls.append("load") or {})

    class Rank:
        def __init__(self, main):
            self.is_main = main

        def barrier(self):
            calls.append("barrier")

    recipe = load_recipe(overrides=["model.name=tv:resnet18", "model.pretrained=true"])
    _load_pretrained(recipe, None, (3, 32, 32), 2, Rank(True))
    assert calls == ["load", "barrier"]
    calls.clear()
    _load_pretrained(recipe, None, (3, 32, 32), 2, Rank(False))
    assert calls == ["barrier", "load"]
