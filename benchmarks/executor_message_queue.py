"""Cost of broadcasting one step's SchedulerOutput to N worker processes and getting rank 0's reply (CPU).

Compares the two transports considered for the multiproc executor: one pickle sent over a multiprocessing Pipe
per rank (what `multiproc` uses) and a ZeroMQ PUB socket over ipc:// with a PUSH reply from rank 0. The workers only
unpickle the message and (rank 0) reply with a small ModelRunnerOutput, so the numbers are the transport's own.

    python benchmarks/executor_message_queue.py --ranks 1,2,4 --iters 2000 --out bench_out/executor_mq.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import platform
import tempfile
import time

from weavelm.core.outputs import CachedRequestsData, ModelRunnerOutput, SchedulerOutput


def decode_step(num_reqs: int) -> SchedulerOutput:
    ids = [f"req-{i}" for i in range(num_reqs)]
    cached = CachedRequestsData(ids, [False] * num_reqs, [[] for _ in ids], [500 + i for i in range(num_reqs)])
    return SchedulerOutput([], cached, {r: 1 for r in ids}, num_reqs)


def reply(num_reqs: int) -> ModelRunnerOutput:
    ids = [f"req-{i}" for i in range(num_reqs)]
    return ModelRunnerOutput(ids, {r: i for i, r in enumerate(ids)}, [[7] for _ in ids], None)


def time_per_call(once, iters: int) -> float:
    """Seconds per call of `once()` after 50 warm-up calls."""
    for _ in range(50):
        once()
    start = time.perf_counter()
    for _ in range(iters):
        once()
    return (time.perf_counter() - start) / iters


def serve_replies(receive, send, rank: int, num_reqs: int) -> None:
    """A worker's loop: unpickle every broadcast until None; rank 0 answers each with a ModelRunnerOutput."""
    out = pickle.dumps(reply(num_reqs))
    while pickle.loads(receive()) is not None:
        if rank == 0:
            send(out)


def pipe_worker(conn, rank: int, num_reqs: int) -> None:
    serve_replies(conn.recv_bytes, conn.send_bytes, rank, num_reqs)


def zmq_worker(pub_addr: str, push_addr: str, rank: int, num_reqs: int) -> None:
    import zmq

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.connect(pub_addr)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    push = ctx.socket(zmq.PUSH)
    push.connect(push_addr)
    push.send(b"ready")
    serve_replies(sub.recv, push.send, rank, num_reqs)


def bench_pipe(ranks: int, iters: int, num_reqs: int) -> float:
    ctx = mp.get_context("spawn")
    pairs = [ctx.Pipe() for _ in range(ranks)]
    procs = [ctx.Process(target=pipe_worker, args=(child, r, num_reqs), daemon=True)
             for r, (_, child) in enumerate(pairs)]
    for p in procs:
        p.start()
    step = decode_step(num_reqs)
    conns = [parent for parent, _ in pairs]

    def once() -> None:
        data = pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL)
        for c in conns:
            c.send_bytes(data)
        pickle.loads(conns[0].recv_bytes())

    elapsed = time_per_call(once, iters)
    for c in conns:
        c.send_bytes(pickle.dumps(None))
    for p in procs:
        p.join(5)
    return elapsed * 1e6


def bench_zmq(ranks: int, iters: int, num_reqs: int) -> float:
    import zmq

    tmp = tempfile.mkdtemp()
    pub_addr, push_addr = f"ipc://{tmp}/pub", f"ipc://{tmp}/pull"
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind(pub_addr)
    pull = ctx.socket(zmq.PULL)
    pull.bind(push_addr)
    mctx = mp.get_context("spawn")
    procs = [mctx.Process(target=zmq_worker, args=(pub_addr, push_addr, r, num_reqs), daemon=True)
             for r in range(ranks)]
    for p in procs:
        p.start()
    for _ in range(ranks):
        pull.recv()
    time.sleep(0.5)  # PUB/SUB joins late: let every subscription settle
    step = decode_step(num_reqs)

    def once() -> None:
        pub.send(pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL))
        pickle.loads(pull.recv())

    elapsed = time_per_call(once, iters)
    pub.send(pickle.dumps(None))
    for p in procs:
        p.join(5)
    ctx.destroy(0)
    return elapsed * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--num-reqs", type=int, default=256, help="decode requests in the broadcast SchedulerOutput")
    ap.add_argument("--out", default="bench_out/executor_mq.json")
    args = ap.parse_args()
    rows = []
    for ranks in [int(r) for r in args.ranks.split(",")]:
        rows.append({"ranks": ranks, "pipe_us": bench_pipe(ranks, args.iters, args.num_reqs),
                     "zmq_us": bench_zmq(ranks, args.iters, args.num_reqs)})
    size = len(pickle.dumps(decode_step(args.num_reqs), protocol=pickle.HIGHEST_PROTOCOL))
    print(f"broadcast of a {args.num_reqs}-request decode SchedulerOutput ({size} bytes pickled) + rank-0 reply, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print("| ranks | pipe (us/step) | zmq PUB/SUB ipc (us/step) |")
    print("|---:|---:|---:|")
    for r in rows:
        print(f"| {r['ranks']} | {r['pipe_us']:.0f} | {r['zmq_us']:.0f} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"message_bytes": size, "num_reqs": args.num_reqs, "iters": args.iters, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
