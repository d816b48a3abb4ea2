"""PD disaggregation's start-up decisions (sglang_fx/sglang/pd.py) and the system libraries of
its transfer engine (sglang_fx/system_libs.py), without starting SGLang."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sglang_fx import system_libs
from sglang_fx.sglang import compat, pd, plugin


def view(**kw):
    base = dict(device="cpu", host="127.0.0.1", disaggregation_mode="prefill", disaggregation_transfer_backend="mooncake",
                disaggregation_decode_retraction_backup=None, disable_overlap_schedule=False, speculative_algorithm=None,
                model_impl="sglang")  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


def test_prefill_on_a_cpu_host_gets_the_plain_send_path_no_overlap_a_host_address_and_tcp():
    p = pd.plan(view(), raw={}, environ={}, rdma=False)
    assert p.env == {"SGLANG_DISAGGREGATION_ALL_CP_RANKS_TRANSFER": "1", "SGLANG_HOST_IP": "127.0.0.1", "MC_FORCE_TCP": "1"}
    assert p.fields == {"disable_overlap_schedule": True}
    assert len(p.notes) == 4 and any("no RDMA device" in n for n in p.notes)


def test_decode_on_a_cpu_host_backs_retraction_up_in_cpu_tensors_unless_the_user_chose():
    p = pd.plan(view(disaggregation_mode="decode"), raw={}, environ={}, rdma=False)
    assert p.fields == {"disaggregation_decode_retraction_backup": "cpu_tensor"}
    assert "SGLANG_DISAGGREGATION_ALL_CP_RANKS_TRANSFER" not in p.env  # a prefill-side setting
    chosen = view(disaggregation_mode="decode", disaggregation_decode_retraction_backup="none")
    assert pd.plan(chosen, raw={"disaggregation_decode_retraction_backup": "none"}, environ={}, rdma=False).fields == {}


def test_the_users_environment_and_flags_win():
    env = {"SGLANG_DISAGGREGATION_ALL_CP_RANKS_TRANSFER": "0", "HOST_IP": "10.1.2.3", "MC_FORCE_TCP": "0"}
    p = pd.plan(view(disable_overlap_schedule=True), raw={}, environ=env, rdma=False)
    assert p.env == {} and p.fields == {}
    assert p.notes == ["SGLANG_DISAGGREGATION_ALL_CP_RANKS_TRANSFER=0 kept as set: sending KV will fail on CPU "
                       "(pin_memory / torch.cuda.Event)"]  # fmt: skip
    # IB devices named: the user wants RDMA; an RDMA device present: Mooncake picks it itself.
    assert "MC_FORCE_TCP" not in pd.plan(view(), raw={"disaggregation_ib_device": "mlx5_0"}, environ={}, rdma=False).env
    assert "MC_FORCE_TCP" not in pd.plan(view(), raw={}, environ={}, rdma=True).env
    # A server listening beyond loopback is reached from other hosts: SGLang's NIC detection decides.
    assert "SGLANG_HOST_IP" not in pd.plan(view(host="0.0.0.0"), raw={}, environ={}, rdma=False).env


def test_nothing_changes_off_cpu_or_outside_pd_mode():
    assert pd.plan(view(device="cuda"), raw={}, environ={}, rdma=False) == pd.Plan()
    assert pd.plan(view(disaggregation_mode="null"), raw={}, environ={}, rdma=False) == pd.Plan()


def test_sglang_fx_servers_run_the_plain_scheduler_loop_on_cpu_only():
    plain = view(disaggregation_mode="null")
    assert plugin.synchronous_schedule(plain)
    assert not plugin.synchronous_schedule(view(disaggregation_mode="null", device="cuda"))
    assert not plugin.synchronous_schedule(view(disaggregation_mode="null", speculative_algorithm="NGRAM"))
    assert not plugin.synchronous_schedule(view())  # PD: pd.configure decides
    assert not plugin.synchronous_schedule(view(disaggregation_mode="null", disable_overlap_schedule=True))  # already


def test_what_cannot_run_is_named():
    assert pd.problems(view(), sglang_fx_backend=True) == []
    (nixl,) = pd.problems(view(disaggregation_transfer_backend="nixl"), sglang_fx_backend=False)
    assert "nixl registers the KV cache as GPU memory" in nixl and "use mooncake" in nixl
    (spec,) = pd.problems(view(speculative_algorithm="EAGLE"), sglang_fx_backend=False)
    assert "speculative decoding (--speculative-algorithm EAGLE) is not supported on a CPU host" in spec
    (spec,) = pd.problems(view(device="cuda", speculative_algorithm="NGRAM"), sglang_fx_backend=True)
    assert "with an sglang-fx backend" in spec
    assert pd.problems(view(device="cuda", speculative_algorithm="EAGLE", disaggregation_transfer_backend="nixl"),
                       sglang_fx_backend=False) == []  # fmt: skip  (SGLang's own GPU PD)


def test_the_ascend_backend_is_checked_at_start_up():
    protocols = lambda: frozenset({"sdma", "device_rdma"})  # noqa: E731
    assert pd.ascend_problems({"ASCEND_MF_STORE_URL": "tcp://10.0.0.1:24669"}, protocols) == []
    ok = {"ASCEND_MF_STORE_URL": "tcp://127.0.0.1:24669", "ASCEND_MF_TRANSFER_PROTOCOL": "Device_RDMA"}
    assert pd.ascend_problems(ok, protocols) == []
    (unset,) = pd.ascend_problems({}, protocols)
    assert unset.startswith("--disaggregation-transfer-backend ascend needs ASCEND_MF_STORE_URL")
    (bad,) = pd.ascend_problems({"ASCEND_MF_STORE_URL": "10.0.0.1"}, protocols)
    assert bad == "ASCEND_MF_STORE_URL='10.0.0.1' is not of the form SCHEME://HOST:PORT (e.g. tcp://10.0.0.1:24669)"
    (proto,) = pd.ascend_problems({"ASCEND_MF_STORE_URL": "tcp://h:1", "ASCEND_MF_TRANSFER_PROTOCOL": "hccs"}, protocols)
    assert proto == "ASCEND_MF_TRANSFER_PROTOCOL='hccs' is not a transfer protocol of the installed memfabric_hybrid (device_rdma, sdma)"
    (missing,) = pd.ascend_problems({"ASCEND_MF_STORE_URL": "tcp://h:1"}, lambda: None)
    assert "needs the package memfabric-hybrid" in missing and "mf_adapter wheel is not it" in missing


def test_has_rdma_device(tmp_path):
    assert not pd.has_rdma_device(tmp_path / "absent")
    assert not pd.has_rdma_device(tmp_path)
    (tmp_path / "mlx5_0").mkdir()
    assert pd.has_rdma_device(tmp_path)


@pytest.fixture
def stubbed(monkeypatch):
    """compat's SGLang lookups stubbed: the view is the namespace itself; declarations recorded."""
    declared = []
    monkeypatch.setattr(compat, "server_view", lambda server_args: server_args)
    monkeypatch.setattr(compat, "raw_server_args", lambda server_args: {})
    monkeypatch.setattr(compat, "declare_server_args", lambda sa, source, **f: declared.append((source, f)))
    monkeypatch.setattr(pd, "has_rdma_device", lambda: False)
    for name in ("SGLANG_DISAGGREGATION_ALL_CP_RANKS_TRANSFER", "SGLANG_HOST_IP", "HOST_IP", "MC_FORCE_TCP"):
        monkeypatch.delenv(name, raising=False)
    return declared


def test_configure_sets_the_environment_and_declares_the_fields(stubbed, monkeypatch, caplog):
    import os

    caplog.set_level("INFO")
    monkeypatch.setenv("HOST_IP", "127.0.0.2")
    p = pd.configure(view(), sglang_fx_backend=True)
    assert os.environ["SGLANG_DISAGGREGATION_ALL_CP_RANKS_TRANSFER"] == "1" and os.environ["MC_FORCE_TCP"] == "1"
    assert "SGLANG_HOST_IP" not in os.environ  # HOST_IP was set
    assert stubbed == [("sglang_fx.pd", {"disable_overlap_schedule": True})]
    assert "sglang-fx PD (prefill, CPU host): MC_FORCE_TCP=1: Mooncake's TCP transport" in caplog.text
    assert p.fields == {"disable_overlap_schedule": True}
    assert pd.configure(SimpleNamespace(device="cpu"), sglang_fx_backend=True) is None  # not PD: untouched


def test_check_server_args_refuses_for_every_model_impl(stubbed, monkeypatch):
    """Native `sglang` too: the plugin loads for every --model-impl."""
    monkeypatch.setattr(compat, "sglang_model_impls", lambda: frozenset({"auto", "sglang", "transformers", "mindspore"}))
    monkeypatch.setattr(plugin, "_backends", ["reference_torch"])
    monkeypatch.setattr(plugin, "check_backend", lambda name, sa: None)
    with pytest.raises(ValueError, match=r"--disaggregation-mode prefill: --disaggregation-transfer-backend nixl registers"):
        plugin.check_server_args(lambda sa: pytest.fail("SGLang's check ran"), view(disaggregation_transfer_backend="nixl"))
    with pytest.raises(ValueError, match=r"--disaggregation-mode decode: PD disaggregation with speculative decoding"):
        plugin.check_server_args(lambda sa: None, view(disaggregation_mode="decode", model_impl="reference_torch",
                                                        speculative_algorithm="EAGLE"))  # fmt: skip
    assert plugin.check_server_args(lambda sa: "ok", view(disaggregation_mode="decode")) == "ok"
    assert stubbed == [("sglang_fx.pd", {"disaggregation_decode_retraction_backup": "cpu_tensor"})]


# --------------------------------------------------------------------------------------------
# System libraries (no download: the fetch step is stubbed)
# --------------------------------------------------------------------------------------------


def test_preload_names_the_fix_when_the_library_is_nowhere(tmp_path, monkeypatch):
    monkeypatch.setattr(system_libs, "_loaded", [])
    monkeypatch.setattr(system_libs, "system_has_library", lambda: False)
    with pytest.raises(ImportError, match=r"libibverbs.so.1 is needed by Mooncake's transfer engine .* run `sglang-fx install-system-libs`"):
        system_libs.preload(tmp_path)


def test_install_checks_sha256_and_is_idempotent(tmp_path, monkeypatch):
    def fake_download(into):
        debs = []
        for p in system_libs.PACKAGES:
            (into / f"{p.name}_{p.version}_amd64.deb").write_bytes(b"not the pinned file")
            debs.append(into / f"{p.name}_{p.version}_amd64.deb")
        return debs

    monkeypatch.setattr(system_libs, "_download", fake_download)
    with pytest.raises(system_libs.SystemLibraryError, match=r"libnl-3-200_3.7.0-0.2\+b1_amd64.deb: SHA-256 [0-9a-f]{64}, expected d1fc3e9e"):
        system_libs.install(tmp_path)
    assert system_libs.missing(tmp_path) == [p.library for p in system_libs.PACKAGES]
    for p in system_libs.PACKAGES:  # as if unpacked: install has nothing to do
        (system_libs.root(tmp_path) / p.library).parent.mkdir(parents=True, exist_ok=True)
        (system_libs.root(tmp_path) / p.library).write_bytes(b"")
    monkeypatch.setattr(system_libs, "_download", lambda into: pytest.fail("downloaded again"))
    assert system_libs.install(tmp_path) == system_libs.root(tmp_path)
