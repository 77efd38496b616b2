"""kvpipe's configuration: one frozen :class:`Config`, from YAML, ``KVPIPE_*``/``LMCACHE_*`` env vars or keywords.

Precedence, lowest first: defaults < YAML file (``KVPIPE_CONFIG_FILE`` or ``LMCACHE_CONFIG_FILE``) < environment
(``KVPIPE_<KEY>`` beats ``LMCACHE_<KEY>``) < keyword overrides. LMCache's YAML keys and variables are accepted as
they are, so an LMCache config loads unchanged. Every bad value raises :class:`ConfigError` naming the key, the
value and what was expected; an unknown key is a warning naming the closest known key.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import yaml

from kvpipe.errors import ConfigError

__all__ = ["Config", "known_keys", "parse_bool"]

log = logging.getLogger(__name__)

_NON_KEY_ENV = {"CONFIG_FILE", "LOG_LEVEL", "DISABLE_PLUGINS", "CACHE_DIR", "USE_EXPERIMENTAL"}
_URL_RE = re.compile(r"^[a-z][a-z0-9+.-]*://\S+$")
_HOSTPORT_RE = re.compile(r"^(?:[a-z][a-z0-9+.-]*://)?[^\s:/]+:\d{1,5}/?$")
_NONE = {"", "none", "null", "~"}


def _expect(name: str, value: object, what: str) -> ConfigError:
    return ConfigError(f"{name}: got {value!r}, expected {what}")


def parse_bool(name: str, v: object) -> bool:
    """A config value as a bool (bools, 0/1, true/false/yes/no/on/off). :raises ConfigError: naming ``name``."""
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return v.strip().lower() in ("true", "1", "yes", "on")
    raise _expect(name, v, "true or false")


def _int(lo: int) -> Callable[[str, object], int]:
    def parse(name: str, v: object) -> int:
        if isinstance(v, bool):
            raise _expect(name, v, f"an integer >= {lo}")
        if isinstance(v, str) and re.fullmatch(r"\s*-?\d+\s*", v):
            v = int(v)
        if not isinstance(v, int) or v < lo:
            raise _expect(name, v, f"an integer >= {lo}")
        return v
    return parse


def _float(lo: float, *, strict: bool) -> Callable[[str, object], float]:
    what = f"a number {'>' if strict else '>='} {lo:g}"

    def parse(name: str, v: object) -> float:
        if isinstance(v, bool):
            raise _expect(name, v, what)
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                raise _expect(name, v, what) from None
        if not isinstance(v, (int, float)) or v != v or (v <= lo if strict else v < lo):
            raise _expect(name, v, what)
        return float(v)
    return parse


def _opt_str(name: str, v: object) -> str | None:
    if v is None or (isinstance(v, str) and v.strip().lower() in _NONE):
        return None
    if isinstance(v, (str, int)) and not isinstance(v, bool):
        return str(v)
    raise _expect(name, v, "a string")


def _str(name: str, v: object) -> str:
    if isinstance(v, str) and v.strip() and "@" not in v:
        return v.strip()
    raise _expect(name, v, "a non-empty string without '@'")


def _choice(*choices: str) -> Callable[[str, object], str]:
    def parse(name: str, v: object) -> str:
        if isinstance(v, str) and v.strip().lower() in choices:
            return v.strip().lower()
        raise _expect(name, v, "one of " + ", ".join(choices))
    return parse


def _url(name: str, v: object) -> str | None:
    s = _opt_str(name, v)
    if s is not None and not _URL_RE.match(s):
        raise _expect(name, s, "a URL like redis://host:6379 (scheme://host:port[,host:port...])")
    return s


def _hostport(name: str, v: object) -> str | None:
    s = _opt_str(name, v)
    if s is not None and not _HOSTPORT_RE.match(s):
        raise _expect(name, s, "host:port")
    return s


def _ports(name: str, v: object) -> tuple[int, ...]:
    """A port or a list of ports (YAML list, or "8500,8501" from the environment)."""
    if v is None:
        return ()
    items: list[object]
    if isinstance(v, str):
        items = [p for p in re.split(r"[,\s\[\]]+", v) if p]
    elif isinstance(v, (list, tuple)):
        items = list(v)
    else:
        items = [v]
    ports = tuple(_int(0)(name, p) for p in items)
    if any(p > 65535 for p in ports):
        raise _expect(name, v, "ports between 0 and 65535")
    return ports


def _int_list(name: str, v: object) -> tuple[int, ...] | None:
    if v is None or (isinstance(v, str) and v.strip().lower() in _NONE):
        return None
    if isinstance(v, str):
        v = [p for p in re.split(r"[,\s\[\]]+", v) if p]
    if isinstance(v, int) and not isinstance(v, bool):
        v = [v]
    if not isinstance(v, (list, tuple)):
        raise _expect(name, v, "a list of integers")
    return tuple(_int(0)(name, x) for x in v)


def _float_list(name: str, v: object) -> tuple[float, ...] | None:
    if v is None or (isinstance(v, str) and v.strip().lower() in _NONE):
        return None
    if isinstance(v, str):
        v = [p for p in re.split(r"[,\s\[\]]+", v) if p]
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = [v]
    if not isinstance(v, (list, tuple)):
        raise _expect(name, v, "a list of numbers between 0 and 1")
    out = tuple(_float(0.0, strict=False)(name, x) for x in v)
    if any(x > 1 for x in out):
        raise _expect(name, v, "numbers between 0 and 1")
    return out


def _str_list(name: str, v: object) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return tuple(p for p in re.split(r"[,\s]+", v) if p)
    if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
        return tuple(v)
    raise _expect(name, v, "a list of names")


def _mapping(name: str, v: object) -> dict[str, Any]:
    if v is None:
        return {}
    if isinstance(v, Mapping):
        return dict(v)
    raise _expect(name, v, "a mapping")


def _f(default: Any, parse: Callable[[str, Any], Any], doc: str, *aliases: str) -> Any:
    return attrs.field(default=default, metadata={"parse": parse, "doc": doc, "aliases": aliases})


@attrs.frozen
class Config:
    """The effective configuration of one kvpipe cache. Build with :meth:`load` (file + env + keywords) or
    directly with keywords (validated the same way).

    :raises ConfigError: for any invalid value, naming the key.
    """

    # --- chunks and tiers
    chunk_size: int = _f(256, _int(1), "tokens per KV chunk")
    local_cpu: bool = _f(True, parse_bool, "keep chunks in the CPU pool (the hot cache in front of disk and remote)")
    max_local_cpu_size: float = _f(5.0, _float(0, strict=True), "GB of host memory for the CPU pool (> 0)")
    local_cpu_use_hugepages: bool = _f(False, parse_bool, "allocate the CPU pool on 2 MiB hugepages")
    local_cpu_transparent_hugepages: bool = _f(True, parse_bool, "ask the kernel for transparent hugepages for "
                                               "the CPU pool (madvise; no reservation needed)")
    local_cpu_prefault: bool = _f(True, parse_bool, "make the CPU pool resident at start (background, idle priority)")
    local_disk: str | None = _f(None, _opt_str, "disk tier directory: file:///path or a path; None disables")
    max_local_disk_size: float = _f(20.0, _float(0, strict=True), "GB the disk tier may hold (LRU beyond)")
    local_disk_serde: str = _f("naive", _choice("naive", "cachegen"), "serde of disk entries")
    remote_url: str | None = _f(None, _url, "remote tier URL (redis://, redis-sentinel://, lm://, ...); None: none")
    remote_serde: str = _f("naive", _choice("naive", "cachegen"), "serde of remote entries")
    save_unfull_chunk: bool = _f(False, parse_bool, "also store the last partial chunk of a request")
    blocking_timeout_secs: float = _f(10.0, _float(0, strict=True), "deadline of one remote call, seconds")
    cache_policy: str = _f("LRU", lambda n, v: _str(n, v).upper(), "eviction policy of the CPU and disk tiers")
    pin_lease_secs: float = _f(600.0, _float(0, strict=True), "how long a pin lasts unless renewed, seconds")
    write_queue_size: int = _f(64, _int(1), "write-behind queue length (chunks) per disk/remote tier")
    extra_stages: tuple[str, ...] = _f((), _str_list, "plugin pipeline stages to enable by name")
    # --- what goes into every key
    model_name: str = _f("kvpipe-model", _str, "model name in every key")
    world_size: int = _f(1, _int(1), "world size in every key")
    worker_id: int = _f(0, _int(0), "worker id (rank) in every key")
    kv_dtype: str = _f("float16", _str, "KV dtype in every key (float16, bfloat16, float32, ...)")
    key_format: str = _f("kvpipe", _str, "format prefix of every key (LMCache uses the engine name, e.g. vllm)")
    # --- controller and P2P (002)
    enable_controller: bool = _f(False, parse_bool, "register this instance with a kvpipe controller")
    lmcache_instance_id: str = _f("kvpipe_instance", _str, "this instance's id at the controller", "instance_id")
    controller_url: str | None = _f(None, _hostport, "controller HTTP host:port")
    controller_pull_url: str | None = _f(None, _hostport, "controller pull endpoint host:port")
    controller_reply_url: str | None = _f(None, _hostport, "controller reply endpoint host:port")
    lmcache_worker_ports: tuple[int, ...] = _f((), _ports, "worker command ports, one per rank", "worker_ports")
    enable_p2p: bool = _f(False, parse_bool, "share KV with other instances peer to peer")
    p2p_host: str | None = _f(None, _opt_str, "address peers reach this instance on")
    p2p_init_ports: tuple[int, ...] = _f((), _ports, "P2P transfer ports, one per rank")
    p2p_lookup_ports: tuple[int, ...] = _f((), _ports, "P2P lookup ports, one per rank")
    transfer_channel: str | None = _f(None, _opt_str, "P2P transfer channel (nixl, tcp)")
    shm_name: str | None = _f(None, _opt_str, "shared-memory segment name")
    # --- CacheBlend (003)
    enable_blending: bool = _f(False, parse_bool, "reuse non-prefix chunks with selective recompute (CacheBlend)")
    blend_check_layers: tuple[int, ...] | None = _f(None, _int_list, "layers checked for KV deviation",
                                                    "check_layers")
    blend_recompute_ratios: tuple[float, ...] | None = _f(None, _float_list, "share of tokens recomputed",
                                                          "recomp_ratios")
    blend_special_str: str = _f(" # # ", lambda n, v: str(v), "separator between blended segments")
    blend_min_tokens: int = _f(256, _int(1), "shortest segment worth blending")
    # --- CacheGen (issue 5)
    cachegen_bins: tuple[int, ...] | None = _f(None, _int_list, "quantization bins per layer group")
    cachegen_anchor_group: int = _f(256, _int(1), "tokens per CacheGen anchor group (256: one per chunk)")
    cachegen_lossless: bool = _f(False, parse_bool, "CacheGen: code the symbols losslessly (tests)")
    cachegen_key_bins: tuple[int, ...] | None = _f(None, _int_list, "CacheGen: K bins per layer (last repeats)")
    cachegen_value_bins: tuple[int, ...] | None = _f(None, _int_list, "CacheGen: V bins per layer (last repeats)")
    cachegen_anchor_bins: int = _f(254, _int(2), "CacheGen: quantization bins of anchor tokens (2..254)")
    cachegen_table_group: int = _f(0, _int(0), "CacheGen: channels per probability table; 0 = one per head")
    cachegen_coder: str = _f("auto", _choice("auto", "native", "constriction"), "CacheGen entropy coder")
    # --- free-form plugin settings
    extra_config: dict[str, Any] = _f(attrs.Factory(dict), _mapping, "settings for plugins")

    sources: dict[str, str] = attrs.field(factory=dict, eq=False, repr=False, metadata={"internal": True})

    def __attrs_post_init__(self) -> None:
        for a in attrs.fields(type(self)):
            if "parse" in a.metadata:
                object.__setattr__(self, a.name, a.metadata["parse"](a.name, getattr(self, a.name)))
        if self.local_cpu_use_hugepages and (self.enable_p2p or self.shm_name):
            raise ConfigError("local_cpu_use_hugepages: true is incompatible with enable_p2p and shm_name")
        from kvpipe.serde.entry import dtype_from_name
        try:
            dtype_from_name(self.kv_dtype)
        except ValueError as exc:
            raise ConfigError(f"kv_dtype: {exc}") from None

    # ------------------------------------------------------------------ derived values
    @property
    def local_disk_path(self) -> Path | None:
        """The disk tier directory (``file://`` stripped), or ``None``."""
        if self.local_disk is None:
            return None
        return Path(self.local_disk.removeprefix("file://")).expanduser()

    @property
    def max_local_cpu_bytes(self) -> int:
        """``max_local_cpu_size`` in bytes."""
        return int(self.max_local_cpu_size * 1e9)

    @property
    def max_local_disk_bytes(self) -> int:
        """``max_local_disk_size`` in bytes."""
        return int(self.max_local_disk_size * 1e9)

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied (validated)."""
        sources = dict(self.sources)
        sources.update({k: "argument" for k in changes})
        return attrs.evolve(self, **changes, sources=sources)

    def as_dict(self) -> dict[str, Any]:
        """Every key and its effective value."""
        return {k: v for k, v in attrs.asdict(self, recurse=False).items() if k != "sources"}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], *, source: str = "argument") -> Config:
        """A config from a mapping of keys (LMCache names accepted); unknown keys warn.

        :raises ConfigError: for a bad value.
        """
        values = _normalize(mapping, source)
        return cls(**values, sources={k: source for k in values})

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
             **overrides: Any) -> Config:
        """defaults < YAML file < environment < ``overrides``.

        ``path`` defaults to ``$KVPIPE_CONFIG_FILE`` or ``$LMCACHE_CONFIG_FILE``; ``env`` to ``os.environ``.

        :raises ConfigError: for an unreadable file, a file that is not a YAML mapping, or any bad value.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        file_var = next((v for v in ("KVPIPE_CONFIG_FILE", "LMCACHE_CONFIG_FILE") if env.get(v)), None)
        if path is None and file_var is not None:
            path = env[file_var]
        if path is not None:
            data = _read_yaml(Path(path))
            file_values = _normalize(data, f"file {path}")
            values.update(file_values)
            sources.update({k: f"file {path}" for k in file_values})
        env_values, env_sources = _from_env(env)
        values.update(env_values)
        sources.update(env_sources)
        arg_values = _normalize(overrides, "argument")
        values.update(arg_values)
        sources.update({k: "argument" for k in arg_values})
        return cls(**values, sources=sources)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Same as :meth:`load` with no path and no overrides."""
        return cls.load(None, env)

    def source_of(self, key: str) -> str:
        """Where ``key``'s value came from: ``default``, ``file PATH``, ``env NAME`` or ``argument``."""
        return self.sources.get(key, "default")


def _fields() -> dict[str, attrs.Attribute[Any]]:
    return {a.name: a for a in attrs.fields(Config) if "parse" in a.metadata}


def known_keys() -> dict[str, str]:
    """Every key and its one-line description."""
    return {name: a.metadata["doc"] for name, a in _fields().items()}


def _aliases() -> dict[str, str]:
    out = {name: name for name in _fields()}
    for name, a in _fields().items():
        for alias in a.metadata["aliases"]:
            out[alias] = name
    return out


def _normalize(mapping: Mapping[str, Any], source: str) -> dict[str, Any]:
    aliases = _aliases()
    out: dict[str, Any] = {}
    for raw_key, value in mapping.items():
        key = str(raw_key).strip().lower()
        name = aliases.get(key)
        if name is None:
            close = difflib.get_close_matches(key, list(aliases), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            log.warning("unknown config key %r from %s is ignored%s", raw_key, source, hint)
            continue
        out[name] = value
    return out


def _from_env(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    aliases = _aliases()
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    # LMCACHE_* first so that KVPIPE_* overrides it.
    for prefix in ("LMCACHE_", "KVPIPE_"):
        for var, value in env.items():
            if not var.startswith(prefix):
                continue
            suffix = var[len(prefix):]
            if suffix in _NON_KEY_ENV:
                continue
            key = suffix.lower()
            name = aliases.get(key)
            if name is None:
                if prefix == "KVPIPE_":
                    close = difflib.get_close_matches(key, list(aliases), n=1)
                    hint = f"; did you mean KVPIPE_{close[0].upper()}?" if close else ""
                    log.warning("unknown environment variable %s is ignored%s", var, hint)
                continue
            values[name] = value
            sources[name] = f"env {var}"
    return values, sources


def _read_yaml(path: Path) -> Mapping[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path}: not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path}: expected a mapping of keys, got {type(data).__name__}")
    return data
