"""
What every scenario needs: processes and their CPU, free ports, the wrk
load generator, Kafka topics, tables and the JSON results.
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
ROOT = os.path.dirname(BENCH)
RESULTS = os.environ.get("EVGATE_BENCH_RESULTS", os.path.join(BENCH, "results"))
CACHE = os.environ.get("EVGATE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "evgate"))
KAFKA = "127.0.0.1:" + os.environ.get("EVGATE_KAFKA_PORT", "9092")
PYTHON = sys.executable
# The evgate source tree the gateway runs from: this checkout, or another
# one (a copy with a patch under test) to compare with the same harness.
TREE = os.path.abspath(os.environ.get("EVGATE_BENCH_TREE", ROOT))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


_temporary: List[str] = []


def scratch(prefix: str) -> str:
    """
    A new temporary directory for a server's config and log, removed when
    the run ends (kept with EVGATE_BENCH_KEEP=1, to read the logs).
    """
    path = tempfile.mkdtemp(prefix=f"evbench-{prefix}-")
    _temporary.append(path)
    return path


def _removeScratch() -> None:
    if os.environ.get("EVGATE_BENCH_KEEP"):
        return
    for path in _temporary:
        shutil.rmtree(path, ignore_errors=True)


def say(text: str) -> None:
    """
    One progress line on stderr (stdout carries the tables).
    """
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- settings


@dataclass
class Settings:
    """
    What the command line asked for, shared by every scenario.
    """

    quick: bool = False
    duration: float = 15.0
    warmup: float = 3.0
    connections: int = 50
    rounds: int = 1
    profile: bool = False
    only: Tuple[str, ...] = ()
    skip: Tuple[str, ...] = ()
    extra: Dict[str, Any] = field(default_factory=dict)

    def wants(self, contender: str) -> bool:
        """
        Whether C{contender} runs (C{--only} / C{--skip} name contenders).
        """
        if self.only and not any(o in contender for o in self.only):
            return False
        return not any(s in contender for s in self.skip)


# ---------------------------------------------------------------- processes


def raiseFileLimit() -> int:
    """
    Raise the soft limit of open files to the hard one (children inherit
    it) and return it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def freePort() -> int:
    """
    A TCP port that was free a moment ago on 127.0.0.1.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def waitPort(port: int, timeout: float = 60.0, proc: Optional[subprocess.Popen] = None) -> None:
    """
    Wait until something accepts connections on 127.0.0.1:C{port}.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:g}s")


def children(pid: int) -> List[int]:
    """
    C{pid} and all its descendants.
    """
    parents: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, ()))
    return out


def cpuSeconds(pids: Iterable[int]) -> float:
    """
    User + system CPU seconds used so far by C{pids} (their threads
    included; exited children not).
    """
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def rssBytes(pid: int) -> int:
    """
    The resident set size of C{pid}.
    """
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def machineBusy() -> Tuple[float, float]:
    """
    (busy, total) jiffies of the whole machine, from /proc/stat.
    """
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return float(sum(values) - idle), float(sum(values))


class CpuMeter:
    """
    CPU used by a set of processes (and by the machine) between L{start}
    and L{stop}, as a percentage of one core.
    """

    def __init__(self, pids: Callable[[], Sequence[int]]) -> None:
        self.pids = pids
        self.percent = 0.0
        self.machine = 0.0

    def start(self) -> "CpuMeter":
        self.changed = False
        self._pids = list(self.pids())
        self._cpu = cpuSeconds(self._pids)
        self._t = time.monotonic()
        self._busy = machineBusy()
        return self

    def stop(self) -> "CpuMeter":
        elapsed = max(1e-6, time.monotonic() - self._t)
        # A process that exited (or was restarted by someone else, as the
        # shared dev broker can be) makes the difference meaningless.
        self.changed = not set(self._pids) <= set(self.pids())
        # CPU seconds used in all (for a cost per message), and that in % of a core.
        self.seconds = max(0.0, cpuSeconds(self._pids) - self._cpu)
        self.percent = 100.0 * self.seconds / elapsed
        busy, total = machineBusy()
        self.machine = 100.0 * (busy - self._busy[0]) / max(1.0, total - self._busy[1])
        return self


def waitQuiet(maxWait: float = 10.0, cores: float = 0.5) -> float:
    """
    Wait (at most C{maxWait} seconds) until the machine has been busy with
    less than C{cores} cores for a second: on a shared machine, start a
    measurement when the others are not running something big.  Returns
    the load seen last, in cores.
    """
    deadline = time.monotonic() + maxWait
    while True:
        busy0, total0 = machineBusy()
        time.sleep(1.0)
        busy1, total1 = machineBusy()
        load = (os.cpu_count() or 1) * (busy1 - busy0) / max(1.0, total1 - total0)
        if load < cores or time.monotonic() > deadline:
            if load >= cores:
                say(f"the machine is still busy with {load:.1f} cores from other processes; measuring anyway")
            return load


_running: List["Service"] = []


def stopAll() -> None:
    """
    Stop every service still running (at exit, or when interrupted).
    """
    for service in list(_running):
        service.stop()


atexit.register(_removeScratch)
atexit.register(stopAll)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


class Service:
    """
    A server process started by a scenario, stopped by it, with its output
    kept in a log file.
    """

    def __init__(self, name: str, argv: Sequence[str], port: int, cwd: Optional[str] = None,
                 env: Optional[Dict[str, str]] = None, ready: Optional[Callable[[], bool]] = None,
                 timeout: float = 90.0) -> None:
        self.name = name
        self.argv = list(argv)
        self.port = port
        self.directory = cwd or scratch(name)
        self.env = env
        self.ready = ready
        self.timeout = timeout
        self.proc: Optional[subprocess.Popen] = None
        self.log = os.path.join(self.directory, f"{name}.log")

    def start(self) -> "Service":
        if self.proc is not None and self.proc.poll() is None:
            return self
        say(f"starting {self.name} on port {self.port}")
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(self.argv, cwd=self.directory, env=self.env, stdout=out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        out.close()
        _running.append(self)
        try:
            waitPort(self.port, self.timeout, self.proc)
            if self.ready is not None:
                deadline = time.monotonic() + self.timeout
                while not self.ready():
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        raise RuntimeError(f"{self.name} did not become ready")
                    time.sleep(0.2)
        except Exception:
            self.stop()
            raise RuntimeError(f"{self.name} failed to start; see {self.log}:\n{self.tail()}") from None
        return self

    def tail(self, lines: int = 15) -> str:
        try:
            with open(self.log, "rb") as f:
                return b"".join(f.readlines()[-lines:]).decode("utf-8", "replace")
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def pids(self) -> List[int]:
        return children(self.pid) if self.proc is not None else []

    def stop(self) -> None:
        if self in _running:
            _running.remove(self)
        if self.proc is None or self.proc.poll() is not None:
            return
        # The process leads its own session: this reaches its children
        # (pushpin's runner, java's launcher) and nothing else.
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> "Service":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def evgateService(ini: str, name: str = "evgate") -> Service:
    """
    C{twistd -n evgate -c <ini>} on a free port; C{ini} has a C{{port}}
    placeholder in its C{listen}.
    """
    port = freePort()
    directory = scratch(name)
    path = os.path.join(directory, f"{name}.ini")
    with open(path, "w") as f:
        f.write(ini.format(port=port))
    env = dict(os.environ, PYTHONPATH=TREE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return Service(name, [TWISTD, "-n", "--pidfile=", "evgate", "-c", path], port, cwd=directory, env=env)


def pythonService(name: str, module: str, args: Sequence[str], port: int) -> Service:
    """
    A server of this package (C{python -m evbench.<module>}) on C{port}.
    """
    env = dict(os.environ, PYTHONPATH=BENCH + os.pathsep + ROOT)
    return Service(name, [PYTHON, "-m", f"evbench.{module}", *args], port, env=env)


def checkEvgate(ini: str) -> Optional[str]:
    """
    L{None} if C{twistd evgate --check} accepts C{ini}, else its complaint.
    """
    directory = scratch("check")
    path = os.path.join(directory, "check.ini")
    with open(path, "w") as f:
        f.write(ini.format(port=0))
    env = dict(os.environ, PYTHONPATH=TREE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([TWISTD, "-n", "--pidfile=", "evgate", "--check", "-c", path], env=env,
                          capture_output=True, text=True, cwd=directory)
    if done.returncode == 0:
        return None
    return (done.stdout + done.stderr).strip().splitlines()[-1] if (done.stdout + done.stderr).strip() else "rejected"


def http(method: str, url: str, body: Optional[bytes] = None, headers: Optional[Dict[str, str]] = None,
         timeout: float = 30.0) -> Tuple[int, bytes]:
    """
    A blocking HTTP request: status and body, never raising for a status.
    """
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# ---------------------------------------------------------------- wrk

WRK = shutil.which("wrk") or "/usr/bin/wrk"
POST_LUA = os.path.join(HERE, "post.lua")


@dataclass
class WrkResult:
    """
    What one wrk run measured, and what it cost the load generator.
    """

    requests: int
    seconds: float
    rps: float
    p50: float
    p90: float
    p99: float
    max: float
    errors: Dict[str, int]
    wrkCpu: float

    def asJSON(self) -> Dict[str, Any]:
        return dict(self.__dict__)


def runWrk(url: str, seconds: float, connections: int, body: bytes, contentType: str,
           threads: int = 1, timeout: float = 10.0, script: Optional[str] = None) -> WrkResult:
    """
    POST C{body} to C{url} with wrk for C{seconds}, C{connections} at a
    time; latencies in milliseconds, wrk's own CPU in % of one core.
    """
    directory = scratch("wrk")
    bodyFile = os.path.join(directory, "body")
    with open(bodyFile, "wb") as f:
        f.write(body)
    env = dict(os.environ, BENCH_BODY_FILE=bodyFile, BENCH_CONTENT_TYPE=contentType)
    argv = [WRK, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
            f"--timeout={timeout:g}s", "-s", script or POST_LUA, url]
    out = tempfile.TemporaryFile()
    proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    text = out.read().decode("utf-8", "replace")
    match = re.search(r"BENCH-JSON (\{.*\})", text)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{text}")
    data = json.loads(match.group(1))
    elapsed = data["duration_us"] / 1e6
    cpu = 100.0 * (usage.ru_utime + usage.ru_stime) / max(elapsed, 1e-6)
    errors = {k[7:]: v for k, v in data.items() if k.startswith("errors_") and v}
    good = data["requests"] - data["errors_status"]
    return WrkResult(requests=good, seconds=elapsed, rps=good / elapsed, p50=data["p50_us"] / 1000,
                     p90=data["p90_us"] / 1000, p99=data["p99_us"] / 1000, max=data["max_us"] / 1000,
                     errors=errors, wrkCpu=cpu)


def measureWrk(service: Optional[Service], url: str, settings: Settings, body: bytes, contentType: str,
               connections: Optional[int] = None, pids: Optional[Callable[[], Sequence[int]]] = None,
               profileTo: Optional[str] = None, script: Optional[str] = None) -> Dict[str, Any]:
    """
    A warm-up run, then the measured one, with the server's CPU beside.
    """
    conns = connections or settings.connections
    waitQuiet()
    if settings.warmup > 0:
        runWrk(url, settings.warmup, conns, body, contentType, script=script)
    meter = CpuMeter(pids or (service.pids if service is not None else (lambda: []))).start()
    broker = CpuMeter(brokerPids).start()
    spy = startProfile(service, settings.duration, profileTo) if profileTo else None
    result = runWrk(url, settings.duration, conns, body, contentType, script=script)
    meter.stop()
    broker.stop()
    finishProfile(spy)
    out = result.asJSON()
    # CPU per request is steadier than requests/s on a shared machine: it
    # does not move when another process takes the core for a while.
    perRequest = 10_000 * meter.percent / result.rps if result.rps else None
    other = max(0.0, meter.machine * (os.cpu_count() or 1) - meter.percent - result.wrkCpu - broker.percent)
    out.update(serverCpu=meter.percent, machineCpu=meter.machine, connections=conns,
               serverCpuPerRequestUs=perRequest, brokerCpu=broker.percent, otherCpu=other,
               brokerRestarted=broker.changed)
    return out


# ---------------------------------------------------------------- profiling


def startProfile(service: Optional[Service], seconds: float, path: Optional[str]) -> Any:
    """
    py-spy on C{service} for C{seconds}, writing collapsed stacks to
    C{path} (L{None} when py-spy is not installed).
    """
    spy = os.path.join(os.path.dirname(PYTHON), "py-spy")
    if service is None or path is None or not os.path.exists(spy):
        return None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return subprocess.Popen([spy, "record", "--pid", str(service.pid), "--duration", str(max(1, int(seconds))),
                             "--rate", "200", "--format", "raw", "--threads", "--nonblocking",
                             "--output", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def finishProfile(spy: Any) -> None:
    if spy is not None:
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


def summariseProfile(path: str, top: int = 15) -> List[Tuple[str, float, float]]:
    """
    The functions with the most samples in a py-spy raw (collapsed) file:
    (function, self %, total %).
    """
    selfCounts: Dict[str, int] = {}
    totalCounts: Dict[str, int] = {}
    samples = 0
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return []
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if not f.startswith("thread ") and not f.startswith("process ")]
        if not frames:
            continue
        samples += n
        selfCounts[frames[-1]] = selfCounts.get(frames[-1], 0) + n
        for frame in set(frames):
            totalCounts[frame] = totalCounts.get(frame, 0) + n
    if not samples:
        return []
    ranked = sorted(selfCounts.items(), key=lambda kv: -kv[1])[:top]
    return [(name, 100.0 * n / samples, 100.0 * totalCounts.get(name, 0) / samples) for name, n in ranked]


# ---------------------------------------------------------------- Kafka


def kafkaTopic(prefix: str, partitions: int = 1, bootstrap: str = KAFKA) -> str:
    """
    A new topic on the dev broker (or on C{bootstrap}), created (and
    waited for) now.
    """
    from confluent_kafka.admin import AdminClient, NewTopic

    name = f"evbench-{prefix}-{int(time.time())}-{os.getpid()}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    for future in futures.values():
        future.result(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        meta = admin.list_topics(name, timeout=10)
        topic = meta.topics.get(name)
        if topic is not None and topic.error is None and len(topic.partitions) == partitions:
            return name
        time.sleep(0.2)
    raise RuntimeError(f"topic {name} did not appear")


def deleteTopics(names: Sequence[str]) -> None:
    """
    Delete the topics a scenario made, so that runs do not fill the disk.
    """
    if not names:
        return
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": KAFKA})
    for future in admin.delete_topics(list(names)).values():
        try:
            future.result(30)
        except Exception:
            pass


def brokerPids() -> List[int]:
    """
    The dev Kafka broker's process (from scripts/dev-services' pid file),
    whose CPU the Kafka contenders cause and the tables show apart.
    """
    state = os.environ.get("EVGATE_STATE", os.path.join(os.path.expanduser("~"), ".local", "state", "evgate"))
    try:
        with open(os.path.join(state, "kafka", "kafka.pid")) as f:
            return [int(f.read().strip())]
    except (OSError, ValueError):
        return []


def kafkaUp() -> bool:
    """
    Whether the dev broker answers.
    """
    from confluent_kafka.admin import AdminClient

    try:
        AdminClient({"bootstrap.servers": KAFKA}).list_topics(timeout=5)
        return True
    except Exception:
        return False


# ---------------------------------------------------------------- output


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 10000:
            return f"{value:,.0f}"
        if 0 < abs(value) < 1:
            return f"{value:.3f}"
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """
    A Markdown table (readable in a terminal as it is).
    """
    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = [f"### {title}", ""]
    lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    lines.append("| " + " | ".join("-" * w for w in widths) + " |")
    for row in cells:
        lines.append("| " + " | ".join(v.rjust(w) for v, w in zip(row, widths)) + " |")
    return "\n".join(lines) + "\n"


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


def machine() -> Dict[str, Any]:
    """
    The machine and the versions this run used.
    """
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) * 1024
    versions: Dict[str, str] = {"python": platform.python_version()}
    for module, attr in (("twisted", "__version__"), ("confluent_kafka", "version"),
                         ("autobahn", "__version__")):
        try:
            mod = __import__(module)
            value = getattr(mod, attr)
            versions[module] = value() if callable(value) else str(value)
        except Exception:
            pass
    try:
        import confluent_kafka

        versions["librdkafka"] = confluent_kafka.libversion()[0]
    except Exception:
        pass
    try:
        versions["wrk"] = subprocess.run([WRK, "-v"], capture_output=True, text=True).stdout.split()[1]
    except Exception:
        pass
    try:
        rev = subprocess.run(["git", "-C", TREE, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", TREE, "status", "--porcelain", "evgate"], capture_output=True,
                               text=True).stdout.strip()
        versions["evgate"] = rev.stdout.strip() + ("+dirty" if dirty else "")
    except Exception:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "memory_gib": round(mem / 2**30, 1),
            "kernel": platform.release(), "versions": versions}


def writeResults(scenario: str, document: Dict[str, Any], text: str) -> str:
    """
    Write the scenario's JSON (and its table) under bench/results/ and
    return the JSON path.
    """
    os.makedirs(RESULTS, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    document = dict(document, scenario=scenario, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    machine=machine())
    path = os.path.join(RESULTS, f"{scenario}-{stamp}.json")
    with open(path, "w") as f:
        json.dump(document, f, indent=2, sort_keys=True)
    with open(os.path.join(RESULTS, f"{scenario}-latest.json"), "w") as f:
        json.dump(document, f, indent=2, sort_keys=True)
    with open(os.path.join(RESULTS, f"{scenario}-latest.md"), "w") as f:
        f.write(text)
    return path
