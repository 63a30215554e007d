"""System shared memory between the client and a local server, one slot per server."""

from __future__ import annotations

from typing import Any


class _ShmSlot:
    """One worker's pair of system shared-memory regions (inputs, outputs) on one server."""

    def __init__(self, client: Any, tag: str) -> None:
        self.client = client
        self.tag = tag
        self.in_size = 0
        self.out_size = 0
        self.in_handle: Any = None
        self.out_handle: Any = None

    def ensure(self, in_size: int, out_size: int) -> None:
        import tritonclient.utils.shared_memory as shm

        if in_size > self.in_size:
            self._drop("in")
            self.in_size = max(in_size, 2 * self.in_size)
            key = f"/uqserve-{self.tag}-in"
            self.in_handle = shm.create_shared_memory_region(f"{self.tag}-in", key, self.in_size)
            self.client.register_system_shared_memory(f"{self.tag}-in", key, self.in_size)
        if out_size > self.out_size:
            self._drop("out")
            self.out_size = max(out_size, 2 * self.out_size)
            key = f"/uqserve-{self.tag}-out"
            self.out_handle = shm.create_shared_memory_region(f"{self.tag}-out", key, self.out_size)
            self.client.register_system_shared_memory(f"{self.tag}-out", key, self.out_size)

    def _drop(self, which: str) -> None:
        import tritonclient.utils.shared_memory as shm

        handle = self.in_handle if which == "in" else self.out_handle
        if handle is None:
            return
        try:
            self.client.unregister_system_shared_memory(f"{self.tag}-{which}")
        except Exception:  # the server may be gone; the local region must go anyway
            pass
        shm.destroy_shared_memory_region(handle)
        if which == "in":
            self.in_handle, self.in_size = None, 0
        else:
            self.out_handle, self.out_size = None, 0

    def close(self) -> None:
        self._drop("in")
        self._drop("out")
