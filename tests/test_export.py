"""`danlu export`: ONNX (checked here in onnxruntime, independently), TorchScript, safetensors; mismatched weights."""
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import danlu
from conftest import TINY
from danlu.runs import load_run
from danlu.errors import DanluError
from danlu.export import export


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A LeNet run with a per-pixel mean and 1/256 scaling, so the preprocessing inside the export matters."""
    out = tmp_path_factory.mktemp("export") / "run"
    danlu.train(None, overrides=TINY + ["data.normalize=pixel", "data.scale=0.00390625", "run.max_iter=10"], out=out,
                device="cpu", quiet=True)
    return out


def reference(run_dir, pixels_uint8):
    """What danlu itself computes for these pixels: the run's preprocessing, then its model."""
    run = load_run(run_dir, device="cpu")
    with torch.no_grad():
        return run.model(run.augment(pixels_uint8, train=False))  # (B, classes)


def test_onnx_has_a_dynamic_batch_and_the_runs_preprocessing(run_dir, cli, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    path = tmp_path / "m.onnx"
    r = cli("export", str(run_dir), "--format", "onnx", "-o", str(path))
    assert r.returncode == 0, r.stderr
    assert "max abs difference" in r.stdout and "(< 0.0001)" in r.stdout
    diff = float(r.stdout.split("max abs difference ")[1].split()[0])
    assert diff < 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("pixels", "logits") and isinstance(inp.shape[0], str)  # a named, dynamic axis
    pixels = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)  # a batch size the export never saw
    got = torch.from_numpy(session.run(None, {"pixels": pixels.float().numpy()})[0])
    assert (got - reference(run_dir, pixels)).abs().max() < 1e-4
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["classes"]) == [f"class_{i}" for i in range(10)]
    assert json.loads(meta["input_shape"]) == [1, 28, 28]


def test_torchscript_and_safetensors(run_dir, tmp_path):
    pixels = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    r = export(run_dir, "torchscript", tmp_path / "m.pt")
    assert r.max_abs_diff < 1e-4
    extra = {"danlu.json": ""}
    with warnings.catch_warnings():  # newer torch versions mark TorchScript deprecated (a warning); it still loads
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(tmp_path / "m.pt"), _extra_files=extra)
    with torch.no_grad():
        assert (module(pixels.float()) - reference(run_dir, pixels)).abs().max() < 1e-5
    meta = json.loads(extra["danlu.json"])  # what a user needs beside the module travels inside the file
    assert json.loads(meta["classes"]) == [f"class_{i}" for i in range(10)] and meta["danlu_model"] == "lenet"
    assert json.loads(meta["input_shape"]) == [1, 28, 28]

    export(run_dir, "safetensors", tmp_path / "m.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        meta = f.metadata()
    state = load_file(str(tmp_path / "m.safetensors"))
    model = danlu.create_model(meta["danlu_model"], num_classes=len(json.loads(meta["classes"])), in_channels=1)
    model.load_state_dict(state)  # strict: the plain model's keys
    pre = json.loads(meta["preprocess"])
    x = pixels.float() * pre["scale"] - torch.tensor(pre["mean"])  # (4, 1, 28, 28) minus the (1, 28, 28) mean
    with torch.no_grad():
        assert (model.eval()(x) - reference(run_dir, pixels)).abs().max() < 1e-5


def test_existing_file_is_kept_unless_forced(run_dir, tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"mine")
    with pytest.raises(DanluError, match="exists"):
        export(run_dir, "safetensors", path)
    assert path.read_bytes() == b"mine"
    export(run_dir, "safetensors", path, force=True)
    assert load_file(str(path))


def test_weights_that_do_not_match_the_recipe_are_refused_naming_the_keys(run_dir, cli, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("recipe.yaml", "summary.json", "preprocess.safetensors"):
        (bad / f).write_bytes((run_dir / f).read_bytes())
    state = load_file(str(run_dir / "model.safetensors"))
    state.pop("fc2.bias")
    state["fc1.weight"] = torch.zeros(500, 801)
    state["head.weight"] = torch.zeros(3)
    save_file(state, str(bad / "model.safetensors"))
    r = cli("export", str(bad), "--format", "onnx", "-o", str(tmp_path / "m.onnx"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    for words in ("missing fc2.bias", "unexpected head.weight", "fc1.weight [500, 801] (model [500, 800])", "lenet"):
        assert words in r.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_bad_arguments(run_dir, tmp_path):
    with pytest.raises(DanluError, match="expected one of onnx, torchscript, safetensors"):
        export(run_dir, "caffemodel", tmp_path / "m")
    with pytest.raises(DanluError, match="does not exist"):
        export(run_dir, "onnx", tmp_path / "no" / "m.onnx")
