"""An embedded MQTT 5 broker for the demo, when Mosquitto is not installed.

`python -m tandem.cloud.demo.broker --config DIR --host H --port P` serves the subset of MQTT 5
that tandem's fleet and agents use, with the same password file and ACL that
`tandem fleet broker-config` writes for Mosquitto:

- CONNECT (protocol level 5 only) with user name and password, checked against Mosquitto's
  PBKDF2-SHA512 ``$7$`` hashes; a client id already connected is taken over;
- PUBLISH at QoS 0 and 1 (PUBACK; 0x87 when the ACL forbids), retained messages, wills;
- SUBSCRIBE / UNSUBSCRIBE with ``+`` and ``#`` and shared subscriptions
  (``$share/GROUP/FILTER``: each message goes to one member of the group, no retained);
- Mosquitto ACL files: ``user``, ``topic`` and ``pattern`` lines (``%u``, ``%c``), read and
  write checked on subscribe, on delivery and on publish;
- PINGREQ, DISCONNECT (reason 0x04 sends the will).

Not served: QoS 2, persistent sessions (every session starts clean; CONNACK says so, and the
fleet republishes desired states on reconnect), message properties (not forwarded), TLS,
websockets. It is a demo broker for one machine; production uses Mosquitto or EMQX.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import itertools
import logging
import signal
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("tandem.demo.broker")

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK = 8, 9, 10, 11
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14

RC_SUCCESS = 0x00
RC_UNSPECIFIED = 0x80
RC_PROTOCOL_ERROR = 0x82
RC_UNSUPPORTED_VERSION = 0x84
RC_BAD_CREDENTIALS = 0x86
RC_NOT_AUTHORIZED = 0x87
RC_TAKEN_OVER = 0x8E
RC_DISCONNECT_WITH_WILL = 0x04
MAX_PACKET = 16 * 1024 * 1024


class ProtocolError(Exception):
    """The peer sent something this broker does not accept; the connection is closed."""


# --- wire helpers -------------------------------------------------------------------------


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def encode_str(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([(kind << 4) | flags]) + encode_varint(len(body)) + body


class Reader:
    """Reads the fields of one packet body."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ProtocolError("packet shorter than its fields")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack("!H", self.take(2))[0])

    def varint(self) -> int:
        value, shift = 0, 0
        for _ in range(4):
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
        raise ProtocolError("malformed variable byte integer")

    def binary(self) -> bytes:
        return self.take(self.u16())

    def string(self) -> str:
        try:
            return self.binary().decode()
        except UnicodeDecodeError as exc:
            raise ProtocolError("string is not UTF-8") from exc

    def skip_properties(self) -> None:
        self.take(self.varint())

    def rest(self) -> bytes:
        chunk = self.data[self.pos :]
        self.pos = len(self.data)
        return chunk

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    first = await reader.readexactly(1)
    length, shift = 0, 0
    for _ in range(4):
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
    else:
        raise ProtocolError("malformed remaining length")
    if length > MAX_PACKET:
        raise ProtocolError(f"packet of {length} bytes is over the limit")
    body = await reader.readexactly(length)
    return first[0] >> 4, first[0] & 0x0F, body


# --- topics -------------------------------------------------------------------------------


def topic_matches(filter_: str, topic: str) -> bool:
    """MQTT filter matching (`+` one level, `#` the rest); `$` topics need an explicit
    first level."""
    f_parts, t_parts = filter_.split("/"), topic.split("/")
    if topic.startswith("$") and f_parts[0] in ("+", "#"):
        return False
    for i, part in enumerate(f_parts):
        if part == "#":
            return True
        if i >= len(t_parts):
            return False
        if part != "+" and part != t_parts[i]:
            return False
    return len(f_parts) == len(t_parts)


def filter_covered(rule: str, filter_: str) -> bool:
    """Whether every topic `filter_` can match is matched by the ACL `rule`."""
    r_parts, f_parts = rule.split("/"), filter_.split("/")
    for i, part in enumerate(r_parts):
        if part == "#":
            return True
        if i >= len(f_parts):
            return False
        if f_parts[i] == "#":
            return False
        if part == "+":
            continue
        if f_parts[i] == "+" or part != f_parts[i]:
            return False
    return len(r_parts) == len(f_parts)


def split_shared(filter_: str) -> tuple[str | None, str]:
    if filter_.startswith("$share/"):
        parts = filter_.split("/", 2)
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise ProtocolError(f"malformed shared subscription {filter_!r}")
        return parts[1], parts[2]
    return None, filter_


# --- credentials and ACL ------------------------------------------------------------------


def check_password(stored: str, password: str) -> bool:
    """Mosquitto's `$7$ITERATIONS$SALT$HASH` (PBKDF2-SHA512, base64)."""
    parts = stored.split("$")
    if len(parts) != 5 or parts[1] != "7":
        return False
    try:
        iterations = int(parts[2])
        salt = base64.b64decode(parts[3])
        expected = base64.b64decode(parts[4])
    except ValueError:
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return hmac.compare_digest(digest, expected)


def load_passwords(path: Path) -> dict[str, str]:
    users = {}
    for line in path.read_text().splitlines():
        user, sep, stored = line.strip().partition(":")
        if sep and user and not user.startswith("#"):
            users[user] = stored
    return users


@dataclass(frozen=True)
class Rule:
    access: str  # read, write, readwrite
    topic: str
    pattern: bool  # with %u / %c substituted per client

    def allows(self, access: str) -> bool:
        return self.access == "readwrite" or self.access == access


@dataclass
class Acl:
    by_user: dict[str, list[Rule]] = field(default_factory=dict)
    patterns: list[Rule] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> Acl:
        acl = cls()
        user: str | None = None
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            words = line.split(None, 2)
            if words[0] == "user" and len(words) >= 2:
                user = line.split(None, 1)[1]
                acl.by_user.setdefault(user, [])
            elif words[0] in ("topic", "pattern") and len(words) >= 2:
                if len(words) == 3 and words[1] in ("read", "write", "readwrite", "deny"):
                    access, topic = words[1], words[2]
                else:
                    access, topic = "readwrite", line.split(None, 1)[1]
                if access == "deny":
                    continue  # not used by tandem's ACLs; nothing is granted by it
                rule = Rule(access, topic, words[0] == "pattern")
                if rule.pattern:
                    acl.patterns.append(rule)
                elif user is not None:
                    acl.by_user[user].append(rule)
        return acl

    def _rules(self, user: str, client_id: str) -> Iterable[Rule]:
        yield from self.by_user.get(user, [])
        for rule in self.patterns:
            yield Rule(rule.access, rule.topic.replace("%u", user).replace("%c", client_id), False)

    def can_publish(self, user: str, client_id: str, topic: str) -> bool:
        return any(
            r.allows("write") and topic_matches(r.topic, topic)
            for r in self._rules(user, client_id)
        )

    def can_read(self, user: str, client_id: str, topic: str) -> bool:
        return any(
            r.allows("read") and topic_matches(r.topic, topic) for r in self._rules(user, client_id)
        )

    def can_subscribe(self, user: str, client_id: str, filter_: str) -> bool:
        return any(
            r.allows("read") and filter_covered(r.topic, filter_)
            for r in self._rules(user, client_id)
        )


# --- the broker ---------------------------------------------------------------------------


@dataclass
class Subscription:
    session: Session
    filter: str
    qos: int
    group: str | None


class Session:
    def __init__(
        self, broker: Broker, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.broker = broker
        self.reader = reader
        self.writer = writer
        self.client_id = ""
        self.user = ""
        self.will: tuple[str, bytes, int, bool] | None = None
        self.ids = itertools.cycle(range(1, 65536))
        self.closed = False
        self.keepalive = 0

    def send(self, data: bytes) -> None:
        if not self.closed and not self.writer.is_closing():
            self.writer.write(data)

    def deliver(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if not self.broker.acl.can_read(self.user, self.client_id, topic):
            return
        header = encode_str(topic)
        if qos:
            header += struct.pack("!H", next(self.ids))
        body = header + b"\x00" + payload  # no properties
        self.send(packet(PUBLISH, (qos << 1) | int(retain), body))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()


class Broker:
    def __init__(self, passwords: dict[str, str], acl: Acl) -> None:
        self.passwords = passwords
        self.acl = acl
        self.sessions: dict[str, Session] = {}
        self.subscriptions: list[Subscription] = []
        self.retained: dict[str, tuple[bytes, int]] = {}
        self._turns: dict[tuple[str, str], int] = {}
        self.handlers: set[asyncio.Task[None]] = set()

    # --- routing

    def route(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if retain:
            if payload:
                self.retained[topic] = (payload, qos)
            else:
                self.retained.pop(topic, None)
        groups: dict[tuple[str, str], list[Subscription]] = {}
        for sub in self.subscriptions:
            if not topic_matches(sub.filter, topic):
                continue
            if sub.group is None:
                sub.session.deliver(topic, payload, min(qos, sub.qos), False)
            else:
                groups.setdefault((sub.group, sub.filter), []).append(sub)
        for key, members in groups.items():
            readers = [
                m for m in members if self.acl.can_read(m.session.user, m.session.client_id, topic)
            ]
            if not readers:
                continue
            turn = self._turns.get(key, 0)
            self._turns[key] = turn + 1
            chosen = readers[turn % len(readers)]
            chosen.session.deliver(topic, payload, min(qos, chosen.qos), False)

    # --- connections

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session(self, reader, writer)
        clean = False
        task = asyncio.current_task()
        if task is not None:
            self.handlers.add(task)
            task.add_done_callback(self.handlers.discard)
        try:
            kind, _flags, body = await asyncio.wait_for(read_packet(reader), 10)
            if kind != CONNECT or not self._connect(session, body):
                return
            while True:
                timeout = session.keepalive * 1.5 if session.keepalive else None
                kind, flags, body = await asyncio.wait_for(read_packet(reader), timeout)
                if kind == DISCONNECT:
                    r = Reader(body)
                    clean = (r.u8() if r.left else RC_SUCCESS) != RC_DISCONNECT_WITH_WILL
                    return
                self._dispatch(session, kind, flags, body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        except ProtocolError as exc:
            log.warning("closing %s: %s", session.client_id or "a client", exc)
        finally:
            self._drop(session, send_will=not clean)

    def _connect(self, session: Session, body: bytes) -> bool:
        r = Reader(body)
        if r.string() != "MQTT":
            raise ProtocolError("not MQTT")
        level = r.u8()
        if level != 5:
            # An MQTT 3.1.1 CONNACK: "unacceptable protocol version".
            session.send(packet(CONNACK, 0, b"\x00\x01"))
            log.warning("refused a client speaking MQTT protocol level %d (5 needed)", level)
            return False
        flags = r.u8()
        session.keepalive = r.u16()
        r.skip_properties()
        client_id = r.string()
        will = None
        if flags & 0x04:
            r.skip_properties()
            will_topic = r.string()
            will_payload = r.binary()
            will = (will_topic, will_payload, (flags >> 3) & 0x03, bool(flags & 0x20))
        user = r.string() if flags & 0x80 else ""
        password = r.binary().decode(errors="replace") if flags & 0x40 else ""
        stored = self.passwords.get(user)
        if stored is None or not check_password(stored, password):
            session.send(packet(CONNACK, 0, bytes([0, RC_BAD_CREDENTIALS, 0])))
            log.warning("refused %r: bad user name or password", client_id)
            return False
        if not client_id:
            client_id = f"auto-{id(session):x}"
        session.client_id, session.user = client_id, user
        if will is not None and not self.acl.can_publish(user, client_id, will[0]):
            will = None
        session.will = will
        old = self.sessions.get(client_id)
        if old is not None:
            old.send(packet(DISCONNECT, 0, bytes([RC_TAKEN_OVER, 0])))
            self._drop(old, send_will=True)
        self.sessions[client_id] = session
        session.send(packet(CONNACK, 0, bytes([0, RC_SUCCESS, 0])))  # never a stored session
        log.info("%s connected as %s", client_id, user)
        return True

    def _dispatch(self, session: Session, kind: int, flags: int, body: bytes) -> None:
        r = Reader(body)
        if kind == PUBLISH:
            qos = (flags >> 1) & 0x03
            if qos > 1:
                raise ProtocolError("QoS 2 is not served by the demo broker")
            topic = r.string()
            packet_id = r.u16() if qos else 0
            r.skip_properties()
            payload = r.rest()
            if "+" in topic or "#" in topic or not topic:
                raise ProtocolError(f"bad topic name {topic!r}")
            allowed = self.acl.can_publish(session.user, session.client_id, topic)
            if allowed:
                self.route(topic, payload, qos, bool(flags & 0x01))
            if qos:
                code = RC_SUCCESS if allowed else RC_NOT_AUTHORIZED
                session.send(packet(PUBACK, 0, struct.pack("!HB", packet_id, code) + b"\x00"))
        elif kind == PUBACK:
            pass  # QoS 1 towards the client: delivered once, over TCP
        elif kind == SUBSCRIBE:
            packet_id = r.u16()
            r.skip_properties()
            codes = []
            while r.left:
                filter_ = r.string()
                options = r.u8()
                codes.append(self._subscribe(session, filter_, min(options & 0x03, 1)))
            session.send(packet(SUBACK, 0, struct.pack("!H", packet_id) + b"\x00" + bytes(codes)))
        elif kind == UNSUBSCRIBE:
            packet_id = r.u16()
            r.skip_properties()
            codes = []
            while r.left:
                group, filter_ = split_shared(r.string())
                before = len(self.subscriptions)
                self.subscriptions = [
                    s
                    for s in self.subscriptions
                    if not (s.session is session and s.filter == filter_ and s.group == group)
                ]
                codes.append(RC_SUCCESS if len(self.subscriptions) < before else 0x11)
            session.send(packet(UNSUBACK, 0, struct.pack("!H", packet_id) + b"\x00" + bytes(codes)))
        elif kind == PINGREQ:
            session.send(packet(PINGRESP, 0, b""))
        else:
            raise ProtocolError(f"packet type {kind} is not served")

    def _subscribe(self, session: Session, raw: str, qos: int) -> int:
        group, filter_ = split_shared(raw)
        if not self.acl.can_subscribe(session.user, session.client_id, filter_):
            log.warning("%s may not subscribe to %s", session.client_id, raw)
            return RC_NOT_AUTHORIZED
        self.subscriptions = [
            s
            for s in self.subscriptions
            if not (s.session is session and s.filter == filter_ and s.group == group)
        ]
        self.subscriptions.append(Subscription(session, filter_, qos, group))
        if group is None:
            for topic, (payload, stored_qos) in list(self.retained.items()):
                if topic_matches(filter_, topic):
                    session.deliver(topic, payload, min(qos, stored_qos), True)
        return qos

    def _drop(self, session: Session, *, send_will: bool) -> None:
        if session.closed:
            return
        session.close()
        self.subscriptions = [s for s in self.subscriptions if s.session is not session]
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
        if send_will and session.will is not None:
            topic, payload, qos, retain = session.will
            self.route(topic, payload, min(qos, 1), retain)
        session.will = None


async def serve(config_dir: Path, host: str, port: int) -> None:
    broker = Broker(
        load_passwords(config_dir / "passwd"), Acl.parse((config_dir / "acl").read_text())
    )
    server = await asyncio.start_server(broker.handle, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("embedded MQTT 5 broker on %s:%d", host, port)
    async with server:
        await stop.wait()
        server.close()
        # Closing the connections ends each handler on its own (EOF), so none is cancelled
        # half-way through a read.
        for session in list(broker.sessions.values()):
            session.close()
        if broker.handlers:
            await asyncio.wait(list(broker.handlers), timeout=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tandem.cloud.demo.broker")
    parser.add_argument("--config", type=Path, required=True, help="broker-config output folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(serve(args.config, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
