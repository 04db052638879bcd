"""Spark servers on this machine, from the installed pyspark: a Spark Connect server with Delta.

What Databricks serverless and standard-access-mode clusters are to refinex, a Spark Connect
endpoint, run locally: ``spark-submit --class org.apache.spark.sql.connect.service.
SparkConnectServer`` (pyspark 4 ships the server jar) with Delta's jars, extension and catalog,
bound to 127.0.0.1. Its Python workers run this interpreter with this refinex on their path,
so a stage's ``mapInPandas`` runs the same code as the client. The tests start one per session
(``-m cluster``); a user can start one to try a Connect run before deploying:

    python -m refinex.spark.local_servers connect --port 15002
    SPARK_REMOTE=sc://127.0.0.1:15002 refinex pipeline --input data/sample/pages-sample.jsonl.gz --workdir work/connect
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

from refinex.spark.session import DELTA_CATALOG, DELTA_EXTENSION

CONNECT_SERVER_CLASS = "org.apache.spark.sql.connect.service.SparkConnectServer"
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class ServerStartError(RuntimeError):
    """A local server did not come up (its log's tail is in the message)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``host:port`` can be bound now (nothing else holds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def spark_home() -> Path:
    """The installed pyspark's folder (bin/spark-submit, jars/)."""
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def worker_environment(base: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The server's environment: its Python workers run this interpreter and import this refinex."""
    env = dict(os.environ if base is None else base)
    env.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    env["PYSPARK_PYTHON"] = sys.executable
    env["SPARK_HOME"] = str(spark_home())
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([_PACKAGE_ROOT, *[p for p in paths if p != _PACKAGE_ROOT]])
    env.pop("SPARK_REMOTE", None)  # the server itself is classic
    env.pop("SPARK_CONNECT_MODE_ENABLED", None)
    env.pop("SPARK_LOCAL_DIRS", None)  # its scratch space is its own (spark.local.dir)
    return env


def connect_server_command(port: int, jars: Sequence[Path], scratch: Path, master: str = "local[2]",
                           driver_memory: str = "2g", conf: Optional[Mapping[str, str]] = None) -> list[str]:
    """The ``spark-submit`` line of a Spark Connect server with Delta on 127.0.0.1:``port``."""
    settings = {
        "spark.connect.grpc.binding.address": "127.0.0.1",
        "spark.connect.grpc.binding.port": str(port),
        "spark.sql.extensions": DELTA_EXTENSION,
        "spark.sql.catalog.spark_catalog": DELTA_CATALOG,
        "spark.sql.warehouse.dir": str(scratch / "warehouse"),
        "spark.driver.host": "127.0.0.1",
        "spark.driver.bindAddress": "127.0.0.1",
        "spark.ui.enabled": "false",
        "spark.driver.extraJavaOptions": f"-Dderby.system.home={scratch / 'derby'}",
        "spark.local.dir": str(scratch / "local"),
        **dict(conf or {}),
    }
    command = [str(spark_home() / "bin" / "spark-submit"), "--class", CONNECT_SERVER_CLASS,
               "--master", master, "--driver-memory", driver_memory, "--jars", ",".join(map(str, jars))]
    for key, value in settings.items():
        command += ["--conf", f"{key}={value}"]
    return command + ["spark-internal"]


STARTED_MARKER = "Spark Connect server started"
"""The server's log line once its gRPC service listens."""


def wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout_s: float, host: str = "127.0.0.1") -> None:
    """Return once the server logged its start and ``host:port`` accepts connections while
    the process runs; :class:`ServerStartError` if it exits or ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerStartError(f"the server exited with {process.returncode}:\n{_tail(log)}")
        try:
            if STARTED_MARKER in log.read_text(encoding="utf-8", errors="replace"):
                with socket.create_connection((host, port), timeout=1.0):
                    if process.poll() is None:
                        return
        except OSError:
            pass
        time.sleep(0.5)
    raise ServerStartError(f"nothing listens on {host}:{port} after {timeout_s:.0f} s:\n{_tail(log)}")


def _tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class ConnectServer:
    """A running local Spark Connect server (``url``: ``sc://127.0.0.1:<port>``)."""

    port: int
    process: subprocess.Popen
    log: Path
    scratch: Path
    started_s: float = field(default=0.0)

    @property
    def url(self) -> str:
        return f"sc://127.0.0.1:{self.port}"

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``; the whole process group (the JVM and its
        Python workers)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)  # the group, even if the JVM itself has exited
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=timeout_s)
                return
            except subprocess.TimeoutExpired:
                continue


def start_connect_server(scratch: Path, port: Optional[int] = None, master: str = "local[2]",
                         driver_memory: str = "2g", timeout_s: float = 180.0,
                         conf: Optional[Mapping[str, str]] = None) -> ConnectServer:
    """Start a Spark Connect server with Delta (the jars of ``refinex setup``) and wait for it."""
    from refinex.spark.jars import ensure_delta_jars

    scratch.mkdir(parents=True, exist_ok=True)
    for sub in ("warehouse", "derby", "local"):
        (scratch / sub).mkdir(exist_ok=True)
    port = port or free_port()
    if not port_is_free(port):
        raise ServerStartError(f"127.0.0.1:{port} is in use: another server listens there")
    jars = ensure_delta_jars().jars
    log = scratch / "connect-server.log"
    clock = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        process = subprocess.Popen(connect_server_command(port, jars, scratch, master, driver_memory, conf),
                                   stdout=out, stderr=subprocess.STDOUT, env=worker_environment(),
                                   start_new_session=True)
    server = ConnectServer(port, process, log, scratch)
    try:
        wait_for_port(port, process, log, timeout_s)
    except BaseException:
        server.stop()
        raise
    server.started_s = time.perf_counter() - clock
    return server


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refinex.spark.local_servers", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="server", required=True)
    connect = sub.add_parser("connect", help="a Spark Connect server with Delta on 127.0.0.1 (Ctrl-C stops it)")
    connect.add_argument("--port", type=int, default=15002)
    connect.add_argument("--master", default="local[2]")
    connect.add_argument("--driver-memory", default="2g")
    connect.add_argument("--scratch", type=Path, default=Path("work") / "connect-server")
    args = parser.parse_args(argv)
    server = start_connect_server(args.scratch.resolve(), args.port, args.master, args.driver_memory)
    print(f"Spark Connect server on {server.url} (started in {server.started_s:.0f} s; log {server.log}); "
          f"run refinex with SPARK_REMOTE={server.url}", flush=True)
    try:
        server.process.wait()
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
