"""A real PostgreSQL server for tests and benchmarks: Debian's binaries (`make tools` installs
them), a cluster in a temporary folder, started and stopped around the tests that use it.

PostgreSQL refuses to run as root and CI runs as root, so then the cluster belongs to an
unprivileged user (``nobody``) and every server command runs as that user through ``runuser``."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from deploy.local import free_port

UNPRIVILEGED_USER = "nobody"


def postgres_bin() -> Path | None:
    """The newest installed server's binaries (Debian: /usr/lib/postgresql/N/bin), or PATH's."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


@dataclass
class PostgresServer:
    bin: Path
    folder: Path
    port: int

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        as_user = ["runuser", "-u", UNPRIVILEGED_USER, "--"] if os.geteuid() == 0 else []
        return subprocess.run([*as_user, *command], check=check, capture_output=True, text=True, timeout=120)

    def init(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.folder, UNPRIVILEGED_USER)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--no-sync", "-E", "UTF8", "--locale=C")

    def start(self) -> None:
        # The socket goes in our folder (the default /var/run/postgresql is root's); fsync stays
        # on so durability tests mean something.
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c max_connections=200"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.folder / "server.log"),
                  "-o", options, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def remove(self) -> None:
        """Stop the server and delete its folder (the cluster, its socket and its log)."""
        self.stop()
        shutil.rmtree(self.folder.parent, ignore_errors=True)

    def create_database(self, name: str, template: str | None = None) -> str:
        """A new database (a copy of ``template`` when given: it must have no connections)."""
        copy_of = f' TEMPLATE "{template}"' if template else ""
        self._run(str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                  "-c", f'CREATE DATABASE "{name}"{copy_of}')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"


def start_postgres() -> PostgresServer:
    """Start a fresh cluster; raises RuntimeError with the reason when PostgreSQL is missing."""
    binaries = postgres_bin()
    if binaries is None:
        raise RuntimeError("PostgreSQL is not installed: `make tools` installs Debian's postgresql package")
    folder = Path(tempfile.mkdtemp(prefix="ctt-postgres-"))
    os.chmod(folder, 0o755)
    server = PostgresServer(binaries, folder / "cluster", free_port())
    server.init()
    server.start()
    return server
