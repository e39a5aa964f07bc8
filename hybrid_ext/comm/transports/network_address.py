"""The address this host advertises to the others: found the way gloo and NCCL users expect, without probing.

1. ``GLOO_SOCKET_IFNAME`` or else ``NCCL_SOCKET_IFNAME`` (their first entry; NCCL's ``=name`` form taken as
   exact, a plain name as a prefix, ``^`` exclusions skipped): that interface's IPv4 address;
2. else the interface of the default route (``/proc/net/route``);
3. else the first interface that is up and not loopback.

Not ``gethostbyname(gethostname())``: on many machines the hostname resolves to 127.0.1.1 or to nothing.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

IFNAME_ENVS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def interface_addresses() -> dict[str, str]:
    """IPv4 address of every interface that has one."""
    import psutil

    return {
        name: entry.address
        for name, entries in psutil.net_if_addrs().items()
        for entry in entries
        if entry.family == socket.AF_INET
    }


def _named_interface(spec: str, addresses: dict[str, str]) -> str | None:
    first = spec.split(",")[0].strip()
    if not first or first.startswith("^"):
        return None
    if first.startswith("="):
        return first[1:] if first[1:] in addresses else None
    if first in addresses:
        return first
    return next((name for name in sorted(addresses) if name.startswith(first)), None)


def default_route_interface() -> str | None:
    try:
        lines = Path("/proc/net/route").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 2 and fields[1] == "00000000":
            return fields[0]
    return None


def advertised_address() -> str:
    """This host's IPv4 address for other hosts to connect to (see the module docstring)."""
    addresses = interface_addresses()
    for env in IFNAME_ENVS:
        spec = os.environ.get(env, "").strip()
        if not spec or spec.startswith("^"):  # unset, or only exclusions: no interface named
            continue
        name = _named_interface(spec, addresses)
        if name is None:
            known = ", ".join(f"{n} ({a})" for n, a in sorted(addresses.items())) or "none"
            raise RuntimeError(f"{env}={spec!r} names no interface with an IPv4 address here; interfaces: {known}")
        return addresses[name]
    route = default_route_interface()
    if route in addresses:
        return addresses[route]
    import psutil

    up = {name for name, stats in psutil.net_if_stats().items() if stats.isup}
    for name in sorted(addresses):
        if name in up and not addresses[name].startswith("127."):
            return addresses[name]
    return "127.0.0.1"
