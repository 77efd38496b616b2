"""Put ``libibverbs.so.1`` (and the libnl libraries it links against) under a directory, for the Mooncake client
and ``mooncake_master`` from PyPI, which link against it even when they only use TCP.

Run by tox before the tests: ``python tests/fetch_ibverbs.py DIR``; tox puts ``DIR/usr/lib/x86_64-linux-gnu`` and
``DIR/lib/x86_64-linux-gnu`` on ``LD_LIBRARY_PATH``. Nothing is done when the system already has the library. The
Debian 12 packages are fetched from deb.debian.org (checked against their SHA-256), else with ``apt-get download``,
and unpacked here without root (a ``.deb`` is an ``ar`` archive holding ``data.tar.*``). Failing is not an error:
the Mooncake tests then skip, saying why.
"""

from __future__ import annotations

import ctypes.util
import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path

POOL = "http://deb.debian.org/debian/pool/main"
PACKAGES = [  # (package, pool path, sha256), Debian 12 amd64
    ("libibverbs1", "r/rdma-core/libibverbs1_44.0-2_amd64.deb",
     "35054815259fee46173240254246d03b673a5cd5c528aaac96fd15ac428a8d59"),
    ("libnl-3-200", "libn/libnl3/libnl-3-200_3.7.0-0.2%2bb1_amd64.deb",
     "d1fc3e9eb8e79b4c96b0a64c3d8c9e068ae2f665cab71bd19f417ffd0453a890"),
    ("libnl-route-3-200", "libn/libnl3/libnl-route-3-200_3.7.0-0.2%2bb1_amd64.deb",
     "0fdcc425ae2982788c085c76a7cb0eda3e3db99d41bd1ce56082ee18e9f1e21f"),
]


def _deb_data(deb: bytes) -> tarfile.TarFile:
    """The ``data.tar.*`` member of a ``.deb`` (``ar`` format: 8-byte magic, then 60-byte member headers)."""
    if not deb.startswith(b"!<arch>\n"):
        raise ValueError("not a .deb (ar) archive")
    pos = 8
    while pos + 60 <= len(deb):
        name = deb[pos : pos + 16].decode().strip().rstrip("/")
        size = int(deb[pos + 48 : pos + 58].decode().strip())
        body = deb[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(body))
        pos += 60 + size + (size & 1)
    raise ValueError("no data.tar member")


def _fetch(pkg: str, path: str, sha: str) -> bytes:
    try:
        with urllib.request.urlopen(f"{POOL}/{path}", timeout=60) as r:
            data = bytes(r.read())
        if hashlib.sha256(data).hexdigest() == sha:
            return data
        print(f"fetch_ibverbs: {pkg}: checksum mismatch from deb.debian.org", file=sys.stderr)
    except OSError as exc:
        print(f"fetch_ibverbs: {pkg}: {exc}; trying apt-get download", file=sys.stderr)
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(["apt-get", "download", pkg], cwd=d, check=True, capture_output=True, timeout=120)
        return next(Path(d).glob("*.deb")).read_bytes()


def unpack_debs(dest: Path, packages: list[tuple[str, str, str]], want: Callable[[str], bool]) -> None:
    """Fetch each ``(package, pool path, sha256)`` and unpack under ``dest`` the files and links whose archive
    name ``want`` accepts (also used by ``benchmarks/bench_remote.py`` for Debian's ``redis-benchmark``).

    :raises Exception: whatever fetching or unpacking raised (callers treat it as "not available")."""
    for pkg, path, sha in packages:
        with _deb_data(_fetch(pkg, path, sha)) as tar:
            members = [m for m in tar.getmembers() if want(m.name) and (m.isfile() or m.issym())]
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4
            tar.extractall(dest, members=members, **safe)  # type: ignore[arg-type]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: fetch_ibverbs.py DIR", file=sys.stderr)
        return 2
    dest = Path(argv[0])
    if ctypes.util.find_library("ibverbs"):
        print("fetch_ibverbs: the system has libibverbs")
        return 0
    if (dest / "usr/lib/x86_64-linux-gnu/libibverbs.so.1").exists():
        return 0
    try:
        unpack_debs(dest, PACKAGES, lambda name: ".so" in name)
    except Exception as exc:  # never fail the test run: the Mooncake tests skip instead
        print(f"fetch_ibverbs: could not get libibverbs ({exc}); the Mooncake tests will skip", file=sys.stderr)
        return 0
    print(f"fetch_ibverbs: libibverbs under {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
