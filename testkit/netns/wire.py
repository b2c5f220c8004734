#!/usr/bin/env python3
"""Point-to-point links with a fixed one-way delay, for the network-namespace tests.

`tc netem` needs the kernel's sch_netem module, which some kernels (our CI machine's among them) lack. This
is the same idea in user space: for each link it creates two TUN devices and copies every packet from one to
the other after DELAY_MS. The test then moves each device into its namespace and configures it like a NIC.

Usage: wire.py NAME_A NAME_B DELAY_MS [NAME_A NAME_B DELAY_MS ...]
Prints "ready" once all devices exist; runs until killed. Each direction queues at most QUEUE_LIMIT packets
(like a router buffer); beyond that packets are dropped.
"""

import fcntl
import heapq
import os
import selectors
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
QUEUE_LIMIT = 20000


def open_tun(name):
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def main(args):
    if len(args) == 0 or len(args) % 3 != 0:
        sys.exit(__doc__)
    selector = selectors.DefaultSelector()
    for i in range(0, len(args), 3):
        a, b, delay = open_tun(args[i]), open_tun(args[i + 1]), float(args[i + 2]) / 1000.0
        selector.register(a, selectors.EVENT_READ, (b, delay))
        selector.register(b, selectors.EVENT_READ, (a, delay))
    print("ready", flush=True)
    queue = []  # (due, sequence, destination fd, packet)
    sequence = 0
    while True:
        timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else None
        for key, _ in selector.select(timeout):
            destination, delay = key.data
            while True:
                try:
                    packet = os.read(key.fd, 65535)
                except (BlockingIOError, OSError):
                    break
                if len(queue) < QUEUE_LIMIT:
                    heapq.heappush(queue, (time.monotonic() + delay, sequence, destination, packet))
                    sequence += 1
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, destination, packet = heapq.heappop(queue)
            try:
                os.write(destination, packet)
            except OSError:
                pass  # the device is down or its queue is full: the packet is lost, as on a real link


if __name__ == "__main__":
    main(sys.argv[1:])
