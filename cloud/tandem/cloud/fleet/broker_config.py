"""`tandem fleet broker-config`: a Mosquitto config, password file and ACL for a fleet.

The ACL is the broker-side half of the protocol's trust model:

- the fleet service's user reads and writes the whole device tree (it alone writes
  ``desired`` and ``chunks``);
- a device (user name = device id) reads only its own ``desired``, ``chunks`` and
  ``reports/ack`` (the fleet's acknowledgement of its reports) and writes only its own
  ``presence``, ``reports``, ``telemetry`` and ``chunks/request``: it can neither read or
  publish into another device's topics nor write desired state, chunks or report acks, not
  even its own (a forged ack would make its own agent drop reports the fleet never stored).

Passwords are stored in Mosquitto's PBKDF2-SHA512 format (``$7$``), written here directly so
that a thousand identities take milliseconds rather than a thousand `mosquitto_passwd` runs.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tandem.errors import ConfigError
from tandem.protos.fleet.v1 import topics
from tandem.sdk.atomic import write_atomic

FLEET_USER = "tandem-fleet"
PBKDF2_ITERATIONS = 101  # Mosquitto 2.0's default for `mosquitto_passwd`
DEVICE_WRITE_LEAVES = (topics.PRESENCE, topics.REPORTS, topics.TELEMETRY, topics.CHUNK_REQUEST)
DEVICE_READ_LEAVES = (topics.DESIRED, topics.CHUNKS, topics.REPORT_ACKS)


def mosquitto_hash(
    password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS
) -> str:
    salt = salt or secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def acl_text(fleet_user: str = FLEET_USER) -> str:
    lines = [
        "# Written by `tandem fleet broker-config`.",
        f"user {fleet_user}",
        f"topic readwrite {topics.PREFIX}/#",
        "",
        "# Every other user is a device whose user name is its device id (%u).",
    ]
    lines += [f"pattern read {topics.PREFIX}/%u/{leaf}" for leaf in DEVICE_READ_LEAVES]
    lines += [f"pattern write {topics.PREFIX}/%u/{leaf}" for leaf in DEVICE_WRITE_LEAVES]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class BrokerConfig:
    out: Path
    host: str = "127.0.0.1"  # the listener address
    port: int = 1883
    fleet_user: str = FLEET_USER
    persistence: bool = True  # keep retained desired states across broker restarts
    run_as_current_user: bool = True  # as root Mosquitto would switch to `mosquitto`

    def __post_init__(self) -> None:
        if not (0 < self.port < 65536):
            raise ConfigError("port", f"must be 1..65535, got {self.port}")
        if not topics.is_valid_device_id(self.fleet_user):
            raise ConfigError("fleet_user", f"{self.fleet_user!r} is not a valid user name")

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


@dataclass(frozen=True)
class Written:
    conf: Path
    passwd: Path
    acl: Path
    credentials: Path
    fleet_password_file: Path
    fleet_password: str
    device_passwords: dict[str, str]


def device_ids_for(count: int, prefix: str = "device-") -> list[str]:
    width = max(4, len(str(count)))
    return [f"{prefix}{i:0{width}d}" for i in range(1, count + 1)]


def write_broker_config(config: BrokerConfig, device_ids: Sequence[str]) -> Written:
    """Writes mosquitto.conf, passwd, acl, credentials.json (0600) and fleet.password."""
    ids = list(dict.fromkeys(device_ids))
    for device_id in ids:
        if not topics.is_valid_device_id(device_id):
            raise ConfigError("device_ids", f"{device_id!r} is not a valid device id")
        if device_id == config.fleet_user:
            raise ConfigError("device_ids", f"{device_id!r} is the fleet service's user name")
    out = config.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    fleet_password = secrets.token_urlsafe(24)
    device_passwords = {d: secrets.token_urlsafe(18) for d in ids}
    users = {config.fleet_user: fleet_password, **device_passwords}
    passwd = out / "passwd"
    # Credentials and ACLs: replaced atomically and owner-only (write_atomic's default, 0600).
    write_atomic(passwd, "".join(f"{u}:{mosquitto_hash(p)}\n" for u, p in users.items()))
    acl = out / "acl"
    write_atomic(acl, acl_text(config.fleet_user))
    lines = []
    if config.run_as_current_user:
        lines.append(f"user {getpass.getuser()}")
    lines += [
        f"listener {config.port} {config.host}",
        "protocol mqtt",
        "allow_anonymous false",
        f"password_file {passwd}",
        f"acl_file {acl}",
        # Chunks are 64 KiB by default; leave room for larger configured chunks.
        "message_size_limit 8388608",
        "max_inflight_messages 100",
        "max_queued_messages 20000",
        "persistent_client_expiration 7d",
    ]
    if config.persistence:
        (out / "data").mkdir(exist_ok=True)
        lines += [
            "persistence true",
            f"persistence_location {out / 'data'}/",
            "autosave_interval 30",
        ]
    else:
        lines.append("persistence false")
    lines += [
        f"log_dest file {out / 'mosquitto.log'}",
        "log_type error",
        "log_type warning",
        "log_type notice",
    ]
    conf = out / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    fleet_pw_file = out / "fleet.password"
    write_atomic(fleet_pw_file, fleet_password + "\n")
    credentials = out / "credentials.json"
    write_atomic(
        credentials,
        json.dumps(
            {
                "broker": config.url,
                "fleet": {"username": config.fleet_user, "password": fleet_password},
                "devices": {d: {"username": d, "password": p} for d, p in device_passwords.items()},
            },
            indent=2,
        )
        + "\n",
    )
    return Written(conf, passwd, acl, credentials, fleet_pw_file, fleet_password, device_passwords)
