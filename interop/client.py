#!/usr/bin/env python3
"""The QUIC interop runner's client side, played by aioquic, for testing run_endpoint.sh.

The runner (github.com/quic-interop/quic-interop-runner, testcases_quic.py) starts the
server container, lets a client of another implementation download the files of /www, then
compares /downloads with /www and reads the pcap. Without Docker or a network simulator,
this client does per case what the runner's client does, and checks from its own socket
what the runner would read in the trace (Retry seen, resumed handshake, cipher suite, key
phase, ECN marks and ACK_ECN frames, PATH_CHALLENGE after a rebinding, bytes the server sent
before the client's address was validated). The caller compares the downloads.

  client.py certs DIR [--chain N]          certs.sh's layout: cert.pem (leaf first), priv.key
  client.py CASE --addr HOST:PORT --downloads DIR FILE...

Exit status 0 when every check passed; each check prints one line.
"""
import argparse
import asyncio
import datetime
import os
import random
import socket
import ssl
import string
import struct
import sys

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicFrameType
from aioquic.tls import CipherSuite, Epoch

HQ = "hq-interop"
# IP_RECVTOS / IPV6_RECVTCLASS and their control messages (linux/in.h, linux/in6.h).
IP_RECVTOS, IP_TOS, IPV6_RECVTCLASS, IPV6_TCLASS = 13, 1, 66, 67
ECT0, ECT1, CE = 2, 1, 3


class Failed(Exception):
    pass


def varint(data, i):
    """A QUIC variable-length integer at `data[i]`: (value, length), or (None, 0) past the end."""
    if i >= len(data):
        return None, 0
    n = 1 << (data[i] >> 6)
    if i + n > len(data):
        return None, 0
    v = data[i] & 0x3F
    for b in data[i + 1 : i + n]:
        v = (v << 8) | b
    return v, n


def long_header_types(data):
    """The types of the long-header packets coalesced in one datagram, in order (RFC 9000
    sections 12.2 and 17.2: 0 Initial, 1 0-RTT, 2 Handshake, 3 Retry); a short header, a Retry
    or a truncated packet ends the walk."""
    types, i = [], 0
    while i < len(data) and data[i] & 0x80:
        kind = (data[i] & 0x30) >> 4
        types.append(kind)
        j = i + 5
        if j >= len(data) or kind == 3:
            break
        j += 1 + data[j]
        if j >= len(data):
            break
        j += 1 + data[j]
        if kind == 0:
            token, n = varint(data, j)
            if token is None:
                break
            j += n + token
        length, n = varint(data, j)
        if length is None:
            break
        i = j + n + length
    return types


def check(ok, what):
    print(("ok: " if ok else "FAILED: ") + what, flush=True)
    if not ok:
        raise Failed(what)


# --- the network: a socket this client owns, so it can mark, drop, count and rebind ---------


class Link(asyncio.DatagramProtocol):
    """A datagram transport for one connection. The runner's simulator sits between the
    endpoints; here the client's own socket plays its part: `drop_sent` drops the n-th
    datagrams sent (counting from 1), `rebind` moves to a new local port or address the
    way a NAT would (the connection does not know), ECN marks and sizes are recorded."""

    def __init__(self, family, local_host, ecn=False, drop_sent=()):
        self.family = family
        self.ecn = ecn
        self.drop_sent = set(drop_sent)
        self.sent = 0
        # (first byte, size, carries a 0-RTT packet) of every datagram that left
        self.delivered = []
        self.received = []  # (size, ECN codepoint or None, arrival index in `log`)
        self.log = []  # ("c", first byte, size) and ("s", size), in the order they happened
        self.protocol = None
        self.sock = None
        self.loop = asyncio.get_running_loop()
        # The 0-RTT case: the server's first datagrams wait (at most 200 ms) until a 0-RTT
        # packet has left, as a slower path would make them. On a loaded machine the
        # server's handshake could otherwise complete before the client's first requests
        # are written, which then leave as 1-RTT: a race of the client's scheduling, not a
        # property of the server.
        self.hold_until_0rtt = False
        self.held = []
        self._open(local_host)

    def _open(self, local_host):
        sock = socket.socket(self.family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        if self.family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVTOS, 1)
            if self.ecn:
                sock.setsockopt(socket.IPPROTO_IP, IP_TOS, ECT0)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVTCLASS, 1)
            if self.ecn:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TCLASS, ECT0)
        sock.bind((local_host, 0))
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
        self.sock = sock
        self.loop.add_reader(sock.fileno(), self._readable)

    def rebind(self, local_host):
        self._open(local_host)
        return self.sock.getsockname()

    # asyncio.DatagramTransport, as far as QuicConnectionProtocol uses it
    def sendto(self, data, addr):
        self.sent += 1
        if self.sent in self.drop_sent:
            return
        has_0rtt = 1 in long_header_types(data)
        self.delivered.append((data[0], len(data), has_0rtt))
        self.log.append(("c", data[0], len(data)))
        try:
            self.sock.sendto(data, addr)
        except BlockingIOError:
            pass  # a full socket buffer is loss, which QUIC recovers from
        if has_0rtt and self.hold_until_0rtt:
            self.loop.call_soon(self._release)

    def hold_until_0rtt_sent(self):
        self.hold_until_0rtt = True
        self.loop.call_later(0.2, self._release)

    def _release(self):
        self.hold_until_0rtt = False
        held, self.held = self.held, []
        for data, addr in held:
            self.protocol.datagram_received(data, addr)

    def close(self):
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    def _readable(self):
        while self.sock is not None:
            try:
                data, anc, _flags, addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(4))
            except (BlockingIOError, InterruptedError):
                return
            tos = None
            for level, kind, value in anc:
                if (level, kind) in ((socket.IPPROTO_IP, IP_TOS), (socket.IPPROTO_IPV6, IPV6_TCLASS)):
                    tos = value[0] if len(value) == 1 else struct.unpack("i", value[:4])[0]
            self.received.append((len(data), None if tos is None else tos & 3))
            self.log.append(("s", None, len(data)))
            if self.hold_until_0rtt:
                self.held.append((data, addr))
                continue
            self.protocol.datagram_received(data, addr)


class Client(QuicConnectionProtocol):
    """hq-interop (`GET /path\\r\\n`, the body until FIN) or HTTP/3 GETs on one connection,
    with the frames the checks need recorded."""

    def __init__(self, quic, h3=False):
        super().__init__(quic)
        self.http = H3Connection(quic) if h3 else None
        self.responses = {}  # stream id -> [headers, body, future]
        self.ack_ecn = 0
        self.path_challenges = 0
        # Taps on aioquic's frame handlers (its dispatch table, filled at construction): it
        # parses ACK_ECN and PATH_CHALLENGE but does not report them.
        handlers = quic._QuicConnection__frame_handlers

        def tap(frame_type, count):
            handle, epochs = handlers[frame_type]

            def tapped(context, frame_type, buf):
                count(frame_type)
                return handle(context, frame_type, buf)

            handlers[frame_type] = (tapped, epochs)

        tap(QuicFrameType.ACK_ECN, lambda _: setattr(self, "ack_ecn", self.ack_ecn + 1))
        tap(QuicFrameType.PATH_CHALLENGE,
            lambda _: setattr(self, "path_challenges", self.path_challenges + 1))

    def quic_event_received(self, event):
        if self.http is None:
            return super().quic_event_received(event)
        for h3_event in self.http.handle_event(event):
            entry = self.responses.get(h3_event.stream_id)
            if entry is None:
                continue
            if isinstance(h3_event, HeadersReceived):
                entry[0] = dict(h3_event.headers)
            elif isinstance(h3_event, DataReceived):
                entry[1] += h3_event.data
            if getattr(h3_event, "stream_ended", False) and not entry[2].done():
                entry[2].set_result(None)
        if isinstance(event, events.ConnectionTerminated):
            for entry in self.responses.values():
                if not entry[2].done():
                    entry[2].set_exception(Failed(f"connection closed: {event.reason_phrase}"))

    async def get(self, authority, path):
        if self.http is None:
            reader, writer = await self.create_stream()
            writer.write(f"GET /{path}\r\n".encode())
            writer.write_eof()
            return await reader.read()
        stream_id = self._quic.get_next_available_stream_id()
        entry = [None, b"", self._loop.create_future()]
        self.responses[stream_id] = entry
        self.http.send_headers(
            stream_id,
            [
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", authority.encode()),
                (b":path", f"/{path}".encode()),
            ],
            end_stream=True,
        )
        self.transmit()
        await entry[2]
        status = entry[0].get(b":status") if entry[0] else None
        check(status == b"200", f"HTTP/3 GET /{path}: status {status!r}")
        return entry[1]


async def connect(args, config, link, h3=False):
    """A connection over `link` to the server; the handshake awaited."""
    quic = QuicConnection(configuration=config, session_ticket_handler=args.tickets.append)
    client = Client(quic, h3=h3)
    link.protocol = client
    client.connection_made(link)
    client.connect(args.server)
    await client.wait_connected()
    return client


async def close(client, link):
    client.close()
    await client.wait_closed()
    link.close()


def configuration(args, alpn, **extra):
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=[alpn],
        server_name="localhost",
        verify_mode=ssl.CERT_NONE,  # the runner's clients do not verify either
        **extra,
    )
    return config


def save(args, name, body):
    with open(os.path.join(args.downloads, name), "wb") as f:
        f.write(body)


async def download(args, client, names):
    bodies = await asyncio.gather(*(client.get(args.authority, n) for n in names))
    for name, body in zip(names, bodies):
        save(args, name, body)
    print(f"ok: downloaded {len(names)} file(s), {sum(map(len, bodies))} bytes", flush=True)


def retries(client):
    return client._quic._retry_count


# --- the cases --------------------------------------------------------------------------------


async def one_connection(args, alpn=HQ, **extra):
    link = Link(args.family, args.local)
    client = await connect(args, configuration(args, alpn, **extra), link, h3=alpn != HQ)
    await download(args, client, args.files)
    return client, link


async def case_handshake(args):
    client, link = await one_connection(args)
    check(retries(client) == 0, "no Retry in the handshake case")
    await close(client, link)


async def case_transfer(args):
    # Small initial windows, so that files of megabytes need MAX_DATA and MAX_STREAM_DATA.
    client, link = await one_connection(args, max_data=256 * 1024, max_stream_data=64 * 1024)
    check(retries(client) == 0, "one handshake, no Retry")
    await close(client, link)


async def case_retry(args):
    client, link = await one_connection(args)
    check(retries(client) == 1, f"the server sent a Retry (retries seen: {retries(client)})")
    await close(client, link)


async def resume(args, early):
    first, link = await one_connection_files(args, args.files[:1])
    await close(first, link)
    check(len(args.tickets) > 0, f"the server sent {len(args.tickets)} session ticket(s)")
    ticket = args.tickets[-1]
    config = configuration(args, HQ)
    config.session_ticket = ticket
    link = Link(args.family, args.local)
    quic = QuicConnection(configuration=config, session_ticket_handler=args.tickets.append)
    client = Client(quic)
    link.protocol = client
    client.connection_made(link)
    if early:
        link.hold_until_0rtt_sent()
    client.connect(args.server)
    if early:
        check(ticket.max_early_data_size is not None and ticket.max_early_data_size > 0,
              f"the ticket allows early data (max_early_data_size {ticket.max_early_data_size})")
        # Requests before the handshake completes: they leave as 0-RTT.
        pending = asyncio.gather(*(client.get(args.authority, n) for n in args.files[1:]))
        await client.wait_connected()
        bodies = await pending
        for name, body in zip(args.files[1:], bodies):
            save(args, name, body)
        check(quic.tls.early_data_accepted, "the server accepted the 0-RTT data")
        # Counted inside coalesced datagrams too: aioquic may put the 0-RTT packet behind
        # the Initial in one datagram (it did under CPU load), whose first byte is the
        # Initial's.
        zero_rtt = sum(1 for _, _, has_0rtt in link.delivered if has_0rtt)
        check(zero_rtt > 0, f"{zero_rtt} 0-RTT datagram(s) sent")
    else:
        await client.wait_connected()
        await download(args, client, args.files[1:])
    check(quic.tls.session_resumed, "the second handshake resumed the session (no certificate)")
    await close(client, link)


async def one_connection_files(args, names):
    link = Link(args.family, args.local)
    client = await connect(args, configuration(args, HQ), link)
    await download(args, client, names)
    return client, link


async def case_resumption(args):
    await resume(args, early=False)


async def case_zerortt(args):
    await resume(args, early=True)


async def case_http3(args):
    client, link = await one_connection(args, alpn=H3_ALPN[0])
    check(client._quic.tls.alpn_negotiated == H3_ALPN[0], "ALPN h3")
    await close(client, link)


async def case_multiconnect(args):
    # The runner's handshakeloss: one connection per file under 30 % loss each way (bursts
    # of up to 3). Here the client drops what it sends and receives with a seeded generator.
    rng = random.Random(15)

    async def one(name):
        link = LossyLink(args.family, args.local, rng, rate=0.3)
        client = await connect(args, configuration(args, HQ), link)
        save(args, name, await client.get(args.authority, name))
        await close(client, link)
        return link.dropped

    dropped = await asyncio.gather(*(one(n) for n in args.files))
    print(f"ok: {len(args.files)} connections, {sum(dropped)} datagrams dropped", flush=True)
    check(sum(dropped) > 0, "the loss simulation dropped datagrams")


class LossyLink(Link):
    def __init__(self, family, local, rng, rate):
        super().__init__(family, local)
        self.rng, self.rate, self.dropped = rng, rate, 0

    def sendto(self, data, addr):
        if self.rng.random() < self.rate:
            self.dropped += 1
            return
        super().sendto(data, addr)

    def _readable(self):
        protocol = self.protocol

        class Filter:
            def datagram_received(_, data, addr):
                if self.rng.random() < self.rate:
                    self.dropped += 1
                    return
                protocol.datagram_received(data, addr)

        self.protocol = Filter()
        try:
            super()._readable()
        finally:
            self.protocol = protocol


async def case_chacha20(args):
    client, link = await one_connection(args, cipher_suites=[CipherSuite.CHACHA20_POLY1305_SHA256])
    suite = client._quic.tls.key_schedule.cipher_suite
    check(suite == CipherSuite.CHACHA20_POLY1305_SHA256, f"cipher suite {suite!r}")
    await close(client, link)


async def case_keyupdate(args):
    link = Link(args.family, args.local)
    client = await connect(args, configuration(args, HQ), link)
    # The runner wants a key update within the first MB; ask as soon as the handshake is
    # confirmed (aioquic defers the request until then).
    client._quic.request_key_update()
    await download(args, client, args.files)
    crypto = client._quic._cryptos[Epoch.ONE_RTT]
    check(crypto.send.key_phase == 1, "the client sends in key phase 1")
    check(crypto.recv.key_phase == 1, "the server answered in key phase 1 (it updated its keys)")
    await close(client, link)


async def case_ecn(args):
    link = Link(args.family, args.local, ecn=True)
    client = await connect(args, configuration(args, HQ), link)
    await download(args, client, args.files)
    marks = [e for _, e in link.received]
    marked = sum(1 for e in marks if e in (ECT0, ECT1))
    unknown = sum(1 for e in marks if e is None)
    check(unknown == 0, f"every datagram's TOS was read ({unknown} without)")
    check(marked > 0, f"the server marked {marked} of {len(marks)} datagrams ECT")
    check(CE not in marks, "no datagram marked CE")
    check(client.ack_ecn > 0, f"the server sent {client.ack_ecn} ACK_ECN frames (it read our ECT(0))")
    await close(client, link)


async def case_amplificationlimit(args):
    # The runner's scenario: the ClientHello passes, the client's next datagrams (2 to 7) are
    # lost, so the server must stop at 3 x what it received until the client's address is
    # validated (its first Handshake packet arrives).
    link = Link(args.family, args.local, drop_sent=range(2, 8))
    client = await connect(args, configuration(args, HQ), link)
    await download(args, client, args.files)
    chain = len(client._quic.tls._peer_certificate_chain) + 1
    check(chain >= 9, f"the server sent the {chain}-certificate chain it was given")
    allowed = server_sent = client_sent = 0
    validated = False
    for entry in link.log:
        if entry[0] == "c":
            kind = (entry[1] & 0x30) >> 4 if entry[1] & 0x80 else None
            if kind == 2:  # a Handshake packet first in the datagram: validated
                validated = True
                break
            if kind == 0:
                client_sent += entry[2]
                allowed += 3 * entry[2]
        else:
            server_sent += entry[2]
            check(server_sent <= allowed,
                  f"server sent {server_sent} B before validation, received {client_sent} B")
    check(validated, "the client's Handshake reached the server")
    await close(client, link)


async def case_rebind(args, new_host):
    # A NAT that moves the client to a new port (and, for rebind-addr, a new address) every
    # quarter of the transfer; the server must validate each new path.
    link = Link(args.family, args.local)
    client = await connect(args, configuration(args, HQ), link)
    task = asyncio.ensure_future(download(args, client, args.files))
    paths = {link.sock.getsockname()}
    total = sum(os.path.getsize(p) for p in args.expect) if args.expect else 0
    while not task.done():
        await asyncio.sleep(0.02)
        if task.done():
            break  # a rebinding after the last byte would have no data to be challenged by
        got = sum(size for size, _ in link.received)
        # The next rebinding once a quarter more has arrived and the server has challenged
        # the current path (a NAT that moved again before that would lose the challenge).
        challenged = client.path_challenges >= len(paths) - 1
        if total and challenged and got * 4 > total * len(paths) and len(paths) < 4:
            host = new_host(len(paths))
            paths.add(link.rebind(host))
            print(f"rebound to {link.sock.getsockname()}", flush=True)
            # The server's packets to the old port are lost now. A client that has ACKed
            # everything has nothing in flight and would wait for data that cannot reach it
            # (and the server would never see the new port): a PING from the new port, as
            # after the last byte below, tells the server where the client is.
            client._quic.send_ping(len(paths))
            client.transmit()
    await task
    # A rebinding just before the last byte: the server sees the new address on the
    # client's next packet, so ping from it until the challenge arrives (or 5 s pass).
    for n in range(250):
        if client.path_challenges >= len(paths) - 1:
            break
        client._quic.send_ping(n)
        client.transmit()
        await asyncio.sleep(0.02)
    check(len(paths) >= 2, f"the client used {len(paths)} paths")
    check(client.path_challenges >= len(paths) - 1,
          f"{client.path_challenges} PATH_CHALLENGE(s) for {len(paths) - 1} rebinding(s)")
    await close(client, link)


async def case_rebind_port(args):
    await case_rebind(args, lambda n: args.local)


async def case_rebind_addr(args):
    # The whole of 127.0.0.0/8 is local on Linux: a new source address needs no namespace.
    check(args.family == socket.AF_INET, "rebind-addr runs over IPv4 loopback")
    await case_rebind(args, lambda n: f"127.0.0.{n + 1}")


async def case_ipv6(args):
    check(args.family == socket.AF_INET6, "the server address is IPv6")
    client, link = await one_connection(args)
    check(link.sock.family == socket.AF_INET6, "the connection ran over IPv6")
    await close(client, link)


CASES = {
    "handshake": case_handshake,
    "transfer": case_transfer,
    "retry": case_retry,
    "resumption": case_resumption,
    "zerortt": case_zerortt,
    "http3": case_http3,
    "multiconnect": case_multiconnect,
    "chacha20": case_chacha20,
    "keyupdate": case_keyupdate,
    "ecn": case_ecn,
    "amplificationlimit": case_amplificationlimit,
    "rebind-port": case_rebind_port,
    "rebind-addr": case_rebind_addr,
    "ipv6": case_ipv6,
}


# --- certificates, the way the runner's certs.sh makes them -----------------------------------


def make_certs(directory, chain_len):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, key, issuer, issuer_key, ca, sans=None):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=10))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=100 if ca else None), critical=True)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    os.makedirs(directory, exist_ok=True)
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(chain_len + 1)]
    names = ["interop runner Root Certificate Authority"]
    names += [f"interop runner intermediate {i}" for i in range(1, chain_len)] + ["interop runner leaf"]
    sans = [x509.DNSName(n) for n in ("server", "server4", "server6", "server46", "localhost")]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    if chain_len != 1:  # inflated, as certs.sh does for the amplification test
        rng = random.Random()
        sans += [x509.DNSName("".join(rng.choices(string.ascii_letters + string.digits, k=250)))
                 for _ in range(20)]
    certs = [cert(names[0], keys[0], names[0], keys[0], True)]
    for i in range(1, chain_len + 1):
        leaf = i == chain_len
        certs.append(cert(names[i], keys[i], names[i - 1], keys[i - 1], not leaf, sans if leaf else None))
    pem = serialization.Encoding.PEM
    with open(os.path.join(directory, "ca.pem"), "wb") as f:
        f.write(certs[0].public_bytes(pem))
    with open(os.path.join(directory, "cert.pem"), "wb") as f:
        for c in reversed(certs[1:]):
            f.write(c.public_bytes(pem))
    # `openssl ecparam -genkey` writes the curve's parameters before the SEC1 key.
    with open(os.path.join(directory, "priv.key"), "wb") as f:
        f.write(b"-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n")
        f.write(keys[-1].private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "certs":
        p = argparse.ArgumentParser(prog="client.py certs")
        p.add_argument("dir")
        p.add_argument("--chain", type=int, default=1)
        a = p.parse_args(sys.argv[2:])
        make_certs(a.dir, a.chain)
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("case", choices=sorted(CASES))
    p.add_argument("--addr", required=True, help="HOST:PORT of the server ([::1]:PORT for IPv6)")
    p.add_argument("--downloads", required=True, help="where the files are written")
    p.add_argument("--www", help="the server's files (to know the sizes, for rebinding)")
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("files", nargs="+", help="names of files under the server's root")
    args = p.parse_args()
    host, port = args.addr.rsplit(":", 1)
    host = host.strip("[]")
    args.family = socket.AF_INET6 if ":" in host else socket.AF_INET
    args.server = (host, int(port)) if args.family == socket.AF_INET else (host, int(port), 0, 0)
    args.local = "127.0.0.1" if args.family == socket.AF_INET else "::1"
    args.authority = f"localhost:{port}"
    args.tickets = []
    args.expect = [os.path.join(args.www, n) for n in args.files] if args.www else []
    try:
        asyncio.run(asyncio.wait_for(CASES[args.case](args), args.timeout))
    except Failed:
        return 1
    except asyncio.TimeoutError:
        print(f"FAILED: {args.case} did not finish within {args.timeout} s", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
