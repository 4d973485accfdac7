"""Ending a distributed rank without an abort at exit.

torch 2.14's gloo process group has no ``shutdown``: ``destroy_process_group`` unregisters a group, but its
worker threads live until the group object is freed, and DeepSpeed keeps the groups alive to the end (the
engine, the ZeRO-3 optimizer, every partitioned parameter's ``ds_process_group``, ``deepspeed.utils.groups``;
after a TWIST run, 6 gloo threads were still alive past ``destroy_process_group`` and ``gc.collect``). They were
freed during interpreter finalisation, where a worker thread retiring a finished all-gather must take the GIL
of a dying interpreter: ``terminate called without an active exception``, exit status 250, after a run that
had saved everything (a core dump showed ``ProcessGroupGloo::runLoop`` -> ``~AsyncAllgatherWork`` ->
``PyThread_exit_thread``). So a rank that has finished ends before finalisation starts.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import NoReturn

import torch


def exit_distributed(status: int = 0) -> NoReturn:
    """End the process with ``status``. A rank of a process group destroys the groups (after waiting for every
    rank when ``status`` is 0), runs the exit handlers, flushes what was printed and logged, and ends before
    interpreter finalisation. A process that never joined a group has no gloo threads and exits as Python does.
    Call it when every output is written, or when this rank failed (then without waiting: the others may not
    come)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        sys.exit(status)
    if status == 0:
        torch.distributed.barrier()  # every rank done writing before any tears the group down
    torch.distributed.destroy_process_group()
    atexit._run_exitfuncs()  # what registered to run at exit (a wandb run's finish, log handlers) still runs
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
