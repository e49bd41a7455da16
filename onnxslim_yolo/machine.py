"""What the machine running a pass has to spare (read when a pass decides how much to keep)."""
from __future__ import annotations

from typing import Optional


def available_memory() -> Optional[int]:
    """Bytes the kernel says new allocations can take (Linux' MemAvailable); None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
