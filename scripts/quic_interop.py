#!/usr/bin/env python3
"""Checks `udpring serve --app quic` with a QUIC client from another implementation: aioquic
(Python, `pip install aioquic`). ALPN `echo`: streams of several sizes echoed byte for byte;
ALPN `hq-interop`: `GET PATH` and the body compared with a local file (or printed).

  python3 scripts/quic_interop.py --addr 127.0.0.1:4433 --cafile cert.pem echo
  python3 scripts/quic_interop.py --addr 127.0.0.1:4433 --cafile cert.pem hq /file --expect FILE

Exit status 0 when every check passed.
"""
import argparse
import asyncio
import ssl
import sys

from aioquic.asyncio import connect
from aioquic.quic.configuration import QuicConfiguration


async def echo(client, sizes):
    for n, size in enumerate(sizes):
        data = bytes((i * 31 + n * 7) & 0xFF for i in range(size))
        reader, writer = await client.create_stream()
        writer.write(data)
        writer.write_eof()
        back = await reader.read()
        if back != data:
            print(f"echo of {size} B: got {len(back)} B, not the same bytes")
            return False
        print(f"echo of {size} B: exact")
    return True


async def hq(client, path, expect):
    reader, writer = await client.create_stream()
    writer.write(f"GET {path}\r\n".encode())
    writer.write_eof()
    body = await reader.read()
    if expect is None:
        sys.stdout.buffer.write(body)
        return True
    with open(expect, "rb") as f:
        want = f.read()
    ok = body == want
    print(f"GET {path}: {len(body)} B, {'exact' if ok else 'DIFFERENT'}")
    return ok


async def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--addr", required=True, help="HOST:PORT of the server")
    p.add_argument("--cafile", required=True, help="the server's certificate (PEM)")
    p.add_argument("--server-name", default="localhost")
    sub = p.add_subparsers(dest="mode", required=True)
    e = sub.add_parser("echo")
    e.add_argument("--sizes", default="1,1000,100000,1048576")
    h = sub.add_parser("hq")
    h.add_argument("path")
    h.add_argument("--expect", help="a file the body must equal")
    args = p.parse_args()
    host, port = args.addr.rsplit(":", 1)
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=["echo" if args.mode == "echo" else "hq-interop"],
        server_name=args.server_name,
        verify_mode=ssl.CERT_REQUIRED,
    )
    config.load_verify_locations(args.cafile)
    async with connect(host.strip("[]"), int(port), configuration=config) as client:
        if args.mode == "echo":
            ok = await echo(client, [int(s) for s in args.sizes.split(",")])
        else:
            ok = await hq(client, args.path, args.expect)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(asyncio.wait_for(main(), 60)))
