#!/usr/bin/env python
"""A simulation of a server's queue in front of 8 and 64 GPU workers: what model affinity buys as a cluster grows.

Prompts arrive at random (Poisson) and ask for one of ``--models`` checkpoints, the popular ones far more often
(Zipf, exponent 1.1: a studio's few house models and a long tail). A worker's GPU holds ``--per-worker`` models at
once (least recently used goes first); a prompt on a worker holding its model takes ``--run`` seconds, otherwise
``--load`` more to load it. The queue starts a waiting prompt whenever a worker is free (as
``nodegraph.prompt_queue`` does with a Dask cluster's GPU workers), by one of three policies:

- **none**: the first waiting prompt on any free worker (what a plain task queue does);
- **free worker**: the first waiting prompt on a free worker holding its model, else any free worker;
- **lookahead** (nodegraph's dispatch): as *free worker*, and a worker that frees up while prompts wait takes the
  first of the next ``--window`` waiting prompts whose model it holds; a prompt passed over ``--patience``
  times goes next (``PromptQueue.WINDOW``, ``PromptQueue.PATIENCE``, ``DaskRunner.choose``).

Printed per cluster size and load (the arrival rate as a share of what the workers could run with every model
loaded): the cache hit rate, the share of worker time spent loading, the queueing delay (mean and p95) and the
throughput; and at saturation (a backlog that never empties) the prompts per second. A load the policy cannot keep
up with shows a queueing delay that grows with the run (marked "grows"). Seeded: the same table each time.

    python benchmarks/cluster_model.py
    python benchmarks/cluster_model.py --workers 8 64 --models 20 --per-worker 3 --run 1.0 --load 6.0
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
import sys
from collections import OrderedDict, deque


POLICIES = ("none", "free worker", "lookahead")


def simulate(workers: int, load_share: float | None, policy: str, *, models: int, per_worker: int, run: float,
             load: float, prompts: int, seed: int, window: int = 8, patience: int = 4) -> dict:
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** 1.1 for k in range(models)]
    asked = rng.choices(range(models), weights, k=prompts)
    if load_share is None:  # saturation: everything is queued at the start
        arrivals = [0.0] * prompts
    else:
        rate = load_share * workers / run
        t, arrivals = 0.0, []
        for _ in range(prompts):
            t += rng.expovariate(rate)
            arrivals.append(t)
    caches = [OrderedDict() for _ in range(workers)]  # worker -> its models, least recently used first
    free = set(range(workers))
    waiting: deque[int] = deque()
    passed = [0] * prompts
    finishing: list[tuple[float, int]] = []  # (time, worker)
    waits, hits, loading = [], 0, 0.0
    now, i = 0.0, 0

    def start(p: int, w: int) -> None:
        nonlocal hits, loading
        free.discard(w)
        model = asked[p]
        cost = run
        if model in caches[w]:
            hits += 1
            caches[w].move_to_end(model)
        else:
            cost += load
            loading += load
            caches[w][model] = True
            if len(caches[w]) > per_worker:
                caches[w].popitem(last=False)
        waits.append(now - arrivals[p])
        heapq.heappush(finishing, (now + cost, w))

    def dispatch() -> None:
        while waiting and free:
            p = waiting[0]
            if policy == "lookahead" and passed[p] < patience and len(waiting) > 1:
                # the queue offers its first prompts; the first whose model a free worker last ran starts there
                for q in list(waiting)[:window]:
                    warm = [w for w in free if asked[q] in caches[w]]
                    if warm:
                        for earlier in waiting:
                            if earlier == q:
                                break
                            passed[earlier] += 1
                        waiting.remove(q)
                        start(q, min(warm))
                        break
                else:
                    waiting.popleft()
                    start(p, rng.choice(sorted(free)))
                continue
            waiting.popleft()
            warm = [w for w in free if asked[p] in caches[w]] if policy != "none" else []
            start(p, min(warm) if warm else rng.choice(sorted(free)))

    while i < prompts or finishing:
        next_arrival = arrivals[i] if i < prompts else float("inf")
        if finishing and finishing[0][0] <= next_arrival:
            now, w = heapq.heappop(finishing)
            free.add(w)
        else:
            now = next_arrival
            waiting.append(i)
            i += 1
        dispatch()
    half = len(waits) // 2
    grows = statistics.fmean(waits[half:]) > 2 * statistics.fmean(waits[:half]) + run
    ordered = sorted(waits)
    return {"hit": hits / prompts, "loading": loading / (workers * now), "wait": statistics.fmean(waits),
            "p95": ordered[int(0.95 * (len(ordered) - 1))], "rate": prompts / now, "grows": grows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--loads", type=float, nargs="+", default=[0.1, 0.25])
    parser.add_argument("--models", type=int, default=20, help="checkpoints prompts ask for (default 20)")
    parser.add_argument("--per-worker", type=int, default=3, help="models a worker's GPU holds (default 3)")
    parser.add_argument("--run", type=float, default=1.0, help="seconds a prompt runs, model loaded (default 1)")
    parser.add_argument("--load", type=float, default=6.0, help="seconds to load a model (default 6)")
    parser.add_argument("--prompts", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=8, help="waiting prompts a freed worker may choose from")
    parser.add_argument("--patience", type=int, default=4, help="times a prompt may be passed over")
    args = parser.parse_args(argv)
    common = dict(models=args.models, per_worker=args.per_worker, run=args.run, load=args.load,
                  prompts=args.prompts, seed=args.seed, window=args.window, patience=args.patience)
    print(f"{args.prompts} prompts over {args.models} models (Zipf 1.1), {args.per_worker} models per worker, "
          f"{args.run:g} s a prompt, {args.load:g} s a load\n")
    print("| workers | load | dispatch | cache hits | worker time loading | wait mean / p95 | prompts/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for workers in args.workers:
        for share in [*args.loads, None]:
            for policy in POLICIES:
                r = simulate(workers, share, policy, **common)
                shown = "saturated" if share is None else f"{share:.0%}"
                wait = "-" if share is None else f"{r['wait']:.1f} / {r['p95']:.1f} s" + (
                    " (grows)" if r["grows"] else "")
                print(f"| {workers} | {shown} | {policy} | {r['hit']:.0%} | {r['loading']:.0%} | {wait} "
                      f"| {r['rate']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
