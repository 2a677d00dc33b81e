"""mdm.toml validation: every error names the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from mdm.config import BridgeSettings, load_config, parse_duration, parse_size
from mdm.errors import ConfigError

GOOD = """
[bridge]
ae_title = "MDMBRIDGE"
port = 11112
[cache]
dir = "cache"
max_bytes = "2GiB"
[[site]]
name = "CHLA"
ae_title = "CHLA_PACS"
host = "127.0.0.1"
port = 4242
[[site]]
name = "UCSF"
ae_title = "UCSF_PACS"
host = "127.0.0.1"
port = 4243
retrieve = "get"
timeout = "5s"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "mdm.toml"
    p.write_text(text)
    return p


def test_good_config(tmp_path: Path) -> None:
    c = load_config(write(tmp_path, GOOD))
    assert c.cache.dir == tmp_path / "cache"
    assert c.cache.max_bytes == 2 * 2**30
    assert [s.name for s in c.sites] == ["CHLA", "UCSF"]
    assert c.site("CHLA").retrieve == "move"
    assert c.site("UCSF").retrieve == "get"
    assert c.site("UCSF").timeout == 5.0
    assert c.site("CHLA").timeout == c.bridge.timeout
    assert c.identity is None and c.policy is None
    assert c.keys.keyring == tmp_path / "keyring.json"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (GOOD.replace("port = 4242", 'port = "x"'), "site[0].port"),
        (GOOD.replace('max_bytes = "2GiB"', 'max_bytes = "lots"'), "cache.max_bytes"),
        (GOOD.replace('retrieve = "get"', 'retrieve = "push"'), "site[1].retrieve"),
        (GOOD.replace('name = "UCSF"', 'name = "CHLA"'), "site[1].name"),
        (GOOD.replace('host = "127.0.0.1"\nport = 4242', "port = 4242"), "site[0].host"),
        (GOOD.replace("[bridge]", "[bridge]\ncolour = 1"), "bridge.colour"),
        (
            GOOD.replace('ae_title = "CHLA_PACS"', 'ae_title = "WAY_TOO_LONG_AE_TITLE"'),
            "site[0].ae_title",
        ),
        (GOOD + "\n[wat]\nx=1\n", "wat"),
        (GOOD.replace("port = 11112", 'port = 11112\nfast_dicom = "no"'), "bridge.fast_dicom"),
        (GOOD.replace("port = 11112", 'port = 11112\nread_ahead = "1GiB"'), "bridge.read_ahead"),
        (GOOD.replace("port = 11112", 'port = 11112\nread_ahead = "fast"'), "bridge.read_ahead"),
        (GOOD.replace('max_bytes = "2GiB"', 'max_bytes = "2GiB"\nfsync = "yes"'), "cache.fsync"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert ei.value.key == key
    assert str(p) in str(ei.value)
    assert ei.value.exit_code == 2


def test_read_ahead_default_and_off(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, GOOD)).bridge.read_ahead == 2**20
    off = GOOD.replace("port = 11112", 'port = 11112\nread_ahead = "0"')
    assert load_config(write(tmp_path, off)).bridge.read_ahead == 0


def test_cache_fsync_is_off_unless_asked(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, GOOD)).cache.fsync is False
    on = GOOD.replace('max_bytes = "2GiB"', 'max_bytes = "2GiB"\nfsync = true')
    assert load_config(write(tmp_path, on)).cache.fsync is True


def test_fast_dicom_is_on_unless_the_file_or_the_environment_says_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MDM_FAST_DICOM", raising=False)
    assert load_config(write(tmp_path, GOOD)).bridge.fast_dicom is True
    off = GOOD.replace("port = 11112", "port = 11112\nfast_dicom = false")
    assert load_config(write(tmp_path, off)).bridge.fast_dicom is False
    monkeypatch.setenv("MDM_FAST_DICOM", "0")
    assert load_config(write(tmp_path, GOOD)).bridge.fast_dicom is False
    assert BridgeSettings().fast_dicom is False  # settings built in code take it too
    on = GOOD.replace("port = 11112", "port = 11112\nfast_dicom = true")
    assert load_config(write(tmp_path, on)).bridge.fast_dicom is True  # the file wins


def test_missing_file_and_syntax(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="TOML syntax"):
        load_config(write(tmp_path, "[cache\n"))
    with pytest.raises(ConfigError, match="cache"):
        load_config(write(tmp_path, "[bridge]\n"))


def test_units() -> None:
    assert parse_size("50GiB") == 50 * 2**30
    assert parse_size("500 MB") == 500 * 10**6
    assert parse_size(123) == 123
    assert parse_duration("10m") == 600
    assert parse_duration("250ms") == 0.25
    with pytest.raises(ValueError):
        parse_size("-1")
    with pytest.raises(ValueError):
        parse_duration("soon")


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "command",
    [["cache", "stats"], ["mount", "MNT"], ["mount", "MNT", "--foreground"]],
    ids=["cache-stats", "mount", "mount-foreground"],
)
@pytest.mark.parametrize("where", ["file", "under-file"])
def test_a_cache_dir_that_is_a_file_is_one_line_and_exit_2(
    tmp_path: Path, command: list[str], where: str
) -> None:
    from mountutil import mdm

    (tmp_path / "afile").write_text("not a directory\n")
    cache = tmp_path / "afile" if where == "file" else tmp_path / "afile" / "cache"
    p = tmp_path / "mdm.toml"
    p.write_text(GOOD.replace('dir = "cache"', f'dir = "{cache}"'))
    (tmp_path / "mnt").mkdir()
    args = [str(tmp_path / "mnt") if a == "MNT" else a for a in command]
    res = mdm(*args, "--config", str(p), check=False, timeout=60)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert f"{p}: cache.dir" in lines[0] and str(cache) in lines[0]
