"""The wds package: one module per stage of the stream (urls, samples, shards, sets, loader, prepare), and a package
that imports none of them until a name is asked for, so that importing one stage loads no other. The stages' own
tests: test_wds_urls, test_wds_samples, test_wds_shards, test_wds_sets, test_wds_loader, test_wds_prepare (and
test_wds_train: training from shards through the CLI)."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

STAGES = ("urls", "samples", "shards", "sets", "loader", "prepare")


def _loaded_after(statement: str) -> list[str]:
    """The stages of danlu.data.wds a fresh interpreter has loaded after running `statement`."""
    code = (f"import sys; {statement}; import json; "
            f"print(json.dumps(sorted(m.rsplit('.', 1)[1] for m in sys.modules if m.startswith('danlu.data.wds.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)


def test_importing_the_package_or_one_stage_loads_only_what_that_stage_needs():
    got = {s: _loaded_after(f"import danlu.data.wds.{s}") for s in ("urls", "samples", "shards")}
    assert _loaded_after("import danlu.data.wds") == []
    assert got == {"urls": ["urls"], "samples": ["samples", "urls"], "shards": ["samples", "shards", "urls"]}
    assert _loaded_after("from danlu.data.wds import open_stream") == ["urls"]  # a re-export loads its own stage


def test_every_name_the_package_offers_is_its_stages_own():
    import danlu.data.wds as wds

    for name in wds.__all__:
        obj = getattr(wds, name)
        owner = importlib.import_module(f"danlu.data.wds.{wds._LAZY[name]}")
        assert getattr(owner, name) is obj, name
    assert set(wds._LAZY.values()) == set(STAGES)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        wds.nope  # noqa: B018
