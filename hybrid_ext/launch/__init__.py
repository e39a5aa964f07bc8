"""Starting ranks: on this machine (:mod:`~hybrid_ext.launch.spawn`) or under a real launcher
(:mod:`~hybrid_ext.launch.launchers`: ``horovodrun``, ``deepspeed``, ``torchrun``), each with a hard timeout.

Used by the CLI (demo, bench, smoke) and by the tests. Ranks started by a launcher hand their results back with
:func:`report_result` (:mod:`~hybrid_ext.launch.results`).
"""

from hybrid_ext.launch.errors import LaunchError, LaunchTimeout
from hybrid_ext.launch.launchers import free_port, launcher_path, run_deepspeed, run_horovodrun, run_torchrun
from hybrid_ext.launch.results import RESULT_DIR_ENV, current_rank, report_result
from hybrid_ext.launch.spawn import spawn

__all__ = [
    "RESULT_DIR_ENV",
    "LaunchError",
    "LaunchTimeout",
    "current_rank",
    "free_port",
    "launcher_path",
    "report_result",
    "run_deepspeed",
    "run_horovodrun",
    "run_torchrun",
    "spawn",
]
