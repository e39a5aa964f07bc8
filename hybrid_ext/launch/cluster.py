"""An emulated cluster on one Linux machine: hosts as namespaces joined by a bridge, each with its own sshd.

``hybrid-ext cluster up --hosts 2 [--nic 1gbit]`` gives hosts ``node0``, ``node1``, ... that launchers reach as
they reach real nodes. Each host is

- a network namespace (``hxc-node<i>``) whose ``eth0`` is one end of a veth pair; the other end sits on the
  bridge ``hxc-br0``. Addresses come from ``10.213.0.0/24``, which exists only on that bridge: the machine's own
  namespace has no address or route in it, so nothing the cluster does reaches any other network;
- its own UTS namespace (hostname), mount namespace (``/etc/hosts`` naming every host by its bridge address, so
  gloo binds there as on a real cluster; an ``/etc/resolv.conf`` without nameservers, so no lookup leaves the
  host; an ``/etc/ssh/ssh_config`` pointing at the cluster's key and known_hosts; a private ``/dev/shm``) and
  PID namespace (``pkill`` in a host, as DeepSpeed's launcher does on failure, stays in it; stopping the host
  stops everything in it);
- a real OpenSSH server accepting the cluster's own key for root, so ``ssh node1`` works from every host.
  Keys, known_hosts and configs live in the cluster's state directory; nothing under ``~/.ssh`` is written,
  and no ssh file of this machine's own namespace changes (the hosts' ``/etc/ssh/ssh_config`` is a bind mount
  inside their mount namespaces);
- with ``--nic RATE``, egress shaped by ``tc qdisc ... tbf rate RATE`` on ``eth0``;
- with ``--cpus-per-host C``, a cgroup whose CPU quota is C cores (:mod:`hybrid_ext.launch.cpu_quota`): without
  it the hosts share every core of the machine, and one whose ranks wait on the network lends its cores to the
  others, as real hosts cannot.

A long-lived keeper process (PID 1 of the host's PID namespace) holds the namespaces; ``cluster run HOST --
CMD`` enters them with ``nsenter``. The filesystem is shared, as a cluster's NFS home is. ``down`` removes
everything, and ``up`` first removes any leftovers of its own naming (a crashed run's).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from hybrid_ext import config
from hybrid_ext.launch import cpu_quota

SUBNET_PREFIX = "10.213.0"  # 10.213.0.0/24: lives only on the cluster's bridge, inside its namespaces
FIRST_ADDRESS = 10  # node<i> is 10.213.0.<10 + i>
MAX_HOSTS = 64
NAME_PREFIX = "hxc-"  # every namespace and link the cluster creates; up removes leftovers with it
BRIDGE = f"{NAME_PREFIX}br0"
INTERFACE = "eth0"  # each host's interface on the bridge (what GLOO_SOCKET_IFNAME / --network-interface name)
STATE_DIR_ENV = "HYBRID_EXT_CLUSTER_DIR"
KEEPER_MARK = "hybrid-ext-cluster-keeper"
SSHD = "/usr/sbin/sshd"
PACKAGES = {"openssh-server": SSHD, "openssh-client": "ssh", "pdsh": "pdsh"}  # pdsh: DeepSpeed's multi-node launch
READY_TIMEOUT = 30.0


class ClusterError(RuntimeError):
    """The emulated cluster could not be started, found or used; the message says why."""


class ClusterUnavailable(ClusterError):
    """This machine cannot run an emulated cluster (no root, namespaces, tools); the message lists what is missing."""


@dataclass
class Host:
    name: str
    address: str
    pid: int  # the keeper: PID 1 of the host's PID namespace, as this machine's root namespace numbers it


class Cluster:
    """A handle on the machine's emulated cluster: its hosts (read from the state directory, so the handle stays
    valid when the cluster is brought up again), and how to run commands on them."""

    interface = INTERFACE

    def __init__(self, directory: Path | None = None) -> None:
        self.state_dir = directory or state_dir()

    def _state(self) -> dict:
        try:
            return json.loads((self.state_dir / "cluster.json").read_text())
        except (OSError, ValueError) as exc:
            raise ClusterError(f"no emulated cluster is up (no state in {self.state_dir})") from exc

    @property
    def hosts(self) -> list[Host]:
        return [Host(**h) for h in self._state()["hosts"]]

    @property
    def nic(self) -> str | None:
        return self._state().get("nic")

    @property
    def cpus_per_host(self) -> float | None:
        return self._state().get("cpus_per_host")

    @property
    def names(self) -> list[str]:
        return [h.name for h in self.hosts]

    def host(self, ref: str | int) -> Host:
        """A host by name (``node1``) or index (``1``, ``"1"``)."""
        for host in self.hosts:
            if host.name == str(ref):
                return host
        if isinstance(ref, int) or str(ref).isdigit():
            index = int(ref)
            if 0 <= index < len(self.hosts):
                return self.hosts[index]
        raise ClusterError(
            f"no host {ref!r} in the emulated cluster; its hosts: {', '.join(self.names)} (or 0-{len(self.hosts) - 1})"
        )

    def command(self, ref: str | int, argv: Sequence[str], cwd: str | os.PathLike | None = None) -> list[str]:
        """``argv`` run inside host ``ref`` in directory ``cwd`` (default: this one), with this process's env."""
        host = self.host(ref)
        wd = os.fspath(cwd) if cwd is not None else os.getcwd()
        # -p: in the host's PID namespace (nsenter forks for it); --wd: nsenter with -m would start in /.
        inside = ["nsenter", "-t", str(host.pid), "-n", "-u", "-m", "-p", f"--wd={wd}", "--", *argv]
        # Into the host's cgroup from this mount namespace, where the cgroup files are; nsenter's child inherits it.
        procs = self._state().get("cgroups", {}).get(host.name)
        return cpu_quota.entering(procs, inside) if procs else inside

    def run(self, ref: str | int, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        """``subprocess.run`` of ``argv`` inside host ``ref`` (keyword ``cwd`` is the directory there)."""
        cwd = kwargs.pop("cwd", None)
        return subprocess.run(self.command(ref, argv, cwd), **kwargs)

    def popen(self, ref: str | int, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        cwd = kwargs.pop("cwd", None)
        return subprocess.Popen(self.command(ref, argv, cwd), **kwargs)

    def slots(self, per_host: int) -> str:
        """Horovod's ``-H`` value: ``node0:2,node1:2``."""
        return ",".join(f"{name}:{per_host}" for name in self.names)

    def hostfile(self, per_host: int) -> str:
        """A DeepSpeed hostfile: one ``name slots=N`` line per host."""
        return "".join(f"{name} slots={per_host}\n" for name in self.names)

    def kill_strays(self, names: Sequence[str] | None = None) -> None:
        """Kill every process in the hosts (those ``names``; default all) but their keepers and sshd listeners
        (e.g. ranks a timed-out launcher left behind on other hosts)."""
        for host in self.hosts:
            if names is not None and host.name not in names:
                continue
            keep = {host.pid, *_children(host.pid, "sshd")}
            with contextlib.suppress(OSError):
                keep.add(int(Path(f"/proc/{host.pid}/stat").read_text().rsplit(")", 1)[1].split()[1]))  # unshare
            for pid in _netns_pids(_netns(host.name)):
                if pid not in keep:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)

    def traffic(self, ref: str | int) -> dict[str, int]:
        """Bytes and packets host ``ref`` has sent (``tx_*``) and received (``rx_*``) on its cluster interface."""
        stats = {}
        for key in ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets"):
            done = self.run(ref, ["cat", f"/sys/class/net/{self.interface}/statistics/{key}"], capture_output=True)
            stats[key] = int(done.stdout)
        return stats

    def alive(self) -> bool:
        try:
            return all(_is_keeper(h.pid) for h in self.hosts)
        except (ClusterError, KeyError, TypeError):
            return False


def state_dir() -> Path:
    return config.get(STATE_DIR_ENV)


# ------------------------------------------------------------------ requirements


def missing_requirements(nic: str | None = None, cpus_per_host: float | None = None) -> list[str]:
    """What this machine lacks for an emulated cluster, each as a sentence (empty: it can run one)."""
    missing = []
    if os.geteuid() != 0:
        missing.append(
            "root: the cluster creates network namespaces, a bridge, veth pairs and mounts (run it as root, e.g. "
            "with sudo, or in a container started with --privileged)"
        )
    tools = {"ip": "iproute2", "unshare": "util-linux", "nsenter": "util-linux", "mount": "mount"}
    if nic:
        tools["tc"] = "iproute2 (for --nic)"
    for tool, package in tools.items():
        if shutil.which(tool) is None:
            missing.append(f"`{tool}` (Debian package {package})")
    if missing:
        return missing
    no_quota = cpu_quota.missing() if cpus_per_host else None
    if no_quota:
        missing.append(f"for --cpus-per-host: {no_quota}")
    probe = subprocess.run(
        ["unshare", "--net", "--uts", "--mount", "--pid", "--fork", "true"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        missing.append(
            f"network/UTS/mount/PID namespaces: `unshare --net --uts --mount --pid --fork true` failed: "
            f"{probe.stderr.strip() or probe.returncode}"
        )
    return missing


def unavailable_reason() -> str | None:
    """Why an emulated cluster cannot run here (for test skips), or None. Missing packages that ``up`` would
    install with apt do not count."""
    missing = missing_requirements()
    absent = [pkg for pkg, tool in PACKAGES.items() if not _have(tool)]
    if not missing and absent and shutil.which("apt-get") is None:
        missing.append(f"packages {', '.join(absent)} (no apt-get to install them)")
    return "; ".join(missing) or None


def _have(tool: str) -> bool:
    return Path(tool).exists() if tool.startswith("/") else shutil.which(tool) is not None


def ensure_packages() -> None:
    """Install openssh-server, the ssh client and pdsh with apt where they are missing (as root)."""
    absent = [pkg for pkg, tool in PACKAGES.items() if not _have(tool)]
    if not absent:
        return
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable(f"missing {', '.join(absent)}, and there is no apt-get here to install them")
    print(f"hybrid-ext cluster: installing {' '.join(absent)} with apt-get", file=sys.stderr, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300"]
    install = subprocess.run(
        [*apt, "install", "-y", "--no-install-recommends", *absent], env=env, capture_output=True, text=True
    )
    if install.returncode != 0:  # a fresh machine may have no package lists yet
        subprocess.run([*apt, "update"], env=env, capture_output=True, text=True)
        install = subprocess.run(
            [*apt, "install", "-y", "--no-install-recommends", *absent], env=env, capture_output=True, text=True
        )
    still = [pkg for pkg, tool in PACKAGES.items() if not _have(tool)]
    if still:
        raise ClusterUnavailable(
            f"could not install {', '.join(still)} with apt-get:\n{install.stdout[-2000:]}{install.stderr[-2000:]}"
        )


# ------------------------------------------------------------------ up / down


def up(
    hosts: int = 2,
    nic: str | None = None,
    *,
    cpus_per_host: float | None = None,
    reuse: bool = False,
    quiet: bool = True,
) -> Cluster:
    """Start an emulated cluster of ``hosts`` hosts (egress shaped to ``nic``, e.g. ``1gbit``; each limited to
    ``cpus_per_host`` cores' worth of CPU time, default the whole machine shared) and return it.

    Over a live cluster: with ``reuse``, return it if it has at least ``hosts`` hosts and the same ``nic`` and
    CPUs; otherwise refuse. Raises :class:`ClusterUnavailable` when this machine cannot run one, naming what is
    missing.
    """
    if not 1 <= hosts <= MAX_HOSTS:
        raise ValueError(f"--hosts must be between 1 and {MAX_HOSTS}, got {hosts}")
    burst = _tbf_burst(nic) if nic else None
    if cpus_per_host is not None:
        cpu_quota.quota_us(cpus_per_host)  # a bad value named before anything starts
    missing = missing_requirements(nic, cpus_per_host)
    if missing:
        raise ClusterUnavailable("cannot start an emulated cluster here; missing: " + "; ".join(missing))
    live = current()
    if live is not None:
        if reuse and _fits(live, hosts, nic, cpus_per_host):
            return live
        raise ClusterError(
            f"an emulated cluster is already up ({', '.join(live.names)}, nic {live.nic or 'unshaped'}, "
            f"{_cpus_text(live.cpus_per_host)}; state in "
            f"{live.state_dir}): use it, or stop it first with `hybrid-ext cluster down`"
        )
    ensure_packages()
    remove_leftovers()
    try:
        cluster = _build(hosts, nic, burst, cpus_per_host)
        _check_ssh(cluster)
    except BaseException:
        remove_leftovers()
        raise
    if not quiet:
        print(describe(cluster), flush=True)
    return cluster


def down() -> bool:
    """Stop the emulated cluster and remove everything it made; False if there was nothing to remove."""
    return remove_leftovers()


def current() -> Cluster | None:
    """The live cluster described by the state directory, or None (none, or a crashed one's leftovers)."""
    cluster = Cluster()
    return cluster if cluster.alive() else None


def remove_leftovers() -> bool:
    """Remove every namespace, link, process and file of the cluster's naming; True if anything was there."""
    found = False
    for netns in _list_netns():
        found = True
        for pid in _netns_pids(netns):  # only processes inside the cluster's own namespaces
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_gone(netns)
        subprocess.run(["ip", "netns", "delete", netns], capture_output=True)
    for link in _list_links():
        found = True
        subprocess.run(["ip", "link", "delete", link], capture_output=True)
    found = cpu_quota.remove(NAME_PREFIX) or found  # after the namespaces: their processes are gone
    directory = state_dir()
    if directory.exists():
        found = True
        shutil.rmtree(directory, ignore_errors=True)
    return found


@contextlib.contextmanager
def emulated_cluster(hosts: int = 2, nic: str | None = None, cpus_per_host: float | None = None) -> Iterator[Cluster]:
    """A cluster for the ``with`` block: a live one with enough hosts (and the same ``nic`` and CPUs) is used and
    left up; otherwise one is started and removed afterwards."""
    live = current()
    if live is not None and _fits(live, hosts, nic, cpus_per_host):
        yield live
        return
    cluster = up(hosts, nic, cpus_per_host=cpus_per_host)
    try:
        yield cluster
    finally:
        down()


def _fits(live: Cluster, hosts: int, nic: str | None, cpus_per_host: float | None) -> bool:
    return len(live.hosts) >= hosts and live.nic == nic and live.cpus_per_host == cpus_per_host


def _cpus_text(cpus_per_host: float | None) -> str:
    return f"{cpus_per_host:g} cores each" if cpus_per_host else "the machine's cores shared"


def describe(cluster: Cluster) -> str:
    shaped = f", egress {cluster.nic} each" if cluster.nic else ""
    shaped += f", {_cpus_text(cluster.cpus_per_host)}"
    lines = [f"emulated cluster: {len(cluster.hosts)} hosts on {BRIDGE} ({SUBNET_PREFIX}.0/24{shaped})"]
    lines += [f"  {h.name}  {h.address}  {cluster.interface}  keeper pid {h.pid}" for h in cluster.hosts]
    lines.append(f"  state: {cluster.state_dir}; try `hybrid-ext cluster run node0 -- ssh node1 hostname`")
    return "\n".join(lines)


def _build(hosts: int, nic: str | None, burst: int | None, cpus_per_host: float | None) -> Cluster:
    directory = state_dir()
    directory.mkdir(parents=True, mode=0o700)
    names = [f"node{i}" for i in range(hosts)]
    addresses = [f"{SUBNET_PREFIX}.{FIRST_ADDRESS + i}" for i in range(hosts)]
    _write_ssh_files(directory, names, addresses)
    (directory / "hosts").write_text(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        + "".join(f"{a}\t{n}\n" for n, a in zip(names, addresses))
    )
    # No nameserver: a lookup of a name outside /etc/hosts asks 127.0.0.1 in the host, and fails at once.
    (directory / "resolv.conf").write_text("options timeout:1 attempts:1\n")
    _ip("link", "add", BRIDGE, "type", "bridge")
    # Bridged frames skip iptables (br_netfilter), so a host firewall's FORWARD policy cannot drop them.
    subprocess.run(["ip", "link", "set", BRIDGE, "type", "bridge", "nf_call_iptables", "0"], capture_output=True)
    with contextlib.suppress(OSError):  # no link-local address either: this namespace stays off the bridge
        Path(f"/proc/sys/net/ipv6/conf/{BRIDGE}/disable_ipv6").write_text("1")
    _ip("link", "set", BRIDGE, "up")
    (directory / "keeper.py").write_text(_KEEPER)
    keepers = []
    try:
        cgroups = {name: str(cpu_quota.create(_netns(name), cpus_per_host)) for name in names} if cpus_per_host else {}
    except OSError as exc:
        raise ClusterUnavailable(f"--cpus-per-host {cpus_per_host:g}: {exc}") from None
    if cpus_per_host:
        (directory / "cgroup-mounts").write_text("".join(f"{' '.join(m)}\n" for m in cpu_quota.mounts()))
    for i, (name, address) in enumerate(zip(names, addresses)):
        netns = _netns(name)
        _ip("netns", "add", netns)
        _ip("link", "add", f"{NAME_PREFIX}veth{i}", "type", "veth", "peer", "name", INTERFACE, "netns", netns)
        _ip("link", "set", f"{NAME_PREFIX}veth{i}", "master", BRIDGE, "up")
        _ip("-n", netns, "addr", "add", f"{address}/24", "dev", INTERFACE)
        _ip("-n", netns, "link", "set", INTERFACE, "up")
        if nic:
            _run(["tc", "-n", netns, "qdisc", "add", "dev", INTERFACE, "root", "tbf", "rate", nic,
                  "burst", str(burst), "latency", "50ms"])  # fmt: skip
        keepers.append(_start_keeper(directory, name, netns, cgroups.get(name)))
    pids = [_wait_ready(directory, name, proc) for name, proc in zip(names, keepers)]
    hosts_state = [asdict(Host(n, a, p)) for n, a, p in zip(names, addresses, pids)]
    state = {"hosts": hosts_state, "nic": nic, "cpus_per_host": cpus_per_host, "cgroups": cgroups}
    (directory / "cluster.json").write_text(json.dumps(state))
    return Cluster(directory)


def _write_ssh_files(directory: Path, names: list[str], addresses: list[str]) -> None:
    key = directory / "id_ed25519"
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "hybrid-ext-cluster", "-f", str(key)])
    (directory / "authorized_keys").write_text(key.with_suffix(".pub").read_text())
    known = []
    for name, address in zip(names, addresses):
        (directory / name).mkdir()
        host_key = directory / name / "ssh_host_ed25519_key"
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(host_key)])
        algorithm, public = host_key.with_suffix(".pub").read_text().split()[:2]
        known.append(f"{name},{address} {algorithm} {public}\n")
        (directory / name / "sshd_config").write_text(
            f"ListenAddress 0.0.0.0\nHostKey {host_key}\nPidFile {directory / name / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {directory / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "PrintMotd no\nLogLevel ERROR\n"
            # Launchers open a connection per rank at once (horovodrun, pdsh): do not drop any.
            "MaxStartups 200\nMaxSessions 200\n"
        )
    (directory / "known_hosts").write_text("".join(known))
    # The hosts' /etc/ssh/ssh_config: the cluster's key and known_hosts, never ~/.ssh's.
    (directory / "ssh_config").write_text(
        f"Host *\n  IdentityFile {key}\n  IdentitiesOnly yes\n  UserKnownHostsFile {directory / 'known_hosts'}\n"
        f"  GlobalKnownHostsFile {directory / 'known_hosts'}\n  StrictHostKeyChecking yes\n  BatchMode yes\n"
        "  ConnectTimeout 10\n  LogLevel ERROR\n"
    )


# The keeper: PID 1 of a host. It sets the host up (hostname, mounts, loopback, sshd), says so, then reaps
# orphans until it is stopped; when it exits the kernel kills everything left in its PID namespace.
_KEEPER = r"""
import os, signal, socket, subprocess, sys, time
from pathlib import Path
_, mark, name, state = sys.argv
state = Path(state)
here = state / name
def run(*argv):
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
try:
    socket.sethostname(name)
    run("mount", "--bind", str(state / "hosts"), "/etc/hosts")
    run("mount", "--bind", str(state / "ssh_config"), "/etc/ssh/ssh_config")
    if os.path.exists("/etc/resolv.conf"):
        run("mount", "--bind", str(state / "resolv.conf"), "/etc/resolv.conf")
    run("mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", "/dev/shm")
    # `ip netns exec` mounted a fresh /sys: the cgroup files go back, so ranks can read their host's CPU quota.
    mounts = state / "cgroup-mounts"
    for line in (mounts.read_text().splitlines() if mounts.exists() else []):
        kind, target, options = line.split()
        os.makedirs(target, exist_ok=True)
        run("mount", "-t", kind, "-o", options, kind, target)
    run("ip", "link", "set", "lo", "up")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    log = open(here / "sshd.log", "ab")
    subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(here / "sshd_config")],
                     stdin=subprocess.DEVNULL, stdout=log, stderr=log)
except Exception as exc:
    (here / "error").write_text(str(exc))
    sys.exit(1)
(here / "ready").write_text("ready")
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(1)
"""


def _start_keeper(directory: Path, name: str, netns: str, procs: str | None) -> subprocess.Popen:
    log = open(directory / name / "keeper.log", "wb")  # noqa: SIM115 - handed to the keeper
    # `ip netns exec` also mounts a /sys of the host's network namespace (interfaces as the host sees them).
    unshare = ["unshare", "--uts", "--mount", "--pid", "--fork", "--mount-proc", "--propagation", "private"]
    keeper = [sys.executable, str(directory / "keeper.py"), KEEPER_MARK, name, str(directory)]
    argv = ["ip", "netns", "exec", netns, *unshare, *keeper]
    if procs:  # the keeper, its sshd and what ssh starts run in the host's cgroup
        argv = cpu_quota.entering(procs, argv)
    with log:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)


def _wait_ready(directory: Path, name: str, proc: subprocess.Popen) -> int:
    deadline = time.monotonic() + READY_TIMEOUT
    here = directory / name
    while time.monotonic() < deadline:
        if (here / "error").exists():
            raise ClusterError(f"host {name} failed to start: {(here / 'error').read_text()}")
        if proc.poll() is not None:
            raise ClusterError(f"host {name}'s keeper exited ({proc.returncode}): {_tail(here / 'keeper.log')}")
        if (here / "ready").exists():
            keeper = _children(proc.pid)
            if keeper:
                return keeper[0]
        time.sleep(0.05)
    raise ClusterError(f"host {name} was not ready within {READY_TIMEOUT:.0f}s: {_tail(here / 'keeper.log')}")


def _check_ssh(cluster: Cluster) -> None:
    """Every host reaches node0 and node0 reaches every host by name over ssh (retried while sshd starts)."""
    pairs = [(cluster.names[0], h) for h in cluster.names] + [(h, cluster.names[0]) for h in cluster.names[1:]]
    for src, dst in pairs:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            done = cluster.run(src, ["ssh", dst, "hostname"], capture_output=True, text=True, timeout=30)
            if done.returncode == 0 and done.stdout.strip() == dst:
                break
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"`ssh {dst} hostname` from {src} failed ({done.returncode}): {done.stdout}{done.stderr}"
                    f"sshd log of {dst}: {_tail(cluster.state_dir / dst / 'sshd.log')}"
                )
            time.sleep(0.2)


# ------------------------------------------------------------------ small helpers


def _netns(name: str) -> str:
    return f"{NAME_PREFIX}{name}"


def _list_netns() -> list[str]:
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return [line.split()[0] for line in done.stdout.splitlines() if line.startswith(NAME_PREFIX)]


def _list_links() -> list[str]:
    done = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True)
    names = [line.split(":")[1].strip().split("@")[0] for line in done.stdout.splitlines() if ":" in line]
    return [n for n in names if n.startswith(NAME_PREFIX)]


def _netns_pids(netns: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
    return [int(p) for p in done.stdout.split() if p.isdigit()]


def _wait_gone(netns: str, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while _netns_pids(netns) and time.monotonic() < deadline:
        time.sleep(0.05)


def _children(pid: int, containing: str = "") -> list[int]:
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return [c for c in children if containing in _cmdline(c)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _is_keeper(pid: int) -> bool:
    return KEEPER_MARK in _cmdline(pid)


def _ip(*args: str) -> None:
    _run(["ip", *args])


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise ClusterError(f"`{' '.join(argv)}` failed: {done.stderr.strip()}")


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


_RATE = re.compile(r"^(\d+(?:\.\d+)?)([kmgt]?)(bit|bps)$", re.IGNORECASE)
_SCALE = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def rate_bytes_per_second(rate: str) -> float:
    """Bytes per second of a rate in tc's syntax (1gbit, 100mbit, 125mbps)."""
    match = _RATE.match(rate.strip())
    if not match:
        raise ValueError(f"--nic {rate!r}: give a rate as tc writes it, e.g. 1gbit, 100mbit, 10gbit")
    value, scale, unit = float(match[1]), _SCALE[match[2].lower()], match[3].lower()
    return value * scale / (8 if unit == "bit" else 1)


def _tbf_burst(rate: str) -> int:
    """Bytes of burst for tbf at ``rate``: 200 µs worth, at least 72 KiB.

    A NIC sends nothing faster than its rate; tbf lets ``burst`` bytes through at once after an idle spell, so a
    large burst makes short exchanges free (10 ms of it hid half of a model's collectives at 250 Mbit/s). The floor
    is one full GSO segment as the qdisc counts it (64 KiB and its packets' headers, about 68.4 kB): tbf splits a
    segment larger than its burst into packets in software, which cost the hosts 13× the CPU per byte (8.9 against
    0.6 ns at 1 Gbit/s, 64 against 72 KiB). The qdisc's timer is a high-resolution one, so the small burst still
    holds the rate over long transfers (docs/multi-host.md has both measurements).
    """
    return max(int(rate_bytes_per_second(rate) * 200e-6), 73728)


# ------------------------------------------------------------------ the command line


def main(args) -> int:
    """``hybrid-ext cluster up | run | down | status`` (parsed in hybrid_ext/cli.py)."""
    action = args.cluster_action
    try:
        if action == "up":
            up(args.hosts, args.nic, cpus_per_host=args.cpus_per_host, quiet=False)
            return 0
        if action == "down":
            print("emulated cluster removed" if down() else "no emulated cluster to remove", flush=True)
            return 0
        cluster = current()
        if cluster is None:
            raise ClusterError("no emulated cluster is up: start one with `hybrid-ext cluster up --hosts 2`")
        if action == "status":
            print(describe(cluster), flush=True)
            return 0
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        command = cluster.command(args.host, argv or [os.environ.get("SHELL", "/bin/sh")])
    except (ClusterError, ValueError) as exc:
        print(f"hybrid-ext cluster {action}: {exc}", file=sys.stderr, flush=True)
        return 1
    os.execvp(command[0], command)  # the command's exit status and signals are the caller's
    return 127  # not reached
