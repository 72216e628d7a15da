"""Fixtures for the libvirt backend: the local daemon, an ssh "remote", a second host.

* ``libvirtd``: the local daemon (``scripts/libvirtd start``; quick and idempotent).
* ``ssh_uri``: an ``sshd`` on 127.0.0.1 at a free port with a throwaway key,
  and the ``qemu+ssh://`` URI that reaches the local daemon through it.
* ``second_host``: a second libvirtd in its own network namespace (a veth
  pair, 10.x.0.1 <-> 10.x.0.2) and mount namespace (private /etc, /run,
  /var/lib, /var/cache, /var/log libvirt directories), reachable at
  ``qemu+tcp://10.x.0.2/system``. Made and torn down by the fixture.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from libvirt_hosts import LOCAL, ROOT, SecondHost, answers, run


@pytest.fixture(scope="session")
def libvirtd() -> str:
    """The local daemon's URI, the daemon started if needed."""
    run(str(ROOT / "scripts" / "libvirtd"), "start", timeout=300)
    return LOCAL


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def ssh_uri(libvirtd: str) -> Iterator[str]:
    """``qemu+ssh://root@127.0.0.1:<port>/system`` through a throwaway sshd and key."""
    work = Path(tempfile.mkdtemp(prefix="vkt-ssh-"))
    os.chmod(work, 0o700)
    for key in ("host", "client"):
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / key))
    shutil.copy(work / "client.pub", work / "authorized_keys")
    port = _free_port()
    (work / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {work / 'host'}\n"
        f"PidFile {work / 'sshd.pid'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        f"AuthorizedKeysFile {work / 'authorized_keys'}\nStrictModes no\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    proc = subprocess.Popen(
        ["/usr/sbin/sshd", "-D", "-f", str(work / "sshd_config"), "-E", str(work / "sshd.log")],
        stdin=subprocess.DEVNULL,
    )
    uri = f"qemu+ssh://root@127.0.0.1:{port}/system?keyfile={work / 'client'}&no_verify=1"
    try:
        deadline = time.monotonic() + 30
        while not answers(uri):
            if time.monotonic() > deadline or proc.poll() is not None:
                log = (work / "sshd.log").read_text() if (work / "sshd.log").exists() else ""
                raise AssertionError(f"sshd on port {port} does not take libvirt: {log}")
            time.sleep(0.1)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def _claim_netns() -> str:
    """A free host tag, its network namespace made: ``ip netns add`` is the atomic claim,
    so parallel test workers never take (or tear down) each other's second host."""
    start = os.getpid() % 200
    for i in range(200):
        tag = (start + i) % 200 + 20
        if run("ip", "netns", "add", f"vkt-host{tag}", check=False).returncode == 0:
            return str(tag)
    raise AssertionError("no free vkt-host<N> network namespace (ip netns list)")


@pytest.fixture
def second_host(libvirtd: str) -> Iterator[SecondHost]:
    """A second libvirt host (own netns + mountns), torn down after the test."""
    tag = _claim_netns()
    netns, veth = f"vkt-host{tag}", f"vkt{tag}a"
    work = Path(tempfile.mkdtemp(prefix="vkt-host-"))
    for sub in ("etc", "run", "lib", "cache", "log"):
        (work / sub).mkdir()
    addr_a, addr_b = f"10.232.{tag}.1", f"10.232.{tag}.2"
    (work / "etc" / "libvirtd.conf").write_text(
        f'listen_tls = 0\nlisten_tcp = 1\nlisten_addr = "{addr_b}"\nauth_tcp = "none"\n'
        f'host_uuid = "5b2a9b8e-0000-4000-8000-0000000000{int(tag):02x}"\n'
        'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
    )
    (work / "etc" / "qemu.conf").write_text(
        'user = "root"\ngroup = "root"\nstdio_handler = "file"\n'
    )
    caps = Path("/var/cache/libvirt/qemu/capabilities")
    if caps.is_dir():  # the local daemon's QEMU probe, so this one does not redo it (~8 s)
        shutil.copytree(caps, work / "cache" / "qemu" / "capabilities")
    run("ip", "link", "del", veth, check=False)  # left by a run that crashed with this tag
    host = SecondHost(
        uri=f"qemu+tcp://{addr_b}/system",
        migration_uri=f"tcp://{addr_b}",
        local_migration_uri=f"tcp://{addr_a}",
        netns=netns,
        veth=veth,
        work=work,
    )
    try:
        run("ip", "link", "add", veth, "type", "veth", "peer", "name", f"vkt{tag}b")
        run("ip", "link", "set", f"vkt{tag}b", "netns", netns)
        run("ip", "addr", "add", f"{addr_a}/30", "dev", veth)
        run("ip", "link", "set", veth, "up")
        for cmd in (
            ("ip", "link", "set", "lo", "up"),
            ("ip", "addr", "add", f"{addr_b}/30", "dev", f"vkt{tag}b"),
            ("ip", "link", "set", f"vkt{tag}b", "up"),
        ):
            run("ip", "netns", "exec", netns, *cmd)
        host.start()
        yield host
    finally:
        host.stop()
        run("ip", "link", "del", veth, check=False)
        run("ip", "netns", "del", netns, check=False)
        shutil.rmtree(work, ignore_errors=True)
