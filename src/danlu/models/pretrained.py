"""Published weights (`model.pretrained: true`): torchvision's DEFAULT weights for `tv:NAME`, timm's default tag (or
the tag in the name, `timm:resnet18.a1_in1k`) for `timm:NAME`; for `inception_resnet_v1`, David Sandberg's FaceNet
models as facenet-pytorch releases them (MIT): `model.pretrained: facenet:vggface2` (LFW 0.9965, also what `true`
means: the better of the two) or `facenet:casia-webface` (LFW 0.9905).

    src = published("tv:resnet18")    # url, resnet18-f37072fd.pth, sha256 'f37072fd', $TORCH_HOME/hub/checkpoints
    report = load_pretrained(model, "tv:resnet18", num_classes=2, in_channels=1)   # what loaded, adapted, stayed fresh
    name = weights_for("inception_resnet_v1", True)    # 'facenet:vggface2': the weights model.pretrained names

A file is downloaded once, by the library's own downloader with its hash check (torch.hub's download_url_to_file,
which torchvision's weights use; timm's loader for timm), into `$TORCH_HOME/hub/checkpoints` (default
~/.cache/torch), and used from there without the network. A file placed there by hand is used as is, after its
SHA-256 is checked where the name carries one (torchvision's do: resnet18-f37072fd.pth begins f37072fd). Offline
(`DANLU_OFFLINE=1`, no network, a firewall) the error is one line naming the file, its checksum, the URL and the
folder. Files are read without running code (`weights_only=True`, safetensors).

The model keeps the data's channels and classes, as timm adapts them: a first convolution for 1 channel gets the RGB
weights summed, a classifier for other classes stays freshly initialized and is named in the report.

FaceNet's files are facenet-pytorch's `InceptionResnetV1` state dicts: the same module names as danlu's network, which
is its `backbone` here (`facenet_state`); their classifier (`logits`: 8,631 VGGFace2 / 10,575 CASIA-WebFace people)
becomes a softmax head of as many classes, else stays unused. They expect faces as facenet-pytorch feeds them: RGB
160x160 MTCNN crops standardized as (x - 127.5) / 128, which are the data settings `data.scale: 1`, `data.mean:
[127.5, 127.5, 127.5]`, `data.std: [128, 128, 128]`, `data.size: 160` (`check_data` refuses a run whose
normalization differs by more than 1%). facenet-pytorch publishes no checksum: the VGGFace2 file's SHA-256 below is
the one that projects pinning this URL agree on; the CASIA-WebFace file has none, so its first use records the
file's SHA-256 beside it (NAME.sha256) and every later use checks the file against that record.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union
from urllib.parse import urlparse

import torch
from torch import nn

from danlu.errors import DanluError

_TV, _TIMM = "tv:", "timm:"
_HASH = re.compile(r"-([a-f0-9]{6,})\.")  # torch.hub's HASH_REGEX: the SHA-256 prefix in a file name
# torchvision's builders set these when they load weights (the weights were trained with them)
_TV_KWARGS = {"inception_v3": {"transform_input": True}, "googlenet": {"transform_input": True}}
# torchvision's DenseNet weights use old key names (torchvision.models.densenet._load_state_dict)
_DENSENET_KEYS = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                            r"((?:[12])\.(?:weight|bias|running_mean|running_var))$")

# facenet-pytorch's releases of David Sandberg's FaceNet models (facenet_pytorch/models/inception_resnet_v1.py):
# model.pretrained value -> (file, its SHA-256 or None where none is known); their classifier `logits` tells apart
# the training set's people (8,631 of VGGFace2, 10,575 of CASIA-WebFace)
FACENET_URL = "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/"
FACENET = {
    # 111,898,327 bytes; not published by facenet-pytorch: the value that independent projects pinning this URL
    # check their downloads against (sha256sum -c in their Dockerfiles)
    "facenet:vggface2": ("20180402-114759-vggface2.pt",
                         "281cebca8662831adb987a874bdcb36e73f5b1c6dc5ee5878f305e985625d99b"),
    "facenet:casia-webface": ("20180408-102900-casia-webface.pt", None),  # recorded at first use (_check_recorded)
}
NAMED = {name: "inception_resnet_v1" for name in FACENET}  # model.pretrained=NAME -> the model.name it is for
_DEFAULT = {"inception_resnet_v1": "facenet:vggface2"}  # model.pretrained=true for models outside tv: / timm:
# facenet-pytorch's fixed_image_standardization, (x - 127.5) / 128 on RGB pixels 0..255, as danlu's data settings
FACENET_DATA = {"scale": 1.0, "mean": [127.5, 127.5, 127.5], "std": [128.0, 128.0, 128.0], "size": 160}


@dataclass(frozen=True)
class Published:
    """Where a model's published weights come from and where they are kept."""
    model: str  # tv:resnet18
    url: str
    file: str  # the file's name in `folder`
    sha256: Optional[str]  # the SHA-256 (or its first hex digits) the file must have; None where none is published
    folder: Path

    @property
    def path(self) -> Path:
        return self.folder / self.file


def checkpoints_folder() -> Path:
    """torch.hub's checkpoints folder: $TORCH_HOME/hub/checkpoints (torchvision and timm keep weights there)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def weights_for(model: str, pretrained: Union[bool, str]) -> str:
    """The published weights that `model.pretrained` names for `model.name`: a named set as given
    (facenet:casia-webface), else (true) the model's default set (inception_resnet_v1: facenet:vggface2) or the model
    itself (tv:NAME, timm:NAME: the library's default weights)."""
    if isinstance(pretrained, str):
        return pretrained
    return _DEFAULT.get(model, model)


def published(name: str) -> Published:
    """The published weights `name` (tv:NAME, timm:NAME[.tag] or facenet:SET, see weights_for): the one place that
    says which file, from where, with which checksum (tests point it at files they make)."""
    if name in FACENET:
        file, digest = FACENET[name]
        return Published(name, FACENET_URL + file, file, digest, checkpoints_folder())
    if name.startswith(_TV):
        import torchvision.models

        try:
            weights = torchvision.models.get_model_weights(name[len(_TV):]).DEFAULT
        except (ValueError, KeyError, AttributeError):
            weights = None
        if weights is None:
            raise DanluError(f"model.pretrained=true: torchvision publishes no weights for {name}; expected a "
                             f"torchvision model with weights (danlu models --all) or model.pretrained=false")
        file = Path(urlparse(weights.url).path).name
        m = _HASH.search(file)
        return Published(name, weights.url, file, m.group(1) if m else None, checkpoints_folder())
    if name.startswith(_TIMM):
        from danlu.models.registry import timm_module

        try:
            cfg = timm_module().models.get_pretrained_cfg(name[len(_TIMM):])
        except RuntimeError as e:  # an unknown tag
            raise DanluError(f"model.pretrained=true: {name}: {e}; expected timm:<model>[.<tag with weights>]") \
                from None
        if cfg is None or not (cfg.hf_hub_id or cfg.url):
            raise DanluError(f"model.pretrained=true: timm publishes no weights for {name}; expected a timm model "
                             f"with weights (timm.list_pretrained()) or model.pretrained=false")
        if cfg.hf_hub_id:  # timm's first choice: the Hugging Face hub
            file = cfg.hf_hub_filename or "model.safetensors"
            url = f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/{file}"
            local = f"{cfg.hf_hub_id.replace('/', '--')}{Path(file).suffix}"
            return Published(name, url, local, None, checkpoints_folder())
        file = Path(urlparse(cfg.url).path).name
        m = _HASH.search(file)
        return Published(name, cfg.url, file, m.group(1) if m else None, checkpoints_folder())
    raise DanluError(f"model.pretrained=true: {name} has no published weights; expected a tv:NAME or timm:NAME "
                     f"model, inception_resnet_v1 ({', '.join(FACENET)}), or model.init with a danlu run or a weights "
                     f"file")


def pretrained_kwargs(name: str) -> dict[str, Any]:
    """Arguments the model must be built with for its published weights (torchvision's Inception / GoogLeNet
    weights expect their input transform)."""
    return dict(_TV_KWARGS.get(name[len(_TV):], {})) if name.startswith(_TV) else {}


def facenet_state(state: dict[str, torch.Tensor], softmax_head: bool) -> dict[str, torch.Tensor]:
    """facenet-pytorch's InceptionResnetV1 state dict -> danlu's inception_resnet_v1 (a FaceModel): every tensor of
    the network under `backbone.` (the module names are the same), the classifier `logits.` -> the softmax head
    `head.` (FaceNet's own head: a linear layer on the 512-d bottleneck); a cosine head (arcface, cosface) is another
    layer, so `logits.` stays as it is and is reported unused."""
    head = "head." if softmax_head else "logits."
    return {(head + k[len("logits."):] if k.startswith("logits.") else "backbone." + k): v for k, v in state.items()}


def check_data(name: str, scale: float, mean: Optional[list[float]], std: Optional[list[float]],
               normalize: str = "none") -> None:
    """Refuse data settings that feed the weights `name` other numbers than they were trained on: FaceNet's (x -
    127.5) / 128 on every channel (FACENET_DATA), within 1% (so the face recipe's (x - 127.5) / 127.5 passes). Other
    weights: no check."""
    if name not in FACENET:
        return
    want = FACENET_DATA
    a, b = want["scale"] / want["std"][0], want["mean"][0] / want["std"][0]  # the weights' y = a x - b, x in 0..255
    m, s = mean or [0.0], std or [1.0]
    pairs = zip(m, s) if len(m) == len(s) else itertools.product(m, s)  # one of them given once for all channels
    # data.normalize without data.mean: the data set's own statistics, not the weights' numbers
    if (mean is not None or normalize == "none") and all(abs(scale / si / a - 1) <= 0.01 and abs(mi / si - b) <= 0.01
                                                         for mi, si in pairs):
        return
    got = f"data.scale={scale:g} data.mean={mean or 'null'} data.std={std or 'null'}" + (
        f" data.normalize={normalize}" if mean is None and normalize != "none" else "")
    raise DanluError(f"model.pretrained={name}: the weights expect RGB faces standardized as (x - 127.5) / 128 "
                     f"(facenet-pytorch's fixed_image_standardization), got {got}; expected data.scale="
                     f"{want['scale']:g} data.mean={want['mean']} data.std={want['std']} (and data.size="
                     f"{want['size']}: 160x160 MTCNN face crops)")


def _where(src: Published) -> str:
    if src.sha256:
        checksum = f"SHA-256 {src.sha256}" if len(src.sha256) == 64 else f"SHA-256 begins {src.sha256}"
    else:
        checksum = "no checksum published"
    return (f"place {src.file} ({checksum}) from {src.url} in {src.folder}/ (TORCH_HOME sets the folder: "
            f"$TORCH_HOME/hub/checkpoints)")


def _unreachable(src: Published, why: str) -> DanluError:
    return DanluError(f"model.pretrained: cannot download {src.model}'s weights ({why}); {_where(src)}")


def _check_placed(src: Published) -> None:
    """A file already in the folder: refused where its SHA-256 does not begin with the published one."""
    if src.sha256 is None:
        return
    from danlu.io import sha256

    got = sha256(src.path)
    if not got.startswith(src.sha256):
        raise DanluError(f"model.pretrained: {src.path}: its SHA-256 begins {got[:len(src.sha256)]}, expected "
                         f"{src.sha256} (a broken or another file); delete it, or {_where(src)}")


def _check_recorded(src: Published) -> None:
    """Weights with no published SHA-256 (facenet:casia-webface): their first use records the file's SHA-256 beside it
    (NAME.sha256), every later use checks the file against that record (a damaged copy, another file put there)."""
    from danlu.io import sha256

    record, got = src.folder / f"{src.file}.sha256", sha256(src.path)
    if not record.is_file():
        record.write_text(f"{got}  {src.file}\n")
        return
    want = (record.read_text().split() or [""])[0]
    if got != want:
        raise DanluError(f"model.pretrained: {src.path}: its SHA-256 begins {got[:12]}, its first use recorded "
                         f"{want[:12]} in {record.name} (a broken or another file); delete both, or {_where(src)}")


def _fetch(src: Published, progress: bool) -> None:
    """Download src.url to src.path with torch.hub's downloader (a temporary file, the hash checked, then renamed)."""
    from danlu.io import offline

    if offline():
        raise _unreachable(src, "DANLU_OFFLINE is set")
    src.folder.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(src.url, str(src.path), hash_prefix=src.sha256, progress=progress)
    except Exception as e:  # URLError, HTTPError, timeouts, 'invalid hash value': the network's or the file's fault
        src.path.unlink(missing_ok=True)
        raise _unreachable(src, f"{type(e).__name__}: {' '.join(str(e).split())[:160]}") from None


def load_pretrained(model: nn.Module, name: str, num_classes: int, in_channels: int,
                    progress: bool = False) -> dict[str, Any]:
    """Load the published weights `name` (tv:NAME, timm:NAME or facenet:SET: weights_for) into `model` (built for
    `num_classes` and `in_channels`); returns the report of danlu.models.weights (loaded, adapted, fresh, unused) with
    key 'model.pretrained'."""
    src = published(name)
    if name.startswith(_TIMM):
        return _load_timm(model, src, num_classes, in_channels)
    if src.path.is_file():
        _check_placed(src)
    else:
        _fetch(src, progress)
    if src.sha256 is None and name in FACENET:
        _check_recorded(src)
    from danlu.models.weights import fit_weights, read_weights

    state = read_weights(src.path, key="model.pretrained")
    for k in list(state):  # torchvision's DenseNet key names
        if m := _DENSENET_KEYS.match(k):
            state[m.group(1) + m.group(2)] = state.pop(k)
    if name in FACENET:
        state = facenet_state(state, softmax_head=getattr(model, "head_kind", None) == "softmax")
    report = fit_weights(model, state, f"{name} ({src.path.name})", key="model.pretrained")
    return {**report, "key": "model.pretrained"}


def _load_timm(model: nn.Module, src: Published, num_classes: int, in_channels: int) -> dict[str, Any]:
    """timm's own loader (it adapts the first convolution and drops a classifier for other classes): from the file
    placed in the folder, else from timm's sources (the Hugging Face hub, its URL)."""
    from danlu.models.registry import timm_module

    timm, cfg = timm_module(), dict(model.pretrained_cfg)
    if src.path.is_file():
        from danlu.models.weights import read_weights

        _check_placed(src)
        cfg.update(state_dict=read_weights(src.path, key="model.pretrained"), source=None)
        where = src.path.name
    else:
        from danlu.io import offline

        if offline():
            raise _unreachable(src, "DANLU_OFFLINE is set")
        where = "timm's download"
    try:
        timm.models.load_pretrained(model, pretrained_cfg=cfg, num_classes=num_classes, in_chans=in_channels)
    except Exception as e:  # no network, the hub's errors, or a placed file of another model (a shape mismatch)
        why = f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
        if src.path.is_file():
            raise DanluError(f"model.pretrained: {src.path}: not {src.model}'s weights ({why}); delete it, or "
                             f"{_where(src)}") from None
        raise _unreachable(src, why) from None
    classifier = cfg.get("classifier")
    heads = [classifier] if isinstance(classifier, str) else list(classifier or [])
    first = cfg.get("first_conv")
    convs = [first] if isinstance(first, str) else list(first or [])
    fresh = [f"{h}.{p}" for h in heads for p in ("weight", "bias")] if num_classes != cfg.get("num_classes") else []
    own = model.state_dict()
    fresh = [n for n in fresh if n in own]
    return {"key": "model.pretrained", "source": f"{src.model} ({where})", "loaded": len(own) - len(fresh),
            "of": len(own), "adapted": [f"{c}.weight" for c in convs] if in_channels != 3 else [], "fresh": fresh,
            "unused": []}
