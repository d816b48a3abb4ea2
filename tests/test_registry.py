"""Backend discovery and selection: every bad registration gives an error naming the fix."""

from __future__ import annotations

import pytest

from sglang_fx.errors import (
    BackendLoadError,
    BackendUnavailableError,
    DuplicateBackendError,
    UnknownBackendError,
    UnsupportedConfigError,
)
from sglang_fx.registry import default_registry

# A complete plugin that delegates to the torch reference backend, under another name.
DELEGATING = """
from dataclasses import replace
from sglang_fx import hookimpl
import sglang_fx_reference_torch.plugin as ref

@hookimpl
def sglang_fx_backend_info():
    return replace(ref.sglang_fx_backend_info(), name="{name}", known_gaps={gaps})

sglang_fx_make_exchange = ref.sglang_fx_make_exchange
sglang_fx_make_kv_cache = ref.sglang_fx_make_kv_cache
sglang_fx_make_attention = ref.sglang_fx_make_attention
sglang_fx_make_runner = ref.sglang_fx_make_runner
"""

UNAVAILABLE = """
from sglang_fx import hookimpl
from sglang_fx.spi import BackendInfo

@hookimpl
def sglang_fx_backend_info():
    try:
        import framework_that_is_not_installed
    except ImportError:
        return BackendInfo("ghost", "framework_that_is_not_installed", None, None,
                           unavailable="framework_that_is_not_installed is not installed: pip install it")

@hookimpl
def sglang_fx_make_exchange(device): ...
@hookimpl
def sglang_fx_make_kv_cache(layout, k_buffers, v_buffers, device): ...
@hookimpl
def sglang_fx_make_attention(spec, layout, device): ...
@hookimpl
def sglang_fx_make_runner(spec, weights, options): ...
"""


def test_installed_backends_are_discovered():
    assert "reference_torch" in default_registry().names()
    info = default_registry().info("reference_torch")
    assert info.unavailable is None and "Qwen3ForCausalLM" in info.capabilities.architectures


def test_unknown_backend_lists_the_known_ones(fake_registry):
    reg = fake_registry({"dist-a": {"alpha": DELEGATING.format(name="alpha", gaps={})}})
    with pytest.raises(UnknownBackendError, match=r"unknown sglang-fx backend 'beta'; installed backends: alpha"):
        reg.load("beta")


def test_two_distributions_claiming_one_name(fake_registry):
    src = DELEGATING.format(name="twin", gaps={})
    reg = fake_registry({"dist-one": {"twin": src}, "dist-two": {"twin": src}})
    with pytest.raises(DuplicateBackendError, match=r"'twin' is registered by dist-one .* and dist-two .*uninstall all but one"):
        reg.load("twin")


def test_framework_not_installed_is_reported_not_raised(fake_registry):
    reg = fake_registry({"dist-ghost": {"ghost": UNAVAILABLE}})
    info = reg.info("ghost")
    assert info.unavailable.startswith("framework_that_is_not_installed is not installed")
    with pytest.raises(BackendUnavailableError, match=r"backend 'ghost' \(dist-ghost\) is unavailable: .*pip install it"):
        reg.load("ghost")


def test_info_in_a_child_process_imports_nothing_here(fake_registry):
    """Registry.info(isolated=True), as SGLang's launcher asks it: the same BackendInfo and the
    same errors as in-process, with neither the plugin nor its framework imported here."""
    import sys

    reg = fake_registry({"dist-c": {"child": DELEGATING.format(name="child", gaps={}), "ghost": UNAVAILABLE},
                         "dist-bad": {"bad": "import no_such_module_anywhere\n"}})  # fmt: skip
    info = reg.info("child", isolated=True)
    assert "dist_c_child" not in sys.modules  # the plugin module ran in the child only
    assert info == reg.info("child")
    assert reg.available_info("child", isolated=True).capabilities == info.capabilities
    with pytest.raises(BackendUnavailableError, match=r"backend 'ghost' \(dist-c\) is unavailable: .*pip install it"):
        reg.available_info("ghost", isolated=True)
    with pytest.raises(BackendLoadError, match=r"backend 'bad' \(dist-bad, .*importing the plugin failed: ModuleNotFoundError.*Reinstall dist-bad"):
        reg.info("bad", isolated=True)


def test_plugin_that_fails_to_import(fake_registry):
    reg = fake_registry({"dist-bad": {"bad": "import no_such_module_anywhere\n"}})
    with pytest.raises(BackendLoadError, match=r"backend 'bad' \(dist-bad, .*importing the plugin failed: ModuleNotFoundError.*Reinstall dist-bad"):
        reg.load("bad")


def test_plugin_missing_a_hook(fake_registry):
    src = DELEGATING.format(name="partial", gaps={}).replace("sglang_fx_make_runner = ref.sglang_fx_make_runner", "")
    reg = fake_registry({"dist-partial": {"partial": src}})
    with pytest.raises(BackendLoadError, match=r"does not implement hook\(s\) sglang_fx_make_runner"):
        reg.load("partial")


def test_plugin_with_a_misspelt_hook(fake_registry):
    src = DELEGATING.format(name="typo", gaps={}) + "\n@hookimpl\ndef sglang_fx_make_exchnage(device): ...\n"
    reg = fake_registry({"dist-typo": {"typo": src}})
    with pytest.raises(BackendLoadError, match=r"does not match the sglang-fx hookspecs.*sglang_fx_make_exchnage"):
        reg.load("typo")


def test_factory_returning_the_wrong_type(fake_registry):
    src = DELEGATING.format(name="wrong", gaps={}).replace(
        "sglang_fx_make_exchange = ref.sglang_fx_make_exchange", "@hookimpl\ndef sglang_fx_make_exchange(device):\n    return 42"
    )
    backend = fake_registry({"dist-wrong": {"wrong": src}}).load("wrong")
    with pytest.raises(BackendLoadError, match=r"hook sglang_fx_make_exchange returned int, which does not satisfy sglang_fx.spi.Exchange"):
        backend.exchange("cpu")


def test_info_must_carry_the_entry_point_name(fake_registry):
    reg = fake_registry({"dist-x": {"x": DELEGATING.format(name="not_x", gaps={})}})
    with pytest.raises(BackendLoadError, match=r"must return a BackendInfo named 'x'"):
        reg.load("x")


def test_unsupported_configuration_lists_every_problem():
    backend = default_registry().load("reference_torch")
    with pytest.raises(UnsupportedConfigError) as e:
        backend.check(architecture="GPT2LMHeadModel", device="npu", page_size=0)
    msg = str(e.value)
    assert "architecture 'GPT2LMHeadModel' is not supported; supported: DeepseekV3ForCausalLM, LlamaForCausalLM" in msg
    assert "device 'npu' is not supported; supported devices: cpu, cuda" in msg
    assert "page size must be a positive number of tokens, got 0" in msg


# ---------------------------------------------------------------------------------------------
# SPI versions
# ---------------------------------------------------------------------------------------------

VERSIONED = DELEGATING.replace('name="{name}", known_gaps={gaps})', 'name="{name}", known_gaps={{}}, spi_version="{version}")')
# Written before SPI versions existed: its BackendInfo names no spi_version.
UNVERSIONED = DELEGATING.replace('return replace(ref.sglang_fx_backend_info(), name="{name}", known_gaps={gaps})', """info = ref.sglang_fx_backend_info()
    from sglang_fx.spi import BackendInfo
    return BackendInfo("{name}", info.framework, info.framework_version, info.capabilities)""")


def test_a_backend_of_this_spi_version_loads(fake_registry):
    from sglang_fx.spi import SPI_VERSION

    reg = fake_registry({"dist-now": {"now": VERSIONED.format(name="now", version=SPI_VERSION)}})
    assert reg.load("now").info.spi_version == SPI_VERSION


def test_a_backend_of_an_older_minor_version_loads(fake_registry, monkeypatch):
    """1.0 backends (written before parallelism) run on 1.1; and any 1.x on a later 1.y. A backend
    that declares nothing was written for 1.0."""
    import sglang_fx.spi as spi

    monkeypatch.setattr(spi, "SPI_VERSION", "1.4")
    reg = fake_registry({"dist-old": {"old": VERSIONED.format(name="old", version="1.1")},
                         "dist-first": {"first": UNVERSIONED.format(name="first")}})  # fmt: skip
    assert reg.load("old").info.spi_version == "1.1"
    assert reg.info("first").spi_version == "1.0"
    assert reg.load("first").capabilities is not None


@pytest.mark.parametrize("version,fix", [("2.0", "upgrade sglang-fx"), ("1.9", "upgrade sglang-fx"),
                                         ("0.3", "install a version of the backend for SPI 1.x"), ("one", "not MAJOR.MINOR")])  # fmt: skip
def test_a_backend_of_an_incompatible_spi_version_is_refused_with_the_versions_that_match(fake_registry, version, fix):
    from sglang_fx.spi import SPI_VERSION

    reg = fake_registry({"dist-x": {"x": VERSIONED.format(name="x", version=version)}})
    with pytest.raises(BackendLoadError, match=r"backend 'x' \(dist-x\) cannot be used: ") as e:
        reg.load("x")
    assert fix in str(e.value)
    if version[0].isdigit():
        assert f"written for sglang-fx SPI {version}, and this sglang-fx has SPI {SPI_VERSION}, which runs backends written for SPI 1.0 to {SPI_VERSION}" in str(e.value)
