"""A real Mosquitto broker on a free loopback port, with its own password file and ACL."""

from __future__ import annotations

import getpass
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.processes import free_port, stop_process, wait_for_port

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


@dataclass
class Broker:
    host: str
    port: int
    workdir: Path
    users: dict[str, str]
    acl: str
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.workdir / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def write_config(self) -> Path:
        passwd = self.workdir / "passwd"
        passwd.unlink(missing_ok=True)
        for i, (user, password) in enumerate(self.users.items()):
            create = ["-c"] if i == 0 else []
            subprocess.run(
                ["mosquitto_passwd", *create, "-b", str(passwd), user, password],
                check=True,
                capture_output=True,
            )
        passwd.chmod(0o600)
        acl = self.workdir / "acl"
        acl.write_text(self.acl)
        acl.chmod(0o600)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            # Run as whoever started us: as root, Mosquitto would otherwise switch to the
            # `mosquitto` user, which cannot read the test's private temp folder.
            f"user {getpass.getuser()}\n"
            f"listener {self.port} {self.host}\n"
            "protocol mqtt\n"
            "allow_anonymous false\n"
            f"password_file {passwd}\n"
            f"acl_file {acl}\n"
            "persistence false\n"
            f"log_dest file {self.log}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            "max_inflight_messages 100\n"
            "max_queued_messages 10000\n"
            "message_size_limit 4194304\n"
        )
        return conf

    def start(self) -> None:
        conf = self.write_config()
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for_port(self.port, self.host, proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def start_broker(workdir: Path, users: dict[str, str], acl: str) -> Broker:
    workdir.mkdir(parents=True, exist_ok=True)
    broker = Broker("127.0.0.1", free_port(), workdir, users, acl)
    broker.start()
    return broker
