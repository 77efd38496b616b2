"""Small native libraries (C/C++ sources shipped in the package), built once with the system compiler and loaded
through ctypes, which releases the GIL for the length of every call.

A library is built on first use into ``$KVPIPE_CACHE_DIR/native`` (default ``~/.cache/kvpipe/native``), under a
name keyed by the source's hash, and written atomically, so concurrent first uses are safe. Without a compiler
:func:`load_library` returns ``None`` and the caller keeps its pure-Python path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["cache_dir", "load_library"]

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where built libraries are kept."""
    env = os.environ.get("KVPIPE_CACHE_DIR")
    if env:
        return Path(env).expanduser() / "native"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "kvpipe" / "native"


def _compiler(cxx: bool) -> str | None:
    names = ("CXX", "g++", "c++", "clang++") if cxx else ("CC", "gcc", "cc", "clang")
    return os.environ.get(names[0]) or next((p for n in names[1:] if (p := shutil.which(n))), None)


def load_library(source: Path, stem: str, flag_sets: Sequence[Sequence[str]] = ((),)) -> ctypes.CDLL | None:
    """Build ``source`` (C, or C++ for ``.cpp``) into a shared library unless already built, and load it.

    ``flag_sets`` are tried in order (e.g. with OpenMP, then without); the first that compiles is kept.
    Returns ``None`` (logged) when no compiler is found or no flag set compiles.
    """
    src = source.read_bytes()
    target = cache_dir() / f"{stem}_{hashlib.sha256(src).hexdigest()[:16]}.so"
    if not target.is_file():
        cxx = source.suffix in (".cpp", ".cc")
        compiler = _compiler(cxx)
        if compiler is None:
            log.info("no C%s compiler: %s is not built", "++" if cxx else "", source.name)
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        base = [compiler, "-O3", "-shared", "-fPIC", "-std=c++17" if cxx else "-std=c11", str(source), "-o", tmp]
        try:
            for flags in flag_sets:
                res = subprocess.run(base + list(flags), capture_output=True, text=True, check=False)
                if res.returncode == 0:
                    os.replace(tmp, target)  # atomic: a concurrent builder's identical file is fine
                    break
                log.debug("building %s with %s failed: %s", source.name, list(flags), res.stderr[-2000:])
            else:
                log.warning("could not build %s; using the pure-Python path", source.name)
                return None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    try:
        return ctypes.CDLL(str(target))
    except OSError as exc:
        log.warning("could not load %s (%s); using the pure-Python path", target, exc)
        return None
