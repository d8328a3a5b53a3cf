"""The README keeps its promises: every `danlu ...` line in its bash blocks (and in the guide's) parses with danlu's
own parser and names a verb that exists, every `--set` of a shipped recipe is a valid key and value, the lines that
run in seconds on tiny data are run, the page stays a front door (at most 200 lines of at most 120 characters), and
its links lead somewhere. The README's Python block is run by tests/test_api.py."""
from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest
import torch

from danlu.cli import _parser
from danlu.config import DEFAULT_RECIPE, list_recipes, load_recipe
from danlu.errors import DanluError

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDE = sorted((ROOT / "docs" / "guide").glob("*.md"))
PAGES = [README, *GUIDE, ROOT / "docs" / "contributing.md"]


def _blocks(text: str, lang: str = "bash") -> list[tuple[str, str]]:
    """(the heading above it, the block's text) for every fenced block of `lang`, in order."""
    out, heading = [], ""
    for m in re.finditer(r"^(#{1,6} [^\n]*)$|^```(\w*)\n(.*?)^```", text, re.M | re.S):
        if m.group(1):
            heading = m.group(1).lstrip("# ").strip()
        elif m.group(2) == lang:
            out.append((heading, m.group(3)))
    return out


def _commands(block: str) -> list[list[str]]:
    """The shell commands of a bash block as argument lists: continuation lines joined, comments dropped, `a && b`
    split in two."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            out.append(words[:cut])
            words = words[cut + 1:]
    return out


def _danlu_argv(words: list[str]) -> list[str] | None:
    """The arguments of danlu in a command: `danlu ARGS`, `python -m danlu ARGS`, `torchrun ... -m danlu ARGS`."""
    if words and words[0] == "danlu":
        return words[1:]
    for i in range(len(words) - 1):
        if words[i] == "-m" and words[i + 1] == "danlu":
            return words[i + 2:]
    return None


def _danlu_lines(text: str) -> list[tuple[str, list[str]]]:
    """(heading, danlu's argv) for every danlu command in the page's bash blocks."""
    return [(heading, argv) for heading, block in _blocks(text) for words in _commands(block)
            if (argv := _danlu_argv(words)) is not None]


def _placeholder(word: str) -> bool:
    """RECIPE, RUN, FILE.yaml: a word the reader replaces."""
    return word.split(".")[0].isupper()


def _problem(argv: list[str]) -> str | None:
    """Why `danlu ARGV` would not run as written (placeholders aside), or None: argparse's own error for an unknown
    verb or option or a missing argument; for `train` of a shipped recipe or a recipe file, the recipe's own
    one-line error for a bad `--set` key or value."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            a = _parser().parse_args(argv)
    except SystemExit:
        return err.getvalue().strip().splitlines()[-1]
    if a.command is None:
        return "no verb"
    if a.command != "train" or a.resume:
        return None
    recipe = a.solver or a.recipe or DEFAULT_RECIPE
    if _placeholder(Path(recipe).name):
        return None
    if recipe not in list_recipes():
        if not (ROOT / recipe).is_file():
            return f"recipe {recipe}: not a shipped recipe (danlu recipes) nor a file in the repository"
        recipe = str(ROOT / recipe)
    overrides = list(a.overrides)
    if a.until:
        metric, _, value = a.until.partition("=")
        overrides += [f"run.target.metric={metric}", f"run.target.value={value}"]
    try:
        load_recipe(recipe, overrides)
    except DanluError as e:
        return str(e)
    return None


def test_the_first_block_is_make_train_and_make_test_and_the_makefile_has_both():
    commands = _commands(_blocks(README.read_text())[0][1])
    assert commands == [["make", "train"], ["make", "test"]]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^train:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_danlu_line_parses_and_names_a_verb_that_exists(page):
    import warnings

    lines = _danlu_lines(page.read_text())
    assert lines or page != README
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a Caffe solver's ignored fields: warnings, not problems
        problems = [f"{heading}: danlu {shlex.join(argv)}: {why}" for heading, argv in lines
                    if (why := _problem(argv)) is not None]
    assert not problems, "\n".join(problems)


def test_the_checker_finds_what_would_not_run():
    """The check above can fail: a misspelt verb, a missing argument, an unknown option, an unknown recipe key and
    an unknown shipped recipe are each found."""
    page = """
```bash
danlu trian                                   # a misspelt verb
danlu predict runs/first                      # no image
danlu eval runs/first --top 3                 # eval has no --top
danlu train --set optim.lrr=0.1 && danlu recipes
python -m danlu train lenet_mnist5kk
danlu train RECIPE --set optim.lr=0.1         # a placeholder: parsed, not loaded
```
"""
    found = [_problem(argv) for _, argv in _danlu_lines(page)]
    assert [why is not None for why in found] == [True, True, True, True, False, True, False]
    assert "invalid choice: 'trian'" in found[0] and "did you mean 'lr'" in found[3]
    assert "lenet_mnist5kk" in found[5]


def test_the_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; at most 200 (move detail to docs/guide/)"
    long = [f"line {i}: {len(s)} characters" for i, s in enumerate(lines, 1) if len(s) > 120]
    assert not long, "README.md lines over 120 characters: " + ", ".join(long)


def test_the_extras_table_is_pyprojects():
    section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = set(re.findall(r"^([\w-]+) = \[", section, re.M))  # (tomllib is Python 3.11+; danlu runs on 3.10)
    assert {"face", "all", "test"} <= extras
    table = set(re.findall(r"^\| `\[([\w-]+)\]` \|", README.read_text(), re.M))
    assert table == extras
    pips = [w for _, block in _blocks(README.read_text()) for words in _commands(block)
            if words[:2] == ["pip", "install"] for w in words if w.startswith(".[")]
    assert pips and all(set(w[2:-1].split(",")) <= extras for w in pips), pips  # pip install -e '.[face,serve]'


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_links_lead_somewhere(page):
    """Every relative link names a file that exists and, with #anchor, a heading in it."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"\w+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            bad.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md":
            headings = re.findall(r"^#{1,6} (.*)$", re.sub(r"^```.*?^```", "", file.read_text(), flags=re.M | re.S),
                                  re.M)
            if anchor not in {_slug(h) for h in headings}:
                bad.append(f"{target}: no heading '{anchor}' in {file.name}")
    assert not bad, "\n".join(bad)


def test_the_readme_links_every_guide_page_and_each_links_back():
    readme = README.read_text()
    for page in [*GUIDE, ROOT / "docs" / "contributing.md"]:
        assert f"]({page.relative_to(ROOT)})" in readme, f"README.md does not link {page.relative_to(ROOT)}"
        first = page.read_text().split("\n\n")[1]  # the paragraph under the title: what the page covers
        assert "README.md)" in first, f"{page.name}: its first paragraph should link back to the README"


# The README lines that run in seconds on tiny data, as written plus the extra arguments that keep them short
# (heading of the block, the line as in the README, extra arguments, what its output must hold). A README line
# changed or dropped fails test_the_readme_lines_run until this table follows it.
FAST = ["--set", "run.tensorboard=false", "--device", "cpu"]
RUNS = [
    ("A tour", "danlu recipes", [], "lenet_mnist5k"),
    ("A tour", "danlu models --all", [], "tv:resnet18"),
    ("A tour", "danlu train --set run.max_iter=300 --out runs/first",
     ["--set", "run.max_iter=6", "--set", "run.display=3", *FAST], "done: test accuracy"),
    ("A tour", "danlu train --resume runs/first", [], "is finished (6 iterations"),
    ("A tour", "danlu eval runs/first", ["--device", "cpu"], "accuracy"),
    ("A tour", "danlu data sample mnist5k -o digit.png", [], "digit.png: mnist5k test image 0 of 1000"),
    ("A tour", "danlu predict runs/first digit.png --top 3", ["--device", "cpu"], "digit.png"),
    ("A tour", "danlu export runs/first --format onnx -o first.onnx", [], "onnxruntime"),
    ("A tour", "danlu train --set run.max_iter=300 --set optim.lr=0.05 --out runs/second",
     ["--set", "run.max_iter=6", "--set", "run.display=3", *FAST], "done: test accuracy"),
    ("A tour", "danlu compare runs/first runs/second -o compare.png", [], "optim.lr=0.05"),
    ("A tour", "danlu data list", [], "mnist5k"),
    ("Your own images in 10 lines", "danlu train resnet18_folder --set data.root=photos --out runs/pets",
     ["--set", "data.size=32", "--set", "data.batch_size=4", "--set", "run.max_iter=2", *FAST],
     "done: test accuracy"),
    ("Your own images in 10 lines", "danlu eval runs/pets", ["--device", "cpu"], "accuracy"),
    ("Your own images in 10 lines", "danlu predict runs/pets photos/cat/1.jpg --top 3", ["--device", "cpu"],
     "photos/cat/1.jpg"),
]


def _photos(root: Path) -> None:
    """photos/cat/1.jpg ... photos/dog/10.jpg as the README's block has them: 40x40 RGB JPEGs, MNIST zeros as cats
    and ones as dogs."""
    from PIL import Image

    from danlu.data.datasets import load_dataset

    train, _ = load_dataset("mnist5k")
    for name, digit in (("cat", 0), ("dog", 1)):
        (root / name).mkdir(parents=True)
        rows = (train.labels == digit).nonzero().flatten()[:10]
        for i, r in enumerate(rows.tolist(), 1):
            Image.fromarray(train.images[r, 0].numpy()).convert("RGB").resize((40, 40)).save(root / name / f"{i}.jpg")


def test_the_readme_lines_run(tmp_path, monkeypatch, capsys):
    """The tour and the own-images block, run in order in an empty folder (the model trained for a few steps): each
    line exits 0 and says what it did."""
    from danlu.cli import main

    readme = {(heading, shlex.join(argv)) for heading, argv in _danlu_lines(README.read_text())}
    missing = [line for heading, line, _, _ in RUNS if (heading, shlex.join(shlex.split(line)[1:])) not in readme]
    assert not missing, f"README.md no longer has these lines; update RUNS: {missing}"

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DANLU_OFFLINE", "1")
    _photos(tmp_path / "photos")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models; one thread never waits for a second core that others are using
    try:
        for heading, line, extra, expect in RUNS:
            code = main(shlex.split(line)[1:] + extra)
            out = capsys.readouterr().out
            assert code == 0, f"{line}: exit {code}\n{out}"
            assert expect in out, f"{line}: expected {expect!r} in its output:\n{out}"
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "first.onnx").is_file() and (tmp_path / "compare.png").is_file()
    assert (tmp_path / "runs" / "pets" / "model.safetensors").is_file()


def test_the_recipes_page_shows_the_default_recipe_as_shipped():
    """The recipes page's YAML is the shipped default, byte for byte (the README once showed a recipe that mixed
    three recipes and was none of them)."""
    page = (ROOT / "docs" / "guide" / "recipes.md").read_text()
    assert f"The default recipe, `{DEFAULT_RECIPE}`, as shipped:" in page
    shown = page.split("as shipped:", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    assert shown == list_recipes()[DEFAULT_RECIPE].read_text()
