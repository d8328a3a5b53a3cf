"""The README's Python example: your own nn.Module on your own tensors."""
import torch
from torch import nn

import danlu


def test_readme_example_trains_a_users_module_on_users_tensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (600,), generator=g)
    images = (labels.view(-1, 1, 1, 1) * 80 + torch.randint(0, 40, (600, 3, 16, 16), generator=g)).to(torch.uint8)
    train = danlu.ImageSet(images[:500], labels[:500], ["red", "green", "blue"])
    test = danlu.ImageSet(images[500:], labels[500:], ["red", "green", "blue"])

    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 32), nn.ReLU(), nn.Linear(32, 3))
    result = danlu.train({"run": {"epochs": 10}, "data": {"batch_size": 32}}, model=model, train_data=train,
                         test_data=test, out=tmp_path / "mine", quiet=True)

    assert result.test_accuracy > 0.9
    assert (result.run_dir / "model.safetensors").is_file() and (result.run_dir / "curves.png").is_file()
    assert result.model is model


def test_importing_danlu_starts_nothing():
    import subprocess
    import sys

    code = "import sys, danlu; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## Python API.*?```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("builtins.print", lambda *a, **k: None)
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["result"].test_accuracy > 0.9
    assert (tmp_path / "runs" / "mine" / "summary.json").is_file()
