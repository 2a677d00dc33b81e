"""packaging/: the systemd units, sysusers and tmpfiles snippets, and the wheel.

The units are read as systemd reads them (sections of ``Key=value`` lines, keys may repeat)
and held to their hardening; every ``mdm`` command line in them is parsed by the real ``mdm``
command. Where systemd's tools are installed (Debian's ``systemd`` package; no running systemd
is needed) ``systemd-analyze verify`` checks the units and ``systemd-sysusers`` and
``systemd-tmpfiles`` install the user and directories into a scratch root. The wheel is built
with ``python -m build``, installed into a fresh venv from the package index, and run.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from mdm.cli.main import main
from mdm_demo.localpacs import free_port
from tests.conftest import PacsPair
from tests.test_e2e_mount import same_dataset

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "packaging"
UNITS = PKG / "systemd"
INSTALLED_MDM = "/opt/mdm/bin/mdm"
MDM = Path(sys.executable).parent / "mdm"

# Settings that make systemd run the service in namespaces of its own (in a mount namespace the
# FUSE mount would be invisible to the host; a private network would cut the PACS off), or that
# make it set no_new_privs for a service with User= and no CAP_SYS_ADMIN (the setuid
# fusermount3 could not mount). systemd.exec(5).
HIDE_THE_MOUNT = {
    "ProtectSystem", "ProtectHome", "PrivateTmp", "ReadWritePaths", "ReadOnlyPaths",
    "InaccessiblePaths", "ExecPaths", "NoExecPaths", "TemporaryFileSystem", "BindPaths",
    "BindReadOnlyPaths", "PrivateMounts", "MountFlags", "ProtectProc", "ProcSubset",
    "ProtectControlGroups", "RootDirectory", "RootImage", "PrivateUsers", "PrivateNetwork",
    "NetworkNamespacePath", "ProtectHostname", "MountAPIVFS",
}  # fmt: skip
FORCE_NO_NEW_PRIVS = {
    "SystemCallFilter", "SystemCallArchitectures", "RestrictAddressFamilies",
    "RestrictNamespaces", "PrivateDevices", "ProtectKernelTunables", "ProtectKernelModules",
    "ProtectKernelLogs", "ProtectClock", "MemoryDenyWriteExecute", "RestrictRealtime",
    "RestrictSUIDSGID", "DynamicUser", "LockPersonality",
}  # fmt: skip


def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as systemd reads them: (key, value) pairs, repeats kept."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path.name}:{n}: a setting outside any section"
        assert "=" in line and not line.endswith("\\"), f"{path.name}:{n}: {raw!r}"
        key, value = line.split("=", 1)
        current.append((key.strip(), value.strip()))
    return sections


def one(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    values = [v for k, v in unit[section] if k == key]
    assert len(values) == 1, f"[{section}] {key}: {values}"
    return values[0]


def every(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit[section] if k == key]


def exec_argv(value: str) -> list[str]:
    """The argv of an Exec*= line, its prefixes (-, +, @, !, :) dropped."""
    return shlex.split(value.lstrip("-+@!:"))


def parse_with_mdm(argv: list[str]) -> tuple[str, dict[str, object]]:
    """Parse an ``mdm`` command line with the real command: (subcommand, its parameters)."""
    args = [a.replace("%i", "inst") for a in argv]
    ctx = main.make_context("mdm", args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        rest = [*ctx.protected_args, *ctx.args]
    name, cmd, sub_args = main.resolve_command(ctx, rest)
    assert cmd is not None and name is not None
    sub = cmd.make_context(name, sub_args, parent=ctx)
    return name, sub.params


def tmpfiles() -> dict[str, tuple[str, str, str]]:
    """packaging/tmpfiles.d/mdm.conf: path -> (mode, user, group)."""
    out = {}
    for line in (PKG / "tmpfiles.d" / "mdm.conf").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            typ, path, mode, user, group, _age = line.split()
            assert typ == "d"
            out[path] = (mode, user, group)
    return out


# ---------------------------------------------------------------------------- mount unit
def test_mount_unit_runs_unprivileged_and_stays_visible() -> None:
    u = read_unit(UNITS / "mdm-mount@.service")
    svc = dict(u["Service"])
    assert one(u, "Service", "User") == "mdm" and one(u, "Service", "Group") == "mdm"
    # Only what the setuid fusermount3 needs to mount and unmount; the daemon holds nothing.
    assert one(u, "Service", "CapabilityBoundingSet") == "CAP_SYS_ADMIN"
    assert one(u, "Service", "AmbientCapabilities") == ""
    assert one(u, "Service", "NoNewPrivileges") == "no"
    hiding = sorted(HIDE_THE_MOUNT & svc.keys())
    assert not hiding, f"these would hide the FUSE mount from the host: {hiding}"
    forcing = sorted(FORCE_NO_NEW_PRIVS & svc.keys())
    assert not forcing, f"these set no_new_privs, fusermount3 could not mount: {forcing}"
    assert one(u, "Service", "UMask") == "0077"
    assert one(u, "Service", "LimitCORE") == "0"
    assert one(u, "Service", "Restart") == "on-failure"
    assert set(one(u, "Service", "RestartPreventExitStatus").split()) == {"2", "3"}
    assert "MDM_TOKEN_FILE=/etc/mdm/%i.jwt" in every(u, "Service", "Environment")


def test_mount_unit_commands_are_mdm_commands() -> None:
    u = read_unit(UNITS / "mdm-mount@.service")
    start = exec_argv(one(u, "Service", "ExecStart"))
    assert start[0] == INSTALLED_MDM
    name, params = parse_with_mdm(start[1:])
    assert name == "mount" and params["foreground"] is True
    assert str(params["mountpoint"]) == "/mnt/mdm/inst"
    assert str(params["config_path"]) == "/etc/mdm/inst.toml"
    stop = exec_argv(one(u, "Service", "ExecStop"))
    assert stop[0] == INSTALLED_MDM
    name, params = parse_with_mdm(stop[1:])
    assert name == "umount" and str(params["mountpoint"]) == "/mnt/mdm/inst"
    # The instance's directories: made by ExecStartPre (as root, "+"), 0700, owned by %u,
    # inside the parents that tmpfiles.d creates.
    made: list[str] = []
    for pre in every(u, "Service", "ExecStartPre"):
        assert pre.startswith("+")
        argv = exec_argv(pre)
        assert argv[:6] == ["/usr/bin/install", "-d", "-m", "0700", "-o", "%u"]
        made += argv[8:]
    assert sorted(made) == [
        "/mnt/mdm/%i",
        "/var/cache/mdm/%i",
        "/var/lib/mdm/%i",
        "/var/log/mdm/%i",
    ]
    dirs = tmpfiles()
    for d in made:
        assert os.path.dirname(d) in dirs


def test_mount_unit_commands_in_mdm_help() -> None:
    """The real ``mdm`` lists the subcommands and global options the units use."""
    res = subprocess.run([str(MDM), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    for word in ("mount", "umount", "keyserver", "--log-level", "--log-format"):
        assert re.search(rf"(^|\s){re.escape(word)}\b", res.stdout), word
    for sub in ("mount", "umount", "keyserver"):
        res = subprocess.run(
            [str(MDM), "--log-level", "INFO", sub, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, res.stderr


# ---------------------------------------------------------------------------- key server, gateway
@pytest.mark.parametrize(
    ("unit", "writable", "command", "config"),
    [
        (
            "mdm-keyserver@.service",
            ["/var/lib/mdm/keyserver", "/var/log/mdm/keyserver"],
            "keyserver",
            "/etc/mdm/keyserver-inst.toml",
        ),
        (
            "mdm-gateway.service",
            ["/var/cache/mdm/gateway", "/var/lib/mdm/gateway", "/var/log/mdm/gateway"],
            "gateway",
            "/etc/mdm/gateway.toml",
        ),
    ],
)
def test_service_units_are_fully_sandboxed(
    unit: str, writable: list[str], command: str, config: str
) -> None:
    u = read_unit(UNITS / unit)
    assert one(u, "Service", "User") == "mdm"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectHome": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "RestrictSUIDSGID": "yes",
        "UMask": "0077",
        "LimitCORE": "0",
        "Restart": "on-failure",
    }.items():
        assert one(u, "Service", key) == value, key
    # Exactly these directories are writable, and tmpfiles.d makes them 0700 for mdm.
    assert sorted(one(u, "Service", "ReadWritePaths").split()) == writable
    dirs = tmpfiles()
    for d in writable:
        assert dirs[d] == ("0700", "mdm", "mdm")
    start = exec_argv(one(u, "Service", "ExecStart"))
    assert start[0] == INSTALLED_MDM
    name, params = parse_with_mdm(start[1:])
    assert name == command and str(params["config_path"]) == config


def test_sysusers_and_tmpfiles() -> None:
    users = [
        ln.split()
        for ln in (PKG / "sysusers.d" / "mdm.conf").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert [u[:2] for u in users] == [["u", "mdm"]]
    dirs = tmpfiles()
    for parent in ("/var/cache/mdm", "/var/log/mdm", "/var/lib/mdm"):
        assert dirs[parent] == ("0711", "root", "root"), parent
    assert dirs["/etc/mdm"] == ("0750", "root", "mdm")


# ---------------------------------------------------------------------------- the credentials
def _unit_bounding_set(unit: Path) -> str:
    """The unit's CapabilityBoundingSet= in setpriv's terms (``-all,+sys_admin``)."""
    caps = one(read_unit(unit), "Service", "CapabilityBoundingSet").split()
    return ",".join(["-all", *("+" + c.removeprefix("CAP_").lower() for c in caps)])


def _mount_as_the_unit(
    tmp_path: Path,
    bounding: str,
    nnp: bool,
    config: str | None = None,
    reads: tuple[str, ...] = (),
) -> dict[str, object]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    fusermount = shutil.which("fusermount3")
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("unshare", "setpriv")):
        pytest.skip("needs root, unshare and setpriv to play the unit's User= and capabilities")
    if fusermount is None or not os.stat(fusermount).st_mode & 0o4000:
        pytest.skip("needs the setuid fusermount3 (Debian package fuse3)")
    if not Path("/dev/fuse").exists() or os.statvfs(tmp_path).f_flag & os.ST_NODEV:
        pytest.skip("needs /dev/fuse, and a temporary directory that allows device nodes")
    work = tmp_path / "inst"
    (work / "mnt").mkdir(parents=True)
    (work / "mdm.toml").write_text(
        config
        or f'[bridge]\nae_title = "MDMSVC"\nhost = "127.0.0.1"\nport = {free_port()}\n'
        f'[cache]\ndir = "{work / "cache"}"\n[keys]\nkeyring = "{work / "keyring.json"}"\n'
        '[[site]]\nname = "Nowhere"\nae_title = "X"\nhost = "127.0.0.1"\nport = 1\n'
    )
    for p in (work, work / "mnt", work / "mdm.toml"):
        os.chown(p, 65534, 65534)
    argv = [sys.executable, "-m", "tests.fuse_as_service", str(work), bounding]
    argv += [f"--read={r}" for r in reads]
    res = subprocess.run(
        ["unshare", "-m", "--propagation", "private", *argv, *(["--nnp"] if nnp else [])],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr
    out: dict[str, object] = json.loads(res.stdout.splitlines()[-1])
    return out


@pytest.mark.e2e
def test_mount_unit_credentials_mount_and_unmount(tmp_path: Path) -> None:
    """As the unit runs it (an unprivileged user, bounding set CAP_SYS_ADMIN, no_new_privs
    off): the daemon mounts through fusermount3, its user reads the mount, `mdm umount` (the
    unit's ExecStop) unmounts it and the daemon exits 0."""
    unit = UNITS / "mdm-mount@.service"
    assert one(read_unit(unit), "Service", "NoNewPrivileges") == "no"
    r = _mount_as_the_unit(tmp_path, _unit_bounding_set(unit), nnp=False)
    assert r["mounted"], r["log"]
    assert "fuse.mdm" in str(r["options"]) and "user_id=65534" in str(r["options"]), r
    assert set(r["listing"]) >= {"studies", "patients", "sites"}, r  # type: ignore[arg-type]
    assert r["umount_rc"] == 0 and r["daemon_rc"] == 0, r["log"]


@pytest.mark.e2e
def test_an_ordinary_user_mounts_and_reads_from_the_pacs(
    orthanc_pair: PacsPair, tmp_path: Path
) -> None:
    """Not root: user nobody mounts (through fusermount3) and reads objects retrieved by
    C-MOVE into the receiver process, byte-exact; the cache it made is its own (0700)."""
    import base64

    pair = orthanc_pair
    aet, port = f"MDMU{free_port() % 10000}", free_port()
    pair.add_destination(aet, port)
    work = tmp_path / "inst"
    cfg = pair.write_config(tmp_path / "cfg", bridge_options={"ae_title": aet, "port": port})
    text = cfg.read_text().replace(str(tmp_path / "cfg" / "cache"), str(work / "cache"))
    text = text.replace(str(tmp_path / "cfg" / "keyring.json"), str(work / "keyring.json"))
    picks = [i for i in pair.instances if "SiteA" in pair.sites_holding(i.sop_uid)][:2]
    rels = [f"studies/{i.study_uid}/{i.series_uid}/{i.sop_uid}.dcm" for i in picks]
    unit = UNITS / "mdm-mount@.service"
    r = _mount_as_the_unit(tmp_path, _unit_bounding_set(unit), False, text, tuple(rels))
    assert r["mounted"], r["log"]
    read = r["read"]
    assert isinstance(read, dict)
    for inst, rel in zip(picks, rels, strict=True):
        assert read[rel], r["log"]
        same_dataset(base64.b64decode(read[rel]), inst)
    assert r["umount_rc"] == 0 and r["daemon_rc"] == 0, r["log"]
    cache = work / "cache"
    assert cache.stat().st_uid == 65534 and cache.stat().st_mode & 0o777 == 0o700
    assert (cache / "index.lmdb").stat().st_mode & 0o777 == 0o700


@pytest.mark.e2e
def test_no_new_privileges_or_no_capability_stops_the_mount(tmp_path: Path) -> None:
    """Why the mount unit has NoNewPrivileges=no and keeps CAP_SYS_ADMIN in its bounding set:
    with either change the setuid fusermount3 cannot mount."""
    unit = UNITS / "mdm-mount@.service"
    r = _mount_as_the_unit(tmp_path / "nnp", _unit_bounding_set(unit), nnp=True)
    assert not r["mounted"] and r["daemon_rc"] != 0
    assert "fuse_session_mount failed" in str(r["log"]), r["log"]
    r = _mount_as_the_unit(tmp_path / "nocap", "-all", nnp=False)
    assert not r["mounted"] and r["daemon_rc"] != 0
    assert "fusermount3: mount failed: Operation not permitted" in str(r["log"]), r["log"]


# ---------------------------------------------------------------------------- systemd's tools
def _systemd_tool(name: str) -> str:
    tool = shutil.which(name)
    if tool is None:
        pytest.skip(
            f"{name} is not installed (Debian package systemd; it needs no running systemd): "
            "the units were NOT checked by systemd here"
        )
    return tool


@pytest.fixture
def units_here(tmp_path: Path) -> Path:
    """The units with /opt/mdm/bin/mdm replaced by this environment's mdm (verify checks that
    every command exists and is executable)."""
    for unit in UNITS.glob("*.service"):
        text = unit.read_text().replace(INSTALLED_MDM, str(MDM))
        (tmp_path / unit.name).write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    "instance", ["mdm-mount@site1.service", "mdm-keyserver@1.service", "mdm-gateway.service"]
)
def test_systemd_analyze_verify(units_here: Path, instance: str) -> None:
    tool = _systemd_tool("systemd-analyze")
    res = subprocess.run(
        [tool, "verify", "--man=no", str(units_here / instance)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # An unknown key or a bad value is only a warning for systemd: fail on any output.
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr


@pytest.mark.parametrize(
    ("instance", "at_most"),
    [
        ("mdm-keyserver@1.service", 2.0),
        ("mdm-gateway.service", 2.0),
        ("mdm-mount@site1.service", 7.0),
    ],
)
def test_systemd_analyze_security(units_here: Path, instance: str, at_most: float) -> None:
    """systemd's exposure score (0 best, 10 worst), computed offline. The mount cannot take
    namespaces or no_new_privs (see the unit); 7.0 is what is left, and may not grow."""
    tool = _systemd_tool("systemd-analyze")
    res = subprocess.run(
        [tool, "security", "--offline=true", "--no-pager", str(units_here / instance)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", res.stdout + res.stderr)
    assert m, res.stdout + res.stderr
    assert float(m.group(1)) <= at_most


def test_sysusers_and_tmpfiles_install_into_a_root(tmp_path: Path) -> None:
    """What `systemd-sysusers` and `systemd-tmpfiles --create` make of the snippets."""
    sysusers, tmpfiles_tool = _systemd_tool("systemd-sysusers"), _systemd_tool("systemd-tmpfiles")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for cmd in (
        [sysusers, f"--root={root}", str(PKG / "sysusers.d" / "mdm.conf")],
        [tmpfiles_tool, f"--root={root}", "--create", str(PKG / "tmpfiles.d" / "mdm.conf")],
    ):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
    (entry,) = [
        ln for ln in (root / "etc/passwd").read_text().splitlines() if ln.startswith("mdm:")
    ]
    uid, gid, shell = int(entry.split(":")[2]), int(entry.split(":")[3]), entry.split(":")[6]
    assert uid < 1000 and shell.endswith("nologin")  # a system user that cannot log in
    ids = {"root": 0, "mdm": uid}
    gids = {"root": 0, "mdm": gid}
    for path, (mode, user, group) in tmpfiles().items():
        st = (root / path.lstrip("/")).stat()
        assert (oct(st.st_mode & 0o7777), st.st_uid, st.st_gid) == (
            oct(int(mode, 8)),
            ids[user],
            gids[group],
        ), path


# ---------------------------------------------------------------------------- the wheel
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_installs_into_a_fresh_venv_and_runs(tmp_path: Path) -> None:
    """python -m build (sdist, then the wheel from the sdist); a fresh venv; pip install the
    wheel with its dependencies from the package index; run what an operator runs first."""
    started = time.monotonic()
    dist = tmp_path / "dist"
    res = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (wheel,) = dist.glob("mdm_bridge-*.whl")
    (sdist,) = dist.glob("mdm_bridge-*.tar.gz")
    built = time.monotonic()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    res = subprocess.run(
        [str(venv / "bin/python"), "-m", "pip", "install", "--disable-pip-version-check", wheel],
        capture_output=True,
        text=True,
        timeout=480,
    )
    if res.returncode != 0:
        pytest.fail(
            "pip could not install the wheel into a fresh venv. Its dependencies come from the "
            "package index: is the network (PyPI or the configured index) reachable?\n"
            + res.stderr[-3000:]
        )
    installed = time.monotonic()
    mdm = venv / "bin/mdm"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MDM_LOG_FORMAT")}
    # Run from elsewhere than the source tree, so that nothing is imported from it.
    version = subprocess.run(
        [str(mdm), "--version"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60
    )
    assert version.returncode == 0, version.stderr
    assert version.stdout.splitlines()[0] == f"mdm-bridge {wheel.name.split('-')[1]}"
    policies = subprocess.run(
        [str(mdm), "policy", "test", str(ROOT / "acl_policies")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert policies.returncode == 0, policies.stdout + policies.stderr
    assert re.search(r"\d+ passed, 0 failed", policies.stdout)
    # The runtime's data files came with it, and the code is the wheel's, not the tree's.
    probe = subprocess.run(
        [
            str(venv / "bin/python"),
            "-c",
            "import mdm, mdm.deid.profile as p; print(mdm.__file__); p.load_table(); "
            "p.load_safe_private()",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.splitlines()[0].startswith(str(venv))
    import tarfile

    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in (
        "mdm/deid/annex_e.csv",
        "mdm/deid/safe_private.csv",
        "packaging/systemd/mdm-mount@.service",
        "packaging/tmpfiles.d/mdm.conf",
        "docs/INSTALL.md",
        "acl_policies",
    ):
        assert needed in names, f"{needed} is not in the sdist"
    print(
        f"build {built - started:.1f}s, venv + pip install {installed - built:.1f}s, "
        f"total {time.monotonic() - started:.1f}s"
    )
