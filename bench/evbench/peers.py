"""
The contenders: evgate itself, the bare twisted.web ceiling, the Strimzi
HTTP Bridge and Pushpin.  Peers are installed here (never vendored) and
run from temporary directories on free ports, all on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Dict, List, Optional

from evbench.common import BENCH, KAFKA, Service, evgateService, freePort, http, pythonService, say, scratch, waitPort


class Unavailable(Exception):
    """
    A peer that cannot run on this machine; the scenario reports why and
    carries on with the others.
    """


# ---------------------------------------------------------------- evgate

EVGATE_INI = """
[gateway]
listen = tcp:port={{port}}:interface=127.0.0.1:backlog=4096
# Above the 10,000 streams of the biggest fan-out, and its publisher.
max-connections = 30000
replay-window = {window}
subscriber-queue = {queue}

[endpoint:mem]
type = memory
retention = {retention}

[endpoint:kafka]
type = kafka
bootstrap.servers = {kafka}

[api:mem]
path = /mem
endpoint = mem
topic = bench
entrypoints = {entrypoints}
start = {start}
{apiExtra}
[api:kafka]
path = /kafka
endpoint = kafka
topic = {topic}
entrypoints = {entrypoints}
start = {start}
{apiExtra}"""


def evgateIni(topic: str = "evbench-unused", entrypoints: str = "http-post", start: str = "latest",
              heartbeat: Optional[float] = None, window: int = 10000, queue: int = 1000,
              retention: int = 10000, extra: str = "", limit: Optional[str] = None) -> str:
    """
    A gateway with a memory API at C{/mem} and a Kafka API at C{/kafka},
    both keyless, and both under the rate limit C{limit} when one is given.
    """
    apiExtra = ""
    if heartbeat is not None and ("sse" in entrypoints or "websocket" in entrypoints):
        apiExtra = f"heartbeat = {heartbeat:g}\n"
    if limit is not None:
        apiExtra += f"plans = keyless\nrate-limit = {limit}\n"
    return EVGATE_INI.format(window=window, queue=queue, retention=retention, kafka=KAFKA, topic=topic,
                             entrypoints=entrypoints, start=start, apiExtra=apiExtra) + extra


def evgateKafkaIni(topic: str, entrypoints: str, workers: int, heartbeat: float = 300,
                   limit: Optional[str] = None) -> str:
    """
    A gateway with only the Kafka API at C{/kafka}, served by C{workers}
    processes (the memory endpoint lives in one process, so it is left
    out).
    """
    ini = evgateIni(topic=topic, entrypoints=entrypoints, heartbeat=heartbeat, limit=limit)
    gateway = f"[gateway]\nworkers = {workers}\n"
    if limit is not None:
        # Processes share their counters through Redis, as production
        # would have them (the dev Redis of scripts/dev-services).
        gateway += f"limits-store = redis://127.0.0.1:{os.environ.get('EVGATE_REDIS_PORT', '6379')}\n"
    head, _, rest = ini.partition("[endpoint:mem]")
    kafka = rest[rest.index("[endpoint:kafka]"):]
    kafka = kafka[:kafka.index("[api:mem]")] + kafka[kafka.index("[api:kafka]"):]
    return head.replace("[gateway]\n", gateway, 1) + kafka


def evgate(ini: str, name: str = "evgate") -> Service:
    """
    The gateway as users run it: C{twistd -n evgate}.
    """
    return evgateService(ini, name)


def bare(noForm: bool = False) -> Service:
    """
    The bare twisted.web ceiling (see L{evbench.bare}); with C{noForm},
    POST bodies are not parsed as forms.
    """
    port = freePort()
    return pythonService("bare-twisted", "bare", [str(port)] + (["noform"] if noForm else []), port)


# ---------------------------------------------------------------- Strimzi

BRIDGE_JAVA = os.environ.get("EVGATE_BRIDGE_JAVA_HOME", "/usr/lib/jvm/temurin-25-jdk-amd64")

BRIDGE_PROPERTIES = """bridge.id=evbench
kafka.bootstrap.servers={kafka}
# The same acknowledgement as evgate's librdkafka producer (acks=all).
kafka.producer.acks=all
kafka.consumer.auto.offset.reset=earliest
kafka.consumer.max.poll.records={maxPoll}
http.host=127.0.0.1
http.port={port}
http.management.port={management}
http.cors.enabled=false
http.consumer.enabled=true
http.producer.enabled=true
"""

# As evgate writes no access log by default, the bridge logs warnings only.
BRIDGE_LOG4J = """name = BridgeConfig
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{yyyy-MM-dd HH:mm:ss} %-5p [%t] %c{1}:%L - %m%n
rootLogger.level = WARN
rootLogger.appenderRefs = console
rootLogger.appenderRef.console.ref = STDOUT
"""


def bridgeHome() -> str:
    """
    The Strimzi bridge's install directory, installing it if needed.
    """
    script = os.path.join(BENCH, "peers", "strimzi-bridge", "install")
    done = subprocess.run([script], capture_output=True, text=True)
    if done.returncode != 0:
        raise Unavailable(done.stderr.strip() or "the Strimzi bridge could not be installed")
    return done.stdout.strip().splitlines()[-1]


def bridgeVersion(home: str) -> str:
    for name in os.listdir(os.path.join(home, "libs")):
        if name.startswith("io.strimzi.kafka-bridge-") or name.startswith("kafka-bridge-"):
            return name.rsplit("-", 1)[1][:-4]
    return "?"


def strimziBridge(maxPoll: int = 1000, heap: str = "1g") -> Service:
    """
    The Strimzi HTTP Bridge against the dev broker, on a free port.
    """
    home = bridgeHome()
    java = os.path.join(BRIDGE_JAVA, "bin", "java")
    if not os.path.exists(java):
        java = shutil.which("java") or "java"
    port, management = freePort(), freePort()
    directory = scratch("strimzi")
    with open(os.path.join(directory, "application.properties"), "w") as f:
        f.write(BRIDGE_PROPERTIES.format(kafka=KAFKA, port=port, management=management, maxPoll=maxPoll))
    with open(os.path.join(directory, "log4j2.properties"), "w") as f:
        f.write(BRIDGE_LOG4J)
    argv = [java, f"-Xms{heap}", f"-Xmx{heap}", "-Dvertx.cacheDirBase=" + os.path.join(directory, "vertx"),
            "-Dlog4j2.configurationFile=file:" + os.path.join(directory, "log4j2.properties"),
            "-cp", os.path.join(home, "libs", "*"), "io.strimzi.kafka.bridge.Application",
            "--config-file=" + os.path.join(directory, "application.properties")]

    def ready() -> bool:
        for path in ("/healthy", "/"):
            for p in (management, port):
                try:
                    status, _ = http("GET", f"http://127.0.0.1:{p}{path}", timeout=2)
                except OSError:
                    continue
                if status in (200, 204):
                    return True
        return False

    service = Service("strimzi-bridge", argv, port, cwd=directory, ready=ready, timeout=120)
    service.version = bridgeVersion(home)  # type: ignore[attr-defined]
    return service


# ---------------------------------------------------------------- Pushpin

PUSHPIN_CONF = """[global]
include={{libdir}}/internal.conf
rundir={rundir}
ipc_prefix=evbench-
port_offset=0
stats_connection_ttl=120

[runner]
services=condure,pushpin-proxy,pushpin-handler
http_port=127.0.0.1:{port}
logdir={logdir}
log_level=1
client_buffer_size=8192
client_maxconn={maxconn}
condure_bin=condure
zurl_bin=zurl

[proxy]
routesfile={routes}
debug=false
auto_cross_origin=false
accept_x_forwarded_protocol=false
set_x_forwarded_protocol=proto-only
log_from=false
log_user_agent=false
sig_iss=pushpin
sig_key=evbench
updates_check=off
zurl_out_specs=ipc://{zurl}/zurl-in
zurl_out_stream_specs=ipc://{zurl}/zurl-in-stream
zurl_in_specs=ipc://{zurl}/zurl-out

[handler]
push_in_spec=tcp://127.0.0.1:{pushIn}
push_in_sub_specs=tcp://127.0.0.1:{pushSub}
push_in_sub_connect=false
push_in_http_addr=127.0.0.1
push_in_http_port={publish}
push_in_http_max_headers_size=10000
push_in_http_max_body_size=1000000
stats_spec=ipc://{{rundir}}/{{ipc_prefix}}stats
command_spec=tcp://127.0.0.1:{command}
message_rate={messageRate}
message_hwm={messageHwm}
message_wait=5000
id_cache_ttl=60
connection_subscription_max=20
subscription_linger=60
stats_subscription_ttl=60
stats_report_interval=10
stats_format=tnetstring
"""

ZURL_CONF = """[General]
instance_id=evbench
in_spec=ipc://{zurl}/zurl-in
in_stream_spec=ipc://{zurl}/zurl-in-stream
out_spec=ipc://{zurl}/zurl-out
in_req_spec=ipc://{zurl}/zurl-req
ipc_file_mode=660
defpolicy=allow
allow=
# Debian's default denies 127.*; the origin lives there.
deny=
max_open_requests={maxconn}
buffer_size=200000
timeout=600
in_hwm=100000
out_hwm=100000
"""


def ensurePushpin() -> str:
    """
    Debian's pushpin and zurl, installed with apt-get when missing; the
    version of pushpin.
    """
    if not (shutil.which("pushpin") and shutil.which("zurl") and shutil.which("condure")):
        say("installing pushpin and zurl with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        lock = ["-o", "DPkg::Lock::Timeout=600"]
        install = ["apt-get", "install", "-y", "--no-install-recommends", *lock, "pushpin", "zurl"]
        done = subprocess.run(install, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            subprocess.run(["apt-get", "update", *lock], env=env, capture_output=True)
            done = subprocess.run(install, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise Unavailable("apt-get install pushpin zurl failed: " + done.stderr.strip()[-300:])
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "pushpin"], capture_output=True, text=True)
        return out.stdout.strip() or "?"
    except OSError:
        return "?"


class Pushpin:
    """
    Pushpin (condure, proxy, handler), a zurl of its own started by hand,
    and the GRIP origin (L{evbench.grip_origin}) that holds every stream
    on one channel.  Tuned for fan-out: no delivery rate limit and deep
    queues (C{message_rate}, C{message_hwm}), 50k client connections.
    """

    def __init__(self, channel: str = "bench", messageRate: int = 10_000_000,
                 messageHwm: int = 10_000_000, maxconn: int = 60000) -> None:
        self.version = ensurePushpin()
        self.channel = channel
        self.directory = scratch("pushpin")
        self.port = freePort()
        self.publishPort = 5561 if _free(5561) else freePort()
        self.originPort = freePort()
        self.messageRate = messageRate
        self.messageHwm = messageHwm
        self.maxconn = maxconn
        self.services: List[Service] = []

    def start(self) -> "Pushpin":
        d = self.directory
        zurlDir = os.path.join(d, "zurl")
        for sub in ("run", "log", "zurl"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        routes = os.path.join(d, "routes")
        with open(routes, "w") as f:
            f.write(f"* 127.0.0.1:{self.originPort}\n")
        with open(os.path.join(d, "zurl.conf"), "w") as f:
            f.write(ZURL_CONF.format(zurl=zurlDir, maxconn=self.maxconn))
        with open(os.path.join(d, "pushpin.conf"), "w") as f:
            f.write(PUSHPIN_CONF.format(rundir=os.path.join(d, "run"), port=self.port,
                                        logdir=os.path.join(d, "log"), maxconn=self.maxconn, routes=routes,
                                        zurl=zurlDir, pushIn=freePort(), pushSub=freePort(),
                                        publish=self.publishPort, command=freePort(),
                                        messageRate=self.messageRate, messageHwm=self.messageHwm))
        origin = pythonService("grip-origin", "grip_origin", [str(self.originPort), self.channel],
                               self.originPort)
        self.services.append(origin.start())
        zurl = Service("zurl", ["zurl", "--config=" + os.path.join(d, "zurl.conf")], 0, cwd=d)
        zurl.port = 0
        self._startNoPort(zurl)
        pushpin = Service("pushpin", ["pushpin", "--config", os.path.join(d, "pushpin.conf"),
                                      "--merge-output"], self.port, cwd=d, timeout=60)
        self.services.append(pushpin.start())
        waitPort(self.publishPort, 30)
        # The proxy talks to zurl over IPC; one held request proves the
        # whole chain (client -> condure -> proxy -> zurl -> origin).
        self._probe()
        return self

    def _startNoPort(self, service: Service) -> None:
        say(f"starting {service.name}")
        out = open(service.log, "ab")
        service.proc = subprocess.Popen(service.argv, cwd=service.directory, stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        out.close()
        time.sleep(0.5)
        if service.proc.poll() is not None:
            raise Unavailable(f"zurl exited at start: {service.tail()}")
        self.services.append(service)

    def _probe(self) -> None:
        import socket

        deadline = time.monotonic() + 30
        last = b""
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                    s.sendall(b"GET /probe HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
                    s.settimeout(5)
                    last = s.recv(4096)
                    if last.startswith(b"HTTP/1.1 200"):
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise Unavailable(f"Pushpin did not hold a stream through the GRIP origin: {last[:200]!r}")

    def pids(self) -> List[int]:
        """
        Pushpin's processes (runner, condure, proxy, handler) and zurl, not
        the origin (which only answers the opening request).
        """
        out: List[int] = []
        for service in self.services:
            if service.name != "grip-origin":
                out.extend(service.pids())
        return out

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()
        self.services = []

    def config(self) -> Dict[str, int]:
        return {"message_rate": self.messageRate, "message_hwm": self.messageHwm,
                "client_maxconn": self.maxconn}


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
