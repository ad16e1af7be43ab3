"""Headless baresip softphones for end-to-end call tests, and the audio checks on their recordings.

Each ``Softphone`` runs its own ``baresip -f <folder>`` with no sound card:

* the microphone is a WAV file (module ``aufile``), a tone made with sox;
* the loudspeaker is a bridge to nowhere (module ``aubridge``: a player whose source is never
  opened), because baresip 1.0's ``aufile`` has no player;
* what the phone sends and what it hears are written by the ``sndfile`` filter into
  ``<folder>/rec/dump-<time>-enc.wav`` (sent) and ``...-dec.wav`` (heard);
* it is driven over ``ctrl_tcp`` (JSON in netstrings): commands such as ``dial`` and ``hangup``
  (registered by the ``menu`` module) and the call events (CALL_ESTABLISHED, CALL_CLOSED, ...).

The phone's log (stdout and stderr) is ``<folder>/baresip.log``; baresip writes there where each
stream's RTP came from ("incoming rtp for 'audio' established, receiving from ADDR:PORT"), which
is how a test tells whether media went through a relay.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import pytest

from conftest import IN_CI, free_tcp_port, free_udp_port

BARESIP = shutil.which("baresip")
SOX = shutil.which("sox")
MODULES = Path("/usr/lib/baresip/modules")
NO_TOOLS_REASON = (
    "baresip and sox are not installed (apt-get install -y baresip sox); "
    "in CI (env CI set) this is an error, not a skip"
)
RTP_FROM = re.compile(rb"incoming rtp for '(\w+)' established, receiving from ([\d.]+):(\d+)")
SAMPLE_RATE = 8000  # G.711, and the rate aufile wants its WAV input in


def require_softphone_tools() -> None:
    """Skip when baresip or sox is missing on a developer machine; fail in CI."""
    if BARESIP and SOX and MODULES.is_dir():
        return
    if IN_CI:
        pytest.fail(NO_TOOLS_REASON, pytrace=False)
    pytest.skip(NO_TOOLS_REASON)


class SoftphoneError(RuntimeError):
    pass


@dataclass
class Softphone:
    """One headless baresip with a single account, registered through ``proxy``."""

    user: str
    password: str
    proxy: tuple[str, int]  # the cluster's SIP address: registrar and outbound proxy
    folder: Path
    tone: Path | None = None  # what the phone says; when None it sends no audio at all
    domain: str = "127.0.0.1"
    rtp_ports: tuple[int, int] = (40000, 40999)
    answer_mode: str = "auto"  # auto, manual or early
    register_interval: int = 60
    # "udp", or "tls": then ``proxy`` is the cluster's TLS port, and the phone registers,
    # calls and is called over one TLS connection it opens there.
    transport: str = "udp"
    cafile: str = ""  # sip_cafile: the CA (or self-signed certificate) the TLS server has
    sip_port: int = 0
    ctrl_port: int = 0
    process: subprocess.Popen | None = field(default=None, repr=False)
    _sock: socket.socket | None = field(default=None, repr=False)
    _buffer: bytes = field(default=b"", repr=False)
    _events: list[dict] = field(default_factory=list, repr=False)
    _cursors: dict[str, int] = field(default_factory=dict, repr=False)  # per event type

    # ---------------------------------------------------------------- files
    @property
    def aor(self) -> str:
        return f"{self.user}@{self.domain}"

    @property
    def log_path(self) -> Path:
        return self.folder / "baresip.log"

    @property
    def recordings(self) -> Path:
        return self.folder / "rec"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _write_config(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.recordings.mkdir(exist_ok=True)
        source = f"aufile,{self.tone}" if self.tone else "aubridge,mute-" + self.user
        lines = [
            "poll_method epoll",
            f"sip_listen 127.0.0.1:{self.sip_port}",
            # An address, not "lo": baresip 1.0 cannot find interface names here, and without
            # it the SDP would offer the machine's first non-loopback address.
            "net_interface 127.0.0.1",
            # Every URI is numeric, so nothing should be resolved; if something were, it must
            # not leave the machine.
            "dns_server 127.0.0.1:9",
            "call_local_timeout 20",
            "call_max_calls 4",
            f"audio_source {source}",
            f"audio_player aubridge,sink-{self.user}",
            f"audio_alert aubridge,alert-{self.user}",
            f"rtp_ports {self.rtp_ports[0]}-{self.rtp_ports[1]}",
            "rtcp_mux no",
            "jitter_buffer_delay 2-6",
            f"module_path {MODULES}",
            "module g711.so",
            "module aufile.so",
            "module aubridge.so",
            "module sndfile.so",
            f"snd_path {self.recordings}",
            "module_app account.so",
            "module_app menu.so",  # registers the dial/hangup/... commands ctrl_tcp runs
            "module_app ctrl_tcp.so",
            f"ctrl_tcp_listen 127.0.0.1:{self.ctrl_port}",
            "statmode_default off",  # no call status line repainted on stderr
            "ringback_disabled yes",
        ]
        if self.cafile:
            lines.append(f"sip_cafile {self.cafile}")
        (self.folder / "config").write_text("\n".join(lines) + "\n")
        host, port = self.proxy
        via = "" if self.transport == "udp" else f";transport={self.transport}"
        account = (f"<sip:{self.aor}{via}>;auth_pass={self.password};"
                   f'outbound="sip:{host}:{port}{via}";regint={self.register_interval};'
                   f"answermode={self.answer_mode};audio_codecs=PCMU,PCMA")
        (self.folder / "accounts").write_text(account + "\n")
        (self.folder / "contacts").write_text("")

    # ---------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 10.0) -> Softphone:
        """Launch baresip and connect to its control socket (it registers by itself)."""
        if self.process is not None:
            raise SoftphoneError("already started")
        for _attempt in range(4):  # a port found free can be taken before baresip binds it
            self.sip_port, self.ctrl_port = _free_sip_port(), free_tcp_port()
            self._write_config()
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen(
                    [BARESIP or "baresip", "-f", str(self.folder)], stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT, cwd=self.folder,
                    start_new_session=True)
            if self._connect(time.monotonic() + timeout):
                return self
            in_use = b"Address already in use" in self.log_path.read_bytes()
            self._reap()
            if not in_use:
                break
        raise SoftphoneError(f"baresip for {self.aor} did not start:\n{self.log_text()[-3000:]}")

    def _connect(self, deadline: float) -> bool:
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                self._sock = socket.create_connection(("127.0.0.1", self.ctrl_port), timeout=0.2)
                return True
            except OSError:
                time.sleep(0.05)
        return False

    def stop(self, timeout: float = 5.0) -> None:
        """Quit (baresip unregisters first), then terminate or kill what is left."""
        if self.process is None:
            return
        if self.process.poll() is None and self._sock is not None:
            try:
                self._send("quit", "")
            except OSError:
                pass
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self._reap()

    def _reap(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            process.send_signal(sig)
            try:
                process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> Softphone:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- control
    def command(self, name: str, params: str = "", timeout: float = 5.0) -> str:
        """Run a baresip command; its text output. Raises when baresip refuses it."""
        token = os.urandom(4).hex()
        self._send(name, params, token)
        deadline = time.monotonic() + timeout
        while True:
            for message in self._pump(deadline):
                if message.get("response") and message.get("token") == token:
                    if not message.get("ok"):
                        raise SoftphoneError(f"{self.aor}: {name} {params}: {message.get('data')}")
                    return message.get("data", "")
            if time.monotonic() >= deadline:
                raise SoftphoneError(f"{self.aor}: no answer to {name} in {timeout}s")

    def dial(self, target: str) -> None:
        """Call ``target``: a user of the domain ("1001") or a full SIP URI."""
        uri = target if target.startswith("sip:") else f"sip:{target}@{self.domain}"
        self.command("dial", uri)

    def hangup(self) -> None:
        self.command("hangup")

    def active_calls(self) -> int:
        listing = self.command("listcalls")
        found = re.search(r"Active calls \((\d+)\)", listing)
        if found is None:
            raise SoftphoneError(f"{self.aor}: unexpected listcalls output {listing!r}")
        return int(found.group(1))

    def reset(self, timeout: float = 5.0) -> None:
        """Hang up whatever call is still there and forget the events seen so far: the next
        test starts from a phone at rest."""
        deadline = time.monotonic() + timeout
        while self.active_calls():
            if time.monotonic() >= deadline:
                raise SoftphoneError(f"{self.aor}: calls still up after {timeout}s")
            self.hangup()
            time.sleep(0.1)
        self.events()
        self._events.clear()
        self._cursors.clear()

    def set_answer_mode(self, mode: str) -> None:
        """auto, manual or early, for the calls that come next."""
        self.command("answermode", mode)
        self.answer_mode = mode

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """The phone stops (SIGSTOP) and answers nothing until the block ends; what is sent to
        it meanwhile waits in its sockets."""
        self.process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.process.send_signal(signal.SIGCONT)

    def wait_for(self, event_type: str, timeout: float = 10.0) -> dict:
        """The next event of ``event_type`` that no earlier wait_for returned."""
        deadline = time.monotonic() + timeout
        while True:
            for index in range(self._cursors.get(event_type, 0), len(self._events)):
                if self._events[index].get("type") == event_type:
                    self._cursors[event_type] = index + 1
                    return self._events[index]
            if time.monotonic() >= deadline:
                got = [e.get("type") for e in self._events]
                raise SoftphoneError(f"{self.aor}: no {event_type} in {timeout}s; events {got}")
            self._pump(deadline)

    def events(self) -> list[dict]:
        """Every event received so far (pending ones are read first)."""
        self._pump(time.monotonic())
        return list(self._events)

    def _send(self, name: str, params: str, token: str = "") -> None:
        if self._sock is None:
            raise SoftphoneError(f"{self.aor}: not started")
        body = json.dumps({"command": name, "params": params, "token": token}).encode()
        self._sock.sendall(b"%d:%s," % (len(body), body))

    def _pump(self, deadline: float) -> list[dict]:
        """One read of the control socket (waiting at most 0.2 s, and not past ``deadline``);
        the whole messages it completes. Events are also kept for wait_for."""
        self._sock.settimeout(max(0.01, min(0.2, deadline - time.monotonic())))
        try:
            data = self._sock.recv(65536)
        except TimeoutError:
            return []
        if data == b"":  # baresip closed the control connection: it quit or crashed
            raise SoftphoneError(f"baresip for {self.aor} went away:\n{self.log_text()[-3000:]}")
        self._buffer += data
        messages = []
        while True:
            length, colon, rest = self._buffer.partition(b":")
            if not colon or not length.isdigit() or len(rest) < int(length) + 1:
                break
            size = int(length)
            messages.append(json.loads(rest[:size]))
            self._buffer = rest[size + 1:]  # past the trailing comma
        self._events += [m for m in messages if m.get("event")]
        return messages

    # ---------------------------------------------------------------- what happened
    def rtp_sources(self) -> dict[str, tuple[str, int]]:
        """Where each media stream's RTP came from, as baresip logged it (last call wins)."""
        found = {}
        for media, host, port in RTP_FROM.findall(self.log_path.read_bytes()):
            found[media.decode()] = (host.decode(), int(port))
        return found

    def recording(self, heard: bool = True) -> Path:
        """The newest recording of what the phone heard (or sent, with heard=False).

        sndfile names them by the second the audio started: calls started within one second
        share (and overwrite) the files, so read a call's recording before the next call."""
        suffix = "dec" if heard else "enc"
        files = sorted(self.recordings.glob(f"dump-*-{suffix}.wav"), key=os.path.getmtime)
        if not files:
            raise SoftphoneError(f"{self.aor}: no {suffix} recording in {self.recordings}")
        return files[-1]


def _free_sip_port() -> int:
    """A port with UDP and TCP free, and TCP free on the next one: baresip 1.0 listens on
    UDP and TCP at the sip_listen port and on TLS one above, and gives up when any is taken."""
    for _attempt in range(50):
        port = free_udp_port()
        if port < 65535 and _tcp_free(port) and _tcp_free(port + 1):
            return port
    raise SoftphoneError("no free port for baresip's SIP transports")


def _tcp_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# -------------------------------------------------------------------- audio
def make_tone(path: Path, frequency: float, seconds: float, amplitude: float = 0.5) -> Path:
    """A mono 16-bit sine WAV at 8 kHz, the format baresip's aufile reads."""
    subprocess.run([SOX or "sox", "-n", "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16",
                    str(path), "synth", str(seconds), "sine", str(frequency),
                    "vol", str(amplitude)], check=True, capture_output=True, timeout=30)
    return path


def read_wav(path: Path) -> tuple[int, list[int]]:
    """(sample rate, samples) of a mono 16-bit WAV file."""
    with wave.open(str(path), "rb") as wav:
        if wav.getnchannels() != 1 or wav.getsampwidth() != 2:
            raise ValueError(f"{path}: want mono 16-bit, got {wav.getnchannels()} channel(s) "
                             f"of {wav.getsampwidth() * 8} bits")
        rate, frames = wav.getframerate(), wav.readframes(wav.getnframes())
    samples = memoryview(frames).cast("h").tolist()
    return rate, samples


def tone_share(block: list[int], rate: int, frequency: float) -> float:
    """The fraction of a block's energy at ``frequency`` (Goertzel): near 1 for that pure tone,
    near 0 for silence, noise or another tone (exact when the block holds whole cycles)."""
    energy = sum(x * x for x in block)
    if energy == 0:
        return 0.0
    coefficient = 2.0 * math.cos(2.0 * math.pi * frequency / rate)
    previous = before = 0.0
    for x in block:
        previous, before = x + coefficient * previous - before, previous
    power = previous * previous + before * before - coefficient * previous * before
    return min(1.0, 2.0 * power / (len(block) * energy))


@dataclass
class ToneReport:
    """What a recording holds, in 50 ms blocks."""

    seconds: float  # length of the recording
    voiced: float  # seconds of blocks louder than the noise floor
    tone: float  # seconds of blocks that are mostly the wanted tone
    dominant: float  # zero-crossing estimate of the frequency over the voiced blocks, Hz


def analyse_tone(path: Path, frequency: float, share: float = 0.8,
                 floor: float = 300.0) -> ToneReport:
    """How much of the recording at ``path`` is the pure tone ``frequency``.

    A block counts as voiced when its RMS passes ``floor`` (of 32767) and as the tone when at
    least ``share`` of its energy is at ``frequency``. Blocks are 50 ms: whole cycles of any
    tone on a 20 Hz step, so choose tones like 440 or 1000 Hz.
    """
    rate, samples = read_wav(path)
    size = rate // 20
    voiced = tone = crossings = voiced_samples = 0
    for start in range(0, len(samples) - size + 1, size):
        block = samples[start:start + size]
        if math.sqrt(sum(x * x for x in block) / size) < floor:
            continue
        voiced += 1
        voiced_samples += size
        edge = samples[start:start + size + 1]  # one more sample: the crossing into the next
        crossings += sum(1 for a, b in pairwise(edge) if (a < 0) != (b < 0))
        if tone_share(block, rate, frequency) >= share:
            tone += 1
    dominant = crossings * rate / (2.0 * voiced_samples) if voiced_samples else 0.0
    return ToneReport(seconds=len(samples) / rate, voiced=voiced * size / rate,
                      tone=tone * size / rate, dominant=round(dominant, 1))
