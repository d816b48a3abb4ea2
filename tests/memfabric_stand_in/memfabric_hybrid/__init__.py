"""Test-only stand-in for `memfabric_hybrid`, Ascend's transfer-engine package (PyPI
`memfabric-hybrid`), so that SGLang 0.5.23's `--disaggregation-transfer-backend ascend` path runs
on a CPU host: SGLang's Ascend KV manager, sender and receiver (srt/disaggregation/ascend/) and
its config-store start-up, unchanged. Only the engine underneath differs: the calls SGLang
makes are served by Mooncake's transfer engine over TCP, between host buffers. tests/ puts this
directory on the servers' PYTHONPATH; it is never installed for users.

What SGLang calls (srt/disaggregation/ascend/transfer_engine.py, srt/managers/disagg_service.py):
- `create_config_store(url)`: memfabric's config store, where engines meet. Here a TCP listener
  at url's host:port that `initialize` must reach, so a wrong ASCEND_MF_STORE_URL fails as it
  would on Ascend. A second call for the same address (the other server of the pair) finds the
  store already there.
- `TransferEngine()`: `get_rpc_port()` (0 before `initialize`, as memfabric's when it picks the
  port itself), `initialize(store_url, session_id, role, npu_id, op_type) -> 0 | error`,
  `batch_register_memory(ptrs, lengths)`, `batch_unregister_memory(ptrs)`,
  `batch_transfer_sync_write(peer_session_id, src_ptrs, dst_ptrs, lengths)`, `send_probe`, and
  `TransferEngine.TransDataOpType` (SDMA, DEVICE_RDMA).
"""

from __future__ import annotations

import enum
import socket
import threading
from urllib.parse import urlsplit

_stores: dict[tuple[str, int], socket.socket] = {}


def _address(url: str | None) -> tuple[str, int]:
    parts = urlsplit(url or "")
    if not parts.hostname or not parts.port:
        raise ValueError(f"config store URL {url!r} is not SCHEME://HOST:PORT")
    return parts.hostname, parts.port


def create_config_store(url: str) -> None:
    """Serve the config store at url (a listener that accepts and closes connections), unless one
    is already serving there."""
    host, port = _address(url)
    if (host, port) in _stores:
        return
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind((host, port))
    except OSError:
        listener.close()
        with socket.create_connection((host, port), timeout=5):  # raises if nothing serves there
            return
    listener.listen(64)
    _stores[host, port] = listener

    def serve() -> None:
        while True:
            conn, _ = listener.accept()
            conn.close()

    threading.Thread(target=serve, name="memfabric-stand-in-store", daemon=True).start()


class TransferEngine:
    class TransDataOpType(enum.Enum):
        SDMA = 0
        DEVICE_RDMA = 1

    def __init__(self) -> None:
        self._engine = None

    def get_rpc_port(self) -> int:
        return 0 if self._engine is None else self._engine.get_rpc_port()

    def initialize(self, store_url: str, session_id: str, role: str, npu_id: int, op_type) -> int:
        if role not in ("Prefill", "Decode") or not isinstance(op_type, TransferEngine.TransDataOpType):
            return -1
        try:
            with socket.create_connection(_address(store_url), timeout=5):
                pass
        except (OSError, ValueError):
            return -2  # no config store at store_url
        from mooncake.engine import TransferEngine as Mooncake

        self._engine = Mooncake()
        host = session_id.rsplit(":", 1)[0]
        return self._engine.initialize(host, "P2PHANDSHAKE", "tcp", "")

    def batch_register_memory(self, ptrs: list[int], lengths: list[int]) -> int:
        return self._engine.batch_register_memory(ptrs, lengths)

    def batch_unregister_memory(self, ptrs: list[int]) -> int:
        return self._engine.batch_unregister_memory(ptrs)

    def batch_transfer_sync_write(self, session_id: str, src: list[int], dst: list[int], lengths: list[int]) -> int:
        return self._engine.batch_transfer_sync_write(session_id, src, dst, lengths)

    def send_probe(self, session_id: str) -> int:
        return self._engine.send_probe(session_id)
