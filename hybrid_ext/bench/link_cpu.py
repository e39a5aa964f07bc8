"""CPU seconds per byte sent between two emulated hosts: the kernel's TCP work at both ends (and the shaping's).

While a gradient bucket crosses the link during backward, ranks that keep every core busy lose this time: the
step model (:mod:`hybrid_ext.parallel.step_model`) charges it as the link's ``cpu_per_byte``. Measured by sending
one TCP stream from host 0 to host 1 and reading the machine's busy time (``/proc/stat``: user, nice, system, irq,
softirq) over the transfer, less the busy time the machine had idle just before. That the machine's counters see
both ends holds only because the emulated hosts share this machine's CPUs (``hybrid-ext cluster``).

``python -m hybrid_ext.bench.link_cpu recv`` prints the port it listens on, then the bytes it got;
``python -m hybrid_ext.bench.link_cpu send ADDRESS PORT BYTES`` connects, says so, waits for a line on stdin, then
sends.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time

CHUNK = 4 << 20
SECONDS_OF_TRAFFIC = 2.0  # long enough that starting and stopping the stream is noise
MIN_BYTES, MAX_BYTES = 32 << 20, 512 << 20
SOCKET_TIMEOUT_S = 60.0  # a stream that stalls this long ends the probe's processes (and the probe, with an error)


def busy_seconds(stat: str) -> float:
    """The machine's busy CPU seconds so far from ``/proc/stat``'s text (its first, all-CPU line)."""
    fields = stat.splitlines()[0].split()
    if fields[0] != "cpu":
        raise ValueError(f"not /proc/stat: {stat[:40]!r}")
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _busy_now() -> float:
    with open("/proc/stat") as f:
        return busy_seconds(f.read())


def probe_bytes(bytes_per_second: float | None) -> int:
    """How much to send: about ``SECONDS_OF_TRAFFIC`` at the link's rate, within [MIN_BYTES, MAX_BYTES]."""
    if not bytes_per_second:
        return MAX_BYTES
    wanted = int(bytes_per_second * SECONDS_OF_TRAFFIC)
    return max(MIN_BYTES, min(MAX_BYTES, wanted - wanted % CHUNK))


def measure(cluster, nbytes: int, repeats: int = 3) -> float:
    """CPU seconds per byte sent from ``cluster``'s host 0 to its host 1 (see the module docstring): the median of
    ``repeats`` streams of ``nbytes`` (the machine's counters tick every 10 ms, and it is never quite idle)."""
    return statistics.median(_one_stream(cluster, nbytes) for _ in range(repeats))


def _one_stream(cluster, nbytes: int, idle_seconds: float = 1.0) -> float:
    me = [sys.executable, "-m", "hybrid_ext.bench.link_cpu"]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    receiver = cluster.popen(1, [*me, "recv"], **pipes)
    sender = None
    try:
        port = receiver.stdout.readline().strip()
        if not port.isdigit():
            raise RuntimeError(f"the link's CPU probe: no receiver on {cluster.host(1).name}: {_error_of(receiver)}")
        sender = cluster.popen(
            0, [*me, "send", cluster.host(1).address, port, str(nbytes)], stdin=subprocess.PIPE, **pipes
        )
        if sender.stdout.readline().strip() != "connected":  # both interpreters up: the machine is idle again
            raise RuntimeError(f"the link's CPU probe: {cluster.host(0).name} did not connect: {_error_of(sender)}")
        start = _busy_now()
        time.sleep(idle_seconds)
        idle_rate = (_busy_now() - start) / idle_seconds
        began, start = time.perf_counter(), _busy_now()
        sender.stdin.write("go\n")
        sender.stdin.close()
        got = receiver.stdout.readline().strip()  # once the stream has ended (or stalled: the sockets time out)
        busy, wall = _busy_now() - start, time.perf_counter() - began
        if got != str(nbytes):
            raise RuntimeError(f"the link's CPU probe received {got or 'nothing'} of {nbytes} bytes: "
                               f"{_error_of(receiver) or _error_of(sender)}")  # fmt: skip
        return max(0.0, busy - idle_rate * wall) / nbytes
    finally:
        _end(cluster, [p for p in (sender, receiver) if p is not None])


def _error_of(process: subprocess.Popen) -> str:
    """The last line a probe process wrote to stderr, once it has exited (else that it is still running)."""
    try:
        process.wait(timeout=SOCKET_TIMEOUT_S + 5)
    except subprocess.TimeoutExpired:
        return "it is still running"
    lines = process.stderr.read().strip().splitlines()
    return lines[-1] if lines else f"it exited with {process.returncode}"


def _end(cluster, processes: list[subprocess.Popen]) -> None:
    """Wait for the probe's processes; any still running past the sockets' timeout are killed inside their hosts
    (killing ``nsenter`` alone would leave its child)."""
    for process in processes:
        if process.stdin and not process.stdin.closed:
            process.stdin.close()  # a sender still waiting for its go: EOF ends it
    for process in processes:
        try:
            process.wait(timeout=SOCKET_TIMEOUT_S + 5)
        except subprocess.TimeoutExpired:
            cluster.kill_strays([cluster.host(0).name, cluster.host(1).name])
            process.kill()
            process.wait()


def _receive() -> None:
    with socket.socket() as server:
        server.settimeout(SOCKET_TIMEOUT_S)
        server.bind(("0.0.0.0", 0))
        server.listen(1)
        print(server.getsockname()[1], flush=True)
        connection, _ = server.accept()
        connection.settimeout(SOCKET_TIMEOUT_S)
        buffer, total = bytearray(CHUNK), 0
        with connection:
            while n := connection.recv_into(buffer):
                total += n
        print(total, flush=True)


def _send(address: str, port: int, nbytes: int) -> None:
    data = bytes(CHUNK)
    with socket.create_connection((address, port), timeout=SOCKET_TIMEOUT_S) as connection:
        print("connected", flush=True)
        if sys.stdin.readline() != "go\n":
            return  # the probe gave up before the stream
        sent = 0
        while sent < nbytes:
            piece = data[: min(CHUNK, nbytes - sent)]
            connection.sendall(piece)
            sent += len(piece)


if __name__ == "__main__":
    if sys.argv[1:2] == ["recv"]:
        _receive()
    elif sys.argv[1:2] == ["send"] and len(sys.argv) == 5:
        _send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        raise SystemExit("usage: python -m hybrid_ext.bench.link_cpu recv | send ADDRESS PORT BYTES")
