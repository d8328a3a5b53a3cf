"""Caffe solver files (protobuf text format) -> a danlu recipe tree, validated by `danlu.config` like any recipe.

    danlu train --solver lenet_solver.prototxt          # or: danlu train lenet_solver.prototxt
    tree, source, extra = read_solver(Path("lenet_solver.prototxt"))

A solver names the optimizer, schedule and run length; the net it points to is not read. Instead:
  - Caffe's `examples/mnist/lenet_train_test.prototxt` maps to `lenet` on `mnist` with that net's data layers
    (batch 64, test batch 100, inputs scaled by 1/256);
  - any other net needs the danlu model and data named in a comment line or on the command line:
        # danlu: model=resnet18 data=cifar10 data.batch_size=128
    (`model=X` and `data=X` are short for `model.name=X` and `data.name=X`; other items are `--set` style keys).

Precedence: defaults <- the known net's values <- solver fields <- `# danlu:` items <- `--set`.

Field mapping (Caffe -> danlu):
    base_lr -> optim.lr            momentum -> optim.momentum (Adam: betas[0]); momentum2 -> betas[1]; delta -> eps
    weight_decay -> optim.weight_decay        type / solver_type: SGD, Nesterov, Adam -> optim.name (+ nesterov)
    lr_policy, gamma, power, stepsize, stepvalue (repeated) -> schedule.policy, gamma, power, stepsize, stepvalues
    max_iter -> run.max_iter       test_iter -> run.test_iter          test_interval -> run.test_interval
    display -> run.display         snapshot -> run.snapshot_every      random_seed -> run.seed
    solver_mode GPU / CPU (+ device_id) -> devices.device cuda[:N] / cpu
    iter_size -> optim.accumulate  clip_gradients -> optim.clip_grad_norm (Caffe clips the global L2 norm too)
    snapshot_prefix: named in a note (danlu writes snapshots to the run folder's snapshots/, not there)
Other fields: a warning naming each, then ignored. Syntax errors: DanluError with the file and line.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from danlu.errors import DanluError, nearest

# The net files danlu knows: Caffe's example nets, mapped to a danlu model, data set and that net's data layers.
KNOWN_NETS = {
    "lenet_train_test.prototxt": {
        "model": {"name": "lenet"},
        # lenet_train_test.prototxt: TRAIN batch_size 64, TEST batch_size 100, transform_param scale 0.00390625
        "data": {"name": "mnist", "batch_size": 64, "test_batch_size": 100, "scale": 0.00390625, "normalize": "none"},
        "augment": "none",
        "optim": {"wd_exclude_norm_bias": False},  # the net sets no decay_mult: Caffe decays biases too
    },
}

# Solver fields danlu reads, by protobuf type: str (quoted), float, int, enum (bare word); '*' = repeated.
_FIELDS = {
    "net": "str", "train_net": "str", "base_lr": "float", "momentum": "float", "momentum2": "float",
    "delta": "float", "weight_decay": "float", "regularization_type": "str", "lr_policy": "str", "gamma": "float",
    "power": "float", "stepsize": "int", "stepvalue": "int*", "max_iter": "int", "test_iter": "int*",
    "test_interval": "int", "display": "int", "snapshot": "int", "snapshot_prefix": "str", "solver_mode": "enum",
    "device_id": "int", "type": "str", "solver_type": "enum", "iter_size": "int", "random_seed": "int",
    "clip_gradients": "float",
}
_TYPES = {"sgd": ("sgd", False), "nesterov": ("sgd", True), "adam": ("adam", False)}


@dataclass
class _Field:
    name: str
    value: Any  # str, int, float, or a list of _Field for a nested message
    kind: str  # 'str' (quoted), 'num', 'word' (bare identifier), 'msg'
    line: int
    raw: str


_TOKEN = re.compile(r"""
    (?P<space>[ \t\r]+) | (?P<newline>\n) | (?P<comment>\#[^\n]*)
  | (?P<str>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<num>[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)(?![\w.]))
  | (?P<word>[A-Za-z_][\w]*)
  | (?P<punct>[:{}])
""", re.VERBOSE)


def _tokens(text: str, where: str) -> tuple[list[tuple[str, str, int]], list[tuple[str, int]]]:
    """(kind, text, line) tokens and the `# danlu:` comment lines (text after 'danlu:', line)."""
    out, danlu_lines, line, pos = [], [], 1, 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            bad = text[pos:].split(None, 1)[0] if text[pos:].strip() else text[pos]
            raise DanluError(f"{where} line {line}: unexpected {bad!r}; expected 'field: value' "
                             f"(a number, a \"quoted string\" or a WORD) or '# comment'")
        kind, tok = m.lastgroup, m.group()
        if kind == "newline":
            line += 1
        elif kind == "comment":
            body = tok[1:].strip()
            if body.lower().startswith("danlu:"):
                danlu_lines.append((body[len("danlu:"):].strip(), line))
        elif kind != "space":
            out.append((kind, tok, line))
        pos = m.end()
    return out, danlu_lines


def _parse_fields(toks: list[tuple[str, str, int]], i: int, where: str, closing: bool) -> tuple[list[_Field], int]:
    """field := NAME ':' scalar | NAME ':'? '{' field* '}'"""
    fields: list[_Field] = []
    while i < len(toks):
        kind, tok, line = toks[i]
        if tok == "}" and kind == "punct":
            if closing:
                return fields, i + 1
            raise DanluError(f"{where} line {line}: '}}' without a matching '{{'")
        if kind != "word":
            raise DanluError(f"{where} line {line}: expected a field name, got {tok!r}")
        name = tok
        nxt = toks[i + 1] if i + 1 < len(toks) else None
        colon = nxt is not None and nxt[1] == ":"
        j = i + 2 if colon else i + 1
        val = toks[j] if j < len(toks) else None
        if val is not None and val[1] == "{":
            body, j = _parse_fields(toks, j + 1, where, closing=True)
            fields.append(_Field(name, body, "msg", line, "{...}"))
            i = j
            continue
        if not colon:
            got = f"got {nxt[1]!r}" if nxt is not None else "got the end of the file"
            raise DanluError(f"{where} line {line}: expected ':' after '{name}', {got} (write {name}: VALUE)")
        if val is None or val[0] not in ("str", "num", "word"):
            got = f"got {val[1]!r}" if val is not None else "got the end of the file"
            raise DanluError(f"{where} line {line}: expected a value after '{name}:', {got}")
        vkind, vtok, _ = val
        if vkind == "str":
            try:  # C-style escapes; backslashreplace keeps non-Latin-1 text intact through unicode_escape
                value: Any = vtok[1:-1].encode("latin-1", "backslashreplace").decode("unicode_escape")
            except UnicodeDecodeError as e:
                raise DanluError(f"{where} line {line}: {name}: bad escape in {vtok} ({e.reason})") from None
        elif vkind == "num":
            value = float(vtok) if re.search(r"[.eE]", vtok) else int(vtok)
        else:
            value = vtok
        fields.append(_Field(name, value, vkind, line, vtok))
        i = j + 1
    if closing:
        raise DanluError(f"{where}: a '{{' block is not closed by '}}' at the end of the file")
    return fields, i


def parse_solver_text(text: str, where: str = "solver") -> tuple[list[_Field], list[tuple[str, int]]]:
    """Parse protobuf text format into fields (in file order) and the `# danlu:` comment lines."""
    toks, danlu_lines = _tokens(text, where)
    try:
        fields, _ = _parse_fields(toks, 0, where, closing=False)
    except RecursionError:
        raise DanluError(f"{where}: '{{' blocks nested too deeply; expected a solver (a few levels at most)") from None
    return fields, danlu_lines


def _typed(f: _Field, want: str, where: str) -> Any:
    """Check a scalar against the field's protobuf type, as Caffe's own parser would."""
    at = f"{where} line {f.line}: {f.name}: {f.raw}"
    if f.kind == "msg":
        raise DanluError(f"{where} line {f.line}: {f.name}: expected a value, got a {{ }} block")
    if want == "str" and f.kind != "str":
        raise DanluError(f"{at}: expected a quoted string, e.g. {f.name}: \"{f.raw}\"")
    if want == "enum" and f.kind != "word":
        raise DanluError(f"{at}: expected a bare word such as GPU or CPU (no quotes)")
    if want in ("float", "int") and f.kind != "num":
        raise DanluError(f"{at}: expected a number")
    if want == "int" and not isinstance(f.value, int):
        raise DanluError(f"{at}: expected an integer")
    return float(f.value) if want == "float" else f.value


@dataclass
class Solver:
    """A solver file turned into a recipe tree: `tree` (nested dict), `source` (recipe key -> 'file line N: ...'
    for error messages), `extra` ((--set style item, where) from `# danlu:` lines, applied after the tree)."""
    tree: dict[str, Any]
    source: dict[str, str]
    extra: list[tuple[str, str]]


def read_solver(path: Union[str, Path], overrides: list[str] | None = None) -> Solver:
    """Read a Caffe solver file into a recipe tree; `overrides` (the --set items) only decide whether an unknown
    net is acceptable (it is when they name model.name and data.name)."""
    path = Path(path)
    where = str(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DanluError(f"{where}: cannot read solver file ({getattr(e, 'strerror', None) or e})") from None
    fields, danlu_lines = parse_solver_text(text, where)

    seen: dict[str, list[_Field]] = {}
    for f in fields:
        if f.name not in _FIELDS:
            warnings.warn(f"{where} line {f.line}: solver field '{f.name}' is not used by danlu; ignored"
                          f"{nearest(f.name, _FIELDS)}", stacklevel=2)
            continue
        if seen.get(f.name) and not _FIELDS[f.name].endswith("*"):
            raise DanluError(f"{where} line {f.line}: '{f.name}' is given twice (first on line "
                             f"{seen[f.name][0].line}); expected it once")
        seen.setdefault(f.name, []).append(f)
    v = {name: [_typed(f, _FIELDS[name].rstrip("*"), where) for f in fs] for name, fs in seen.items()}
    one = {name: vals[0] for name, vals in v.items()}
    line = {name: fs[0].line for name, fs in seen.items()}

    tree: dict[str, Any] = {}
    source: dict[str, str] = {}

    def put(key: str, value: Any, field: str) -> None:
        node = tree
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
        source[key] = f"{where} line {line[field]}: {field}: {seen[field][0].raw}"

    # the net: a known Caffe example sets model, data and the data layers' values
    extra = _danlu_items(danlu_lines, where)
    named = {item.split("=", 1)[0].strip() for item, _ in extra} | \
            {o.split("=", 1)[0].strip() for o in overrides or []}
    net_field = "net" if "net" in one else "train_net" if "train_net" in one else None
    net = one.get(net_field) if net_field else None
    known = KNOWN_NETS.get(Path(net).name) if net else None
    if known is not None:
        for section, value in known.items():
            tree[section] = dict(value) if isinstance(value, dict) else value
            keys = [f"{section}.{k}" for k in value] if isinstance(value, dict) else [section]
            for k in keys:
                source[k] = f"{where} line {line[net_field]}: {net_field}: {seen[net_field][0].raw}"
    elif not {"model.name", "data.name"} <= named:
        what = f" line {line[net_field]}: net {net!r} is not one danlu knows" if net else ": no net"
        raise DanluError(f"{where}{what} (it knows {', '.join(KNOWN_NETS)}); name the danlu model and data in a "
                         f"line '# danlu: model=NAME data=NAME' or with --set model.name=NAME --set data.name=NAME")

    # optimizer
    kind = one.get("type", one.get("solver_type"))
    if kind is not None:
        field = "type" if "type" in one else "solver_type"
        if kind.lower() not in _TYPES:
            raise DanluError(f"{where} line {line[field]}: {field}: {kind}: danlu does not implement this solver; "
                             f"expected SGD, Nesterov or Adam")
        name, nesterov = _TYPES[kind.lower()]
        put("optim.name", name, field)
        if nesterov:
            put("optim.nesterov", True, field)
    adam = kind is not None and kind.lower() == "adam"
    for caffe_key, key in (("base_lr", "optim.lr"), ("weight_decay", "optim.weight_decay"),
                           ("clip_gradients", "optim.clip_grad_norm"), ("delta", "optim.eps")):
        if caffe_key in one and not (caffe_key == "delta" and not adam):
            value = one[caffe_key]
            if caffe_key == "clip_gradients" and value < 0:  # Caffe's default -1: no clipping
                continue
            put(key, value, caffe_key)
    if adam and ("momentum" in one or "momentum2" in one):
        betas = [one.get("momentum", 0.9), one.get("momentum2", 0.999)]
        put("optim.betas", betas, "momentum" if "momentum" in one else "momentum2")
    elif "momentum" in one:
        put("optim.momentum", one["momentum"], "momentum")
    if one.get("regularization_type", "L2") != "L2":
        raise DanluError(f"{where} line {line['regularization_type']}: regularization_type: "
                         f"{one['regularization_type']!r}: danlu's weight_decay is L2; expected \"L2\"")
    if one.get("iter_size", 1) != 1:
        put("optim.accumulate", one["iter_size"], "iter_size")

    # schedule
    for caffe_key, key in (("lr_policy", "schedule.policy"), ("gamma", "schedule.gamma"),
                           ("power", "schedule.power"), ("stepsize", "schedule.stepsize")):
        if caffe_key in one:
            put(key, one[caffe_key], caffe_key)
    if "stepvalue" in v:
        put("schedule.stepvalues", v["stepvalue"], "stepvalue")

    # run
    if "max_iter" not in one and not named & {"run.max_iter", "run.epochs"}:
        raise DanluError(f"{where}: no max_iter; expected 'max_iter: N' (or --set run.max_iter=N or run.epochs=E)")
    if len(v.get("test_iter", [])) > 1:
        raise DanluError(f"{where} line {seen['test_iter'][1].line}: test_iter is given "
                         f"{len(v['test_iter'])} times (one per test net); danlu tests one test set, expected once")
    for caffe_key, key in (("max_iter", "run.max_iter"), ("test_iter", "run.test_iter"),
                           ("test_interval", "run.test_interval"), ("display", "run.display"),
                           ("snapshot", "run.snapshot_every")):
        if caffe_key in one:
            value = one[caffe_key]
            if caffe_key == "display" and value == 0:  # Caffe: no display; danlu: display at the end only
                if "max_iter" not in one:
                    continue
                value = one["max_iter"]
            put(key, value, caffe_key)
    if "random_seed" in one:
        if one["random_seed"] >= 0:
            put("run.seed", one["random_seed"], "random_seed")
        else:
            warnings.warn(f"{where} line {line['random_seed']}: random_seed {one['random_seed']} (Caffe: "
                          f"unseeded); danlu runs are always seeded: run.seed 0", stacklevel=2)

    # devices
    if "solver_mode" in one:
        mode = one["solver_mode"]
        if mode not in ("GPU", "CPU"):
            raise DanluError(f"{where} line {line['solver_mode']}: solver_mode: {mode}: expected GPU or CPU")
        device = "cpu" if mode == "CPU" else f"cuda:{one['device_id']}" if "device_id" in one else "cuda"
        put("devices.device", device, "solver_mode")
    if "snapshot_prefix" in one:
        warnings.warn(f"{where} line {line['snapshot_prefix']}: snapshot_prefix {one['snapshot_prefix']!r}: danlu "
                      f"writes snapshots to the run folder's snapshots/ instead", stacklevel=2)
    return Solver(tree, source, extra)


def _danlu_items(lines: list[tuple[str, int]], where: str) -> list[tuple[str, str]]:
    """'# danlu: model=lenet data=mnist data.batch_size=64' -> [('model.name=lenet', 'file line N: # danlu: ...')]"""
    items = []
    for body, line in lines:
        for word in body.split():
            key, sep, value = word.partition("=")
            if not sep or not key:
                raise DanluError(f"{where} line {line}: '# danlu:' item {word!r}: expected KEY=VALUE, "
                                 f"e.g. '# danlu: model=lenet data=mnist data.batch_size=64'")
            key = {"model": "model.name", "data": "data.name"}.get(key, key)
            items.append((f"{key}={value}", f"{where} line {line}: # danlu: {word}"))
    return items


def gpu_flag(value: str) -> tuple[str | None, str | None]:
    """Caffe's `-gpu` -> (device, gpus): `-gpu 1` trains in this process on cuda:1 (device); `-gpu all` and
    `-gpu 0,1` start one process per GPU, as `--gpus all` / `--gpus 0,1` (a single number after --gpus is a count,
    after -gpu an index, as in Caffe)."""
    spec = value.strip().lower()
    ids = [s.strip() for s in spec.split(",")]
    if spec != "all" and not all(s.isdigit() for s in ids):
        raise DanluError(f"-gpu {value}: expected a GPU number, a comma-separated list (0,1) or 'all'")
    if spec == "all" or len(ids) > 1:
        return None, spec
    return f"cuda:{ids[0]}", None
