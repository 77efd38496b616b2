"""The ``mooncakestore://MASTER_HOST:PORT`` connector: a client of a Mooncake Store (``mooncake_master`` plus the
nodes that lend it memory, e.g. ``mooncake_client``), through the ``mooncake.store`` module of the PyPI package
``mooncake-transfer-engine`` (``-non-cuda`` for CPU machines).

One Mooncake object per entry, ``<key>`` = the 80-byte entry header followed by the payload: Mooncake makes an
object visible only once all of it is written, so a reader never sees half an entry.

Settings, LMCache's names, from (first wins) the URL query, ``extra_config``, the JSON file named by
``MOONCAKE_CONFIG_PATH``, then the defaults: ``metadata_server`` (``http://MASTER_HOST:8080/metadata``, the
master's own HTTP metadata server), ``protocol`` (``tcp``; ``rdma`` with ``device_name``, the URL's ``device``),
``local_hostname`` (the address this host reaches the master from), ``global_segment_size`` (0: this process
lends no memory, so its chunks outlive it), ``local_buffer_size`` (16 MiB), ``admin_port`` (the master's
``-metrics_port``, 9003: ``kvpipe inspect`` lists keys through its ``/get_all_keys``). Sizes take bytes or
``"256MB"``-style strings.

The Mooncake client blocks (and waits up to 30 s on a hung node or master), so every call runs in a daemon thread
(never joined at exit). A call the tier's deadline gives up on keeps its thread, which may still write; so
payloads never travel between Mooncake and pool memory directly: each entry goes through a staging buffer this
connector owns (``?max_transfers=N`` of them, 4 by default, registered with Mooncake for RDMA), busy until its
thread returns. A batch moves as one ``batch_get_into``/``batch_put_from`` per group of free buffers. The copy
costs ~0.5 ms per 4 MiB, small beside a Mooncake TCP transfer. Threads stuck on a dead remote are bounded: when
every staging buffer (or every control call slot) is held by one, calls fail as unavailable at once. The client
is set up once, after a plain connect to the master (Mooncake's own setup against a master that is down retries
for ~90 s), and kept across outages: it reconnects to a restarted master by itself.
"""

from __future__ import annotations

import ctypes
import fnmatch
import functools
import json
import logging
import mmap
import os
import queue
import re
import socket
import threading
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import anyio
import attrs

from kvpipe.connectors.base import Entry, GetResult, ReadInto
from kvpipe.connectors.urlopts import check_options, host_port, number_opt, split_url
from kvpipe.errors import ConfigError, TierError, TierUnavailable
from kvpipe.serde.entry import HEADER_SIZE, payload_checksum

__all__ = ["MooncakeConnector", "MooncakeSettings", "load_store_class"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Mooncake Store error codes (mooncake-store's ErrorCode) this connector tells apart.
_NOT_FOUND = -704  # OBJECT_NOT_FOUND
_BUFFER_OVERFLOW = -600  # the destination is smaller than the object
_NO_SPACE = -200  # NO_AVAILABLE_HANDLE: no segment has room
_TRANSFER_FAIL = -800  # the node holding the object did not deliver it (dead or hung node)
_RPC_FAIL = (-900, -901)  # the master cannot be reached / did not answer
_CONTROL_SLOTS = 4  # concurrent non-transfer calls (exists, delete, ping, list) before new ones fail fast
_SLOT_WAIT = 1.0  # seconds a transfer waits while stuck calls hold every staging buffer, then fails
_EMPTY = memoryview(b"")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

_store_class: Any = None


def load_store_class() -> Any:
    """``mooncake.store.MooncakeDistributedStore``.

    :raises ConfigError: naming what is missing (the package, or a shared library it links against).
    """
    global _store_class
    if _store_class is None:
        # Mooncake logs every step of a client's set-up at INFO (and retries at WARNING) to stderr, into the
        # engine's own log; errors only, unless the user set MC_LOG_LEVEL.
        os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
        try:
            from mooncake.store import MooncakeDistributedStore  # type: ignore[import-not-found]
        except ImportError as exc:
            what = str(exc)
            if "libibverbs" in what or "libnl" in what:
                raise ConfigError(f"mooncakestore://: the Mooncake client cannot load ({what}); install "
                                  "libibverbs1 (apt install libibverbs1) or put its directory on LD_LIBRARY_PATH"
                                  ) from None
            raise ConfigError("mooncakestore://: the Mooncake client is not installed (pip install "
                              f"'kvpipe[mooncake]' or mooncake-transfer-engine-non-cuda): {what}") from None
        _store_class = MooncakeDistributedStore
    return _store_class


def parse_size(name: str, value: object) -> int:
    """``value`` (an int of bytes or a string like ``"256MB"``, ``"4 GB"``, ``"1GiB"``) in bytes.

    :raises ConfigError: for anything else.
    """
    if isinstance(value, bool):
        raise ConfigError(f"mooncake {name}: expected a size, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ConfigError(f"mooncake {name}: must be >= 0, got {value!r}")
        return int(value)
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ConfigError(f"mooncake {name}: expected bytes or a size like '256MB', got {value!r}")
    unit = (m.group(2) or "").lower().replace("i", "").replace("b", "") or ""
    return int(float(m.group(1)) * _UNITS[unit])


def _route_address(host: str, port: int) -> str:
    """The local address this host reaches ``host`` from (no packet is sent: a UDP socket's connect only routes)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


class _Busy(TierUnavailable):
    """Every control call slot is held by a call still waiting on Mooncake (nothing was started)."""


class _DaemonWorkers:
    """Daemon threads for blocking Mooncake calls, kept for reuse: starting a thread per call cost 360-550 us here,
    handing a call to an idle worker 85-125 us.

    Each idle worker waits on an inbox of its own and gets exactly the call handed to it (with one shared queue a
    worker counted idle could take a call meant for a newer one while a 30 s call was still ahead of it). A
    worker left idle for ``idle_secs`` exits. Concurrent calls, hence threads, are bounded by the connectors'
    slots; a thread stuck in Mooncake is simply not idle.
    """

    def __init__(self, idle_secs: float = 30.0) -> None:
        self.idle_secs = idle_secs
        self._lock = threading.Lock()
        self._idle: list[queue.SimpleQueue[Callable[[], None]]] = []

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` (which must not raise) on an idle worker, or on a new one."""
        with self._lock:
            inbox = self._idle.pop() if self._idle else None
        if inbox is None:
            threading.Thread(target=self._run, args=(job,), name="kvpipe-mooncake", daemon=True).start()
        else:
            inbox.put(job)

    @property
    def idle(self) -> int:
        """Workers waiting for a call now."""
        with self._lock:
            return len(self._idle)

    def forget_workers(self) -> None:
        """Drop every idle worker without telling it (in a forked child: its threads did not come along, and a
        call handed to one of them would never run)."""
        self._lock = threading.Lock()
        self._idle = []

    def _run(self, job: Callable[[], None]) -> None:
        inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        while True:
            try:
                job()
            except BaseException:  # pragma: no cover - jobs catch everything themselves
                log.exception("mooncake worker: a call raised past its handler")
            with self._lock:
                self._idle.append(inbox)
            try:
                job = inbox.get(timeout=self.idle_secs)
            except queue.Empty:
                with self._lock:
                    if inbox in self._idle:  # nobody handed it a call: done
                        self._idle.remove(inbox)
                        return
                job = inbox.get()  # handed one just now: it is on its way


_WORKERS = _DaemonWorkers()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_WORKERS.forget_workers)


async def _in_daemon_thread(fn: Callable[[], T]) -> T:
    """``fn()`` on a daemon worker thread; the caller may be cancelled (the call then runs on, abandoned).

    Not anyio's worker threads: those are joined at interpreter exit, so a Mooncake call stuck on a hung node or
    master (30 s), or a ``setup`` whose master went away (it retries for ~90 s), would hold up the engine's
    shutdown. The worker wakes the waiting task through a pipe, which works on every anyio backend.
    """
    r, w = os.pipe()
    box: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            box.append((True, fn()))
        except BaseException as exc:  # handed to the waiting task
            box.append((False, exc))
        finally:
            try:
                os.write(w, b"x")
            except OSError:  # the waiting task gave up and closed its end
                pass
            os.close(w)

    try:
        _WORKERS.submit(run)
        await anyio.wait_readable(r)
    finally:
        os.close(r)
    ok, value = box[0]
    if not ok:
        raise value
    return cast(T, value)


@attrs.frozen
class MooncakeSettings:
    """What ``MooncakeDistributedStore.setup`` takes, plus the master's admin port."""

    master: str
    metadata_server: str
    local_hostname: str
    protocol: str = "tcp"
    device_name: str = ""
    global_segment_size: int = 0
    local_buffer_size: int = 16 << 20
    admin_port: int = 9003


_KEYS = ("metadata_server", "local_hostname", "protocol", "device_name", "global_segment_size", "local_buffer_size",
         "admin_port")


def _file_config() -> dict[str, Any]:
    path = os.environ.get("MOONCAKE_CONFIG_PATH")
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"MOONCAKE_CONFIG_PATH={path!r}: cannot read it as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"MOONCAKE_CONFIG_PATH={path!r}: expected a JSON object")
    return data


@attrs.define(eq=False)
class _Staging:
    """A buffer for one transfer at a time; ``busy`` until the thread using it returns."""

    size: int = 0
    busy: bool = False
    thread_done: bool = False
    abandoned: bool = False
    _mem: mmap.mmap | None = attrs.field(default=None, repr=False)
    _cbuf: Any = attrs.field(default=None, repr=False)
    _registered: Any = attrs.field(default=None, repr=False)  # the client this buffer is registered with
    ptr: int = 0

    def ensure(self, need: int, store: Any) -> None:
        """At least ``need`` bytes (grown to the next MiB), registered with ``store`` (RDMA needs it; after a
        reset the connector has a new client); called by the owning thread."""
        if need > self.size:
            size = max(need + (1 << 20) - 1, 1 << 20) & ~((1 << 20) - 1)
            self.release(self._registered)
            mem = mmap.mmap(-1, size)
            self._cbuf = (ctypes.c_char * size).from_buffer(mem)
            self._mem, self.size, self.ptr = mem, size, ctypes.addressof(self._cbuf)
        if self._registered is not store:
            store.register_buffer(self.ptr, self.size)
            self._registered = store

    def view(self, n: int) -> memoryview:
        assert self._mem is not None
        return memoryview(self._mem)[:n]

    def release(self, store: Any) -> None:
        """Unregister from ``store`` (when registered there) and unmap."""
        if self._mem is not None:
            if store is not None and store is self._registered:
                try:
                    store.unregister_buffer(self.ptr)
                except Exception as exc:  # a store already closed has nothing registered
                    log.debug("mooncake: unregister_buffer failed: %s", exc)
            self._registered = None
            self._cbuf = None
            self._mem.close()
            self._mem, self.size, self.ptr = None, 0, 0


@attrs.define(eq=False)
class MooncakeConnector:
    """Byte store over a Mooncake Store (see :class:`~kvpipe.connectors.base.Connector`)."""

    url: str
    settings: MooncakeSettings
    max_transfers: int = 4
    _store: Any = attrs.field(init=False, default=None)
    _setting_up: bool = attrs.field(init=False, default=False)
    _staging: list[_Staging] = attrs.field(init=False)
    _control: int = attrs.field(init=False, default=0)
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)
    _closed: bool = attrs.field(init=False, default=False)
    _freed: anyio.Event | None = attrs.field(init=False, default=None)  # set when _free frees buffers

    def __attrs_post_init__(self) -> None:
        self._staging = [_Staging() for _ in range(self.max_transfers)]

    @classmethod
    def from_url(cls, url: str, extra: dict[str, Any] | None = None) -> MooncakeConnector:
        """Parse ``mooncakestore://MASTER_HOST:PORT[?metadata_server=..&protocol=..&device=..&...]``.

        :raises ConfigError: for a malformed URL or setting, or when the Mooncake client cannot be loaded.
        """
        parts, q = split_url(url, "mooncakestore")
        host, port = host_port(parts, url, "mooncakestore://MASTER_HOST:PORT")
        check_options(q, url, (*_KEYS, "device", "max_transfers"))
        if "device" in q:
            q["device_name"] = q.pop("device")
        merged: dict[str, Any] = {k: v for k, v in _file_config().items() if k in _KEYS}
        merged.update({k: v for k, v in (extra or {}).items() if k in _KEYS})
        merged.update({k: v for k, v in q.items() if k in _KEYS})
        protocol = str(merged.get("protocol", "tcp")).lower()
        if protocol not in ("tcp", "rdma"):
            raise ConfigError(f"remote_url={url!r}: protocol must be tcp or rdma, got {protocol!r}")
        try:
            admin_port = int(merged.get("admin_port", 9003))
        except (TypeError, ValueError):
            raise ConfigError(f"remote_url={url!r}: admin_port must be an integer") from None
        settings = MooncakeSettings(
            master=f"{host}:{port}",
            metadata_server=str(merged.get("metadata_server") or f"http://{host}:8080/metadata"),
            local_hostname=str(merged.get("local_hostname") or _route_address(host, port)),
            protocol=protocol,
            device_name=str(merged.get("device_name") or ""),
            global_segment_size=parse_size("global_segment_size", merged.get("global_segment_size", 0)),
            local_buffer_size=parse_size("local_buffer_size", merged.get("local_buffer_size", 16 << 20)),
            admin_port=admin_port,
        )
        load_store_class()
        transfers = int(number_opt(q, "max_transfers", url, 4, minimum=1))
        return cls(url=url, settings=settings, max_transfers=transfers)

    @property
    def _safe_url(self) -> str:
        return f"mooncakestore://{self.settings.master}"

    # -- the store and its threads ------------------------------------------------------------------------------
    async def _get_store(self) -> Any:
        """The Mooncake client, set up on first use. One ``setup`` at a time: should the master go away during it,
        it retries for about 90 s in its thread after the caller's deadline gave up on it; a client it then makes
        is kept (not leaked), and calls meanwhile fail as unavailable at once."""
        if self._closed:
            raise TierUnavailable(f"{self._safe_url}: connector closed")
        if self._store is not None:
            return self._store
        with self._lock:
            if self._setting_up:
                raise TierUnavailable(f"{self._safe_url}: still connecting to the Mooncake master")
            self._setting_up = True
        s = self.settings
        cls = load_store_class()

        def setup() -> Any:
            try:
                # Mooncake's setup against a master that is down retries for ~90 s and does not notice it coming
                # back; a plain connect to the master's port first fails at once instead.
                host, _, port = s.master.rpartition(":")
                try:
                    socket.create_connection((host, int(port)), timeout=2).close()
                except OSError as exc:
                    raise TierUnavailable(f"{self._safe_url}: the Mooncake master cannot be reached: {exc}") from None
                store = cls()
                rc = store.setup(s.local_hostname, s.metadata_server, s.global_segment_size, s.local_buffer_size,
                                 s.protocol, s.device_name, s.master)
                if rc != 0:
                    raise TierUnavailable(f"{self._safe_url}: Mooncake setup failed ({rc}): is the master running, "
                                          f"and the metadata server {s.metadata_server} reachable?")
                if self._closed:
                    store.close()
                    raise TierUnavailable(f"{self._safe_url}: connector closed")
                self._store = store
                return store
            finally:
                with self._lock:
                    self._setting_up = False
        try:
            return await self._control_call(setup)
        except _Busy:  # refused before a thread started: no setup is running
            with self._lock:
                self._setting_up = False
            raise

    async def _control_call(self, fn: Callable[[], T]) -> T:
        """``fn()`` in a worker thread that a deadline may abandon (it then runs on, holding a control slot)."""
        with self._lock:
            if self._control >= _CONTROL_SLOTS:
                raise _Busy(f"{self._safe_url}: {_CONTROL_SLOTS} earlier calls are still waiting on "
                                      "Mooncake")
            self._control += 1

        def run() -> T:
            try:
                return fn()
            finally:
                with self._lock:
                    self._control -= 1
        return await _in_daemon_thread(run)

    async def _slots(self, k: int) -> list[_Staging]:
        """Up to ``k`` free staging buffers, at least one. While live calls hold them all it waits (the tier's
        deadline bounds that), woken as soon as one of them frees its buffers; when abandoned calls, stuck in
        Mooncake, have held them all for :data:`_SLOT_WAIT` seconds, it fails at once as unavailable (a buffer
        freed by such a call's thread is seen at the next look, every 10 ms)."""
        give_up = anyio.current_time() + _SLOT_WAIT
        while True:
            with self._lock:
                got = [st for st in self._staging if not st.busy][:k]
                for st in got:
                    st.busy, st.thread_done, st.abandoned = True, False, False
                stuck = all(st.abandoned for st in self._staging)
            if got:
                return got
            if not stuck:
                give_up = anyio.current_time() + _SLOT_WAIT
            elif anyio.current_time() > give_up:
                raise TierUnavailable(f"{self._safe_url}: every transfer slot is held by a call still waiting on "
                                      "Mooncake")
            if self._freed is None:
                self._freed = anyio.Event()
            with anyio.move_on_after(0.01):
                await self._freed.wait()

    async def _transfer(self, sts: list[_Staging], fn: Callable[[], T]) -> T:
        """``fn()`` in a worker thread, with ``sts`` (taken by :meth:`_slots`). On return the caller still owns
        ``sts`` and frees them with :meth:`_free`; when a deadline gives up on the call, they stay busy until the
        thread returns (it may still be writing into them)."""
        def run() -> T:
            try:
                return fn()
            finally:
                with self._lock:
                    for st in sts:
                        st.thread_done = True
                        if st.abandoned:
                            st.busy = False
        try:
            return await _in_daemon_thread(run)
        except BaseException:
            with self._lock:
                for st in sts:
                    st.abandoned = True
                    if st.thread_done:
                        st.busy = False
            raise

    def _free(self, sts: list[_Staging]) -> None:
        with self._lock:
            for st in sts:
                st.busy = False
        if self._freed is not None:  # wake the tasks waiting in _slots
            self._freed.set()
            self._freed = None

    def _check(self, rc: int, what: str) -> None:
        """:raises TierUnavailable: when ``rc`` says the master cannot be reached."""
        if rc in _RPC_FAIL:
            raise TierUnavailable(f"{self._safe_url}: {what}: the Mooncake master cannot be reached ({rc})")

    # -- the connector contract ---------------------------------------------------------------------------------
    async def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """Whether each entry is stored."""
        if not keys:
            return []
        store = await self._get_store()
        rcs = await self._control_call(lambda: list(store.batch_is_exist(list(keys))))
        for rc in rcs:
            if rc < 0:
                self._check(rc, "exists")
                raise TierError(f"{self._safe_url}: exists failed ({rc})")
        return [rc == 1 for rc in rcs]

    async def get_many(self, keys: Sequence[str], read_into: ReadInto) -> list[GetResult | None]:
        """Entries read into staging buffers (one ``batch_get_into`` per group of free buffers) and their payloads
        hashed there, in the worker thread; then each payload copied into ``read_into(header)``'s buffer."""
        out: list[GetResult | None] = []
        if not keys:
            return out
        store = await self._get_store()
        while len(out) < len(keys):
            sts = await self._slots(len(keys) - len(out))
            group = list(keys[len(out) : len(out) + len(sts)])
            got = await self._transfer(sts, functools.partial(self._get_hashed, store, group, sts))
            try:
                out += [self._unpack(k, n, csum, st, read_into)
                        for k, (n, csum), st in zip(group, got, sts, strict=True)]
            finally:
                self._free(sts)
        return out

    def _unpack(self, key: str, n: int, csum: int | None, st: _Staging, read_into: ReadInto) -> GetResult | None:
        """The result of a get that returned ``n`` (an object size or an error code) into ``st``; ``csum``: the
        payload's checksum, when there is a payload."""
        if n < 0:
            self._check(n, "get")
            if n not in (_NOT_FOUND, _TRANSFER_FAIL):
                log.debug("%s: get %s failed (%d)", self._safe_url, key, n)
            return None
        data = st.view(n)
        if n < HEADER_SIZE:
            return bytes(data), _EMPTY
        hb = bytes(data[:HEADER_SIZE])
        rest = n - HEADER_SIZE
        buf = read_into(hb, key)
        if buf is None or rest > len(buf):
            return hb, _EMPTY
        view = buf[:rest]
        view.cast("B")[:] = data[HEADER_SIZE:n]
        return (hb, view) if csum is None else (hb, view, csum)

    @classmethod
    def _get_hashed(cls, store: Any, keys: list[str], sts: list[_Staging]) -> list[tuple[int, int | None]]:
        """:meth:`_get_blocking`, and each payload's xxh3 computed right there, off the event loop (the tier then
        does not hash the copy again)."""
        ns = cls._get_blocking(store, keys, sts)
        return [(n, payload_checksum(st.view(n)[HEADER_SIZE:]) if n > HEADER_SIZE else None)
                for n, st in zip(ns, sts, strict=True)]

    @staticmethod
    def _get_blocking(store: Any, keys: list[str], sts: list[_Staging]) -> list[int]:
        def alone(j: int) -> int:
            n = int(store.get_into(keys[j], sts[j].ptr, sts[j].size))
            if n == _BUFFER_OVERFLOW:  # the staging buffer is too small: grow it to the object's size
                size = int(store.get_size(keys[j]))
                if size < 0:
                    return size
                sts[j].ensure(size, store)
                n = int(store.get_into(keys[j], sts[j].ptr, sts[j].size))
            return n

        for st in sts:
            st.ensure(4 << 20, store)  # a first guess (a 256-token chunk of an 8B model); grown when short
        if len(keys) == 1:
            return [alone(0)]
        ns = [int(n) for n in store.batch_get_into(keys, [st.ptr for st in sts], [st.size for st in sts])]
        # What the batch could not read is read alone: a short buffer, or another per-entry error, such as -707
        # (LEASE_EXPIRED: the batch outlasted the objects' read lease; seen with a 100 ms lease and 4 x 16 MiB);
        # a miss or an unreachable master is not retried.
        return [alone(j) if n < 0 and n != _NOT_FOUND and n not in _RPC_FAIL else n for j, n in enumerate(ns)]

    async def put_many(self, items: Sequence[Entry]) -> int:
        """Store entries, each header and payload copied into one staging buffer and written as one object (one
        ``batch_put_from`` per group of free buffers); returns how many were stored (a full store answers no space,
        and the entry is not stored)."""
        if not items:
            return 0
        store = await self._get_store()
        stored = done = 0
        while done < len(items):
            sts = await self._slots(len(items) - done)
            group = items[done : done + len(sts)]
            done += len(group)

            def put(group: Sequence[Entry] = group, sts: list[_Staging] = sts) -> list[int]:
                sizes = []
                for (_, header, payload), st in zip(group, sts, strict=True):
                    pv = memoryview(payload).cast("B")
                    n = len(header) + len(pv)
                    st.ensure(n, store)
                    dst = st.view(n)
                    dst[: len(header)] = header
                    dst[len(header):] = pv
                    del dst
                    sizes.append(n)
                keys = [k for k, _, _ in group]
                if len(keys) == 1:
                    return [int(store.put_from(keys[0], sts[0].ptr, sizes[0]))]
                return [int(rc) for rc in store.batch_put_from(keys, [st.ptr for st in sts], sizes)]
            rcs = await self._transfer(sts, put)  # when it raises, _transfer has dealt with the buffers
            self._free(sts)
            for (key, _, _), rc in zip(group, rcs, strict=True):
                if rc < 0:
                    self._check(rc, "put")
                    if rc != _NO_SPACE:
                        log.debug("%s: put %s failed (%d)", self._safe_url, key, rc)
                    continue
                stored += 1
        return stored

    async def delete_many(self, keys: Sequence[str]) -> int:
        """Delete entries; returns how many existed."""
        if not keys:
            return 0
        store = await self._get_store()
        rcs = await self._control_call(lambda: list(store.batch_remove(list(keys), True)))
        for rc in rcs:
            self._check(rc, "delete")
        return sum(1 for rc in rcs if rc == 0)

    async def list_keys(self, pattern: str) -> list[str]:
        """Entry keys matching the glob ``pattern`` (the master's ``/get_all_keys`` on its admin port)."""
        host = self.settings.master.rpartition(":")[0]
        url = f"http://{host}:{self.settings.admin_port}/get_all_keys"

        def fetch() -> str:
            with urllib.request.urlopen(url, timeout=30) as r:
                return str(r.read().decode("utf-8", errors="replace"))
        try:
            text = await self._control_call(fetch)
        except OSError as exc:
            raise TierUnavailable(f"{self._safe_url}: cannot list keys at {url}: {exc}") from None
        return [k for k in text.split() if fnmatch.fnmatchcase(k, pattern)]

    async def list_entries(self, pattern: str) -> list[tuple[str, int]]:
        """``(key, stored bytes)`` for entries matching the glob ``pattern`` (sizes asked of the master one key at a
        time, in one worker thread; an entry gone in between is left out)."""
        keys = await self.list_keys(pattern)
        if not keys:
            return []
        store = await self._get_store()
        sizes = await self._control_call(lambda: [int(store.get_size(k)) for k in keys])
        for rc in sizes:
            if rc < 0:
                self._check(rc, "size")
        return [(k, n) for k, n in zip(keys, sizes, strict=True) if n >= 0]

    async def ping(self) -> None:
        """A master round trip (``health_check`` does not ask the master, so this asks whether a key exists).

        :raises TierUnavailable: when the master cannot be reached."""
        store = await self._get_store()
        rc = (await self._control_call(lambda: list(store.batch_is_exist(["kvpipe-ping"]))))[0]
        if rc < 0:
            self._check(rc, "ping")
            raise TierUnavailable(f"{self._safe_url}: ping failed ({rc})")

    def reset(self) -> None:
        """Nothing to drop when the tier marks the remote down: the Mooncake client reconnects to its master by
        itself (also to a restarted one), while a new client's ``setup`` would have to start over."""

    async def aclose(self) -> None:
        """Close the client once no transfer is in flight (a stuck one keeps it, and its staging, alive)."""
        self._closed = True
        store, self._store = self._store, None
        for _ in range(100):  # up to 1 s for transfers in flight to return
            if not any(st.busy for st in self._staging):
                break
            await anyio.sleep(0.01)
        if store is not None and not any(st.busy for st in self._staging) and self._control == 0:
            for st in self._staging:
                st.release(store)
            try:
                await _in_daemon_thread(store.close)
            except Exception as exc:
                log.debug("%s: close failed: %s", self._safe_url, exc)
