"""Soak: a GRPO run with 2 rollout workers while an attacker process beside the learner sends it, at random,
garbage, impostor Hellos, floods, gaps and oversized frames; against the same run without the attacker.

    python benchmarks/bench_soak.py                    # 30 steps, a tiny random Llama, tcp on loopback with keys
    python benchmarks/bench_soak.py --steps 6 --out /tmp/soak.jsonl

The learner and its 2 workers run exactly as `medvl-engine grpo --transport.endpoint tcp://127.0.0.1:P
--transport.workers 2` with the run's CURVE keys (`medvl-engine keys --workers 3`). The attacker holds the key
pair of `rollout-2`, a worker the learner assigned no shard (a leaked key of another worker), and also
connects without keys and with a key of its own: what it sends can reach the learner's admission, never its
training. Gaps and floods come from its sessions as well as from connections that never said Hello.

Prints, per run, the steps done, wall time, the learner's RSS (start, peak, end) and every drop per reason,
then the learner's RSS per step for both runs, and whether the attacked run's rollouts.jsonl equals the
quiet run's; writes one JSON row per run and one per step (`--out`). The learner's RSS is this process's
(it runs `grpo.run` in process); the workers' are not counted.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ATTACKS = ("garbage", "multipart", "impostor_hello", "unknown_hello", "flood", "gap", "keyless", "oversized")


def tiny_model(folder: Path) -> str:
    """bench_rollout's random Llama over a byte-level ChatML tokenizer (hidden 64, 2 layers), saved: answers are
    nonsense, every one decodable."""
    from bench_rollout import tiny_model_and_tokenizer  # this folder is the script's, so on sys.path

    model, tokenizer = tiny_model_and_tokenizer(hidden=64, layers=2)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ------------------------------------------------------------------------------------------------ attacker


def attack(endpoint: str, keys: str, seed: int, hz: float) -> None:
    """Send random bad traffic to `endpoint` until killed (run as its own process: `--attack`)."""
    import zmq
    import zmq.auth

    from medvl_engine.transport.messages import Hello, RolloutError, RolloutGroup, encode

    rng = random.Random(seed)
    context = zmq.Context()
    server_public, _ = zmq.auth.load_certificate(Path(keys) / "server.key")
    leaked = zmq.auth.load_certificate(Path(keys) / "rollout-2.key_secret")
    own = zmq.curve_keypair()

    def socket(pair=leaked):
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 64)
        if pair is not None:
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_public, *pair
        sock.connect(endpoint)
        return sock

    def group(producer: str, seq: int, position: int, text: int = 16) -> bytes:
        return encode(RolloutGroup.build(
            producer=producer, seq=seq, prompt_id=f"evil{position}", dataset_name="evil", dataset_index=0,
            weight_version=0, answer_label="A", prompt_ids=[1, 2], response_ids=[[3]], logprobs=[[-0.1]],
            texts=["x" * text], finish_reasons=["stop"], rewards=[1.0], correct=[True], format_ok=[True],
            letters=["A"], position=position))

    session = socket()  # says Hello as rollout-2 once: refused (no shard), so everything after is before a Hello
    session.send(encode(Hello(producer="rollout-2", pid=os.getpid())))
    sent = 0
    while True:
        kind = rng.choice(ATTACKS)
        try:
            if kind == "garbage":
                session.send(rng.randbytes(rng.randint(1, 4096)), zmq.NOBLOCK)
            elif kind == "multipart":
                session.send_multipart([b"a", rng.randbytes(64)], zmq.NOBLOCK)
            elif kind == "impostor_hello":  # rollout-2's key, rollout-0's name: a live worker's "restart"
                sock = socket()
                sock.send(encode(Hello(producer="rollout-0", pid=1)))
                sock.send(group("rollout-0", 0, 0))
                time.sleep(0.05)
                sock.close()
            elif kind == "unknown_hello":
                sock = socket()
                sock.send(encode(Hello(producer="rollout-2", pid=2)))
                sock.send(encode(RolloutError(producer="rollout-2", seq=0, prompt_id="q", reason="x", position=2)))
                time.sleep(0.05)
                sock.close()
            elif kind == "flood":  # 64 KB groups for far positions, as fast as the socket takes them
                for seq in range(32):
                    session.send(group("rollout-2", seq, 10**6 + seq, text=64 << 10), zmq.NOBLOCK)
            elif kind == "gap":
                session.send(group("rollout-2", 7, 23), zmq.NOBLOCK)
            elif kind == "keyless":  # no key at all, or a key of its own: the CURVE handshake fails
                sock = socket(None if rng.random() < 0.5 else own)
                sock.send(encode(Hello(producer="rollout-1", pid=3)))
                time.sleep(0.05)
                sock.close()
            elif kind == "oversized" and rng.random() < 0.05:  # past the learner's frame cap: libzmq cuts it
                sock = socket()
                sock.send(bytes(80 << 20))
                time.sleep(0.2)
                sock.close()
        except zmq.Again:
            pass  # the learner is not reading that connection: what it does not read costs it nothing
        sent += 1
        time.sleep(rng.expovariate(hz))


# ------------------------------------------------------------------------------------------------ runs


def config(model: str, run_dir: Path, endpoint: str, keys: Path, steps: int):
    from medvl_engine import config as config_lib
    from medvl_engine.trainers.config import GRPOConfig

    return config_lib.build(GRPOConfig, {
        "model": {"path": model, "dtype": "fp32", "gradient_checkpointing": False},
        "optim": {"lr": 1e-2},
        "data": {"source": "bundled", "text_only": True, "shuffle": False},
        "rollout": {"n": 3, "max_response_tokens": 8, "seed": 11, "max_staleness": 0, "max_batch": 16},
        "transport": {"endpoint": endpoint, "workers": 2, "keys": str(keys)},
        "algo": {"prompts_per_step": 4, "mini_batches": 1, "kl_coef": 0.0},
        "deepspeed": {"micro_batch_size": 3},
        "output": str(run_dir),
        "checkpoint": {"every": 0, "final": False, "export": False},
        "logging": {"log_every": 10**6},
        "steps": steps, "seed": 1,
    })


def run(model: str, run_dir: Path, keys: Path, steps: int, *, attacker: dict | None) -> dict:
    from medvl_engine.trainers import grpo
    from medvl_engine.trainers.distributed import free_port
    from medvl_engine.trainers.placement import build_transport_feed

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cfg = config(model, run_dir, endpoint, keys, steps)
    feed = build_transport_feed(cfg, None)
    proc = None
    if attacker is not None:
        proc = subprocess.Popen([sys.executable, __file__, "--attack", endpoint, "--keys", str(keys),
                                 "--seed", str(attacker["seed"]), "--hz", str(attacker["hz"])])
    samples = [(0, time.perf_counter(), rss_mib())]
    started = time.perf_counter()
    try:
        history = grpo.run(cfg, feed=feed, on_step=lambda trainer, row: samples.append(
            (row["step"], time.perf_counter(), rss_mib())))
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
    seconds = time.perf_counter() - started
    dropped = dict(feed.receiver.stats.dropped)
    return {"run": "attacked" if attacker else "quiet", "steps": len(history), "seconds": seconds,
            "rss_start_mib": samples[1][2] if len(samples) > 1 else samples[0][2],
            "rss_peak_mib": max(s[2] for s in samples[1:] or samples), "rss_end_mib": samples[-1][2],
            "restarts": sum(w.restarts for w in feed.workers), "dropped": dropped,
            "dropped_total": sum(dropped.values()), "per_step": samples[1:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--hz", type=float, default=50.0, help="attacker actions per second (mean)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/soak.jsonl")
    parser.add_argument("--attack", default="", help=argparse.SUPPRESS)  # the attacker process's endpoint
    parser.add_argument("--keys", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.attack:
        attack(args.attack, args.keys, args.seed, args.hz)
        return 0
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 workers, the learner and the attacker share the cores

    from medvl_engine.benchmarking import format_table, write_rows
    from medvl_engine.trainers.metrics import read_rollouts
    from medvl_engine.transport.keys import create_keys

    scratch = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    model = tiny_model(scratch / "model")
    create_keys(scratch / "keys", workers=3)
    quiet = run(model, scratch / "quiet", scratch / "keys", args.steps, attacker=None)
    attacked = run(model, scratch / "attacked", scratch / "keys", args.steps,
                   attacker={"seed": args.seed, "hz": args.hz})
    same = read_rollouts(scratch / "quiet" / "rollouts.jsonl") == read_rollouts(scratch / "attacked" / "rollouts.jsonl")
    reasons = sorted(set(quiet["dropped"]) | set(attacked["dropped"]))
    rows = []
    for result in (quiet, attacked):
        row = {k: v for k, v in result.items() if k not in ("dropped", "per_step")}
        row.update({f"drop_{reason}": result["dropped"].get(reason, 0) for reason in reasons})
        row["rss_peak_vs_quiet"] = result["rss_peak_mib"] / quiet["rss_peak_mib"]
        row["rollouts_equal_quiet"] = same
        rows.append(row)
    print(format_table(rows, ["run", "steps", "seconds", "rss_start_mib", "rss_peak_mib", "rss_end_mib",
                              "rss_peak_vs_quiet", "restarts", "dropped_total", "rollouts_equal_quiet"]))
    print()
    print(format_table(rows, ["run", *(f"drop_{reason}" for reason in reasons)]) if reasons else "no drops")
    print()
    q0, a0 = quiet["per_step"][0][1], attacked["per_step"][0][1]
    steps = [{"step": q[0], "quiet_rss_mib": q[2], "attacked_rss_mib": a[2], "quiet_elapsed_s": q[1] - q0,
              "attacked_elapsed_s": a[1] - a0} for q, a in zip(quiet["per_step"], attacked["per_step"])]
    print(format_table(steps, ["step", "quiet_rss_mib", "attacked_rss_mib", "quiet_elapsed_s", "attacked_elapsed_s"]))
    write_rows(args.out, rows + [{"run": "per_step", **s} for s in steps])
    return 0 if same and attacked["steps"] == args.steps else 1


if __name__ == "__main__":
    sys.exit(main())
