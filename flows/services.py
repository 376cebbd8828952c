"""A team's MLflow tracking server on PostgreSQL, started on this host.

    python -m flows.services mlflow-server            # = make mlflow-server (foreground)
    python -m flows.services postgres                 # PostgreSQL only (background)
    python -m flows.services stop                     # stops that PostgreSQL

``mlflow-server`` initialises a PostgreSQL cluster in ``.services/postgres`` (once; Debian's
``postgresql`` package, as the ``postgres`` user when run as root: initdb refuses root),
starts it on 127.0.0.1 (port 5433, beside a system PostgreSQL on 5432), creates the
database ``mlflow`` and runs, in the foreground,

    mlflow server --backend-store-uri postgresql+psycopg2://mlflow@127.0.0.1:5433/mlflow \\
        --artifacts-destination .services/mlartifacts --host 127.0.0.1 --port 5000

so that runs, metrics and the model registry live in PostgreSQL and artifacts go through
the server (clients need no shared disk). Clients point at it with
``MLFLOW_TRACKING_URI=http://<host>:5000``. The database password is generated once into
``.services/pgpass`` (mode 600, libpq's password file): it never appears on a command
line. Use ``--host 0.0.0.0`` to serve other machines (MLflow's ``--allowed-hosts`` then
names the server's host name).
"""

from __future__ import annotations

import argparse
import glob
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / ".services"
DB_USER = DB_NAME = "mlflow"


class ServiceError(RuntimeError):
    """A service could not be set up or started; the message says what to do."""


def pg_bin() -> Path:
    """The folder of PostgreSQL's server programs (initdb, pg_ctl), newest version first."""
    found = shutil.which("initdb")
    if found:  # e.g. a symlink in /usr/local/bin: the folder of the real program
        return Path(found).resolve().parent
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True):
        if (Path(d) / "initdb").is_file():
            return Path(d)
    raise ServiceError(
        "PostgreSQL's initdb not found: install it (Debian/Ubuntu: apt-get install postgresql)"
    )


def _version(path: str) -> tuple[int, ...]:
    part = Path(path).parent.name
    return tuple(int(p) for p in part.split(".") if p.isdigit())


def _as_postgres(cmd: list[str]) -> list[str]:
    """initdb and the server refuse root: run them as Debian's ``postgres`` user then."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


def _chown_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ServiceError(f"{what} failed (exit {proc.returncode}): {' | '.join(tail)}")


@dataclass(frozen=True)
class Postgres:
    """A PostgreSQL cluster in ``datadir`` serving ``port`` on ``host``."""

    datadir: Path
    port: int = 5433
    host: str = "127.0.0.1"

    @property
    def passfile(self) -> Path:
        return self.datadir.parent / "pgpass"

    @property
    def uri(self) -> str:
        """SQLAlchemy URI for MLflow (psycopg2: a bare postgresql:// wants psycopg 3)."""
        return f"postgresql+psycopg2://{DB_USER}@{self.host}:{self.port}/{DB_NAME}"

    def client_env(self) -> dict[str, str]:
        """What libpq clients (psycopg2, mlflow server) need: the password file."""
        return {**os.environ, "PGPASSFILE": str(self.passfile)}

    def init(self) -> None:
        """initdb once: superuser ``mlflow`` with a generated password, scram auth."""
        if (self.datadir / "PG_VERSION").is_file():
            return
        self.datadir.mkdir(parents=True, exist_ok=True)
        if any(self.datadir.iterdir()):
            raise ServiceError(f"{self.datadir}: not empty and not a PostgreSQL cluster")
        self.datadir.chmod(0o700)
        _chown_postgres(self.datadir)
        password = secrets.token_urlsafe(24)
        with tempfile.TemporaryDirectory() as tmp:
            pw = Path(tmp) / "pw"
            pw.write_text(password + "\n")
            if os.geteuid() == 0:  # readable by postgres for initdb only
                os.chmod(tmp, 0o755)
                _chown_postgres(pw)
            _run(
                _as_postgres(
                    [
                        str(pg_bin() / "initdb"),
                        "-D",
                        str(self.datadir),
                        "-U",
                        DB_USER,
                        f"--pwfile={pw}",
                        "--auth=scram-sha-256",
                        "-E",
                        "UTF8",
                        "--no-instructions",
                    ]
                ),  # fmt: skip
                f"initdb {self.datadir} (the postgres user must be able to reach the folder)",
            )
        self.passfile.write_text(f"*:*:*:{DB_USER}:{password}\n")
        self.passfile.chmod(0o600)

    def running(self) -> bool:
        proc = subprocess.run(
            [str(pg_bin() / "pg_isready"), "-h", self.host, "-p", str(self.port), "-q"],
            capture_output=True,
        )
        return proc.returncode == 0

    def start(self, timeout: float = 60) -> None:
        """Start the cluster (if not up) and create the database ``mlflow`` (if missing)."""
        self.init()
        if not self.running():
            opts = f"-p {self.port} -c listen_addresses={self.host} -k {self.datadir}"
            _run(
                _as_postgres(
                    [
                        str(pg_bin() / "pg_ctl"),
                        "-D",
                        str(self.datadir),
                        "-o",
                        opts,
                        "-l",
                        str(self.datadir / "server.log"),
                        "-w",
                        "-t",
                        str(int(timeout)),
                        "start",
                    ]
                ),  # fmt: skip
                f"pg_ctl start ({self.datadir / 'server.log'})",
            )
        self.create_database()

    def create_database(self) -> None:
        import psycopg2

        conn = psycopg2.connect(
            host=self.host, port=self.port, user=DB_USER, dbname="postgres",
            passfile=str(self.passfile),
        )  # fmt: skip
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{DB_NAME}"')
        finally:
            conn.close()

    def stop(self) -> None:
        if (self.datadir / "postmaster.pid").is_file():
            _run(
                _as_postgres(
                    [str(pg_bin() / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w", "stop"]
                ),  # fmt: skip
                "pg_ctl stop",
            )


def mlflow_server_cmd(
    backend_uri: str, artifacts: Path, host: str = "127.0.0.1", port: int = 5000, workers: int = 2
) -> list[str]:
    """``mlflow server`` on ``backend_uri`` that serves artifacts from ``artifacts``."""
    mlflow = Path(sys.executable).with_name("mlflow")
    return [
        str(mlflow) if mlflow.is_file() else "mlflow", "server",
        "--backend-store-uri", backend_uri,
        "--artifacts-destination", str(Path(artifacts).resolve()),
        "--host", host, "--port", str(port), "--workers", str(workers),
    ]  # fmt: skip


def mlflow_server_env(pg: Postgres) -> dict[str, str]:
    """The environment of ``mlflow server`` on ``pg``: its password file, and MLflow's job
    execution off (unless set already). Those jobs (GenAI judges, trace roll-ups) are
    nothing this pipeline runs, and on start they spawn about nine more processes that each
    import MLflow (some 30 s of CPU and 2 GB of memory)."""
    return {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **pg.client_env()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("command", choices=["mlflow-server", "postgres", "stop"])
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="state folder (.services)")
    ap.add_argument("--pg-port", type=int, default=5433)
    ap.add_argument("--host", default="127.0.0.1", help="interface the MLflow server binds")
    ap.add_argument("--port", type=int, default=5000, help="MLflow server port")
    ap.add_argument("--workers", type=int, default=2, help="MLflow server worker processes")
    args = ap.parse_args()
    pg = Postgres(args.dir.resolve() / "postgres", args.pg_port)
    try:
        if args.command == "stop":
            pg.stop()
            print(f"PostgreSQL in {pg.datadir} stopped")
            return
        pg.start()
        print(
            f"PostgreSQL {pg.uri} running (data {pg.datadir}; stop: python -m flows.services stop)"
        )
        if args.command == "postgres":
            return
        artifacts = args.dir.resolve() / "mlartifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        cmd = mlflow_server_cmd(pg.uri, artifacts, args.host, args.port, args.workers)
        print(f"MLflow server: MLFLOW_TRACKING_URI=http://{args.host}:{args.port}", flush=True)
        proc = subprocess.Popen(cmd, env=mlflow_server_env(pg))
        signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
        try:
            while proc.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
        sys.exit(proc.returncode or 0)
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
