"""The cluster view: a clean stop is reported as stopped, a kill as dead."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from typing import Any


def _cluster_status(server: Any) -> str:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "dovecote",
            "cluster",
            "status",
            "--data-dir",
            str(server.data_dir),
            "--heartbeat-interval",
            "1",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout


def test_clean_stop_is_not_dead_and_kill_is(server_factory: Any) -> None:
    server = server_factory(env={"DOVECOTE_HEARTBEAT_INTERVAL": "1"})
    assert " alive " in _cluster_status(server)
    server.kill(signal.SIGTERM)
    assert " stopped " in _cluster_status(server)

    server.start()
    time.sleep(1.5)  # at least one heartbeat of the new process
    server.kill(signal.SIGKILL)
    time.sleep(3.5)  # three missed beats
    lines = _cluster_status(server).splitlines()
    assert sum(" stopped " in line for line in lines) == 1
    assert sum(" dead " in line for line in lines) == 1
