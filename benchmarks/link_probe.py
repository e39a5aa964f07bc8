"""How a link between two hosts prices one message after an idle spell, by size: a shaper's burst shows as
messages far faster than the rate; a NIC's rate shows as time proportional to size.

On an emulated cluster (docs/multi-host.md), one end on each host:

    hybrid-ext cluster run node0 -- python benchmarks/link_probe.py serve node0 &
    hybrid-ext cluster run node1 -- python benchmarks/link_probe.py send node0

Each message is length-prefixed and acknowledged with one byte, so the time covers the whole message crossing the
link; the sender prints the median of a few tries per size, each after ``--idle`` seconds of silence.
"""

import argparse
import socket
import statistics
import time

PORT = 5301
SIZES_KIB = (16, 64, 256, 1024, 4096, 32768)


def serve(host: str) -> None:
    connection, _ = socket.create_server((host, PORT)).accept()
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while head := connection.recv(8, socket.MSG_WAITALL):
        left = int.from_bytes(head, "little")
        while left:
            left -= len(connection.recv(min(left, 1 << 20)))
        connection.sendall(b"k")


def send(host: str, idle: float, tries: int) -> None:
    for _ in range(200):  # the other end may still be starting
        try:
            connection = socket.create_connection((host, PORT))
            break
        except OSError:
            time.sleep(0.05)
    else:
        raise SystemExit(f"link_probe: nothing listens on {host}:{PORT}; start `link_probe.py serve {host}` there")
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def exchange(size: int) -> float:
        start = time.perf_counter()
        connection.sendall(size.to_bytes(8, "little") + bytes(size))
        connection.recv(1)
        return time.perf_counter() - start

    exchange(1 << 20)  # TCP's window opens
    print("message KiB   ms (median)   Mbit/s")
    for kib in SIZES_KIB:
        times = []
        for _ in range(tries):
            time.sleep(idle)
            times.append(exchange(kib << 10))
        seconds = statistics.median(times)
        print(f"{kib:11d} {seconds * 1e3:12.2f} {kib * 8192 / seconds / 1e6:8.1f}", flush=True)
    connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=("serve", "send"))
    parser.add_argument("host", help="the serving host's name or address")
    parser.add_argument("--idle", type=float, default=0.05, help="seconds of silence before each message")
    parser.add_argument("--tries", type=int, default=5, help="messages per size (the median is printed)")
    args = parser.parse_args()
    if args.role == "serve":
        serve(args.host)
    else:
        send(args.host, args.idle, args.tries)


if __name__ == "__main__":
    main()
