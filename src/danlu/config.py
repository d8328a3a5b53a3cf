"""The recipe: one typed description of a run, built in layers (defaults <- YAML file <- `key=value` overrides).

    recipe = load_recipe("lenet_mnist5k", overrides=["optim.lr=0.05", "run.max_iter=100"])
    recipe.optim.lr          # 0.05

Every problem becomes a one-line `DanluError` naming the file or flag, the key, the bad value and what was expected.
"""
from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from danlu.data.datasets import FORMATS, data_format, format_options
from danlu.engine.devices import check_device
from danlu.engine.precision import PRECISIONS
from danlu.engine.speed import COMPILE_MODES
from danlu.errors import DanluError, nearest

RECIPES_DIR = Path(__file__).parent / "recipes"
DEFAULT_RECIPE = "lenet_mnist5k"
SOLVER_SUFFIXES = (".prototxt", ".pbtxt")  # Caffe solver files, read by danlu.caffe


class _Section(BaseModel):
    # no NaN / Inf anywhere: `lr: .inf` is a typo, not a recipe
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelCfg(_Section):
    name: str = Field("lenet", description=(
        "the architecture: a registered model (`danlu models`), tv:NAME (any torchvision classifier) or timm:NAME "
        "(danlu[timm])"))
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra arguments of the model's entry point")
    sync_bn: bool = Field(False, description=(
        "several processes: BatchNorm statistics over the global batch (SyncBatchNorm)"))
    head: Optional[Literal["softmax", "arcface", "cosface"]] = Field(None, description=(
        "face models (`danlu models`: dlib_resnet, inception_resnet_v1, mobilefacenet): the identity head and its "
        "loss, softmax, arcface or cosface (null: softmax)"))
    scale: float = Field(64.0, gt=0, description="arcface / cosface: logits = scale * cos(theta)")
    margin: float = Field(0.5, ge=0, lt=1.5, description=(
        "arcface: cos(theta + margin) (radians); cosface: cos(theta) - margin"))
    margin_warmup: float = Field(0.0, ge=0, description=(
        "epochs over which the margin grows from 0 to `margin` (linearly, by iteration): a normalized softmax first, "
        "so that the identities' weights spread apart before the margin asks for more (from scratch on a few "
        "identities, ArcFace can otherwise fall into a state where every weight points one way and every face the "
        "other, at chance)"))
    embedding_dim: Optional[int] = Field(None, gt=0, description=(
        "face models: the embedding's size (null: the model's own, 512 or 128)"))
    whiten: float = Field(0.0, ge=0, description=(
        "face models: after training, whiten the embeddings against the training people's own variation (within-class"
        " covariance normalization, WCCN: fitted on their unaugmented images, saved as whiten.safetensors and used by"
        " verify, embed, enroll, identify and serve); the value is the shrinkage toward no whitening, 0 = off"))
    test_flip: Optional[bool] = Field(None, description=(
        "at test time also run each image's mirror image: face models add the two embeddings (verify, embed, "
        "serve...), classifiers average the two logits; null: on for face models, off for classifiers (a flipped "
        "digit is another)"))
    init: Optional[str] = Field(None, description=(
        "start from these weights (a run folder, a .safetensors or a .pt/.pth file): layers that do not fit (the "
        "classifier for other classes) are named and keep their fresh initialization"))
    pretrained: Union[bool, str] = Field(False, description=(
        "tv:NAME / timm:NAME: start from the library's published weights (torchvision's DEFAULT, timm's default tag),"
        " downloaded once (hash-checked) into $TORCH_HOME/hub/checkpoints; the classifier for the data's classes is "
        "fresh. inception_resnet_v1: facenet:vggface2 (what true means) or facenet:casia-webface, FaceNet's models as"
        " facenet-pytorch releases them (data: scale 1, mean 127.5, std 128, size 160; danlu.models.pretrained)"))
    keep_start: bool = Field(False, description=(
        "with model.init or model.pretrained: after training, test the starting weights as the trained ones were and "
        "keep them where training did not improve run.monitor by more than 0.001 (fine-tuning that leaves the held-out test set worse "
        "off is undone; summary.json keep_start has both figures)"))
    freeze: Optional[Union[Literal["backbone"], list[str]]] = Field(None, description=(
        "train only part of the model: `backbone` (all but the classifier: a face model's `head`, else the last "
        "Linear producing the classes) or a list of parameter-name prefixes ([conv1, layer1]) that stay frozen"))
    unfreeze_at: Optional[float] = Field(None, ge=0, description="epochs: from then on the frozen parameters train too")

    @field_validator("freeze", mode="before")
    @classmethod
    def _freeze_words(cls, v: Any) -> Any:
        if v in (None, False, "none", []):
            return None
        if isinstance(v, str) and v != "backbone":
            return [v]  # one prefix
        if not (v == "backbone" or (isinstance(v, list) and all(isinstance(p, str) and p for p in v))):
            raise ValueError("expected backbone or a list of parameter-name prefixes, e.g. [conv1, layer1]")
        return v

    @field_validator("pretrained", mode="before")
    @classmethod
    def _pretrained_words(cls, v: Any, info: Any) -> Any:  # info.data: the fields above (name)
        if not isinstance(v, str):
            return v
        word = v.strip().lower()
        if word in ("true", "yes", "on", "t", "y", "1", "false", "no", "off", "f", "n", "0"):  # YAML's, pydantic's
            return word in ("true", "yes", "on", "t", "y", "1")
        from danlu.models.pretrained import NAMED

        if v not in NAMED:
            raise ValueError(f"expected a boolean (true: the model's published weights) or one of "
                             f"{', '.join(NAMED)}{nearest(v, NAMED)}")
        model = info.data.get("name")
        if model is not None and model != NAMED[v]:
            raise ValueError(f"{v} are weights of {NAMED[v]}, not of model.name={model}; expected model.name="
                             f"{NAMED[v]}, or model.pretrained=true or false")
        return v

    @model_validator(mode="after")
    def _start(self) -> "ModelCfg":
        if self.pretrained and self.init:
            weights = "true" if self.pretrained is True else self.pretrained
            raise ValueError(f"model.pretrained={weights} and model.init={self.init}: expected one of them (init "
                             f"starts from a file, pretrained from the library's weights)")
        if self.unfreeze_at is not None and self.freeze is None:
            raise ValueError(f"model.unfreeze_at={self.unfreeze_at}: nothing is frozen; expected model.freeze "
                             f"(backbone or a list of prefixes) with it")
        return self


# the wds keys every resolved recipe held before they became the wds format's own (danlu 0.1.0 runs), at the values
# a run of another format saved: such runs and their snapshots still load
_OLD_SHARD_DEFAULTS = {"label_key": ("cls",), "streams": (8,), "decode": ("auto",), "workers": (None,),
                       "timeout": (600.0, 240.0)}


class DataCfg(_Section):
    """The data: the keys every format reads below, and the keys of data.name's own format beside them (wds:
    label_key, streams, decode, workers, timeout; validated where the format is defined: danlu.data.datasets)."""
    model_config = ConfigDict(extra="allow", validate_assignment=True, allow_inf_nan=False)

    name: str = Field("mnist5k", description=(
        "the data's format: a registered one (danlu.data.datasets.FORMATS: " + " | ".join(FORMATS) + ")"))
    root: Optional[str] = Field(None, description=(
        "folder: class subfolders; list: what paths are relative to; store: its folder; wds: a folder of .tar shards,"
        " a brace pattern (shards/train-{000000..000127}.tar) or a URL (https://, s3://, gs://, pipe:)"))
    train_list: Optional[str] = Field(None, description=(
        "list: Caffe 'path label' lines or a CSV with a header (path,label)"))
    val_list: Optional[str] = Field(None, description=(
        "list: the test split (default: split train_list by val_fraction)"))
    resize: Literal["crop", "exact"] = Field("crop", description=(
        "folder/list: shorter side + centre crop, or stretch to data.size"))
    device_cache: Union[bool, Literal["auto"]] = Field("auto", description=(
        "store: whole set on the device (true), streamed (false)"))
    batch_size: int = Field(64, gt=0, description="per device")
    test_batch_size: Optional[int] = Field(None, gt=0, description="default: 4x batch_size")
    size: Optional[Union[int, tuple[int, int]]] = Field(None, description=(
        "the images' size: folder/list decode to it (default 224), synthetic makes it (default 28); a store or a "
        "named set is resized to it on the device (antialiased) where it differs (default: as stored)"))
    channels: Optional[Literal[1, 3]] = Field(None, description=(
        "synthetic: default 1; folder/list: 3 (RGB) or 1 (grayscale)"))
    num_classes: Optional[int] = Field(None, ge=2, description="synthetic: default 10")
    train_size: int = Field(4096, gt=0, description="synthetic only")
    test_size: int = Field(1024, gt=0, description="synthetic only")
    val_fraction: float = Field(0.2, gt=0, lt=1, description=(
        "held-back share where a set has no test split (mnist5k: 1,000)"))
    split_seed: int = Field(0, description="the held-back split never changes with run.seed")
    split: Literal["images", "identities"] = Field("images", description=(
        "identities: hold back val_fraction of the classes (faces)"))
    test_pairs: int = Field(1000, ge=10, description=(
        "split=identities: verification pairs of each kind (same / different)"))
    scale: float = Field(1 / 255, gt=0, description="uint8 -> float multiplier (Caffe's LeNet uses 1/256)")
    normalize: Literal["none", "channel", "pixel"] = Field("none", description=(
        "pixel: subtract the per-pixel mean image (Keras article)"))
    mean: Optional[list[float]] = Field(None, description=(
        "explicit per-channel mean/std in scaled units (overrides normalize)"))
    std: Optional[list[float]] = Field(None, description=(
        "explicit per-channel std in scaled units, with data.mean (overrides normalize)"))
    @model_validator(mode="before")
    @classmethod
    def _old_runs(cls, v: Any) -> Any:
        """Runs and snapshots from before formats kept their own keys saved the shard keys in every recipe: dropped
        where the format is another one and they hold the defaults they were saved with."""
        if isinstance(v, dict) and v.get("name", "mnist5k") != "wds":
            v = {k: x for k, x in v.items() if not (k in _OLD_SHARD_DEFAULTS and x in _OLD_SHARD_DEFAULTS[k])}
        return v

    @field_validator("name")
    @classmethod
    def _known_format(cls, v: str) -> str:
        data_format(v)  # one line naming the formats where the name is not one
        return v

    @model_validator(mode="after")
    def _format_options(self) -> "DataCfg":
        """The keys of data.name's own format (wds: label_key, streams, ...), validated by the options model the
        format is defined with (danlu.data.datasets), kept beside the fields with their defaults filled in."""
        self.__pydantic_extra__ = format_options(self.name, dict(self.model_extra or {}),
                                                 tuple(type(self).model_fields))
        if self.split == "identities" and data_format(self.name).identities == "none":
            raise ValueError(f"data.split=identities: data.name={self.name} streams its shards and cannot hold back "
                             f"identities; expected data.split=images")
        return self


class AugmentCfg(_Section):
    """Batched, per-sample, on the device; in this order (data/augment.py). 0 / null: off."""
    shift: float = Field(0.0, ge=0, le=0.5, description=(
        "random shift by up to this fraction of width/height, nearest fill"))
    flip: bool = Field(False, description="random horizontal flip")
    crop: int = Field(0, ge=0, description="random crop after zero padding by this many pixels")
    resized_crop: Optional[tuple[float, float]] = Field(None, description=(
        "one affine warp (bilinear, edge fill) [lo, hi] share of the area (torchvision RandomResizedCrop)"))
    ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="resized_crop: aspect ratio range (width / height)")
    rotate: float = Field(0.0, ge=0, le=180, description="degrees, U(-rotate, rotate)")
    zoom: float = Field(0.0, ge=0, lt=1, description="factor U(1 - zoom, 1 + zoom); > 1 is closer")
    translate: float = Field(0.0, ge=0, le=0.5, description="U(-t, t) of the width and of the height (sub-pixel)")
    brightness: float = Field(0.0, ge=0, le=1, description=(
        "lighting, all together with probability p_light + U(-b, b) of white"))
    contrast: float = Field(0.0, ge=0, le=1, description="x U(1 - c, 1 + c) about the image's mean")
    saturation: float = Field(0.0, ge=0, le=1, description="colour images: x U(1 - s, 1 + s) away from gray")
    gamma: float = Field(0.0, ge=0, le=3, description="pixels ** exp(U(-g, g)) on [0, white]")
    ramp: float = Field(0.0, ge=0, le=1, description="side light: x (1 + U(0, r) <direction, position>)")
    p_light: float = Field(1.0, ge=0, le=1, description="probability that an image gets the lighting changes above")
    grayscale: float = Field(0.0, ge=0, le=1, description="probability (colour images)")
    blur: float = Field(0.0, ge=0, le=10, description=(
        "Gaussian blur, sigma U(0.1, blur) pixels, with probability blur_p"))
    blur_p: float = Field(0.0, ge=0, le=1, description="probability of the blur")
    erase: float = Field(0.0, ge=0, le=1, description=(
        "probability of random erasing (one box of 2-33% of the area, set to 0)"))
    trivial: bool = Field(False, description=(
        "TrivialAugment-lite: one random op per image (colour, contrast, solarize, shear, ...)"))
    mixup: float = Field(0.0, ge=0, le=10, description=(
        "mixup / cutmix: each image mixed with its neighbour in the batch by lambda ~ Beta(alpha, alpha) (0: off); "
        "with both on, each image takes one of them at random. The loss then uses soft labels. alpha"))
    cutmix: float = Field(0.0, ge=0, le=10, description="alpha")
    mix_p: float = Field(1.0, ge=0, le=1, description="probability that an image is mixed at all")


class OptimCfg(_Section):
    name: Literal["sgd", "adam", "adamw"] = Field("sgd", description="sgd | adam | adamw")
    lr: float = Field(0.01, ge=0, description="0: the weights stay as they are (e.g. to evaluate a model.init start)")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd: momentum")
    nesterov: bool = Field(False, description="sgd: Nesterov momentum")
    weight_decay: float = Field(5e-4, ge=0, description=(
        "L2 (sgd, adam) or decoupled (adamw) weight decay; none on biases and norms with wd_exclude_norm_bias"))
    betas: tuple[float, float] = Field((0.9, 0.999), description="adam / adamw: the moving averages' decay rates")
    eps: float = Field(1e-8, gt=0, description="adam / adamw: added to the denominator")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description=(
        "cross-entropy against (1 - s) on the true class and s spread over all"))
    clip_grad_norm: Optional[float] = Field(None, gt=0, description=(
        "clip the gradients' global norm to this (null: no clipping)"))
    lr_scaling: Literal["linear", "sqrt", "none"] = Field("linear", description="by global_batch / reference_batch")
    reference_batch: Optional[int] = Field(None, gt=0, description=(
        "default: data.batch_size (no scaling on one device)"))
    accumulate: int = Field(1, ge=1, description="micro-batches of data.batch_size per step (DDP syncs only the last)")
    head_lr_mult: float = Field(1.0, gt=0, description=(
        "the classifier head's LR = the schedule's x this (fine-tuning: 10)"))
    wd_exclude_norm_bias: bool = Field(True, description=(
        "no weight decay on biases and 1-d parameters (normalization), as timm does"))
    ema: Optional[float] = Field(None, gt=0, lt=1, description=(
        "decay of an exponential moving average of the weights (0.999)"))


class ScheduleCfg(_Section):
    policy: str = Field("fixed", description=(
        "the LR policy: Caffe's fixed, step, exp, inv, multistep, poly, sigmoid, or poly_decay (per epoch), cosine, "
        "onecycle (engine/schedule.py has each formula)"))
    gamma: float = Field(0.1, description=(
        "step, exp, multistep: the LR factor; inv, sigmoid: the rate in Caffe's formula"))
    power: float = Field(1.0, description="inv, poly, poly_decay: the exponent")
    stepsize: int = Field(0, ge=0, description="step: iterations between LR drops; sigmoid: the midpoint")
    stepvalues: list[int] = Field(default_factory=list, description=(
        "multistep: the iterations at which the LR drops by gamma"))
    min_lr: float = Field(0.0, ge=0, description="cosine: the LR it ends at")
    warmup: int = Field(0, ge=0, description="iterations of linear warmup")
    warmup_epochs: float = Field(0.0, ge=0, description="or epochs (converted to iterations)")
    pct_start: float = Field(0.3, gt=0, lt=1, description="onecycle")
    div_factor: float = Field(25.0, gt=0, description="onecycle: it starts at lr / div_factor")
    final_div_factor: float = Field(1e4, gt=0, description="onecycle: it ends at lr / div_factor / final_div_factor")

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, v: str) -> str:
        from danlu.engine.schedule import POLICIES

        if v not in POLICIES:
            raise ValueError(f"expected one of {', '.join(POLICIES)}{nearest(v, POLICIES)}")
        return v


class TargetCfg(_Section):
    """Stop at the first evaluation where the test metric reaches `value` (at least; at most for a loss)."""
    metric: str = Field("acc", description="a test figure: acc, top5, loss, verification_acc")
    value: float = Field(description="the value to reach (at least; at most for a loss)")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        if v not in TARGET_METRICS:
            raise ValueError(f"expected one of {', '.join(TARGET_METRICS)}{nearest(v, TARGET_METRICS)}")
        return v


TARGET_METRICS = ("acc", "top5", "loss", "verification_acc", "verification_auc")


class RunCfg(_Section):
    max_iter: Optional[int] = Field(None, gt=0, description=(
        "the run's length in iterations (global batches), or run.epochs"))
    epochs: Optional[float] = Field(None, gt=0, description=(
        "the run's length in epochs (fractions allowed), or run.max_iter"))
    test_interval: Optional[int] = Field(None, gt=0, description=(
        "iterations between test events; default: whole epochs, at most about 10 test events a run (20 epochs: "
        "every 2)"))
    test_iter: Optional[int] = Field(None, gt=0, description="test batches per evaluation; default: the whole test set")
    display: int = Field(50, gt=0, description="iterations between train lines and metrics.jsonl train events")
    snapshot_every: int = Field(500, ge=0, description="0: only at the end")
    keep_snapshots: int = Field(3, gt=0, description="how many of the newest snapshots are kept")
    seed: int = Field(0, description=(
        "seeds the initial weights, the data order and the augmentation (never the held-out split)"))
    tensorboard: Union[bool, Literal["auto"]] = Field("auto", description=(
        "TensorBoard events beside metrics.jsonl; auto: where danlu[tensorboard] is installed"))
    on_nan: Literal["stop", "skip"] = Field("stop", description=(
        "a non-finite loss: stop with diagnosis.json, or drop the step"))
    find_batch_size: bool = Field(False, description="probe the largest power-of-two batch that fits before training")
    target: Optional[TargetCfg] = Field(None, description="stop at the first evaluation reaching it (--until acc=0.99)")
    min_images: int = Field(0, ge=0, description=(
        "with epochs: train on at least this many images, so a small set gets more epochs than a large one (240 face "
        "crops and 24,000 images see the same 40,000 images; a large set runs its epochs)"))
    monitor: str = Field("auto", description=(
        "the test figure keep_best and early_stop watch: auto (acc, or verification_acc), ..."))
    keep_best: bool = Field(False, description=(
        "keep the weights of the best test event as best.safetensors (+ best.json)"))
    early_stop: Optional[int] = Field(None, gt=0, description=(
        "stop after this many test events without a better `monitor`"))

    @field_validator("monitor")
    @classmethod
    def _known_monitor(cls, v: str) -> str:
        words = ("auto", *TARGET_METRICS)
        if v not in words:
            raise ValueError(f"expected one of {', '.join(words)}{nearest(v, words)}")
        return v

    @model_validator(mode="after")
    def _one_length(self) -> "RunCfg":
        if self.max_iter is None and self.epochs is None:
            raise ValueError("set run.max_iter or run.epochs")
        if self.max_iter is not None and self.epochs is not None:
            raise ValueError(f"set run.max_iter ({self.max_iter}) or run.epochs ({self.epochs}), not both")
        return self


class DevicesCfg(_Section):
    device: str = Field("auto", description=(
        "auto (a GPU where there is one, else mps, else the CPU) | cpu | cuda | cuda:N | mps"))

    @field_validator("device")
    @classmethod
    def _device_form(cls, v: str) -> str:
        return check_device(v)


class DistCfg(_Section):
    """Several processes (--procs, --gpus, torchrun, SLURM); ignored by a single process."""
    timeout: float = Field(300.0, gt=0, description=(
        "seconds a collective waits for a missing rank before the job fails"))
    bucket_mb: float = Field(25.0, gt=0, description=(
        "DDP gradient bucket size (MiB): all-reduce overlaps backward per bucket"))


class Recipe(_Section):
    model: ModelCfg = Field(default_factory=ModelCfg)
    data: DataCfg = Field(default_factory=DataCfg)
    augment: AugmentCfg = Field(default_factory=AugmentCfg)
    optim: OptimCfg = Field(default_factory=OptimCfg)
    schedule: ScheduleCfg = Field(default_factory=ScheduleCfg)
    run: RunCfg = Field(default_factory=lambda: RunCfg(epochs=1))
    precision: Literal[PRECISIONS] = Field("fp32", description=(
        "fp32, tf32, fp16, bf16 (mixed precision: autocast, and for fp16 a loss scaler), fp64, or auto (bf16 where the "
        "GPU has bf16 tensor cores, else fp32; resolved when the run starts and saved as what it became)"))
    compile: Union[bool, Literal[COMPILE_MODES[2:]]] = Field(False, description=(
        "torch.compile of the model: false, true, or max-autotune (longer compilation for faster kernels)"))
    channels_last: Union[Literal["auto"], bool] = Field("auto", description="auto: on CUDA for conv nets, off on CPU")
    cuda_graphs: bool = Field(False, description="CUDA only: replay forward + backward as CUDA graphs (static shapes)")
    devices: DevicesCfg = Field(default_factory=DevicesCfg)
    dist: DistCfg = Field(default_factory=DistCfg)

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_none(cls, v: Any) -> Any:
        return {} if v in (None, False, "none", "off") else v

    @field_validator("compile", "channels_last", mode="before")
    @classmethod
    def _switch(cls, v: Any, info: Any) -> Any:
        words = {"compile": COMPILE_MODES[2:], "channels_last": ("auto",)}[info.field_name]
        if isinstance(v, bool) or v in words:
            return v
        raise ValueError(f"expected false, true or {' or '.join(words)}")

    @model_validator(mode="after")
    def _mixing(self) -> "Recipe":
        a, b = self.augment, self.data.batch_size
        mixing = "augment.mixup" if a.mixup else "augment.cutmix" if a.cutmix else None
        if mixing and b % 2:
            raise ValueError(f"{mixing}={getattr(self.augment, mixing[8:])} mixes images in pairs of neighbours: "
                             f"data.batch_size={b}; expected an even batch size")
        if mixing and self.model.head in ("arcface", "cosface"):
            raise ValueError(f"{mixing} with model.head={self.model.head}: a margin loss takes one label per image; "
                             f"expected model.head=softmax or no mixing")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------- loading in layers


def list_recipes() -> dict[str, Path]:
    """Shipped recipes by name: {'lenet_mnist5k': Path(...), ...}."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DanluError(f"{path}: cannot read recipe ({e.strerror})") from None
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise DanluError(f"{path} line {line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); expected a YAML "
                         f"recipe") from None
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise DanluError(f"{path}: not a recipe (YAML nested too deeply)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        if mark is None and isinstance(getattr(e, "position", None), int):  # yaml.reader.ReaderError
            where = f" line {text[:e.position].count(chr(10)) + 1}"
            problem = f"character {e.character!r} is not allowed" if hasattr(e, "character") else str(e)
        else:
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e)
        raise DanluError(f"{path}{where}: not valid YAML ({' '.join(str(problem).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DanluError(f"{path}: expected a mapping of sections (model, data, optim, ...), got {type(data).__name__}")
    return data


def resolve_recipe_path(name_or_path: str) -> Path:
    """A shipped recipe's name ('lenet_mnist5k') or a path to a YAML file or a Caffe solver.prototxt."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = list_recipes()
    if name_or_path in shipped:
        return shipped[name_or_path]
    if p.suffix in SOLVER_SUFFIXES:
        raise DanluError(f"solver file '{name_or_path}' not found; expected a Caffe solver.prototxt")
    if p.suffix in (".yaml", ".yml") or "/" in name_or_path:
        raise DanluError(f"recipe file '{name_or_path}' not found; expected a YAML file or a shipped recipe "
                         f"({', '.join(shipped)})")
    raise DanluError(f"unknown recipe '{name_or_path}'; expected a YAML file or one of {', '.join(shipped)}"
                     f"{nearest(name_or_path, shipped)}")


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise DanluError(f"--set {item}: expected key=value, e.g. --set optim.lr=0.05")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except (yaml.YAMLError, RecursionError):
        value = raw  # a plain string such as a path with odd characters
    return key.strip().split("."), value


def _set_path(tree: dict[str, Any], keys: list[str], value: Any, item: str) -> None:
    node = tree
    for k in keys[:-1]:
        child = node.get(k)
        if child is None or isinstance(child, str):  # e.g. `augment: none` then --set augment.flip=true
            child = node[k] = {}
        if not isinstance(child, dict):
            raise DanluError(f"--set {item}: '{k}' is a value, not a section")
        node = child
    node[keys[-1]] = value
    # run length is max_iter OR epochs: setting one on the command line replaces the other
    if keys[:1] == ["run"] and keys[-1] in ("max_iter", "epochs") and len(keys) == 2:
        node.pop("epochs" if keys[-1] == "max_iter" else "max_iter", None)


def _expected_keys(loc: tuple[Any, ...]) -> list[str]:
    """The valid keys of the section that `loc` points into (for 'did you mean')."""
    model: Any = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)


_TYPE_TAGS = {"int", "float", "str", "bool", "none"}


def _key(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """The recipe key of an error location, without pydantic's union-member and validator tags."""
    return tuple(p for p in loc if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p or
                                                                  p.startswith("function-"))))


def _describe(errors: list[dict[str, Any]], source: dict[str, str], origin: str) -> str:
    err = errors[0]
    loc = _key(err["loc"])
    if err["type"] == "extra_forbidden":  # the last part is the user's own key, even one that looks like a tag
        loc = _key(err["loc"][:-1]) + err["loc"][-1:]
    key = ".".join(str(p) for p in loc) or "recipe"
    named = [k for k in source if f"'{k}'" in err["msg"] or f"{k}=" in err["msg"]]  # a key the message names
    where = source.get(max(named, key=len)) if named else \
        source.get(key) or next((v for k, v in source.items() if k.startswith(key + ".")), origin)
    if err["type"] == "extra_forbidden":
        valid = _expected_keys(loc)
        return (f"{where}: unknown key '{key}'{nearest(str(loc[-1]), valid)}; "
                f"expected one of {', '.join(valid)}")
    value = err.get("input")
    if err["type"] in ("model_type", "dict_type"):
        return f"{where}: '{key}' must be a section (a mapping of keys), got {value!r}"
    msgs = dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in errors if _key(e["loc"]) == loc)
    msg = " or ".join(msgs)
    for a, b in (("Input should be greater", "expected a value greater"),
                 ("Input should be less", "expected a value less"), ("Input should be", "expected")):
        msg = msg.replace(a, b)
    if where.startswith("--set ") and msg.startswith(where[6:] + ": "):  # `--set k=v: k=v: ...`: said once
        msg = msg[len(where) - 4:]
    if key in source or isinstance(value, dict):  # the place already shows the key (and the value)
        return f"{where}: {msg}"
    return f"{where}: {key}={value!r}: {msg}"


def build_recipe(tree: dict[str, Any], *, origin: str = "recipe", source: Optional[dict[str, str]] = None) -> Recipe:
    """Validate a nested dict into a Recipe; errors name the key, the value and the source (file or --set)."""
    try:
        return Recipe.model_validate(tree)
    except ValidationError as e:
        raise DanluError(_describe(e.errors(), source or {}, origin)) from None


def load_recipe(recipe: Union[str, Path, dict, None] = None, overrides: Optional[list[str]] = None) -> Recipe:
    """Defaults <- recipe (shipped name, YAML path, or dict) <- overrides (['optim.lr=0.05', ...])."""
    if recipe is None:
        recipe = DEFAULT_RECIPE
    if isinstance(recipe, dict):
        tree, origin = copy.deepcopy(recipe), "recipe"
    else:
        path = resolve_recipe_path(str(recipe))
        tree, origin = _read_yaml(path) if path.suffix not in SOLVER_SUFFIXES else {}, str(recipe)
    source: dict[str, str] = {}
    layers = [(item, f"--set {item}") for item in overrides or []]
    if not isinstance(recipe, dict) and path.suffix in SOLVER_SUFFIXES:  # a Caffe solver: danlu.caffe maps it
        from danlu.caffe import read_solver

        solver = read_solver(path, overrides)
        tree, source, layers = solver.tree, solver.source, solver.extra + layers
    for item, where in layers:
        keys, value = _parse_override(item)
        _set_path(tree, keys, value, item)
        source[".".join(keys)] = where
    return build_recipe(tree, origin=origin, source=source)


def iters_per_epoch(train_size: int, global_batch: int) -> int:
    """Training iterations in one epoch (the last partial batch is dropped)."""
    return max(1, train_size // global_batch)


def total_iters(run: RunCfg, per_epoch: int, global_batch: int = 1) -> int:
    """run.max_iter, or run.epochs of `per_epoch` iterations, at least run.min_images / global_batch."""
    if run.max_iter is not None:
        return run.max_iter
    return max(1, math.ceil(run.epochs * per_epoch), math.ceil(run.min_images / global_batch))
