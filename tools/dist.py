"""`make dist`: an sdist and a wheel for each sglang-fx distribution, in dist/.

    python tools/dist.py [--out DIR]

Each wheel is built from its sdist, as `python -m build` does, so a file missing from an sdist
fails here rather than on a user's machine. Both come from setuptools' own PEP 517 hooks
(`setuptools.build_meta.build_sdist` / `build_wheel`), run in the environment's Python without
build isolation (offline; setuptools is pinned in that environment), on a copy of the source
tree: setuptools writes `*.egg-info` next to the sources it builds, and one in the checkout
would shadow the installed entry points. Prints each file with its size.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The distributions, by source directory: sglang-fx first, then its backends.
PROJECTS = (".", "backends/reference_torch", "backends/mindspore", "backends/jax", "backends/numpy")
#: Not sources: left out of the copy that is built.
IGNORE = shutil.ignore_patterns(".git", ".venv", "dist", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".cache",
                                "out", "*.log")  # fmt: skip


def build_hook(hook: str, source: Path, out: Path) -> Path:
    """Run setuptools.build_meta.<hook>(out) in `source`, in a fresh Python (setuptools keeps
    global state); returns the file it wrote."""
    code = f"import sys, setuptools.build_meta as b; print(b.{hook}(sys.argv[1]))"
    run = subprocess.run([sys.executable, "-c", code, str(out)], cwd=source, capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        raise RuntimeError(f"{hook} failed in {source}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return out / run.stdout.strip().splitlines()[-1]


def build(out: Path) -> list[Path]:
    """Build every distribution into `out` (created if missing); returns the files, sdist then
    wheel for each project."""
    out.mkdir(parents=True, exist_ok=True)
    built = []
    with tempfile.TemporaryDirectory(prefix="sglang-fx-dist-") as tmp:
        tree = Path(tmp) / "src"
        shutil.copytree(ROOT, tree, symlinks=True, ignore=IGNORE)
        for project in PROJECTS:
            sdist = build_hook("build_sdist", tree / project, out)
            with tarfile.open(sdist) as tar:
                tar.extractall(Path(tmp) / "sdists", filter="data")
            unpacked = Path(tmp) / "sdists" / sdist.name.removesuffix(".tar.gz")
            built += [sdist, build_hook("build_wheel", unpacked, out)]
    return built


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "dist"), help="where to write the files (default: dist/)")
    args = p.parse_args()
    for f in build(Path(args.out).resolve()):
        print(f"{f.stat().st_size / 1024:8.1f} KiB  {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
