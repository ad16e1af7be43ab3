"""Run SIPp scenarios (tests/integration/scenarios/*.xml) against a test cluster.

Every run is bounded: a call count (``-m``), a global timeout that counts as an
error (``-timeout``/``-timeout_error``), and a wall-clock limit on the process.
The verdict comes from SIPp's exit code (0: every call succeeded) and from its
statistics file (``-trace_stat``), whose last row holds the cumulative counts.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from conftest import INTEGRATION, free_udp_port

SIPP = shutil.which("sipp")
SCENARIOS = INTEGRATION / "scenarios"


@dataclass
class SippResult:
    returncode: int
    stats: dict[str, str]  # the last row of the -trace_stat file: cumulative counts
    output: str  # SIPp's stdout and stderr
    errors: str  # the -trace_err file: unexpected messages, aborted calls

    def count(self, column: str) -> int:
        return int(self.stats.get(column, "0") or 0)

    @property
    def created(self) -> int:
        return self.count("TotalCallCreated")

    @property
    def successful(self) -> int:
        return self.count("SuccessfulCall(C)")

    @property
    def failed(self) -> int:
        return self.count("FailedCall(C)")

    @property
    def retransmissions(self) -> int:
        return self.count("Retransmissions(C)")

    def summary(self) -> str:
        return (f"sipp exit {self.returncode}: created={self.created} "
                f"successful={self.successful} failed={self.failed} "
                f"retransmissions={self.retransmissions}\n"
                f"--- errors\n{self.errors[-3000:]}\n--- output\n{self.output[-3000:]}")


@dataclass
class Sipp:
    """One SIPp client run; ``start()`` returns at once, ``wait()`` collects the result."""

    scenario: str  # a file name under scenarios/
    server: tuple[str, int]
    workdir: Path
    calls: int
    rate: float = 10.0  # calls per second
    # Injection file rows: field0 user, field1 password, field2 the [authentication]
    # keyword for that user (SIPp 3.6 cannot nest [field0] inside [authentication]).
    users: list[tuple[str, str]] | None = None
    timeout: float = 60.0  # SIPp's global timeout, an error when reached
    extra: tuple[str, ...] = ()
    port: int = field(default_factory=free_udp_port)
    transport: str = "u1"  # SIPp's -t: "t1" is one TCP connection to the server
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def stat_file(self) -> Path:
        return self.workdir / "stats.csv"

    @property
    def error_file(self) -> Path:
        return self.workdir / "errors.log"

    @property
    def output_file(self) -> Path:
        return self.workdir / "output.log"

    def command(self) -> list[str]:
        if SIPP is None:
            raise RuntimeError("sipp is not installed (apt-get install -y sip-tester)")
        host, port = self.server
        cmd = [SIPP, f"{host}:{port}", "-sf", str(SCENARIOS / self.scenario),
               "-i", "127.0.0.1", "-p", str(self.port), "-t", self.transport,
               "-m", str(self.calls), "-r", str(self.rate), "-rp", "1000",
               "-timeout", f"{int(self.timeout)}s", "-timeout_error",
               "-trace_stat", "-stf", str(self.stat_file), "-fd", "1",
               "-trace_err", "-error_file", str(self.error_file),
               "-nostdin", *self.extra]
        if self.users is not None:
            cmd += ["-inf", str(self._injection_file())]
        return cmd

    def _injection_file(self) -> Path:
        path = self.workdir / "users.csv"
        rows = ["SEQUENTIAL", *(f"{user};{password};[authentication username={user} "
                                f"password={password}]" for user, password in self.users)]
        path.write_text("\n".join(rows) + "\n")
        return path

    def start(self) -> Sipp:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = self.command()
        with open(self.output_file, "wb") as out:
            self.process = subprocess.Popen(command, cwd=self.workdir, stdin=subprocess.DEVNULL,
                                            stdout=out, stderr=subprocess.STDOUT)
        return self

    def wait(self) -> SippResult:
        assert self.process is not None, "start() first"
        try:
            returncode = self.process.wait(timeout=self.timeout + 15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            returncode = self.process.wait(timeout=10)
        return SippResult(returncode, _last_row(self.stat_file),
                          _read(self.output_file), _read(self.error_file))

    def stop(self) -> None:
        """Kill a run that is still going (test clean-up after a failure)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def run(self) -> SippResult:
        self.start()
        try:
            return self.wait()
        finally:
            self.stop()


def _last_row(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    rows = list(csv.DictReader(path.read_text(errors="replace").splitlines(), delimiter=";"))
    return rows[-1] if rows else {}


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
