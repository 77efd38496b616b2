"""A real Mooncake Store for the tests: ``mooncake_master`` (with its own HTTP metadata server) and one
``mooncake_client`` storage node lending it memory, from the PyPI package ``mooncake-transfer-engine-non-cuda``, on
free loopback ports. The tier under test is a separate client that lends no memory, so every chunk crosses TCP.
"""

from __future__ import annotations

import importlib.util
import socket
import time
import urllib.request
from pathlib import Path

import attrs
from servers import ServerProc, free_port

from kvpipe.connectors.mooncake import load_store_class
from kvpipe.errors import ConfigError

__all__ = ["MooncakeStore", "mooncake_missing", "mooncake_store"]


def _package_dir() -> Path | None:
    spec = importlib.util.find_spec("mooncake")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def mooncake_missing() -> str | None:
    """Why the Mooncake tests cannot run here, or ``None``."""
    d = _package_dir()
    if d is None or not (d / "mooncake_master").exists():
        return "no Mooncake (pip install mooncake-transfer-engine-non-cuda)"
    try:
        load_store_class()
    except ConfigError as exc:
        return str(exc)
    return None


class _HttpReady(ServerProc):
    """A process that is ready once ``GET http://127.0.0.1:{port}{path}`` answers 200."""

    path: str = "/health"

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{self.path}", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False


class _TcpReady(ServerProc):
    """A process that is ready once its port accepts a connection."""

    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False


@attrs.define(eq=False)
class MooncakeStore:
    """The master (RPC port ``rpc_port``, metadata server on ``http_port``, admin/metrics on ``admin.port``) and
    a storage node."""

    master: ServerProc
    node: ServerProc
    rpc_port: int
    http_port: int
    workdir: Path

    @property
    def url(self) -> str:
        """``mooncakestore://127.0.0.1:RPC?metadata_server=...&admin_port=...``."""
        return (f"mooncakestore://127.0.0.1:{self.rpc_port}?metadata_server=http://127.0.0.1:{self.http_port}"
                f"/metadata&admin_port={self.master.port}")

    def segments(self) -> str:
        """The master's ``/get_all_segments`` answer ('' when it cannot be asked)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.master.port}/get_all_segments", timeout=2) as r:
                return str(r.read().decode(errors="replace"))
        except OSError:
            return ""

    def wait_node_mounted(self, timeout: float = 20.0) -> None:
        """Block until the master lists a segment (the node's memory is usable)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.segments().strip():
                return
            time.sleep(0.05)
        raise RuntimeError(f"the Mooncake node never mounted its segment:\n{self.node.log_tail()}")

    def stop(self) -> None:
        """Stop both processes."""
        self.node.stop()
        self.master.stop()


def mooncake_store(workdir: Path, segment: str = "256MB") -> MooncakeStore:
    """Start a master and a storage node lending ``segment`` of memory."""
    d = _package_dir()
    assert d is not None
    workdir.mkdir(parents=True, exist_ok=True)
    rpc, http, admin, node_port = free_port(), free_port(), free_port(), free_port()
    master = _HttpReady([str(d / "mooncake_master"), f"-rpc_port={rpc}", "-rpc_address=127.0.0.1",
                         "-enable_http_metadata_server=true", f"-http_metadata_server_port={http}",
                         "-http_metadata_server_host=127.0.0.1", f"-metrics_port={admin}", "-metrics_host=127.0.0.1",
                         "-client_ttl=3", "-enable_metric_reporting=false"],
                        admin, workdir, "mooncake-master")
    master.start()
    node = _TcpReady([str(d / "mooncake_client"), "-host=127.0.0.1", f"-port={node_port}",
                      f"-global_segment_size={segment}", f"-master_server_address=127.0.0.1:{rpc}",
                      f"-metadata_server=http://127.0.0.1:{http}/metadata"],
                     node_port, workdir, "mooncake-node")
    node.start()
    store = MooncakeStore(master, node, rpc, http, workdir)
    store.wait_node_mounted()
    return store
