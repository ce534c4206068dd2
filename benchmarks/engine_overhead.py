"""Engine overhead per node: validation, planning, cache keys, events and bookkeeping around trivial nodes.

    python benchmarks/engine_overhead.py [--sizes 100,1000,4000] [--repeat 5]

Prints a table for a chain (each node reads the previous one) and a fan-out (one source feeding N output nodes),
cold (empty cache) and fully cached (an identical re-run), as the median of --repeat runs. Nothing here touches
torch: it measures the engine alone.
"""

from __future__ import annotations

import argparse
import statistics
import time

import nodegraph as ng


class Source(ng.Node):
    """A constant."""
    value = ng.Int(default=1)
    outputs = (ng.Output("value", "INT"),)

    def run(self, ctx, value):
        return value


class Inc(ng.Node):
    """x + 1."""
    x = ng.Socket("INT")
    outputs = (ng.Output("value", "INT"),)

    def run(self, ctx, x):
        return x + 1


class Sink(ng.Node):
    """An output node."""
    output_node = True
    x = ng.Socket("INT")
    tag = ng.Int(default=0)  # gives fan-out sinks distinct keys, as real outputs would have

    def run(self, ctx, x, tag):
        return None


REGISTRY = ng.Registry([Source, Inc, Sink])


def chain(n: int) -> ng.Workflow:
    wf = ng.Workflow()
    wf.add(0, "Source", value=1)
    for i in range(1, n - 1):
        wf.add(i, "Inc", x=ng.Link(str(i - 1), "value"))
    wf.add(n - 1, "Sink", x=ng.Link(str(n - 2), "value"))
    return wf


def fan_out(n: int) -> ng.Workflow:
    wf = ng.Workflow()
    wf.add(0, "Source", value=1)
    for i in range(1, n):
        wf.add(i, "Sink", x=ng.Link("0", "value"), tag=i)
    return wf


def measure(make, n: int, repeat: int) -> tuple[float, float]:
    cold, cached = [], []
    for _ in range(repeat):
        executor = ng.Executor(REGISTRY)
        wf = make(n)
        t0 = time.perf_counter()
        result = executor.run(wf)
        t1 = time.perf_counter()
        again = executor.run(wf)
        t2 = time.perf_counter()
        assert result.count("ran") == n and again.count("cached") == n
        cold.append(t1 - t0)
        cached.append(t2 - t1)
    return statistics.median(cold), statistics.median(cached)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,4000")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"{'graph':10s} {'nodes':>6s} {'cold ms':>9s} {'us/node':>8s} {'cached ms':>10s} {'us/node':>8s}")
    for name, make in (("chain", chain), ("fan-out", fan_out)):
        for n in (int(s) for s in args.sizes.split(",")):
            cold, cached = measure(make, n, args.repeat)
            print(f"{name:10s} {n:6d} {cold * 1e3:9.2f} {cold / n * 1e6:8.1f} {cached * 1e3:10.2f} "
                  f"{cached / n * 1e6:8.1f}")


if __name__ == "__main__":
    main()
