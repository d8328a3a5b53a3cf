"""Recipe -> the parts of a training step, in the one order that works. `danlu.train` and `danlu bench` both build
their step here, so what bench times is what train runs.

    b = build(recipe, train_set, test_set, device, dist)       # b.parts: what train_loop needs; b.model: the plain
    stats = train_loop(b.parts, build_plan(recipe, b.per_epoch, b.max_iter), log, snapshot, on_test)

The order, and why:
  1. seed, then the model for the data's channels and classes, its starting weights (model.init, or
     model.pretrained: the library's published ones), then its layout (channels-last): before any DDP wrap, whose
     gradient buckets follow the parameters' layout at wrap time.
  2. loaders: this rank's slice of every global batch (data.batch_size x accumulate x processes).
  3. the LR: optim.lr scaled by the global batch (optim.lr_scaling), then the schedule over the run's iterations.
  4. the frozen part (model.freeze, before DDP registers what trains), the optimizer over parameter groups (no
     decay on biases and norms, the head at optim.head_lr_mult) with the schedule that sets each group's LR and
     unfreezes, the weights' average (optim.ema), precision (autocast, loss scaler, backend switches once),
     augmentation that draws for the whole global batch, and its generator.
  5. the task's loss and test metric (danlu.tasks: classification, or face verification with its margin loss).
  6. the module the loop calls: DDP, then torch.compile or CUDA graphs.
Config reaches the classes as flat arguments: nothing below this module reads a Recipe.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from danlu.config import Recipe, iters_per_epoch, total_iters
from danlu.data.imageset import ImageSet
from danlu.data.loader import DecodingLoader
from danlu.engine.devices import wide_float
from danlu.engine.distributed import Dist
from danlu.engine.ema import EMA
from danlu.engine.loop import Parts, Plan
from danlu.engine.metrics import Best
from danlu.engine.params import freeze, param_groups
from danlu.engine.precision import Precision
from danlu.engine.schedule import Schedule
from danlu.engine.speed import Speed, reuse_freed_memory
from danlu.errors import DanluError
from danlu.models.heads import MarginLoss
from danlu.tasks.base import Task, task_for


@dataclass
class Build:
    parts: Parts  # what one training step touches (the model there is the wrapped one: DDP, compiled, graphed)
    model: nn.Module  # the plain module: what snapshots save and the final weights are read from
    speed: Speed
    per_epoch: int  # iterations (global batches) per epoch
    max_iter: int
    base_lr: float  # optim.lr scaled for the global batch
    task: Task  # what is learned: its loss, test metric, console line, summary fields (danlu.tasks)
    init: Optional[dict[str, Any]] = None  # what model.init loaded (danlu.models.weights.init_from), if it ran
    start: Optional[dict[str, torch.Tensor]] = None  # model.keep_start: the starting weights, to compare at the end


def build(recipe: Recipe, train: ImageSet, test: ImageSet, device: torch.device, dist: Optional[Dist] = None, *,
          model: Optional[nn.Module] = None, loader: Any = None, lr: Optional[float] = None,
          init: bool = True) -> Build:
    """The parts of `recipe`'s training step on `device`. `model`: train this module instead of the recipe's;
    `loader`: this training loader instead of the recipe's; `lr`: a constant LR instead of the recipe's schedule
    (bench overrides these two and nothing else); `init=False`: leave model.init out (a resumed run's weights come
    from its snapshot)."""
    dist = dist or Dist(device=device)
    speed = Speed(device, compile=recipe.compile, channels_last=recipe.channels_last, cuda_graphs=recipe.cuda_graphs,
                  world=dist.world)
    precision = Precision(recipe.precision, device, autocast_cache=not recipe.cuda_graphs)
    precision.configure_backends()
    reuse_freed_memory()  # the library's runs too (the CLI did it already)
    torch.manual_seed(recipe.run.seed)  # the initial weights
    shape = input_shape(recipe, train.shape)  # what the model sees: the data's, resized by data.size
    task = task_for(recipe, model)
    if model is None:
        model = build_model(recipe, shape, len(train.classes), task)
    report = None
    load = init or recipe.model.keep_start  # a resumed run's snapshot replaces them, but keep_start compares with them
    if load and recipe.model.init:
        from danlu.models.weights import init_from

        report = init_from(model, recipe.model.init)
    if load and recipe.model.pretrained:
        report = _load_pretrained(recipe, model, shape, len(train.classes), dist)
    model = speed.layout(model.to(device, precision.param_dtype))
    start = ({k: v.detach().clone() for k, v in model.state_dict().items()}
             if recipe.model.keep_start and (recipe.model.init or recipe.model.pretrained) else None)
    head = _head(recipe, model, len(train.classes))
    frozen = freeze(model, recipe.model.freeze, head) if recipe.model.freeze else []
    train_loader, test_loader = build_loaders(recipe, train, test, device, dist, loader, task.whole_test_set)
    per_epoch = iters_per_epoch(len(train), train_loader.global_batch)
    max_iter = total_iters(recipe.run, per_epoch, train_loader.global_batch)
    base_lr = scaled_lr(recipe, train_loader.global_batch)
    lr_at = build_schedule(recipe, base_lr, per_epoch, max_iter) if lr is None else (lambda it: lr)
    criterion = task.criterion()
    schedule = Schedule(lr_at, frozen, _unfreeze_iter(recipe, per_epoch, dist, speed) if frozen else None,
                        margin=criterion if isinstance(criterion, MarginLoss) else None,
                        margin_iters=round(recipe.model.margin_warmup * per_epoch))
    optimizer = build_optimizer(recipe, model, base_lr if lr is None else lr, head)
    ema = EMA(model, recipe.optim.ema) if recipe.optim.ema else None  # before any wrap: the plain module's weights
    augment = build_augment(recipe, train).for_rank(dist.rank, dist.world)  # draws for the global batch
    augment.memory_format, augment.dtype = speed.memory_format, precision.param_dtype  # the weights' layout, dtype
    augment.wide = wide_float(device)  # its draws: float64, float32 where the device has none (mps)
    if isinstance(train_loader, DecodingLoader):  # shards: crop (and mirror) each image as it is decoded
        for op in train_loader.take_crop(augment):
            if train.report is not None:
                train.report[op] = "decoder"
    generator = None if augment.is_identity else torch.Generator(device).manual_seed(recipe.run.seed + 1)
    step_model = speed.wrap(dist.wrap(model, sync_bn=recipe.model.sync_bn), (recipe.data.batch_size, *shape),
                            precision)
    parts = Parts(step_model, optimizer, criterion, augment, generator, train_loader, test_loader,
                  precision, dist, schedule, evaluate=task.evaluator(test), ema=ema,
                  best=Best(monitored(recipe, task), recipe.run.early_stop))
    return Build(parts, model, speed, per_epoch, max_iter, base_lr, task, report if init else None, start)


def resolve_precision(recipe: Recipe, device: torch.device,
                      dist: Optional[Dist] = None) -> tuple[Recipe, Optional[str]]:
    """precision: auto -> the recipe with the format it resolves to here, and why (None where it was not auto).
    With several processes rank 0 decides for all."""
    if recipe.precision != "auto":
        return recipe, None
    from danlu.config import build_recipe
    from danlu.engine.precision import resolve_auto

    dist = dist or Dist(device=device)
    name, why = dist.broadcast_object(resolve_auto(device) if dist.is_main else None)
    tree = recipe.to_dict()
    tree["precision"] = name
    return build_recipe(tree), f"precision auto -> {name}: {why}"


TEST_EVENTS = 10  # at most about this many evaluations in a run whose run.test_interval is left to danlu


def build_plan(recipe: Recipe, per_epoch: int, max_iter: int) -> Plan:
    """When the loop logs, tests and snapshots, from the recipe's `run` section. run.test_interval, where the recipe
    sets it, is kept exactly; left out it is a whole number of epochs, at least one and as many as keep the run to
    about TEST_EVENTS evaluations (plus the one at the end): 20 epochs test every 2, 30 epochs of one step each every
    3 steps, so a short run on a small set spends its time training, not evaluating."""
    r, o = recipe.run, recipe.optim
    epochs = -(-max_iter // per_epoch)  # ceil: a last partial epoch counts
    every = r.test_interval or per_epoch * -(-epochs // TEST_EVENTS)
    return Plan(max_iter=max_iter, test_interval=every, display=r.display,
                snapshot_every=r.snapshot_every, test_iter=r.test_iter, clip_grad_norm=o.clip_grad_norm,
                label_smoothing=o.label_smoothing, accumulate=o.accumulate,
                target=(r.target.metric, r.target.value) if r.target is not None else None)


def load_data(recipe: Recipe) -> tuple[ImageSet, ImageSet]:
    """(train, test) of the recipe's `data` section: its keys, and the keys of its format's own (data.model_extra)."""
    from danlu.data.datasets import load_dataset

    d = recipe.data
    return load_dataset(d.name, root=d.root, size=d.size, channels=d.channels, num_classes=d.num_classes,
                        train_size=d.train_size, test_size=d.test_size, val_fraction=d.val_fraction,
                        split_seed=d.split_seed, resize=d.resize, train_list=d.train_list, val_list=d.val_list,
                        split=d.split, **(d.model_extra or {}))


def input_shape(recipe: Recipe, data_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(C, H, W) of the batches the model takes: the data's, resized to data.size where a store or a named set holds
    another size (folder and list data are decoded at data.size already)."""
    from danlu.data.decode import as_size

    c, h, w = data_shape
    return (c, *as_size(recipe.data.size)) if recipe.data.size is not None else (c, h, w)


def build_model(recipe: Recipe, shape: tuple[int, int, int], num_classes: int,
                task: Optional[Task] = None) -> nn.Module:
    """The recipe's model for inputs of `shape` (C, H, W) and `num_classes` outputs, with what its task sets (an
    identity head)."""
    from danlu.models import create_model, model_info

    m = recipe.model
    info = model_info(m.name)
    kw = dict(m.kwargs)
    if info.takes_input_size:
        kw.setdefault("input_size", shape[1])  # models with a fixed flatten size (LeNet) are built for the data's
    for k, v in (task or task_for(recipe)).model_kwargs().items():
        kw.setdefault(k, v)
    if m.pretrained:  # what the published weights were trained with (torchvision's Inception: its input transform)
        from danlu.models.pretrained import pretrained_kwargs

        kw = {**pretrained_kwargs(m.name), **kw}
    return create_model(m.name, num_classes=num_classes, in_channels=shape[0], **kw)


def _load_pretrained(recipe: Recipe, model: nn.Module, shape: tuple[int, int, int], num_classes: int,
                     dist: Dist) -> dict[str, Any]:
    """model.pretrained: the library's published weights into `model` (true: the model's default ones; or a named
    set, facenet:casia-webface), once the data is known to be standardized as they expect. With several processes
    rank 0 downloads first (into the shared cache) and the others then read the file."""
    import sys

    from danlu.models.pretrained import check_data, load_pretrained, weights_for

    m, d = recipe.model, recipe.data
    name = weights_for(m.name, m.pretrained)  # tv:resnet18, facenet:vggface2
    check_data(name, d.scale, d.mean, d.std, d.normalize)
    if not dist.is_main:
        dist.barrier()
    try:
        return load_pretrained(model, name, num_classes, shape[0], progress=dist.is_main and sys.stderr.isatty())
    finally:
        if dist.is_main:
            dist.barrier()


def build_loaders(recipe: Recipe, train: ImageSet, test: ImageSet, device: torch.device, dist: Dist,
                  loader: Any = None, whole_test_set: bool = False) -> tuple[Any, Any]:
    """The training loader (a global batch of data.batch_size x accumulate x processes, this rank's share; `loader`
    if given) and the test loader (sharded over ranks, or with `whole_test_set` whole on every rank: verification
    pairs across the set)."""
    from danlu.data.loader import make_loader

    d, micro = recipe.data, recipe.optim.accumulate
    if loader is None:
        loader = make_loader(train.images, train.labels, d.batch_size * micro, device=device, cache=d.device_cache,
                             seed=recipe.run.seed, rank=dist.rank, world=dist.world)
    if len(loader) == 0:
        raise DanluError(f"data.batch_size={d.batch_size}: x {dist.world} process(es) x optim.accumulate={micro} "
                         f"is more than the training set ({len(train)} images); expected at most "
                         f"{len(train) // (dist.world * micro)}")
    test_loader = make_loader(test.images, test.labels, d.test_batch_size or 4 * d.batch_size, device=device,
                              cache=d.device_cache, shuffle=False, drop_last=False,
                              rank=0 if whole_test_set else dist.rank, world=1 if whole_test_set else dist.world)
    return loader, test_loader


def scaled_lr(recipe: Recipe, global_batch: int) -> float:
    """Goyal et al.'s linear rule (or sqrt): optim.lr x global_batch / optim.reference_batch."""
    o = recipe.optim
    ratio = global_batch / (o.reference_batch or recipe.data.batch_size)
    return o.lr * {"linear": ratio, "sqrt": ratio ** 0.5, "none": 1.0}[o.lr_scaling]


def build_schedule(recipe: Recipe, base_lr: float, per_epoch: int, max_iter: int) -> Callable[[int], float]:
    """lr(iteration) from the recipe's schedule, checked now rather than at the first step."""
    from danlu.engine.schedule import lr_at

    s, lr = recipe.schedule, recipe.optim.lr
    warmup = s.warmup or round(s.warmup_epochs * per_epoch)

    def lr_fn(it: int) -> float:
        return lr_at(it, policy=s.policy, base_lr=base_lr, max_iter=max_iter, iters_per_epoch=per_epoch,
                     gamma=s.gamma, power=s.power, stepsize=s.stepsize, stepvalues=s.stepvalues, min_lr=s.min_lr,
                     warmup=warmup, warmup_start=lr if warmup and base_lr != lr else None, pct_start=s.pct_start,
                     div_factor=s.div_factor, final_div_factor=s.final_div_factor)

    lr_fn(0)
    return lr_fn


def build_optimizer(recipe: Recipe, model: nn.Module, lr: float, head: Optional[str] = None) -> torch.optim.Optimizer:
    """The recipe's optimizer over parameter groups (engine/params.py): no weight decay on biases and 1-d parameters
    (optim.wd_exclude_norm_bias), the classifier `head` at optim.head_lr_mult x the LR. Frozen parameters are in it
    too (without a gradient the optimizer leaves them alone), so unfreezing changes nothing in its shape."""
    o = recipe.optim
    groups = param_groups(model, head=head, weight_decay=o.weight_decay, exclude_norm_bias=o.wd_exclude_norm_bias,
                          head_lr_mult=o.head_lr_mult)
    for g in groups:
        g["lr"] = lr * g["lr_mult"]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=o.nesterov)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(groups, lr=lr, betas=o.betas, eps=o.eps)


def _head(recipe: Recipe, model: nn.Module, num_classes: int) -> Optional[str]:
    """The classifier's module name where the recipe needs it (model.freeze: backbone, optim.head_lr_mult)."""
    from danlu.models import classifier_name

    if recipe.model.freeze != "backbone" and recipe.optim.head_lr_mult == 1.0:
        return None
    head = classifier_name(model, num_classes)
    if head is None and recipe.optim.head_lr_mult != 1.0:
        raise DanluError(f"optim.head_lr_mult={recipe.optim.head_lr_mult}: found no classifier in "
                         f"{type(model).__name__} (a Linear with {num_classes} outputs); expected head_lr_mult: 1")
    return head


def _unfreeze_iter(recipe: Recipe, per_epoch: int, dist: Dist, speed: Speed) -> Optional[int]:
    """model.unfreeze_at (epochs) as an iteration; refused where the step cannot start training new parameters:
    DDP registers the parameters that need a gradient once, when it wraps the model, and CUDA graphs record which."""
    at = recipe.model.unfreeze_at
    if at is None:
        return None
    if dist.world > 1:
        raise DanluError(f"model.unfreeze_at={at} with {dist.world} processes: DDP cannot start training frozen "
                         f"parameters mid-run; expected one process, or model.freeze without unfreeze_at")
    if speed.cuda_graphs:
        raise DanluError(f"model.unfreeze_at={at} with cuda_graphs: the graphs record which parameters train; "
                         f"expected cuda_graphs: false")
    return round(at * per_epoch)


def monitored(recipe: Recipe, task: Task) -> str:
    """The test figure run.keep_best and run.early_stop watch: run.monitor, or for auto the task's headline figure."""
    return task.headline if recipe.run.monitor == "auto" else recipe.run.monitor


def build_augment(recipe: Recipe, train: Optional[ImageSet] = None):
    """The run's preprocessing and augmentation. Statistics the recipe asks to compute (data.normalize) come from
    `train`; without it (inference) they stay unset until the run's saved ones are loaded."""
    from danlu.data.augment import Augment
    from danlu.data.datasets import channel_stats, pixel_mean  # tensors or a store's memory-mapped shards
    from danlu.data.decode import as_size

    d, a = recipe.data, recipe.augment
    mean, std = d.mean, d.std
    if train is not None and mean is None and d.normalize == "pixel":
        mean = pixel_mean(train.images, d.scale)  # (C, H, W)
    elif train is not None and mean is None and d.normalize == "channel":
        mean, std = channel_stats(train.images, d.scale)
    size = None if d.size is None else as_size(d.size)
    if size is not None and isinstance(mean, torch.Tensor) and mean.dim() == 3 and tuple(mean.shape[-2:]) != size:
        mean = torch.nn.functional.interpolate(mean[None], size=size, mode="bilinear", antialias=True,
                                               align_corners=False)[0]  # a per-pixel mean at the model's size
    # every `augment` key is the Augment argument of the same name: a new augmentation is its recipe field and its
    # code in data/augment.py, nothing here
    return Augment(**dict(a), mean=mean, std=std, scale=d.scale, size=size,
                   num_classes=None if train is None else len(train.classes))
