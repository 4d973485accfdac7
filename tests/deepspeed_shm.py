"""DeepSpeed's CPU all-reduce buffers in /dev/shm (``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``)."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shm_buffers(port: int) -> list[Path]:
    """The buffers a DeepSpeed run on ``port`` left in /dev/shm (none where the shm all-reduce is not built)."""
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
