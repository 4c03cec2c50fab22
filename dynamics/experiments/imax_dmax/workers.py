"""Worker processes that die with their parent (imported first in every worker, so it stays light).

``init_worker`` is the pool's initializer. It arms the parent-death guard *before* importing
anything heavy (torch, transformers, the pipeline): a worker whose parent is SIGKILLed while it is
still starting exits at once instead of training on as an orphan. On Linux the kernel sends the
worker SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``); elsewhere a daemon thread polls
the parent's pid. Either way the guard then checks that the parent is still the one that started
it, which closes the window between the spawn and the ``prctl`` call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from typing import Any

PR_SET_PDEATHSIG = 1
STATE: dict[str, Any] = {}  # per worker process: the preset, the progress queue, cached bundles


def die_with_parent(parent_pid: int) -> None:
    """Make this process exit when ``parent_pid`` dies (see the module docstring)."""
    armed = False
    libc_name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    if libc_name:
        try:
            armed = (
                ctypes.CDLL(libc_name, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
            )
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)
    if armed:
        return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def init_worker(preset_json: dict, queue: Any, threads: int, parent_pid: int) -> None:
    """Pool initializer: guard first, then torch threads and the preset (heavy imports after the guard)."""
    die_with_parent(parent_pid)
    import torch

    from dynamics.experiments.imax_dmax.presets import preset_from_json

    torch.set_num_threads(threads)
    STATE["preset"] = preset_from_json(preset_json)
    STATE["queue"] = queue
