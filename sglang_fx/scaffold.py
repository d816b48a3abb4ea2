"""`sglang-fx new-backend NAME [--out DIR]`: a new backend distribution, copied from the NumPy
backend (`backends/numpy/sglang_fx_numpy`, which the sglang-fx distribution carries as
`sglang_fx.backend_template`, so nothing but sglang-fx need be installed), that passes the
conformance suite before its author changes a line. The author then replaces NumPy piece by
piece (docs/writing-a-backend.md), keeping `sglang-fx conformance --backend NAME` green.

What it writes under DIR (default ./sglang-fx-NAME):
    pyproject.toml          the distribution sglang-fx-NAME, entry point NAME in sglang_fx.backends
    README.md               the commands to install, check and serve it
    sglang_fx_NAME/         the NumPy backend's modules, renamed (NAME = "NAME" in plugin.py)
    tests/test_conformance.py   the conformance suite through sglang-fx's pytest plugin
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path

from .errors import SglangFxError

TEMPLATE = "sglang_fx_numpy"  # the package copied (its name is replaced in every file)
#: Where its modules lie: sglang_fx/backend_template, in the wheel a copy, in the source tree a
#: symlink to backends/numpy/sglang_fx_numpy.
TEMPLATE_DIR = Path(__file__).resolve().parent / "backend_template"
TEMPLATE_NAME = "numpy"  # its backend name

#: SGLang 0.5.23's own --model-impl values (srt/configs/model_config.py::ModelImpl): a backend
#: of one of these names would never be reached through --model-impl. Kept equal to SGLang's
#: by a test.
SGLANG_IMPLS = frozenset({"auto", "sglang", "transformers", "mindspore"})


class ScaffoldError(SglangFxError, ValueError):
    """The name or the output directory cannot be used. The message names the fix."""


def check_name(name: str) -> None:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or keyword.iskeyword(name):
        raise ScaffoldError(f"backend name {name!r} must be a lower-case Python identifier (letters, digits, _), "
                            "since it names the package sglang_fx_<name>; e.g. 'mybackend'")  # fmt: skip
    if name in SGLANG_IMPLS:
        raise ScaffoldError(f"{name!r} is one of SGLang's own --model-impl values ({', '.join(sorted(SGLANG_IMPLS))}); "
                            "choose another name")  # fmt: skip
    from .registry import default_registry

    if name in default_registry().names():
        dists = ", ".join(e.distribution for e in default_registry().entries(name))
        raise ScaffoldError(f"a backend named {name!r} is already installed ({dists}); choose another name")


def new_backend(name: str, out: str | Path | None = None) -> Path:
    """Write the new distribution; returns its directory. Raises ScaffoldError for a bad name,
    an existing output directory, or a missing template."""
    check_name(name)
    out = Path(out) if out is not None else Path.cwd() / f"sglang-fx-{name.replace('_', '-')}"
    if out.exists():
        raise ScaffoldError(f"{out} already exists; pass --out with a new directory (nothing was written)")
    template = TEMPLATE_DIR
    if not (template / "plugin.py").is_file():
        raise ScaffoldError(f"the backend template is missing from this sglang-fx installation ({template}): reinstall "
                            "sglang-fx (pip install --force-reinstall --no-deps sglang-fx), then run this again")  # fmt: skip
    package = f"sglang_fx_{name}"
    (out / package).mkdir(parents=True)
    for src in sorted(template.glob("*.py")):
        text = src.read_text().replace(TEMPLATE, package)
        if src.name == "plugin.py":
            text = text.replace(f'NAME = "{TEMPLATE_NAME}"', f'NAME = "{name}"')
        (out / package / src.name).write_text(text)
    dist = f"sglang-fx-{name.replace('_', '-')}"
    (out / "pyproject.toml").write_text(PYPROJECT.format(dist=dist, name=name, package=package, sglang_fx=requirement(),
                                                         sglang_fx_conformance=requirement("conformance")))  # fmt: skip
    (out / "README.md").write_text(README.format(dist=dist, name=name, package=package))
    (out / "tests").mkdir()
    (out / "tests" / "test_conformance.py").write_text(TEST.format(name=name))
    return out


def requirement(extra: str | None = None) -> str:
    """The scaffold's requirement on sglang-fx: from this version up to below its next minor, the
    rule of every sglang-fx distribution's pins (pyproject.toml), with `extra` if given."""
    from . import __version__

    major, minor = (int(p) for p in __version__.split(".")[:2])
    return f"sglang-fx{f'[{extra}]' if extra else ''}>={__version__},<{major}.{minor + 1}"


PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"
description = "sglang-fx backend {name}"
requires-python = ">=3.10"
dependencies = ["{sglang_fx}", "numpy"]

[project.optional-dependencies]
# pytest tests/: the conformance suite, its ground truth (transformers, the reference backend)
test = ["{sglang_fx_conformance}"]

[project.entry-points."sglang_fx.backends"]
{name} = "{package}.plugin"

[tool.setuptools]
packages = ["{package}"]

[tool.pytest.ini_options]
addopts = "--fx-backend {name}"
"""

README = """\
# {dist}

An sglang-fx backend named `{name}`, started from the NumPy template (`sglang-fx new-backend`).
It passes the conformance suite as written; replace NumPy piece by piece, following the guide
(docs/writing-a-backend.md in the sglang-fx repository; its worked example,
examples/backend-patches/own-attention.patch, replaces this template's attention), and keep it
passing.

```sh
pip install -e '.[test]'                           # registers the entry point `{name}`; [test]: what pytest needs
sglang-fx conformance --backend {name}             # every case, with what it checks
sglang-fx conformance --backend {name} --list      # the cases and the contract each tests
pytest tests/                                      # the same cases through pytest
python -m sglang_fx.sglang.launch_server --model-path M --model-impl {name} \\
    --device cpu --attention-backend torch_native --dtype float32 --disable-cuda-graph   # SGLang's server, CPU
```

| file | what |
|---|---|
| `{package}/plugin.py` | the five hooks, the capabilities you declare, the SPI version you wrote for |
| `{package}/exchange.py` | torch <-> your arrays, zero-copy |
| `{package}/kv_cache.py` | the host's KV buffers as your arrays; writes in place |
| `{package}/attention.py` | paged attention |
| `{package}/layers.py`, `decoder.py`, `llama.py`, `deepseek_v3.py` | the models |
"""

TEST = '''\
"""The sglang-fx conformance suite against the `{name}` backend (sglang-fx's pytest plugin runs
every case; pyproject.toml's addopts selects the backend)."""

from sglang_fx.conformance.test_conformance import test_conformance  # noqa: F401
'''
