"""System libraries that a pip-installed package needs but no wheel provides, installed into the
environment without root: pinned Debian packages, checked by SHA-256, unpacked under
`<env>/sglang-fx-system-libs/`, and preloaded into the processes that need them.

Mooncake's transfer engine (`mooncake-transfer-engine-non-cuda`, SGLang's PD transfer backend)
links `libibverbs.so.1`, and its loader needs it even for the TCP transport; the library is
Debian's `libibverbs1` (with its dependencies `libnl-3-200` and `libnl-route-3-200`), not on
PyPI. `sglang-fx install-system-libs` (run by `make setup`) fetches the three packages with
`apt-get download` by name and version, through the machine's own apt sources (needing no root:
without package lists it reads them into a private directory), checks each file's SHA-256
against the table below, and unpacks it with `dpkg-deb -x`. `preload()` then loads them with
RTLD_GLOBAL before `mooncake` is imported (sglang_fx/cpu_host.py's import hook does it, in every
process that imports the engine and only there), unless the system already has the library.
"""

from __future__ import annotations

import ctypes
import hashlib
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

DIR_NAME = "sglang-fx-system-libs"


class DebPackage(NamedTuple):
    name: str
    version: str
    sha256: str  # of the .deb file
    library: str  # the shared library it provides, relative to the unpack root


#: Debian 12 (bookworm), amd64. In load order (each needs the ones before it).
PACKAGES = (
    DebPackage("libnl-3-200", "3.7.0-0.2+b1", "d1fc3e9eb8e79b4c96b0a64c3d8c9e068ae2f665cab71bd19f417ffd0453a890",
               "lib/x86_64-linux-gnu/libnl-3.so.200"),  # fmt: skip
    DebPackage("libnl-route-3-200", "3.7.0-0.2+b1", "0fdcc425ae2982788c085c76a7cb0eda3e3db99d41bd1ce56082ee18e9f1e21f",
               "usr/lib/x86_64-linux-gnu/libnl-route-3.so.200"),  # fmt: skip
    DebPackage("libibverbs1", "44.0-2", "35054815259fee46173240254246d03b673a5cd5c528aaac96fd15ac428a8d59",
               "usr/lib/x86_64-linux-gnu/libibverbs.so.1"),  # fmt: skip
)
SONAME = "libibverbs.so.1"

_loaded: list[ctypes.CDLL] = []


class SystemLibraryError(RuntimeError):
    pass


def root(prefix: str | Path | None = None) -> Path:
    """Where the packages are unpacked: under the environment (sys.prefix)."""
    return Path(prefix or sys.prefix) / DIR_NAME


def missing(prefix: str | Path | None = None) -> list[str]:
    """The pinned libraries not unpacked yet (relative paths)."""
    base = root(prefix)
    return [p.library for p in PACKAGES if not (base / p.library).exists()]


def install(prefix: str | Path | None = None) -> Path:
    """Fetch, check and unpack the pinned packages (idempotent: nothing to do when all libraries
    are there). Returns the unpack root. Raises SystemLibraryError naming what failed."""
    base = root(prefix)
    if not missing(prefix):
        return base
    if platform.machine() != "x86_64":
        raise SystemLibraryError(f"the pinned packages are for x86_64, this machine is {platform.machine()}: "
                                 f"install {SONAME} with the system's package manager (libibverbs1 on Debian)")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="sglang-fx-debs-") as tmp:
        debs = _download(Path(tmp))
        for pkg, deb in zip(PACKAGES, debs):
            digest = hashlib.sha256(deb.read_bytes()).hexdigest()
            if digest != pkg.sha256:
                raise SystemLibraryError(f"{deb.name}: SHA-256 {digest}, expected {pkg.sha256} (pinned in "
                                         "sglang_fx/system_libs.py); the package source serves another file")  # fmt: skip
        base.mkdir(parents=True, exist_ok=True)
        for deb in debs:
            _run(["dpkg-deb", "-x", str(deb), str(base)], f"unpacking {deb.name}")
    if missing(prefix):
        raise SystemLibraryError(f"unpacked the packages into {base} but {', '.join(missing(prefix))} is missing")
    return base


def _download(into: Path) -> list[Path]:
    """`apt-get download NAME=VERSION ...` into `into`; without package lists (a fresh machine,
    no root for `apt-get update`), the lists are read into a private directory first."""
    specs = [f"{p.name}={p.version}" for p in PACKAGES]
    try:
        _run(["apt-get", "download", *specs], "apt-get download", cwd=into)
    except SystemLibraryError:
        state = into / "apt-state"
        (state / "lists" / "partial").mkdir(parents=True)
        (state / "cache" / "archives" / "partial").mkdir(parents=True)
        opts = ["-o", f"Dir::State::Lists={state / 'lists'}", "-o", f"Dir::Cache={state / 'cache'}",
                "-o", "Debug::NoLocking=1"]  # fmt: skip
        _run(["apt-get", *opts, "update"], "apt-get update (private lists)", cwd=into)
        _run(["apt-get", *opts, "download", *specs], "apt-get download", cwd=into)
    found = []
    for p in PACKAGES:
        debs = sorted(into.glob(f"{p.name}_*.deb"))
        if not debs:
            raise SystemLibraryError(f"apt-get download left no {p.name} package in {into}")
        found.append(debs[0])
    return found


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise SystemLibraryError(f"{what}: {e.filename} not found (a Debian-based system is needed, or install "
                                 f"{SONAME} with the system's package manager)") from None  # fmt: skip
    if r.returncode != 0:
        raise SystemLibraryError(f"{what} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-2000:]}")


def system_has_library() -> bool:
    try:
        ctypes.CDLL(SONAME)
        return True
    except OSError:
        return False


def preload(prefix: str | Path | None = None) -> str:
    """Make `libibverbs.so.1` resolvable for libraries loaded afterwards in this process: the
    system's when it has one, else the unpacked packages, loaded with RTLD_GLOBAL (the dynamic
    loader then matches the engine's DT_NEEDED entry by soname). Returns where it came from.
    Raises ImportError with the fix when neither has it."""
    if _loaded or system_has_library():
        return "system" if not _loaded else str(root(prefix))
    base = root(prefix)
    if missing(prefix):
        raise ImportError(f"{SONAME} is needed by Mooncake's transfer engine (SGLang's PD transfer backend) and is "
                          f"neither installed on the system nor unpacked in {base}: run `sglang-fx install-system-libs` "
                          "(`make setup` does), or install Debian's libibverbs1")  # fmt: skip
    for p in PACKAGES:
        _loaded.append(ctypes.CDLL(str(base / p.library), mode=ctypes.RTLD_GLOBAL))
    return str(base)
