"""Backend discovery and selection over the `sglang_fx.backends` entry-point group.

Each entry point names a plugin module implementing the hooks in `hookspecs`. Listing reads
entry-point metadata only; `load(name)` imports one plugin, validates it against the hookspecs
(pluggy's checks plus "every hook implemented") and returns a `Backend`, whose factories check
the Protocol of what they return. Every failure raises an error naming the backend, the
distribution, the hook and the fix.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pluggy
import torch

from . import hookspecs
from .capabilities import Capabilities
from .checkpoint import ModelSpec
from .errors import (
    BackendLoadError,
    SglangFxError,
    BackendUnavailableError,
    DuplicateBackendError,
    UnknownBackendError,
    UnsupportedConfigError,
)
from .kv_pool import KVLayout
from .spi import Attention, AttentionSpec, BackendInfo, Exchange, KVCache, ModelRunner, RunnerOptions, spi_problem

GROUP = "sglang_fx.backends"
REQUIRED_HOOKS = tuple(n for n in vars(hookspecs) if n.startswith("sglang_fx_"))


@dataclass(frozen=True)
class BackendEntry:
    """One registration: backend name, the distribution that declares it, and its target."""

    name: str
    distribution: str
    target: str


class Backend:
    """A loaded backend. Factories are called once per model load, not per step."""

    def __init__(self, entry: BackendEntry, pm: pluggy.PluginManager, info: BackendInfo):
        self.entry, self._pm, self.info = entry, pm, info

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def capabilities(self) -> Capabilities:
        assert self.info.capabilities is not None  # load() refuses unavailable backends
        return self.info.capabilities

    def check(self, **config: Any) -> None:
        """Raise UnsupportedConfigError listing every problem with running `config`
        (keywords of Capabilities.validate) on this backend."""
        problems = self.capabilities.validate(**config)
        if problems:
            raise UnsupportedConfigError(f"backend {self.name!r} cannot run this: " + "; ".join(problems))

    def _make(self, hook: str, protocol: type, **kwargs: Any) -> Any:
        obj = getattr(self._pm.hook, hook)(**kwargs)
        if not isinstance(obj, protocol):
            raise BackendLoadError(
                f"backend {self.name!r} ({self.entry.distribution}): hook {hook} returned "
                f"{type(obj).__name__}, which does not satisfy sglang_fx.spi.{protocol.__name__}; "
                "fix the backend's hook implementation"
            )
        return obj

    def exchange(self, device: str) -> Exchange:
        return self._make("sglang_fx_make_exchange", Exchange, device=device)

    def kv_cache(
        self, layout: KVLayout, k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor] | None, device: str
    ) -> KVCache:
        self.check(device=device, page_size=layout.page_size)
        return self._make("sglang_fx_make_kv_cache", KVCache, layout=layout, k_buffers=k_buffers, v_buffers=v_buffers, device=device)

    def attention(self, spec: AttentionSpec, layout: KVLayout, device: str) -> Attention:
        return self._make("sglang_fx_make_attention", Attention, spec=spec, layout=layout, device=device)

    def runner(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor], options: RunnerOptions) -> ModelRunner:
        p = options.parallel
        self.check(architecture=spec.architecture, dtype=spec.dtype_name, device=options.device, tp_size=p.tp_size, ep_size=p.ep_size,
                   quantization=spec.quant.scheme if spec.quant else None)  # fmt: skip
        return self._make("sglang_fx_make_runner", ModelRunner, spec=spec, weights=weights, options=options)


class Registry:
    """The backends registered by installed distributions (or by `entry_points`, for tests)."""

    def __init__(self, entry_points: Iterable[md.EntryPoint] | None = None):
        eps = md.entry_points(group=GROUP) if entry_points is None else entry_points
        self._entries: dict[str, list[tuple[BackendEntry, md.EntryPoint]]] = {}
        seen = set()
        for ep in eps:
            dist = ep.dist.name if ep.dist is not None else "<unknown distribution>"
            key = (ep.name, dist, ep.value)
            if key in seen:  # the same distribution seen twice on sys.path
                continue
            seen.add(key)
            self._entries.setdefault(ep.name, []).append((BackendEntry(ep.name, dist, ep.value), ep))
        self._loaded: dict[str, Backend] = {}

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self, name: str) -> list[BackendEntry]:
        """Every registration of `name` (more than one is a conflict)."""
        return [e for e, _ in self._entries.get(name, [])]

    def _entry_point(self, name: str) -> tuple[BackendEntry, md.EntryPoint]:
        if name not in self._entries:
            known = ", ".join(self.names()) or "none"
            raise UnknownBackendError(
                f"unknown sglang-fx backend {name!r}; installed backends: {known}. Install the "
                f"distribution that provides it (an entry point named {name!r} in group {GROUP!r})."
            )
        regs = self._entries[name]
        if len(regs) > 1:
            dists = " and ".join(f"{e.distribution} ({e.target})" for e, _ in regs)
            raise DuplicateBackendError(
                f"backend name {name!r} is registered by {dists}; uninstall all but one of them"
            )
        return regs[0]

    def _plugin_manager(self, name: str) -> tuple[BackendEntry, pluggy.PluginManager]:
        entry, ep = self._entry_point(name)
        return entry, self._manager(entry, ep)

    @staticmethod
    def _manager(entry: BackendEntry, ep: md.EntryPoint) -> pluggy.PluginManager:
        name = entry.name
        where = f"backend {name!r} ({entry.distribution}, entry point {entry.target})"
        try:
            plugin = ep.load()
        except Exception as e:
            raise BackendLoadError(f"{where}: importing the plugin failed: {type(e).__name__}: {e}. Reinstall {entry.distribution}.") from e
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        try:
            pm.register(plugin, name=name)
            pm.check_pending()
        except pluggy.PluginValidationError as e:
            raise BackendLoadError(f"{where}: does not match the sglang-fx hookspecs: {e}") from e
        missing = [h for h in REQUIRED_HOOKS if not getattr(pm.hook, h).get_hookimpls()]
        if missing:
            raise BackendLoadError(f"{where}: does not implement hook(s) {', '.join(missing)}; every hook in sglang_fx.hookspecs is required")
        return pm

    def info(self, name: str, *, isolated: bool = False) -> BackendInfo:
        """The backend's self-description (its `sglang_fx_backend_info`, which imports its
        framework to tell whether it is available). isolated: computed in a child process of
        this interpreter, with this process's sys.path, so that this process imports neither the
        plugin nor its framework (SGLang's HTTP launcher checks a backend this way: importing
        MindSpore there would add about 330 MB to a process that never runs the model). Raises
        the same errors either way."""
        if name in self._loaded:
            return self._loaded[name].info
        if isolated:
            entry, ep = self._entry_point(name)
            return _info_in_child(entry, ep)
        entry, pm = self._plugin_manager(name)
        return self._info(entry, pm)

    def available_info(self, name: str, *, isolated: bool = False) -> BackendInfo:
        """`info(name)`, raising BackendUnavailableError (naming the reason) if the backend
        cannot run here."""
        info = self.info(name, isolated=isolated)
        if info.unavailable is not None:
            entry = self.entries(name)[0]
            raise BackendUnavailableError(f"backend {name!r} ({entry.distribution}) is unavailable: {info.unavailable}")
        return info

    @staticmethod
    def _info(entry: BackendEntry, pm: pluggy.PluginManager) -> BackendInfo:
        try:
            info = pm.hook.sglang_fx_backend_info()
        except Exception as e:
            raise BackendLoadError(f"backend {entry.name!r} ({entry.distribution}): sglang_fx_backend_info raised {type(e).__name__}: {e}; it must report problems in BackendInfo.unavailable instead") from e
        if not isinstance(info, BackendInfo) or info.name != entry.name:
            raise BackendLoadError(
                f"backend {entry.name!r} ({entry.distribution}): sglang_fx_backend_info must return a "
                f"BackendInfo named {entry.name!r}, got {info!r}"
            )
        problem = spi_problem(info.spi_version)
        if problem is not None:
            raise BackendLoadError(f"backend {entry.name!r} ({entry.distribution}) cannot be used: {problem}")
        if info.unavailable is None and info.capabilities is None:
            raise BackendLoadError(f"backend {entry.name!r} ({entry.distribution}): an available backend must declare its capabilities")
        return info

    def load(self, name: str) -> Backend:
        """Import, validate and return the backend; BackendUnavailableError if it cannot run here."""
        if name not in self._loaded:
            info = self.available_info(name)
            entry, pm = self._plugin_manager(name)
            self._loaded[name] = Backend(entry, pm, info)
        return self._loaded[name]


_default: Registry | None = None


def default_registry() -> Registry:
    """The process-wide registry over installed distributions (built on first use)."""
    global _default
    if _default is None:
        _default = Registry()
    return _default


def load_backend(name: str) -> Backend:
    return default_registry().load(name)


# --------------------------------------------------------------------------------------------
# Backend info in a child process (Registry.info(isolated=True))
# --------------------------------------------------------------------------------------------

INFO_TIMEOUT = 300.0  # s: importing a framework on a loaded 2-core machine can take a minute


def _info_in_child(entry: BackendEntry, ep: md.EntryPoint) -> BackendInfo:
    """Run `_info_main` for one entry point in `sys.executable`, sys.path passed on; returns its
    BackendInfo or raises the SglangFxError it raised (both pickled into a file, since a
    framework may print to stdout while it imports)."""
    with tempfile.TemporaryDirectory(prefix="sglang-fx-info-") as tmp:
        out = os.path.join(tmp, "info.pickle")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        cmd = [sys.executable, "-m", __name__, out, entry.name, ep.value, entry.distribution]
        try:
            run = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                 timeout=INFO_TIMEOUT)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise BackendLoadError(
                f"backend {entry.name!r} ({entry.distribution}): sglang_fx_backend_info did not return within "
                f"{INFO_TIMEOUT:.0f} s in a child process; check that its framework imports (python -c 'import ...')"
            ) from None
        if run.returncode != 0 or not os.path.exists(out):
            tail = (run.stderr or run.stdout or "").strip()[-2000:]
            raise BackendLoadError(
                f"backend {entry.name!r} ({entry.distribution}): the child process asking for its info exited with "
                f"{run.returncode}: {tail}. Reinstall {entry.distribution} and its framework."
            )
        with open(out, "rb") as f:
            kind, value = pickle.load(f)
    if kind == "error":
        raise value
    return value


def _info_main(argv: list[str]) -> int:
    """`python -m sglang_fx.registry OUT NAME TARGET DISTRIBUTION`: pickles ("info", BackendInfo)
    or ("error", SglangFxError) of that entry point into OUT."""
    out, name, target, dist = argv
    entry = BackendEntry(name, dist, target)
    try:
        result: tuple[str, object] = ("info", Registry._info(entry, Registry._manager(entry, md.EntryPoint(name, target, GROUP))))
    except SglangFxError as e:
        result = ("error", e)
    with open(out, "wb") as f:
        pickle.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(_info_main(sys.argv[1:]))
