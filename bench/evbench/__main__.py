"""
python -m evbench SCENARIO [options]: run one scenario (or C{all}).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from typing import List, Optional

from evbench import targets
from evbench.common import RESULTS, Settings, say, writeResults

SCENARIOS = {
    "publish": "evbench.publish",
    "batch": "evbench.batch",
    "fanout": "evbench.fanout",
    "poll": "evbench.poll",
    "idle": "evbench.idle",
    "webhook": "evbench.webhook",
    "proxy": "evbench.proxy",
    "schemas": "evbench.schemas",
}
# Run by name only, never by "all": it takes as many minutes as it is told
# and starts a broker of its own.
SEPARATE = {
    "soak": "evbench.soak",
}


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run",
        description="evgate's side-by-side benchmarks. Scenarios: " + ", ".join(SCENARIOS) + ", all.")
    parser.add_argument("scenario", choices=[*SCENARIOS, *SEPARATE, "all"])
    parser.add_argument("--quick", action="store_true", help="short measurements and fewer sizes (a smoke run)")
    parser.add_argument("--duration", type=float, help="seconds per measurement (default 15, quick 5)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up before a wrk measurement (default 3)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    parser.add_argument("--rounds", type=int, help="publish: measure every contender this many times, "
                                                   "interleaved, and report the median (default 3, quick 1)")
    parser.add_argument("--sizes", help="fan-out: subscriber counts, comma separated (default 1000,5000,10000)")
    parser.add_argument("--ws-sizes", help="fan-out: WebSocket subscriber counts (default 5000)")
    parser.add_argument("--idle", type=int, help="idle: streams to open (default 5000)")
    parser.add_argument("--only", help="run only contenders whose name contains one of these words (comma separated)")
    parser.add_argument("--skip", help="skip contenders whose name contains one of these words (comma separated)")
    parser.add_argument("--profile", action="store_true", help="py-spy evgate during its measurements")
    parser.add_argument("--minutes", type=float, help="soak: minutes of load (default 10; 2 for a smoke run)")
    parser.add_argument("--rate", type=float, help="soak: messages published per second (default 100)")
    return parser.parse_args(argv)


def settingsFrom(args: argparse.Namespace) -> Settings:
    quick = bool(args.quick)
    settings = Settings(
        quick=quick,
        duration=args.duration if args.duration else (5.0 if quick else 15.0),
        warmup=args.warmup if args.warmup is not None else (2.0 if quick else 3.0),
        connections=args.connections,
        rounds=args.rounds if args.rounds else (1 if quick else 3),
        profile=bool(args.profile),
        only=tuple(w for w in (args.only or "").split(",") if w),
        skip=tuple(w for w in (args.skip or "").split(",") if w),
    )
    if args.sizes:
        settings.extra["sizes"] = [int(s) for s in args.sizes.split(",")]
    if args.ws_sizes:
        settings.extra["ws_sizes"] = [int(s) for s in args.ws_sizes.split(",")]
    if args.idle:
        settings.extra["idle"] = args.idle
    if args.minutes:
        settings.extra["minutes"] = args.minutes
    if args.rate:
        settings.extra["rate"] = args.rate
    return settings


def main(argv: Optional[List[str]] = None) -> int:
    args = parse(argv)
    settings = settingsFrom(args)
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    began = time.monotonic()
    texts = []
    documents = {}
    status = 0
    for name in names:
        module = importlib.import_module({**SCENARIOS, **SEPARATE}[name])
        say(f"== scenario {name}")
        try:
            document, text = module.run(settings)
        except Exception as e:
            say(f"scenario {name} failed: {e}")
            text = f"### {name}\n\nfailed: {e}\n"
            document = {"error": str(e)}
            status = 1
        if document.get("failed"):
            # A scenario that ran but found a fault (the soak: a lost
            # acknowledged message) fails the command too.
            status = 1
        print(text, flush=True)
        path = writeResults(name, document, text)
        say(f"wrote {path}")
        texts.append(text)
        documents[name] = document
    if len(names) > 1:
        minutes = (time.monotonic() - began) / 60
        met, metText = targets.summary(documents)
        print(metText, flush=True)
        summary = metText + "\n" + "\n".join(texts) + f"\n(all scenarios in {minutes:.1f} min)\n"
        writeResults("all", {"scenarios": names, "minutes": minutes, "targets": met}, summary)
        say(f"all scenarios in {minutes:.1f} min; tables in {RESULTS}/*-latest.md")
    return status


if __name__ == "__main__":
    sys.exit(main())
