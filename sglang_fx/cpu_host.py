"""Compatibility shim for CPU-only hosts: the one place sglang-fx works around packages whose
PyPI builds assume CUDA. It edits no installed file.

`sglang-fx setup-cpu-host` writes a one-line `sglang_fx_cpu_host.pth` into the environment's
site-packages, so that `install()` runs at interpreter start-up in every process (SGLang's
launcher and its scheduler subprocesses import these packages before any plugin of ours loads).
`install()` only adds an import hook: it imports nothing heavy, and each fix below is applied
when, and only when, the affected package is first imported on a host that needs it.

Fixes:
- torchvision: PyPI's only Linux wheel is a CUDA build whose `_C.so` cannot load against the
  CPU torch; its `_meta_registrations` then calls `register_fake("torchvision::nms")` and
  `("torchvision::qnms")` unguarded, which raises because those operators were never defined,
  so `import torchvision` (and thus transformers and SGLang) crashes. We define the two operator
  schemas first (no kernel: calling nms/qnms raises torch's "no kernel" error, as it would
  without the extension). Applied only when torch is a CPU build and torchvision a CUDA one.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

PTH_NAME = "sglang_fx_cpu_host.pth"
PTH_LINE = "import sglang_fx.cpu_host as m; m.install()\n"

_TORCHVISION_OPS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_libraries: list = []  # keeps the torch.library.Library objects (and their definitions) alive


def _torchvision_is_cuda_build() -> bool:
    spec = importlib.machinery.PathFinder.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    version = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    return version.is_file() and "+cu" in version.read_text()


def fix_torchvision() -> bool:
    """Define the torchvision operators a CUDA torchvision needs on a CPU torch. Returns True
    when it did (the fix was needed)."""
    import torch

    if torch.version.cuda is not None or not _torchvision_is_cuda_build() or _libraries:
        return False
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _TORCHVISION_OPS:
        lib.define(schema)
    _libraries.append(lib)
    return True


class _ImportHook(importlib.abc.MetaPathFinder):
    """Runs a package's fix just before its first import, then steps aside."""

    fixes = {"torchvision": fix_torchvision}

    def find_spec(self, name, path=None, target=None):
        fix = self.fixes.pop(name, None)
        if fix is not None:
            fix()
        if not self.fixes and self in sys.meta_path:
            sys.meta_path.remove(self)
        return None  # the normal finders import the package itself


def install() -> None:
    """Put the import hook in place (idempotent). Called from the .pth file."""
    if not any(isinstance(f, _ImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _ImportHook())


def write_pth(site_packages: str | Path | None = None) -> Path:
    """Write the .pth file that calls install() at start-up; returns its path."""
    import sysconfig

    target = Path(site_packages or sysconfig.get_paths()["purelib"]) / PTH_NAME
    target.write_text(PTH_LINE)
    return target
