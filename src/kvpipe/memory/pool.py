"""One preallocated host pool, a first-fit allocator over it, and ref-counted :class:`MemoryObj` views.

The pool is allocated once (pinned when CUDA is present, on 2 MiB hugepages when asked) and reused: a fresh
allocation page-faults at ~2 GB/s here, pool memory is already mapped. Allocation never waits: when the free list
has no room the pool asks its evictor (the CPU tier's LRU) to free entries, and returns ``None`` when that fails.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import logging
import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future

import anyio
import attrs
import torch

from kvpipe.errors import CapacityError
from kvpipe.native import checksum

__all__ = ["HostPool", "MemoryObj", "PoolStats", "create_pool"]

log = logging.getLogger(__name__)

ALIGN = 256
_MAP_HUGETLB = getattr(mmap, "MAP_HUGETLB", 0x40000)
_HUGEPAGE = 2 << 20
_warned_hugepages = False


@attrs.frozen
class PoolStats:
    """A snapshot of the pool."""

    capacity: int
    used: int
    allocated_objects: int
    alloc_failures: int
    evictions: int
    pinned: bool
    hugepages: bool
    #: the pool asked the kernel for transparent hugepages (``madvise``); the kernel backs it with 2 MiB pages
    #: where it has them (``AnonHugePages`` in ``/proc/PID/smaps`` says how much)
    transparent_hugepages: bool = False


_CHECKSUM_LOCK = threading.Lock()


@attrs.define(eq=False)
class MemoryObj:
    """A ref-counted region of the pool viewed as one chunk tensor.

    The tensor view of a pool region is made on first use of :attr:`tensor`, not at allocation: a remote read
    allocates after a reply's header arrived and receives the payload through :attr:`byte_view` (a plain
    memoryview slice of the pool). Any torch call in that window, even a 1 µs ``view``, made the rest of a 4 MiB
    receive 0.3-0.4 ms slower here (measured: 1.33 vs 1.69 ms per GET), so none is made there.

    Whoever receives a ``MemoryObj`` from an allocation or a ``get_many`` owns one reference and must
    :meth:`release` it; a tier that keeps the object takes its own with :meth:`ref`. The region returns to the
    pool when the last reference goes.
    """

    pool: HostPool | None
    offset: int
    nbytes: int
    _tensor: torch.Tensor | None
    num_tokens: int
    refcount: int = 1
    _shape: tuple[int, ...] = ()
    _dtype: torch.dtype = torch.uint8
    _checksum: Future[int] | int | None = attrs.field(default=None, init=False)

    @property
    def tensor(self) -> torch.Tensor:
        """The region as a tensor of the allocated shape and dtype (a view of the pool, made once)."""
        t = self._tensor
        if t is None:
            assert self.pool is not None
            t = self._tensor = (self.pool.buffer[self.offset : self.offset + self.nbytes]
                                .view(self._dtype).view(self._shape))
        return t

    def ref(self) -> MemoryObj:
        """Take one more reference; returns ``self``."""
        if self.refcount <= 0:
            raise RuntimeError("MemoryObj used after its last release")
        self.refcount += 1
        return self

    def release(self) -> None:
        """Drop one reference; the last one frees the region."""
        if self.refcount <= 0:
            raise RuntimeError("MemoryObj released more often than referenced")
        self.refcount -= 1
        if self.refcount == 0 and self.pool is not None:
            self.pool._free(self.offset, self.nbytes)

    @property
    def shape(self) -> tuple[int, ...]:
        """The allocated shape (no torch call for a pool region)."""
        return self._shape if self.pool is not None else tuple(self.tensor.shape)

    @property
    def dtype(self) -> torch.dtype:
        """The allocated dtype (no torch call for a pool region)."""
        return self._dtype if self.pool is not None else self.tensor.dtype

    @property
    def byte_view(self) -> memoryview:
        """The region's bytes (a view, no copy; no torch call for a pool region)."""
        if self.pool is not None:
            return self.pool.byte_view[self.offset : self.offset + self.nbytes]
        return memoryview(self.tensor.view(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]

    # -- payload checksum -----------------------------------------------------------------------------------------
    # The xxh3_64 of the region's bytes, computed once, by whichever tier first writes the chunk behind, and reused
    # by the others (disk and remote both store it in the entry header). Not computed eagerly at gather: on this
    # 2-core machine hashing during store() raised store latency with a disk tier from 0.99-1.04x to 1.16-1.27x
    # of a CPU-only store. The bytes must not change once a checksum is taken (pool regions are written once).
    def _claim(self) -> tuple[Future[int] | int, bool]:
        """The memoized value or the computation in flight, and whether the caller must compute it."""
        with _CHECKSUM_LOCK:
            c = self._checksum
            if c is None:
                c = self._checksum = Future()
                return c, True
        return c, False

    def _compute(self, fut: Future[int]) -> int:
        try:
            value = checksum.xxh3_64(self.byte_view)
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        fut.set_result(value)
        self._checksum = value
        return value

    def set_checksum(self, value: int) -> None:
        """Record the checksum of the region's bytes, known already."""
        self._checksum = value

    async def checksum(self) -> int:
        """xxh3_64 of the region's bytes: memoized, computed now (without the GIL) by the first caller; a caller
        arriving while another thread computes it waits off the event loop."""
        c, mine = self._claim()
        if isinstance(c, int):
            return c
        if mine:
            return self._compute(c)
        return c.result() if c.done() else await anyio.to_thread.run_sync(c.result)

    def checksum_blocking(self) -> int:
        """:meth:`checksum` for worker threads."""
        c, mine = self._claim()
        if isinstance(c, int):
            return c
        return self._compute(c) if mine else c.result()

    @classmethod
    def detached(cls, tensor: torch.Tensor, num_tokens: int) -> MemoryObj:
        """Wrap a tensor that does not live in a pool (one reference, freed by the garbage collector)."""
        t = tensor.contiguous()
        return cls(None, 0, t.numel() * t.element_size(), t, num_tokens)


def _alloc_buffer(nbytes: int, *, pin: bool, hugepages: bool, thp: bool = True
                  ) -> tuple[torch.Tensor, object, bool, bool]:
    """``(buffer, mapping to keep alive, on MAP_HUGETLB pages, transparent hugepages asked for)``."""
    global _warned_hugepages
    if hugepages:
        size = -(-nbytes // _HUGEPAGE) * _HUGEPAGE
        try:
            mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_HUGETLB)
        except OSError as exc:
            if not _warned_hugepages:
                log.warning("local_cpu_use_hugepages: could not map %d MiB on 2 MiB hugepages (%s; reserve "
                            "them with 'sysctl vm.nr_hugepages'); using regular pages", size >> 20, exc)
                _warned_hugepages = True
        else:
            buf = torch.frombuffer(mm, dtype=torch.uint8)
            if pin and torch.cuda.is_available():
                torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), size, 0)
            return buf[:nbytes], mm, True, False
    pin = pin and torch.cuda.is_available()
    if thp and not pin and nbytes >= _HUGEPAGE and hasattr(mmap, "MADV_HUGEPAGE"):
        # Transparent hugepages (no reservation needed, unlike MAP_HUGETLB above): the kernel backs the pool with
        # 2 MiB pages where it can, so reading a cold 4 MiB chunk takes 2 TLB entries instead of 1024. Here that
        # made hashing a cold chunk 0.144-0.154 ms instead of 0.169-0.174 ms (torch.empty's memory gets 4 KiB
        # pages: THP is "madvise" only). Regular pages where THP is off or the kernel has none to give.
        # ``local_cpu_transparent_hugepages: false`` turns this off (a fragmented host may compact memory on a
        # first touch; ``local_cpu_prefault`` moves that to start-up).
        size = -(-nbytes // _HUGEPAGE) * _HUGEPAGE
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
            asked = True
        except OSError:  # a kernel built without THP
            asked = False
        return torch.frombuffer(mm, dtype=torch.uint8)[:nbytes], mm, False, asked
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin), None, False, False


@attrs.define(eq=False)
class HostPool:
    """A fixed host buffer with a first-fit, coalescing free list."""

    capacity: int
    buffer: torch.Tensor
    pinned: bool
    hugepages: bool
    _mapping: object = None
    transparent_hugepages: bool = False
    _free_offsets: list[int] = attrs.field(factory=list)
    _free_sizes: list[int] = attrs.field(factory=list)
    _used: int = 0
    _objects: int = 0
    _alloc_failures: int = 0
    _evictions: int = 0
    _lock: threading.Lock = attrs.field(factory=threading.Lock)
    evictor: Callable[[int], bool] | None = None
    _stop: threading.Event = attrs.field(factory=threading.Event)
    byte_view: memoryview = attrs.field(init=False, repr=False)  # the whole buffer, for MemoryObj.byte_view
    _prefaulter: threading.Thread | None = None

    def __attrs_post_init__(self) -> None:
        self._free_offsets = [0]
        self._free_sizes = [self.capacity]
        self.byte_view = memoryview(self.buffer.numpy())  # type: ignore[arg-type]

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype, num_tokens: int) -> MemoryObj | None:
        """A region for a tensor of ``shape``/``dtype``, or ``None`` when nothing can be freed for it.

        Never blocks: it asks the evictor (if any) to drop unpinned, unreferenced entries, then gives up.

        :raises CapacityError: when one tensor is larger than the whole pool.
        """
        n = 1
        for d in shape:
            n *= d
        nbytes = n * dtype.itemsize
        if nbytes > self.capacity:
            raise CapacityError(f"one chunk of {nbytes} bytes does not fit a pool of {self.capacity} bytes")
        offset = self._take(nbytes)
        while offset is None and self.evictor is not None and self.evictor(nbytes):
            self._evictions += 1
            offset = self._take(nbytes)
        if offset is None:
            self._alloc_failures += 1
            return None
        return MemoryObj(self, offset, nbytes, None, num_tokens, shape=tuple(shape), dtype=dtype)

    def _take(self, nbytes: int) -> int | None:
        size = -(-nbytes // ALIGN) * ALIGN
        with self._lock:
            for i, free in enumerate(self._free_sizes):
                if free >= size:
                    off = self._free_offsets[i]
                    if free == size:
                        del self._free_offsets[i], self._free_sizes[i]
                    else:
                        self._free_offsets[i] = off + size
                        self._free_sizes[i] = free - size
                    self._used += size
                    self._objects += 1
                    return off
        return None

    def _free(self, offset: int, nbytes: int) -> None:
        size = -(-nbytes // ALIGN) * ALIGN
        with self._lock:
            self._used -= size
            self._objects -= 1
            i = bisect.bisect_left(self._free_offsets, offset)
            offs, sizes = self._free_offsets, self._free_sizes
            if i > 0 and offs[i - 1] + sizes[i - 1] == offset:  # merge with the left neighbour
                i -= 1
                sizes[i] += size
            else:
                offs.insert(i, offset)
                sizes.insert(i, size)
            if i + 1 < len(offs) and offs[i] + sizes[i] == offs[i + 1]:  # and with the right one
                sizes[i] += sizes[i + 1]
                del offs[i + 1], sizes[i + 1]

    @property
    def used(self) -> int:
        """Bytes allocated now (aligned)."""
        return self._used

    def wait_resident(self, timeout: float | None = None) -> bool:
        """Block until background prefaulting (``prefault=True``) has made every page resident; ``False`` when
        ``timeout`` seconds passed first. A benchmark or a server calls this before its first timed request: the
        prefault runs at idle priority, but its page zeroing still competes for memory bandwidth (a 2048-token
        prefill here took 8.8-9.1 s while a 2 GB pool was being prefaulted, 6.0-6.5 s without)."""
        t = self._prefaulter
        if t is not None:
            t.join(timeout)
            return not t.is_alive()
        return True

    def close(self) -> None:
        """Stop background prefaulting and wait for it (at most one 64 MiB step); idempotent. Regions still
        referenced stay valid: the buffer lives as long as they do."""
        self._stop.set()
        if self._prefaulter is not None:
            self._prefaulter.join()
            self._prefaulter = None

    def statistics(self) -> PoolStats:
        """A snapshot of capacity, use and failures."""
        return PoolStats(self.capacity, self._used, self._objects, self._alloc_failures, self._evictions,
                         self.pinned, self.hugepages, self.transparent_hugepages)


_MADV_POPULATE_WRITE = 23  # Linux >= 5.14
_PREFAULT_STEP = 64 << 20


def _prefault(buf: torch.Tensor, stop: threading.Event) -> None:
    """Fault the pool's pages in without touching their contents (``madvise(MADV_POPULATE_WRITE)``), in steps,
    so that data-path copies never pay first-touch page faults (~2 GB/s here, against ~13 GB/s into resident
    pages). Safe while the pool is in use: it changes no byte. Kernels without it: a no-op."""
    # Idle priority: at start-up this thread must not take a CPU from the engine's first requests (a 1-token
    # forward over 2047 cached tokens took 2.5 s instead of 0.15 s while a 2 GB pool was prefaulted beside it).
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        pass
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = mmap.PAGESIZE
    start = -(-buf.data_ptr() // page) * page
    end = (buf.data_ptr() + buf.numel()) // page * page
    for addr in range(start, end, _PREFAULT_STEP):
        if stop.is_set():
            return
        if madvise(addr, min(_PREFAULT_STEP, end - addr), _MADV_POPULATE_WRITE) != 0:
            log.debug("pool prefault stopped: errno %d", ctypes.get_errno())
            return


def create_pool(nbytes: int, *, hugepages: bool = False, prefault: bool = False,
                transparent_hugepages: bool = True) -> HostPool:
    """Preallocate a pool of ``nbytes`` (pinned when CUDA is available; hugepages when asked and possible).

    ``prefault`` makes the pages resident in a background thread (the pool is usable at once);
    ``transparent_hugepages``: a pool of 2 MiB or more that is neither pinned nor on ``hugepages`` asks the kernel
    for transparent hugepages.
    """
    nbytes = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
    pin = torch.cuda.is_available()
    buf, mapping, huge, thp = _alloc_buffer(nbytes, pin=pin, hugepages=hugepages, thp=transparent_hugepages)
    pool = HostPool(capacity=nbytes, buffer=buf, pinned=pin, hugepages=huge, mapping=mapping,
                    transparent_hugepages=thp)
    if prefault and not pin:  # pinned memory is resident already
        # The thread holds ``buf``, so the memory outlives it even if the pool goes first; close() stops it.
        pool._prefaulter = threading.Thread(target=_prefault, args=(buf, pool._stop), name="kvpipe-pool-prefault",
                                            daemon=True)
        pool._prefaulter.start()
    return pool
