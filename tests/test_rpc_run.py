"""`slimc run OUT --rpc HOST:PORT` against a real TVM RPC server (here on localhost, as a
board would run it: `python -m tvm.exec.rpc_server`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def rpc_server():
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host",
                               "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # its popen workers die with it
    try:
        deadline = time.monotonic() + 300  # importing tvm takes >100 s on a loaded 2-core host
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the TVM RPC server did not start")
        yield f"127.0.0.1:{port}"
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)  # the server and the workers it forked
        except ProcessLookupError:  # it had exited already
            pass
        server.wait(timeout=30)


def test_run_over_rpc_matches_the_local_run(cli, tmp_path, rpc_server):
    out = tmp_path / "m"
    assert cli("compile", "tests.models:two_inputs_two_outputs", "-t", "host", "-o", out,
               "-q").code == 0
    local = cli("run", out, "--json")
    remote = cli("run", out, "--json", "--rpc", rpc_server)
    assert local.code == 0 and remote.code == 0, local.err + remote.err
    local_out, remote_out = json.loads(local.out)["outputs"], json.loads(remote.out)["outputs"]
    assert list(remote_out) == list(local_out) and len(remote_out) == 2
    for name in local_out:
        assert remote_out[name] == local_out[name]


def test_rpc_address_errors_are_usage_errors(cli, tmp_path):
    out = tmp_path / "m"
    assert cli("compile", "tests.models:two_inputs_two_outputs", "-t", "host", "-o", out,
               "-q").code == 0
    result = cli("run", out, "--rpc", "no-port", "--json")
    assert result.code == 2 and "HOST:PORT" in json.loads(result.out)["error"]
    result = cli("run", out, "--rpc", f"127.0.0.1:{_free_port()}", "--json")
    assert result.code == 2 and "rpc_server" in json.loads(result.out)["hint"]


def test_a_rebuilt_library_is_uploaded_under_a_new_name(tmp_path):
    """A long-lived server dlopens by name: a fixed upload name would run a stale library."""
    from slimc.backends.tvm.rpc_runner import remote_library_name

    library = tmp_path / "model.so"
    library.write_bytes(b"\x7fELF first build")
    first = remote_library_name(library)
    assert remote_library_name(library) == first  # same content, same name: no growth
    library.write_bytes(b"\x7fELF second build")
    second = remote_library_name(library)
    assert second != first and second.endswith(".so") and "/" not in second
