"""The ``kvpipe`` CLI: ``config show`` (values and sources; a bad config is one line, exit code 2, no traceback),
``inspect`` of a disk directory, and ``--help`` everywhere. Most tests call ``main()`` in-process; a few run the
installed ``kvpipe`` command in a subprocess to check what a user sees."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kvpipe
from fixtures_core import CHUNK, DATA, make_kv, make_tokens, small_config
from kvpipe.cli import main


def _kvpipe_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "kvpipe"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("kvpipe")
    return [found] if found else [sys.executable, "-m", "kvpipe.cli"]


def _run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KVPIPE_", "LMCACHE_"))}
    return subprocess.run([*_kvpipe_cmd(), *args], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**clean, **env})


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith(("KVPIPE_", "LMCACHE_")):
            monkeypatch.delenv(k)


def test_bad_config_is_one_line_exit_2_subprocess(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("chunk_size: -1\n")
    proc = _run(["config", "show", "--config", str(bad)], tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "chunk_size" in lines[0] and "-1" in lines[0] and "integer" in lines[0]


def test_config_show_sources_subprocess(tmp_path: Path) -> None:
    proc = _run(["config", "show", "--json"], tmp_path,
                LMCACHE_CONFIG_FILE=str(DATA / "seeds" / "000_redis-offload.yaml"), KVPIPE_CHUNK_SIZE="128")
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["chunk_size"] == {"value": 128, "source": "env KVPIPE_CHUNK_SIZE"}
    assert shown["remote_url"]["value"] == "redis://localhost:6379"
    assert shown["remote_url"]["source"].startswith("file ")
    assert shown["local_cpu"] == {"value": True, "source": "default"}


@pytest.mark.parametrize(("text", "key"), [
    ('max_local_cpu_size: "lots"\n', "max_local_cpu_size"),
    ('remote_url: "redis//x"\n', "remote_url"),
    # checked as opening a cache would check it (the connector is built, nothing is connected)
    ('remote_url: "redis://h:notaport"\n', "bad port"),
    ('remote_url: "lm://h:1?auth_tokn=x"\n', "unknown option 'auth_tokn'"),
    ('remote_url: "infinistore://127.0.0.1:12345"\n', "InfiniStore is not supported"),
])
def test_bad_configs_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert main(["config", "show", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvpipe: error: ") and key in err and "\n" not in err


def test_config_show_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("chunk_size: 64\n")
    assert main(["config", "show", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "chunk_size" in out and "64" in out and f"file {cfg}" in out
    assert "keys at their defaults" in out
    assert main(["config", "show", "--config", str(cfg), "--all"]) == 0
    assert "max_local_cpu_size" in capsys.readouterr().out


def test_help_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["config", "--help"], ["config", "show", "--help"], ["inspect", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
        assert "usage:" in capsys.readouterr().out


def test_missing_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


async def _fill_disk(tmp_path: Path) -> Path:
    cfg = small_config(tmp_path, disk=True)
    async with kvpipe.open_cache(cfg) as cache:
        await cache.store(make_tokens(3 * CHUNK), make_kv(3 * CHUNK))
        await cache.flush()
    return tmp_path / "disk"


async def test_inspect_disk_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    disk = await _fill_disk(tmp_path)
    assert main(["inspect", str(disk), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["chunks"] == 3 and report["bad_entries"] == []
    [group] = report["groups"]
    assert group["model"] == "test-model" and group["tokens"] == 3 * CHUNK and group["dtype"] == "float32"
    assert main(["inspect", str(disk)]) == 0
    assert "3 chunks" in capsys.readouterr().out


async def test_inspect_verify_finds_bad_entries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    disk = await _fill_disk(tmp_path)
    victim = sorted(disk.glob("*.kvpe"))[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert main(["inspect", str(disk), "--json"]) == 0  # header only: the payload flip is not seen
    assert json.loads(capsys.readouterr().out)["bad_entries"] == []
    assert main(["inspect", str(disk), "--verify", "--json"]) == 0
    bad = json.loads(capsys.readouterr().out)["bad_entries"]
    assert len(bad) == 1 and victim.name in bad[0]


async def test_inspect_delete(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    disk = await _fill_disk(tmp_path)
    assert main(["inspect", str(disk), "--model", "other-model", "--delete", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["deleted"] == 0
    capsys.readouterr()
    # no filter: refused (one line, exit 2) and nothing is lost, unless --all says so
    assert main(["inspect", str(disk), "--delete"]) == 2
    err = capsys.readouterr().err
    assert "would delete every entry" in err and "--all" in err and len(err.strip().splitlines()) == 1
    assert len(list(disk.glob("*.kvpe"))) == 3
    assert main(["inspect", str(disk), "--all"]) == 2  # --all alone deletes nothing either
    assert main(["inspect", str(disk), "--delete", "--all", "--model", "m"]) == 2
    assert len(list(disk.glob("*.kvpe"))) == 3
    capsys.readouterr()
    assert main(["inspect", str(disk), "--delete", "--all", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["deleted"] == 3
    assert list(disk.glob("*.kvpe")) == []


def test_inspect_not_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_inspect_without_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect"]) == 2
    assert "inspect:" in capsys.readouterr().err
