"""Python side of the didcomm-rust driver (tests/interop/node/driver.mjs).

The driver is a Node process running SICPA's didcomm-rust compiled to wasm (npm
`didcomm-node`, locked in tests/interop/node/package-lock.json and installed by
`make interop-node`, which `make test` depends on). Each call sends one JSON command and
returns the driver's JSON answer.
"""

from __future__ import annotations

import json
import select
import shutil
import subprocess
from pathlib import Path
from typing import Any

NODE_DIR = Path(__file__).parent / "node"
DRIVER = NODE_DIR / "driver.mjs"
CALL_TIMEOUT = 30.0


class DriverError(AssertionError):
    """The driver (or didcomm-rust inside it) reported an error."""


class RustDriver:
    """One driver process; agents live inside it, named by the test."""

    def __init__(self, log_path: Path) -> None:
        node = shutil.which("node")
        assert node, "node is not installed"
        assert (NODE_DIR / "node_modules" / "didcomm-node").is_dir(), (
            "didcomm-node is not installed: run `make interop-node`"
        )
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            [node, str(DRIVER)],
            cwd=NODE_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
        )

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], CALL_TIMEOUT)
        if not ready:
            raise DriverError(f"driver gave no answer to {cmd} within {CALL_TIMEOUT} s")
        line = self.proc.stdout.readline()
        if not line:
            raise DriverError(f"driver exited (code {self.proc.poll()}) during {cmd}")
        answer: dict[str, Any] = json.loads(line)
        if not answer.pop("ok"):
            raise DriverError(f"{cmd}: {answer['error']}")
        return answer

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()
