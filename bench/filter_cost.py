"""
What a filter costs per message, in microseconds per evaluation.

    .venv/bin/python bench/filter_cost.py [iterations]

Prints, for a few typical expressions:

 - eval: one cel-python evaluation (the interpreter evgate uses) over a
   message whose values are already built;
 - first: what the first subscriber of a message pays through
   evgate.filters (building the message's values, parsing JSON content,
   evaluating);
 - shared: what every further subscriber with the same filter pays (the
   verdict is cached on the event);
 - compiled: the same evaluation with cel-python's CompiledRunner, which
   evgate does not use (it exec()s Python generated from the expression),
   for comparison.

See docs/filters.md for the numbers and the choice they support.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

import celpy
from celpy.celparser import CELParser

from evgate.filters import SubscriptionFilter, compileFilter, messageValue
from evgate.hub import Event
from evgate.message import Cursor, Message

EXPRESSIONS = [
    "true",
    'key == "eu"',
    'headers.tenant == claims.tenant',
    "content.amount > 100",
    'key == "eu" && content.amount > 100',
    'content.customer.country in ["FR", "DE"] && content.amount >= 10 && has(headers.tenant)',
]

CONTENT = (b'{"amount": 150, "currency": "EUR", "customer": {"id": 42, "country": "FR"}, '
           b'"lines": [{"sku": "A", "qty": 1}, {"sku": "B", "qty": 2}]}')


def newEvent(offset: int) -> Event:
    message = Message(content=CONTENT, key="eu", headers=(("tenant", "a"), ("kind", "order")),
                      topic="orders", partition=0, offset=offset, timestamp=1700000000000)
    return Event(message, Cursor.fromMapping({0: offset + 1}))


def perCall(f: Callable[[int], Any], n: int, rounds: int = 5) -> float:
    """
    Microseconds per call of C{f}: the best of C{rounds} rounds, because
    other processes on the machine only ever add time.
    """
    f(0)
    best = float("inf")
    per = max(1, n // rounds)
    for r in range(rounds):
        start = time.perf_counter()
        for i in range(r * per, (r + 1) * per):
            f(i)
        best = min(best, (time.perf_counter() - start) / per)
    return best * 1e6


def main(n: int) -> None:
    claims = {"tenant": "a"}
    compiledEnv = None
    rows = []
    for text in EXPRESSIONS:
        program = compileFilter(text)
        sample = newEvent(0)
        context = {name: messageValue(sample, name) for name in ("key", "headers", "metadata", "content")}
        context["claims"] = celpy.json_to_cel(claims)
        evaluate = perCall(lambda i: program.evaluate(context), n)

        events = [newEvent(i) for i in range(n + 1)]

        def first(i: int) -> Any:
            return SubscriptionFilter(None, program, claims)(events[i])

        firstCost = perCall(first, n)
        shared = SubscriptionFilter(None, program, claims)
        warm = newEvent(0)
        shared(warm)
        sharedCost = perCall(lambda i: shared(warm), n)
        rows.append((text, evaluate, firstCost, sharedCost, context))

    # cel-python builds one parser per process; the compiled runner needs
    # its own tree class, hence a fresh parser.
    CELParser.CEL_PARSER = None
    compiledEnv = celpy.Environment(runner_class=celpy.CompiledRunner)
    print(f"{'expression':<60} {'eval':>8} {'first':>8} {'shared':>8} {'compiled':>9}  (µs)")
    for text, evaluate, firstCost, sharedCost, context in rows:
        runner = compiledEnv.program(compiledEnv.compile(text))
        compiled = perCall(lambda i: runner.evaluate(context), n)
        print(f"{text[:60]:<60} {evaluate:8.1f} {firstCost:8.1f} {sharedCost:8.2f} {compiled:9.1f}")
    parse = perCall(lambda i: messageValue(newEvent(i), "content"), n)
    print(f"\nJSON content parsed and converted once per message: {parse:.1f} µs "
          f"({len(CONTENT)} bytes)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
