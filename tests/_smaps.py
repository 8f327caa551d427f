"""Test helper: how much of one of this process's mappings the kernel maps with huge
pages (``/proc/self/smaps``), for the tests of the daemon's shared regions."""

from __future__ import annotations


def pmd_mapped_kib(base: int) -> int:
    """ShmemPmdMapped (KiB) of the mapping that starts at ``base``."""
    found = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                found = int(head.split("-")[0], 16) == base
            elif found and head == "ShmemPmdMapped:":
                return int(line.split()[1])
    raise AssertionError(f"no mapping starts at {base:#x}")
