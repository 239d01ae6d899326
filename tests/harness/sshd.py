"""A small SSH server (asyncssh) on 127.0.0.1 for tests.

    async with SshServer() as sshd:
        async with asyncssh.connect(**sshd.client_kwargs()) as conn:
            r = await conn.run("echo hi", check=True)        # r.stdout == "hi\\n"

One user (``username``) that can log in with ``password`` or with the generated client key
(``client_key``, also written to ``client_key_path`` for OpenSSH, mode 0600). The host key is
generated per server; ``known_hosts_path`` holds a ``[127.0.0.1]:PORT`` line for it.

Commands:
- ``echo ARGS``  prints ARGS and a newline
- ``cat``        copies stdin to stdout until EOF (also the behaviour of a session without a command)
- ``exit N``     exits with status N
- anything else  prints ``ran: <command>`` and exits 0
``commands`` records every command run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import asyncssh

HOST = "127.0.0.1"


class _Server(asyncssh.SSHServer):
    def __init__(self, owner: "SshServer"):
        self._owner = owner

    def connection_made(self, conn):
        self._owner.connections_total += 1

    def begin_auth(self, username: str) -> bool:
        return True  # always require authentication

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        return username == self._owner.username and password == self._owner.password

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key) -> bool:
        return username == self._owner.username and \
            key.export_public_key() == self._owner.client_key.export_public_key()


class SshServer:
    def __init__(self, host: str = HOST, port: int = 0, *, username: str = "tester",
                 password: str = "correct horse battery staple"):
        self.host = host
        self.port = port
        self.username = username
        self.password = password
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.client_key = asyncssh.generate_private_key("ssh-ed25519")
        self.commands: list[str | None] = []
        self.connections_total = 0
        self._acceptor = None
        self._dir: str | None = None
        self.client_key_path: Path | None = None
        self.known_hosts_path: Path | None = None

    async def _handle(self, process: asyncssh.SSHServerProcess) -> None:
        cmd = process.command
        self.commands.append(cmd)
        try:
            if cmd is None or cmd.strip() == "cat":
                async for data in process.stdin:
                    process.stdout.write(data)
                process.exit(0)
            elif cmd.startswith("echo"):
                process.stdout.write((cmd[5:] + "\n").encode())
                process.exit(0)
            elif cmd.startswith("exit "):
                process.exit(int(cmd.split()[1]))
            else:
                process.stdout.write(f"ran: {cmd}\n".encode())
                process.exit(0)
        except (asyncssh.BreakReceived, asyncssh.TerminalSizeChanged, ConnectionError):
            process.exit(1)

    async def __aenter__(self) -> "SshServer":
        self._acceptor = await asyncssh.create_server(
            lambda: _Server(self), self.host, self.port, server_host_keys=[self.host_key],
            process_factory=self._handle, encoding=None)
        self.port = self._acceptor.sockets[0].getsockname()[1]
        self._dir = tempfile.mkdtemp(prefix="hd-sshd-")
        self.client_key_path = Path(self._dir) / "id_ed25519"
        self.client_key.write_private_key(str(self.client_key_path))
        os.chmod(self.client_key_path, 0o600)
        self.client_key.write_public_key(str(self.client_key_path) + ".pub")
        self.known_hosts_path = Path(self._dir) / "known_hosts"
        pub = self.host_key.export_public_key().decode().strip()
        self.known_hosts_path.write_text(f"[{self.host}]:{self.port} {pub}\n")
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._acceptor is not None:
            self._acceptor.close()
            await self._acceptor.wait_closed()
            self._acceptor = None
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"ssh://{self.host}:{self.port}"

    def known_hosts(self) -> asyncssh.SSHKnownHosts:
        return asyncssh.import_known_hosts(self.known_hosts_path.read_text())

    def client_kwargs(self, *, password: bool = False, host: str | None = None, port: int | None = None) -> dict:
        """Keyword arguments for ``asyncssh.connect`` (key auth by default, or the password).
        Pass ``host``/``port`` to go through a forwarder (e.g. ``hd access tcp``); the host key is
        then trusted as-is (the tunnel is the thing under test, not host-key lookup)."""
        kw = dict(host=host or self.host, port=port or self.port, username=self.username)
        if host is None and port is None:
            kw["known_hosts"] = self.known_hosts()
        else:
            kw["known_hosts"] = None
        if password:
            kw.update(password=self.password, client_keys=None, preferred_auth="password")
        else:
            kw.update(client_keys=[self.client_key], preferred_auth="publickey")
        kw.update(agent_path=None, config=None, connect_timeout=10)
        return kw
