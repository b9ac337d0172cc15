"""
Scenario proxy: GET of a small static file through a proxy, 50 concurrent
connections from wrk.

All three contenders forward to the same upstream, a private nginx serving
a 120-byte file: evgate's C{http-proxy} (keyless, one process), twisted.web's
bare C{ReverseProxyResource} (one process, no pooling) and nginx's
C{proxy_pass} (one worker, keep-alive upstream pool).  The upstream
itself, asked directly, is the ceiling.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any, Dict, List, Tuple

from evbench.common import HERE, Service, Settings, freePort, measureWrk, pythonService, ratio, scratch, table

GET_LUA = os.path.join(HERE, "get.lua")
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
FILE = b"x" * 119 + b"\n"


def nginxService(name: str, server: str) -> Service:
    """
    A private nginx (one worker, no access log) with C{server} as its
    server block; C{{port}} in it is its port.
    """
    port = freePort()
    d = scratch(name)
    os.makedirs(os.path.join(d, "www"), exist_ok=True)
    with open(os.path.join(d, "www", "small.txt"), "wb") as f:
        f.write(FILE)
    config = f"""
daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
    {server.replace("{port}", str(port)).replace("{root}", d + "/www")}
}}
"""
    path = os.path.join(d, "nginx.conf")
    with open(path, "w") as f:
        f.write(config)
    return Service(name, [NGINX, "-c", path, "-p", d], port, cwd=d)


def evgateProxy(upstream: int) -> Service:
    """
    evgate with one keyless http-proxy API in front of C{upstream}.
    """
    from evbench.common import evgateService

    return evgateService(f"""
[gateway]
listen = tcp:{{port}}:interface=127.0.0.1

[endpoint:static]
type = http
targets = http://127.0.0.1:{upstream}

[api:static]
path = /static
endpoint = static
entrypoints = http-proxy
""", name="evgate-proxy")


def run(settings: Settings) -> Tuple[Dict[str, Any], str]:
    services: List[Service] = []
    rows: List[Dict[str, Any]] = []
    try:
        upstream = nginxService("upstream-nginx", "server { listen 127.0.0.1:{port}; root {root}; }").start()
        services.append(upstream)
        contenders: List[Tuple[str, Service, str]] = []
        if settings.wants("nginx"):
            proxy = nginxService("nginx-proxy", f"""
    upstream up {{ server 127.0.0.1:{upstream.port}; keepalive 64; }}
    server {{ listen 127.0.0.1:{{port}};
        location /static/ {{ proxy_pass http://up/; proxy_http_version 1.1; proxy_set_header Connection ""; }} }}
""").start()
            services.append(proxy)
            contenders.append(("nginx proxy_pass", proxy, f"http://127.0.0.1:{proxy.port}/static/small.txt"))
        if settings.wants("evgate"):
            gateway = evgateProxy(upstream.port).start()
            services.append(gateway)
            contenders.append(("evgate http-proxy", gateway, f"http://127.0.0.1:{gateway.port}/static/small.txt"))
        if settings.wants("reverse"):
            port = freePort()
            bare = pythonService("twisted-reverse-proxy", "reverse", [str(port), str(upstream.port)], port).start()
            services.append(bare)
            contenders.append(("twisted.web ReverseProxyResource", bare, f"http://127.0.0.1:{bare.port}/small.txt"))
        if settings.wants("direct"):
            contenders.append(("nginx upstream, direct (ceiling)", upstream,
                               f"http://127.0.0.1:{upstream.port}/small.txt"))
        for name, service, url in contenders:
            status = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url],
                                    capture_output=True, text=True).stdout
            if status != "200":
                raise RuntimeError(f"{name}: {url} answered {status}")
            result = measureWrk(service, url, settings, b"", "text/plain", script=GET_LUA)
            result["name"] = name
            rows.append(result)
    finally:
        for service in reversed(services):
            service.stop()
    byName = {r["name"]: r for r in rows}
    evgate = byName.get("evgate http-proxy")
    text = table("Proxy: GET of a 120-byte file through a proxy, 50 connections", [
        "contender", "req/s", "p99 ms", "proxy CPU %", "CPU µs/request", "req/s vs evgate"], [
        [r["name"], r["rps"], r["p99"], r["serverCpu"], r["serverCpuPerRequestUs"],
         ratio(r["rps"], evgate["rps"]) if evgate else None] for r in rows])
    return {"rows": rows}, text
