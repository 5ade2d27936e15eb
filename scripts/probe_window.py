#!/usr/bin/env python3
"""Where unknown-peer datagrams land while a per-client socket is bound but not yet connected.

Run in a private namespace: sudo unshare -n sh -c "ip link set lo up && python3 scripts/probe_window.py"
See kernel-notes/connected-sockets.md."""
import socket, sys
def s_bound(port, connect=None):
    s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1<<20)
    s.bind(("127.0.0.1", port))
    if connect: s.connect(connect)
    s.setblocking(False); return s
def drain(s):
    n=0
    while True:
        try: s.recv(2048); n+=1
        except BlockingIOError: return n
for existing in (0, 1, 100):
    port=7300+existing
    L=[s_bound(port), s_bound(port)]
    conns=[s_bound(port, ("127.0.0.2", 10000+i)) for i in range(existing)]
    new=s_bound(port)   # bound, not yet connected
    peers=[]
    for j in range(200):
        c=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); c.bind(("127.0.0.3", 50000+j)); peers.append(c)
    for c in peers: c.sendto(b"x"*64, ("127.0.0.1", port))
    print(f"connected sessions={existing}: listener0={drain(L[0])} listener1={drain(L[1])} new(unconnected)={drain(new)} connected={sum(drain(c) for c in conns)}")
