"""Run an artifact on a device through a TVM RPC server (``slimc run OUT --rpc HOST:PORT``).

The device runs ``python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090`` (apache-tvm
installed there); slimc uploads ``model.so``, loads it into a Relax VM on the device's CPU,
sends the inputs and reads the outputs back. Nothing is compiled on the device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from slimc.errors import UsageError


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"--rpc {address!r} is not HOST:PORT.", hint="E.g. --rpc "
                         "raspberrypi.local:9090 (start the server with `python -m "
                         "tvm.exec.rpc_server --host 0.0.0.0 --port 9090` on the device).")
    return host, int(port)


def remote_library_name(library: Path) -> str:
    """The name ``library`` is uploaded under: one per content, never a fixed name.

    Why: a long-lived RPC server ``dlopen``s what it is asked to load, and glibc hands back an
    object already loaded under the same name without reading the file again; a fixed name
    would make the second artifact sent to one server run the first one's code and weights
    (the stale-library bug ``runtime.load_library`` fixes on the host). A content hash makes a
    rebuilt library a new name, and the same library the same name (no growth on re-runs).
    """
    digest = hashlib.sha256()
    with open(library, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"slimc_model_{digest.hexdigest()[:16]}.so"


class RpcRunner:
    """``model.so`` loaded into a VM on a remote TVM RPC server; call it with numpy arrays."""

    def __init__(self, library: Path, address: str) -> None:
        import tvm
        from tvm import rpc
        from tvm.runtime.vm import VirtualMachine  # works with TVM's runtime alone

        host, port = parse_address(address)
        try:
            self.session = rpc.connect(host, port)
        except Exception as exc:  # noqa: BLE001 - connection refused, DNS, handshake
            raise UsageError(f"Cannot reach a TVM RPC server at {address}: "
                             f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}.",
                             hint="Start `python -m tvm.exec.rpc_server --host 0.0.0.0 --port "
                             f"{port}` on the device and check the address.") from None
        remote_name = remote_library_name(library)
        self.session.upload(str(library), remote_name)
        module = self.session.load_module(remote_name)
        self.device = self.session.cpu()
        self._tvm = tvm
        self._vm = VirtualMachine(module, self.device)

    def __call__(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        from slimc.backends.tvm.runtime import _flatten

        args = [self._tvm.runtime.tensor(np.require(x, requirements="C"), self.device)
                for x in inputs]
        # The stateful interface: a tuple result stays on the device as a remote object that
        # cannot be iterated; get_outputs fetches it element by element (TVM's RPC idiom).
        self._vm.set_input("main", *args)
        self._vm.invoke_stateful("main")
        return _flatten(self._vm.get_outputs("main"))
