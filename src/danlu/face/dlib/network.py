"""dlib's face recognition network file (dlib_face_recognition_resnet_model_v1.dat) -> a state dict for
danlu.models.dlib_resnet.DlibResNet, read with numpy alone, and cached as safetensors.

    state = load_dlib_weights()                    # the .dat of `pip install 'danlu[face-pretrained]'`, cached
    net = DlibResNet().eval(); net.load_state_dict(state)
    net = read_dlib_network(Path(p).read_bytes(), p)   # every layer as read (DlibNetwork), input mean, loss settings

How dlib writes a network (dlib/dnn/core.h): `deserialize(file) >> net` of the type
loss_metric<fc_no_bias<128, avg_pool_everything<...<con<32,7,7,2,2, input_rgb_image_sized<150>>>...>>> (dlib's
examples/dnn_face_recognition_ex.cpp). Each layer object serializes its version, then its whole subnetwork, then its
own details, so the file holds the layers' version numbers from the loss down to the input, then the input layer,
then each layer's details from the input up:

- add_loss_layer: version 1, the loss ('loss_metric_2', margin, distance threshold: floats), then the subnetwork.
- add_layer: version 1 or 2, subnetwork, layer details, three bools (setup called, gradient stale, output disabled),
  two tensors (x_grad, cached_output; empty in this file), and from version 2 a third (params_grad).
- the bottom add_layer (whose subnetwork is the input layer): version 2 or 3, the input layer, details, three bools,
  three tensors (x_grad, cached_output, grad_final), from version 3 an int (sample expansion factor).
- add_tag_layer, add_skip_layer (tag1, skip1 ...): version 1, then the subnetwork; the tag's number is in the C++
  type only, so a reader needs the network's definition to know where tags and skips are (`dlib_resnet_definition`).
- layer details begin with a version string: 'con_4'..'con_6' (a flat parameter tensor = filters (O, I, kh, kw)
  then biases (O,), shapes as alias tensors), 'affine_'/'affine_2' (flat tensor = per-channel scale then shift; dlib
  also reads a batch norm 'bn_con2' as an affine layer, folding its running statistics), 'relu_'/'relu_2',
  'max_pool_2'/'avg_pool_2' (window, stride, padding), 'add_prev_', 'fc_2'/'fc_3' (flat tensor = weights
  (inputs, outputs), then biases), 'input_rgb_image_sized' (the R, G, B means as floats, then rows and columns).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from danlu.errors import DanluError
from danlu.face.dlib.files import PIP_HINT, model_file
from danlu.face.dlib.serialize import Reader
from danlu.models.dlib_resnet import Affine, DlibResNet

DAT_NAME = "dlib_face_recognition_resnet_model_v1.dat"
# SHA-256 of the file dlib.net publishes and face_recognition_models 0.3.0 ships: names the cache of that file, so a
# machine without the package can still load weights converted once before
DAT_SHA256 = "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30"

_FC_MODE, _CONV_MODE = 1, 0  # dlib's layer_mode


@dataclass(frozen=True)
class DlibLayer:
    """One computational layer as read: `kind` (con, affine, relu, max_pool, avg_pool, add_prev, fc), dlib's version
    tag, its parameters (con: weight (O, I, kh, kw) and bias (O,); affine: weight, bias (C,); fc: weight
    (outputs, inputs), as torch keeps them) and its settings (window, stride, padding, filters, outputs)."""
    kind: str
    tag: str
    params: dict[str, np.ndarray] = field(default_factory=dict)
    config: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class DlibNetwork:
    """A dlib metric-learning network file, read: computational layers from the input up (tags and skips left out),
    the input layer's per-channel mean (R, G, B in 0..255 pixel units; dlib feeds (pixel - mean) / 256) and size,
    and the loss's margin and distance threshold (two faces are one person below it, on unnormalised descriptors)."""
    layers: list[DlibLayer]
    input_mean: tuple[float, float, float]
    input_size: Optional[tuple[int, int]]
    margin: float
    distance_threshold: float


def dlib_resnet_definition() -> list[tuple]:
    """dnn_face_recognition_ex.cpp's `anet_type`, outermost (loss) first, one tuple per layer object:
    ('con', filters, kernel, stride), ('max_pool' | 'avg_pool', window, stride) with window 0 = the whole map,
    ('affine',), ('relu',), ('add_prev',), ('fc', outputs), ('tag',), ('skip',), ('input',), ('loss_metric',)."""
    def ares(n: int, sub: list) -> list:  # relu<add_prev1<block<n, affine, 1, tag1<sub>>>>
        return [("relu",), ("add_prev",), ("affine",), ("con", n, 3, 1), ("relu",), ("affine",), ("con", n, 3, 1),
                ("tag",), *sub]

    def ares_down(n: int, sub: list) -> list:  # relu<add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<n,..,2,tag1<sub>>>>>>>
        return [("relu",), ("add_prev",), ("avg_pool", 2, 2), ("skip",), ("tag",), ("affine",), ("con", n, 3, 1),
                ("relu",), ("affine",), ("con", n, 3, 2), ("tag",), *sub]

    net = [("max_pool", 3, 2), ("relu",), ("affine",), ("con", 32, 7, 2), ("input",)]
    for _ in range(3):  # alevel4
        net = ares(32, net)
    for n, repeats in ((64, 3), (128, 2), (256, 2), (256, 0)):  # alevel3 .. alevel0
        net = ares_down(n, net)
        for _ in range(repeats):
            net = ares(n, net)
    return [("loss_metric",), ("fc", 128), ("avg_pool", 0, 1), *net]


def read_dlib_network(data: bytes, name: str = DAT_NAME,
                      definition: Optional[list[tuple]] = None) -> DlibNetwork:
    """Read a dlib network file's bytes laid out as `definition` (default: dlib_resnet_definition()); every byte
    must be read and every layer's settings must match the definition, else a one-line DanluError."""
    spec = definition or dlib_resnet_definition()
    if spec[0] != ("loss_metric",) or spec[-1] != ("input",):
        raise DanluError(f"{name}: network definition from {spec[0]} to {spec[-1]}; expected ('loss_metric',) first "
                         f"and ('input',) last")
    r = Reader(data, name)
    # headers, loss first: each layer object's version, the loss's settings, the input layer
    r.expect_int(1, "add_loss_layer version")
    margin, threshold = _loss_metric(r)
    versions = []
    for i, entry in enumerate(spec[1:-1], 1):
        if entry[0] in ("tag", "skip"):
            r.expect_int(1, f"add_{entry[0]}_layer version")
            versions.append(None)
        elif spec[i + 1] == ("input",):
            versions.append(r.expect_int((2, 3), "input add_layer version"))
        else:
            versions.append(r.expect_int((1, 2), "add_layer version"))
    mean, size = _input_layer(r)
    # details, input side first
    layers: list[DlibLayer] = []
    for entry, version in zip(reversed(spec[1:-1]), reversed(versions)):
        if version is None:
            continue
        at, bottom = r.pos, not layers  # the bottom add_layer (on the input layer) has its own trailer
        layer = layer_details(r, entry[0], layers)
        _check_config(r, layer, entry, at)
        layers.append(layer)
        skip_layer_state(r, version, bottom)
    r.end()
    return DlibNetwork(layers, mean, size, margin, threshold)


def skip_layer_state(r: Reader, version: int, bottom: bool) -> None:
    """Reads past what dlib's add_layer serializes after a layer's details (core.h): flags and training state that
    inference does not need. `bottom`: the add_layer right over the input layer, which has its own trailer."""
    r.bool(), r.bool(), r.bool()  # setup called, gradient stale, output and gradient disabled
    r.tensor(), r.tensor()  # x_grad, cached_output
    if bottom:
        r.tensor()  # grad_final
        if version >= 3:
            r.int()  # sample expansion factor
    elif version >= 2:
        r.tensor()  # params_grad


def _loss_metric(r: Reader) -> tuple[float, float]:
    tag = r.expect_string(("loss_metric_", "loss_metric_2"), "loss version")
    if tag == "loss_metric_":  # loss.h: the first version's values were fixed
        return 0.1, 0.75
    return r.float(), r.float()


def _input_layer(r: Reader) -> tuple[tuple[float, float, float], Optional[tuple[int, int]]]:
    tag = r.expect_string(("input_rgb_image_sized", "input_rgb_image"), "input layer")
    mean = (r.float(), r.float(), r.float())  # R, G, B
    size = (r.int(), r.int()) if tag == "input_rgb_image_sized" else None
    return mean, size


def layer_details(r: Reader, kind: str, below: list[DlibLayer]) -> DlibLayer:
    """One layer's details, by the kind the definition expects there; `below` = the layers read so far."""
    if kind == "con":
        return _con(r)
    if kind == "affine":
        return _affine(r, below[-1].config.get("filters") if below else None)
    if kind == "relu":
        tag = r.expect_string(("relu_", "relu_2"), "relu version")
        at = r.pos
        if tag == "relu_2" and r.bool():
            raise r.error("a disabled relu (a network saved after dlib's fuse_layers)", "the unfused network", at)
        return DlibLayer("relu", tag)
    if kind in ("max_pool", "avg_pool"):
        tag = r.expect_string(f"{kind}_2", f"{kind} version")
        nr, nc, sy, sx, py, px = (r.int() for _ in range(6))
        return DlibLayer(kind, tag, config={"window": nr, "window_x": nc, "stride": sy, "stride_x": sx,
                                            "padding": py, "padding_x": px})
    if kind == "add_prev":
        return DlibLayer("add_prev", r.expect_string("add_prev_", "add_prev version"))
    if kind == "fc":
        return _fc(r)
    raise DanluError(f"{r.name}: network definition layer {kind!r}; expected con, affine, relu, max_pool, avg_pool, "
                     f"add_prev, fc, tag, skip")


def _split(r: Reader, flat: np.ndarray, shapes: list[tuple[int, ...]], at: int, what: str) -> list[np.ndarray]:
    """Cut a layer's flat parameter tensor into consecutive pieces of `shapes` (dlib's alias tensors into it)."""
    flat = flat.reshape(-1)
    sizes = [math.prod(s) for s in shapes]
    if sum(sizes) != flat.size:
        raise r.error(f"{what} parameter tensor of {flat.size} values", f"{sum(sizes)} (pieces {shapes})", at)
    pieces, start = [], 0
    for shape, n in zip(shapes, sizes):
        pieces.append(flat[start:start + n].reshape(shape))
        start += n
    return pieces


def _con(r: Reader) -> DlibLayer:
    tag = r.expect_string(("con_4", "con_5", "con_6"), "con version")
    at = r.pos
    params = r.tensor()
    filters, nr, nc, sy, sx, py, px = (r.int() for _ in range(7))
    wshape, bshape = r.alias_tensor(), r.alias_tensor()  # (O, I, kh, kw), (1, O, 1, 1) or empty
    for _ in range(4):  # learning rate and weight decay multipliers (training only)
        r.float()
    if tag in ("con_5", "con_6"):
        r.bool()  # use_bias: an unused bias has an empty alias tensor, which is what counts here
    if tag == "con_6" and r.bool():
        raise r.error("a convolution with a fused relu (a network saved after dlib's fuse_layers)",
                      "the unfused network", at)
    has_bias = math.prod(bshape) > 0
    pieces = _split(r, params, [wshape, (filters,)] if has_bias else [wshape], at, "con")
    out = {"weight": pieces[0]} | ({"bias": pieces[1]} if has_bias else {})
    return DlibLayer("con", tag, out, {"filters": filters, "window": nr, "window_x": nc, "stride": sy,
                                       "stride_x": sx, "padding": py, "padding_x": px})


def _affine(r: Reader, channels: Optional[int]) -> DlibLayer:
    at = r.pos
    tag = r.expect_string(("affine_", "affine_2", "bn_con2"), "affine version")
    if tag == "bn_con2":
        return _batch_norm_as_affine(r, at)
    params = r.tensor()
    gshape, bshape = r.alias_tensor(), r.alias_tensor()
    mode = r.int()
    disabled = r.bool() if tag == "affine_2" else False
    if disabled:  # dlib's fuse_layers folded it into the convolution below: identity
        if channels is None:
            raise r.error("a disabled affine layer with no convolution below it", "a channel count", at)
        return DlibLayer("affine", tag, {"weight": np.ones(channels, np.float32),
                                         "bias": np.zeros(channels, np.float32)})
    if mode != _CONV_MODE:
        raise r.error(f"affine layer mode {mode} (fc mode: one scale per value)", f"{_CONV_MODE} (per channel)", at)
    gamma, beta = _split(r, params, [gshape, bshape], at, "affine")
    return DlibLayer("affine", tag, {"weight": gamma.reshape(-1), "bias": beta.reshape(-1)})


def _batch_norm_as_affine(r: Reader, at: int) -> DlibLayer:
    """A 'bn_con2' layer where an affine one is expected: dlib's affine_(bn_) constructor, scale = gamma /
    sqrt(running variance + eps), shift = beta - scale * running mean."""
    params = r.tensor()
    gshape, bshape = r.alias_tensor(), r.alias_tensor()
    r.tensor(), r.tensor()  # the last batch's means and inverse standard deviations (training only)
    running_mean, running_var = r.tensor().reshape(-1), r.tensor().reshape(-1)
    r.int(), r.int()  # updates so far, running statistics window
    for _ in range(4):
        r.float()
    eps = np.float32(r.float())
    gamma, beta = (p.reshape(-1) for p in _split(r, params, [gshape, bshape], at, "bn_con"))
    scale = gamma / np.sqrt(running_var + eps)
    return DlibLayer("affine", "bn_con2", {"weight": scale, "bias": beta - scale * running_mean})


def _fc(r: Reader) -> DlibLayer:
    tag = r.expect_string(("fc_2", "fc_3"), "fc version")
    at = r.pos
    outputs, inputs = r.int(), r.int()
    params = r.tensor()
    r.alias_tensor()  # weights: (inputs, outputs)
    bshape = r.alias_tensor()
    r.int()  # bias mode (FC_HAS_BIAS 0, FC_NO_BIAS 1); an unused bias has an empty alias tensor
    for _ in range(4):
        r.float()
    if tag == "fc_3":
        r.bool()  # use_bias
    has_bias = math.prod(bshape) > 0
    pieces = _split(r, params, [(inputs, outputs), (outputs,)] if has_bias else [(inputs, outputs)], at, "fc")
    out = {"weight": np.ascontiguousarray(pieces[0].T)} | ({"bias": pieces[1]} if has_bias else {})
    return DlibLayer("fc", tag, out, {"outputs": outputs, "inputs": inputs})


def _check_config(r: Reader, layer: DlibLayer, entry: tuple, at: int) -> None:
    """The settings read must be the definition's (dlib's deserialize checks the same against its C++ type)."""
    c = layer.config
    if entry[0] == "con":
        _, filters, kernel, stride = entry
        want = {"filters": filters, "window": kernel, "window_x": kernel, "stride": stride, "stride_x": stride,
                "padding": kernel // 2 if stride == 1 else 0}  # dlib's default padding (layers.h)
        want["padding_x"] = want["padding"]
    elif entry[0] in ("max_pool", "avg_pool"):
        _, window, stride = entry
        want = {"window": window, "window_x": window, "stride": stride, "stride_x": stride,
                "padding": window // 2 if stride == 1 else 0}
        want["padding_x"] = want["padding"]
    elif entry[0] == "fc":
        want = {"outputs": entry[1]}
    else:
        return
    got = {k: c[k] for k in want}
    if got != want:
        raise r.error(f"{entry[0]} layer settings {got}", f"{want} (dnn_face_recognition_ex.cpp's network)", at)


def dlib_state_dict(net: DlibNetwork) -> dict[str, torch.Tensor]:
    """DlibResNet's state dict from a network read by read_dlib_network: dlib's convolutions, affine and fc layers
    in input-to-output order, onto DlibResNet's Conv2d, Affine and Linear modules in registration order."""
    with torch.device("meta"):  # names and shapes only
        skeleton = DlibResNet()
    targets = [(n, m) for n, m in skeleton.named_modules() if isinstance(m, (nn.Conv2d, Affine, nn.Linear))]
    sources = [layer for layer in net.layers if layer.kind in ("con", "affine", "fc")]
    kinds = {nn.Conv2d: "con", Affine: "affine", nn.Linear: "fc"}
    if [kinds[type(m)] for _, m in targets] != [s.kind for s in sources]:
        raise DanluError(f"{DAT_NAME}: layers {[s.kind for s in sources][:6]}... ({len(sources)}); expected "
                         f"DlibResNet's {len(targets)} conv/affine/fc layers in the same order")
    state = {}
    for (prefix, module), layer in zip(targets, sources):
        own = module.state_dict()
        if set(own) != set(layer.params):
            raise DanluError(f"{DAT_NAME}: {layer.tag} layer for {prefix} has {sorted(layer.params)}; expected "
                             f"{sorted(own)}")
        for key, value in layer.params.items():
            if tuple(own[key].shape) != value.shape:
                raise DanluError(f"{DAT_NAME}: {prefix}.{key} of shape {value.shape}; expected "
                                 f"{tuple(own[key].shape)}")
            state[f"{prefix}.{key}"] = torch.from_numpy(np.array(value, dtype=np.float32))  # a copy of its own
    return state


def dlib_model_path() -> Path:
    """The .dat inside the installed face_recognition_models package."""
    return model_file(DAT_NAME, "dlib's face recognition network")


def _cache_path(folder: Path, sha: str) -> Path:
    return folder / f"{Path(DAT_NAME).stem}-{sha[:8]}.safetensors"


def load_dlib_weights(path: Union[str, Path, None] = None,
                      cache_dir: Union[str, Path, None] = None) -> dict[str, torch.Tensor]:
    """DlibResNet's state dict from dlib's .dat (`path`, default: the face_recognition_models package's), kept as
    safetensors in `cache_dir` (default: torch.hub's checkpoints folder) with the .dat's SHA-256 in its metadata
    (source_sha256); a cache whose hash matches is loaded instead of converting. Without the package, the cache of
    the published file (DAT_SHA256) is used where one was made before."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    from danlu.models.pretrained import checkpoints_folder

    folder = Path(cache_dir) if cache_dir is not None else checkpoints_folder()

    def cached(sha: str) -> Optional[dict[str, torch.Tensor]]:  # the cache of the file with this hash, if made
        cache = _cache_path(folder, sha)
        if not cache.is_file():
            return None
        with safe_open(cache, "pt") as f:
            hit = (f.metadata() or {}).get("source_sha256") == sha
        return load_file(cache) if hit else None

    if path is None:
        try:
            path = dlib_model_path()
        except DanluError:
            state = cached(DAT_SHA256)
            if state is None:
                raise
            return state
    path = Path(path)
    if not path.is_file():
        raise DanluError(f"dlib face weights: {path} is not a file; expected {DAT_NAME} ({PIP_HINT})")
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    state = cached(sha)
    if state is not None:
        return state
    net = read_dlib_network(data, path.name)
    state = dlib_state_dict(net)
    meta = {"source": path.name, "source_sha256": sha, "model": "dlib_resnet",
            "input_mean_rgb": ",".join(repr(m) for m in net.input_mean), "input_divisor": "256",
            "distance_threshold": repr(net.distance_threshold)}
    try:
        from danlu.io import write_bytes

        folder.mkdir(parents=True, exist_ok=True)
        write_bytes(_cache_path(folder, sha), save(state, metadata=meta))
    except (OSError, DanluError):
        pass  # a read-only cache folder: the weights were converted all the same, the next call converts again
    return state
