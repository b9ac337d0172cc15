"""
The performance targets, read from the documents of one C{bench/run-all}:
one row per target with what was measured, the ratio, and whether it is
met.  A target whose rows did not run (a peer that could not start, a
scenario left out with C{--only}) says so rather than guessing.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from evbench.common import table

Documents = Dict[str, Dict[str, Any]]
# A target's check: (measured, met) from the documents; met is None when
# it could not be judged.
Check = Callable[[Documents], Tuple[str, Optional[bool]]]


def rowsOf(documents: Documents, scenario: str) -> List[Dict[str, Any]]:
    return list(documents.get(scenario, {}).get("rows", ()))


def find(rows: Sequence[Dict[str, Any]], prefix: str, **where: Any) -> Optional[Dict[str, Any]]:
    """
    The first row whose contender (or name) starts with C{prefix} and whose
    other members equal C{where}.
    """
    for row in rows:
        name = str(row.get("contender", row.get("name", "")))
        if name.startswith(prefix) and all(row.get(k) == v for k, v in where.items()):
            return row
    return None


def times(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def missing(*names: str) -> Tuple[str, Optional[bool]]:
    return "not measured: no row for " + ", ".join(names), None


BARE = "bare twisted.web, parsePOSTFormSubmission=False"


def publishAgainstBare(prefix: str, wanted: float) -> Check:
    def check(documents: Documents) -> Tuple[str, Optional[bool]]:
        rows = rowsOf(documents, "publish")
        row, bare = find(rows, prefix), find(rows, BARE)
        if row is None or bare is None:
            return missing(prefix, BARE)
        x = times(row["rps"], bare["rps"])
        assert x is not None
        return (f"{row['rps']:,.0f} req/s against {bare['rps']:,.0f}: {x:.2f}× "
                f"({row.get('serverCpuPerRequestUs') or 0:.0f} against "
                f"{bare.get('serverCpuPerRequestUs') or 0:.0f} µs of CPU per request)"), x >= wanted
    return check


def againstPeer(scenario: str, mine: str, theirs: str, wanted: float, tail: float) -> Check:
    """
    C{mine} makes at least C{wanted} times C{theirs}' requests per second
    at no more than C{tail} times its p99.
    """
    def check(documents: Documents) -> Tuple[str, Optional[bool]]:
        rows = rowsOf(documents, scenario)
        row, peer = find(rows, mine), find(rows, theirs)
        if row is None or peer is None:
            return missing(mine, theirs)
        x, p = times(row["rps"], peer["rps"]), times(row["p99"], peer["p99"])
        assert x is not None and p is not None
        return (f"{row['rps']:,.0f} req/s p99 {row['p99']:.0f} ms against {peer['rps']:,.0f} req/s p99 "
                f"{peer['p99']:.0f} ms: {x:.2f}× the req/s at {p:.2f}× the p99"), x >= wanted and p <= tail
    return check


def accessLogCost(documents: Documents) -> Tuple[str, Optional[bool]]:
    rows = rowsOf(documents, "publish")
    logged, plain = find(rows, "evgate-logged"), find(rows, "evgate-memory")
    if logged is None or plain is None:
        return missing("evgate-logged", "evgate-memory")
    extra = (logged.get("serverCpuPerRequestUs") or 0) - (plain.get("serverCpuPerRequestUs") or 0)
    x = times(logged["rps"], plain["rps"])
    return (f"{logged['rps']:,.0f} req/s with the log against {plain['rps']:,.0f} without ({x or 0:.2f}×); "
            f"{extra:+.0f} µs of CPU per request"), None


def rateLimitCost(documents: Documents) -> Tuple[str, Optional[bool]]:
    rows = rowsOf(documents, "publish")
    free, plain = find(rows, "evgate-free"), find(rows, "evgate-memory")
    if free is None or plain is None:
        return missing("evgate-free", "evgate-memory")
    extra = (plain.get("serverCpuPerRequestUs") or 0) - (free.get("serverCpuPerRequestUs") or 0)
    return (f"{plain['rps']:,.0f} req/s limited against {free['rps']:,.0f} without a limit; "
            f"{extra:+.0f} µs of CPU per request"), None


def batchAgainstRdkafka(workers: bool, wanted: float) -> Check:
    def check(documents: Documents) -> Tuple[str, Optional[bool]]:
        rows = rowsOf(documents, "batch")
        ceiling = find(rows, "librdkafka")
        candidates = [r for r in rows if str(r["contender"]).startswith("evgate NDJSON POST, 1000 ")
                      and ("workers" in str(r["contender"])) == workers]
        if ceiling is None or not candidates:
            return missing("librdkafka", "evgate NDJSON POST, 1000 records" + (" with workers" if workers else ""))
        row = candidates[0]
        x = times(row["records_per_s"], ceiling["records_per_s"])
        assert x is not None
        return (f"{row['records_per_s']:,.0f} records/s against {ceiling['records_per_s']:,.0f}: {x:.2f}×"), \
            x >= wanted
    return check


def pollAgainstStrimzi(prefix: str, wanted: float) -> Check:
    def check(documents: Documents) -> Tuple[str, Optional[bool]]:
        rows = rowsOf(documents, "poll")
        row, bridge = find(rows, prefix), find(rows, "strimzi")
        if row is None or bridge is None:
            return missing(prefix, "strimzi")
        x = times(row["records_per_s"], bridge["records_per_s"])
        assert x is not None
        return (f"{row['records_per_s']:,.0f} records/s against {bridge['records_per_s']:,.0f}: {x:.2f}×"), \
            x >= wanted
    return check


def webhookOneInFlight(documents: Documents) -> Tuple[str, Optional[bool]]:
    rows = rowsOf(documents, "webhook")
    row, plain = find(rows, "evgate webhook, 1 subscription"), find(rows, "plain")
    if row is None or plain is None:
        return missing("evgate webhook, 1 subscription", "plain HTTP client")
    x = times(row["deliveries_per_s"], plain["deliveries_per_s"])
    assert x is not None
    return (f"{row['deliveries_per_s']:,.0f}/s against {plain['deliveries_per_s']:,.0f}/s: {x:.2f}×; "
            f"lost {row['lost']}"), x >= 0.9 and row["lost"] == 0


def webhookWindow(documents: Documents) -> Tuple[str, Optional[bool]]:
    rows = rowsOf(documents, "webhook")
    one, window = find(rows, "evgate webhook, slow receiver, 1 in flight"), find(rows, "evgate webhook, slow "
                                                                                       "receiver, window")
    if one is None or window is None:
        return missing("slow receiver rows")
    x = times(window["deliveries_per_s"], one["deliveries_per_s"])
    assert x is not None
    return (f"{window['deliveries_per_s']:,.0f}/s against {one['deliveries_per_s']:,.0f}/s: {x:.1f}×; "
            f"out of order per key {window['out_of_order']}, lost {window['lost']}"), \
        x >= 10 and window["out_of_order"] == 0 and window["lost"] == 0


def fanout(prefix: str, size: int) -> Check:
    def check(documents: Documents) -> Tuple[str, Optional[bool]]:
        row = find(rowsOf(documents, "fanout"), prefix, mode="sse", wanted=size)
        if row is None:
            return missing(f"{prefix} at {size:,}")
        lost = row.get("gaps", 0) + row.get("late", 0)
        return (f"p99 {row['p99']} ms, {row['deliveries_per_s']:,.0f} deliveries/s, lost {lost}, "
                f"server {row['server_cpu']:.0f}% + clients {row['client_cpu']:.0f}% CPU"), \
            row["p99"] < 300 and lost == 0
    return check


def bigMessages(documents: Documents) -> Tuple[str, Optional[bool]]:
    # Met when the server's peak growth is at most two copies of each
    # message it holds by design (its content and its framed event), that
    # is nowhere near one per subscriber, and nothing was lost.
    big = documents.get("fanout", {}).get("big") or []
    if not big:
        return missing("evgate-big")
    row = big[0]
    lost = row.get("gaps", 0) + row.get("late", 0)
    return (f"peak RSS growth {row['rss_growth_mib']:.0f} MiB for {row['held_messages']} messages of "
            f"{row['message_bytes'] // 2**20} MiB held and {row['connected']:,} subscribers: "
            f"{row['copies_per_held_message']:.1f} copies per held message, "
            f"{row['copies_per_subscriber']:.3f} per subscriber; lost {lost}"), \
        row["copies_per_held_message"] <= 2.0 and lost == 0


def idleSse(documents: Documents) -> Tuple[str, Optional[bool]]:
    row = find(rowsOf(documents, "idle"), "evgate SSE")
    bare = find(rowsOf(documents, "idle"), "bare")
    if row is None:
        return missing("evgate SSE")
    text = f"{row['kib_per_stream']:.1f} KiB per stream"
    if bare is not None:
        text += f" (bare twisted.web {bare['kib_per_stream']:.1f})"
    return text, row["kib_per_stream"] <= 8


TARGETS: List[Tuple[str, Check]] = [
    ("publish, memory: ≥ 0.8× the bare handler", publishAgainstBare("evgate-memory", 0.8)),
    ("publish, Kafka, one process: ≥ 0.5× the bare handler", publishAgainstBare("evgate-kafka", 0.5)),
    ("publish, Kafka, 2 workers: ≥ 0.8× the bare handler", publishAgainstBare("evgate-workers", 0.8)),
    ("publish, Kafka: ≥ 2× Strimzi's req/s at ≤ 0.2× its p99", againstPeer("publish", "evgate-kafka", "strimzi", 2.0, 0.2)),
    ("publish: what the rate limit costs (a row of its own)", rateLimitCost),
    ("publish: what the access log costs (a row of its own)", accessLogCost),
    ("batch, one process: ≥ 0.35× direct librdkafka", batchAgainstRdkafka(False, 0.35)),
    ("batch, 2 workers: ≥ 0.5× direct librdkafka", batchAgainstRdkafka(True, 0.5)),
    ("poll with cursors: ≥ 2.5× the Strimzi bridge", pollAgainstStrimzi("evgate GET, cursors", 2.5)),
    ("poll in group mode: ≥ 2× the Strimzi bridge", pollAgainstStrimzi("evgate GET, group", 2.0)),
    ("webhook, 1 in flight: ≥ 0.9× a plain client", webhookOneInFlight),
    ("webhook, window 16 on a 10 ms receiver: ≥ 10× 1 in flight, order per key, none lost", webhookWindow),
    ("fan-out, 10,000 SSE, memory: p99 < 300 ms, 0 lost", fanout("evgate memory", 10000)),
    ("fan-out, 10,000 SSE, Kafka with 2 workers: p99 < 300 ms, 0 lost", fanout("evgate kafka, 2 workers", 10000)),
    ("fan-out, 1,000 subscribers of 1 MiB messages: one copy per message", bigMessages),
    ("idle subscriber: ≤ 8 KiB per SSE stream", idleSse),
    ("proxy: ≥ the bare Twisted reverse proxy's req/s at no worse p99",
     againstPeer("proxy", "evgate http-proxy", "twisted.web ReverseProxyResource", 1.0, 1.0)),
]


def summary(documents: Documents) -> Tuple[List[Dict[str, Any]], str]:
    """
    The targets against C{documents} (scenario name to its document).
    """
    rows = []
    for target, check in TARGETS:
        try:
            measured, met = check(documents)
        except (KeyError, TypeError) as e:
            measured, met = f"could not be read: {e!r}", None
        rows.append({"target": target, "measured": measured, "met": met})
    marks = {True: "yes", False: "no", None: "-"}
    text = table("Targets (this run)", ["target", "measured", "met"],
                 [[r["target"], r["measured"], marks[r["met"]]] for r in rows])
    return rows, text
