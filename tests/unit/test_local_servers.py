"""The local Spark Connect server's command line and its refusal of a port already taken."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from refinex.spark import local_servers


def test_a_taken_port_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        assert not local_servers.port_is_free(port)
        with pytest.raises(local_servers.ServerStartError, match="in use"):
            local_servers.start_connect_server(tmp_path, port=port)
    assert local_servers.port_is_free(port)
    assert not (tmp_path / "connect-server.log").exists()


def test_the_command_binds_loopback_with_delta(tmp_path: Path) -> None:
    command = local_servers.connect_server_command(15999, [tmp_path / "delta.jar"], tmp_path)
    assert command[0].endswith("spark-submit") and local_servers.CONNECT_SERVER_CLASS in command
    confs = {command[i + 1].split("=", 1)[0]: command[i + 1].split("=", 1)[1]
             for i, item in enumerate(command) if item == "--conf"}
    assert confs["spark.connect.grpc.binding.address"] == "127.0.0.1"
    assert confs["spark.connect.grpc.binding.port"] == "15999"
    assert confs["spark.sql.extensions"] == "io.delta.sql.DeltaSparkSessionExtension"
    assert command[command.index("--jars") + 1] == str(tmp_path / "delta.jar")


def test_the_server_environment_is_classic_and_imports_this_refinex() -> None:
    env = local_servers.worker_environment({"SPARK_REMOTE": "sc://x", "SPARK_LOCAL_DIRS": "/x", "PYTHONPATH": "/a"})
    assert "SPARK_REMOTE" not in env and "SPARK_LOCAL_DIRS" not in env
    assert env["PYTHONPATH"].split(":")[0] == str(Path(local_servers.__file__).resolve().parents[2])
    assert env["PYTHONPATH"].endswith("/a")
