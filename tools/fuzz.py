"""The long fuzz run of the device (`make fuzz`).

Draws batches of cases at random from the strategies of tests/device/test_fuzz.py
(serial streams, SMP frames, CBOR bodies, command arguments, mutated MCUboot
images uploaded in chunks, plain or compressed, interleaved sessions), runs each
batch on a fresh simulated device under MicroPython with the board's heap (64wK)
through tests/device/fuzz_harness.py, and checks what test_fuzz checks: no
exception escapes, no hang, well-formed replies, bounded memory, valid requests
still work. With --kind any, one round in five runs on a signed-only device
(provisioned with the vectors' test key, after one verified upload).
Prints the cases per second as it goes; stops at the first failure, shrinks it
(hypothesis) and saves the reproducing case file as .meterota/fuzz/<name>.cases
(+ .txt with the problems, the device's output and the replay command); exits 1.

    .venv/bin/python tools/fuzz.py                       # 100k cases, all CPUs
    .venv/bin/python tools/fuzz.py --cases 1000000 --jobs 2 --seed 7
    .venv/bin/python tools/fuzz.py --minutes 30 --kind uploads
    .venv/bin/python tools/fuzz.py --replay .meterota/fuzz/fuzz-7-0.cases [--signed]

A replayed batch runs in a fresh temporary directory: a failure that depends on
the exact heap layout (fragmentation) may not show again there.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "device"), str(REPO / "tests"), str(REPO / "host")]


def strategy(kind: str):  # type: ignore[no-untyped-def]
    from hypothesis import strategies as st

    import test_fuzz as tf

    kinds = {
        "frames": tf.batches(tf.frame_cases(), 80),
        "serial": tf.batches(tf.serial_cases(), 12),
        "uploads": tf.batches(st.one_of(tf.upload_sessions(), tf.interleaved_uploads(), tf.frame_cases()), 8),
        "mixed": tf.batches(tf.any_case(), 40),
        "signed": tf.batches(st.one_of(tf.upload_sessions(), tf.upload_sessions(), tf.frame_cases()), 8),
    }
    if kind == "any":
        return st.one_of(*[v for k, v in kinds.items() if k != "signed"])
    return kinds[kind]


def worker(job: int, args: argparse.Namespace, stop, records, batches, mem_max, lock, failures) -> None:  # type: ignore[no-untyped-def]
    import warnings

    from hypothesis import HealthCheck, Phase, given, seed, settings

    import test_fuzz as tf

    warnings.simplefilter("ignore")
    root = Path(tempfile.mkdtemp(prefix=f"meterota-fuzz-{job}-"))
    envs = {False: tf.make_env(root / "plain"), True: tf.make_env(root / "signed", pubkey=tf.test_pubkey())}
    rnd = random.Random(args.seed * 1000003 + job)
    last_fail: list[tf.Outcome] = []
    name = f"fuzz-{args.seed}-{job}"
    signed = False

    def body(recs: list) -> None:  # type: ignore[type-arg]
        if stop.is_set() and not last_fail:
            return
        if signed:  # a signed-only device, after its first (verified) upgrade
            recs = tf.warmup_signed() + recs
        res = tf.run_batch(envs[signed], recs, heap=args.heap, save_as=name)
        with lock:
            records.value += res.records
            batches.value += 1
            if res.mem:
                mem_max.value = max(mem_max.value, max(res.mem))
        if res.problems:
            last_fail[:] = [res]
            stop.set()
            raise AssertionError("\n".join(res.problems[:5]))

    phases = [Phase.generate] if args.no_shrink else [Phase.generate, Phase.shrink]
    try:
        while not stop.is_set():
            # One round in five (with --kind any) on a device provisioned with a signing key.
            signed = args.kind == "signed" or (args.kind == "any" and rnd.random() < 0.2)
            strat = strategy("signed" if signed else args.kind)
            test = settings(max_examples=50, deadline=None, database=None, derandomize=False, phases=phases,
                            suppress_health_check=list(HealthCheck), print_blob=False)(given(strat)(body))
            test = seed(rnd.getrandbits(64))(test)
            try:
                test()
            except Exception:  # noqa: the failure is in last_fail, saved by run_batch
                if last_fail:
                    res = last_fail[-1]
                    failures.put((job, str(res.cases_file), res.problems[:10]))
                else:
                    import traceback

                    failures.put((job, "", [traceback.format_exc()]))
                stop.set()
                return
    finally:
        shutil.rmtree(root, ignore_errors=True)


def replay(path: Path, heap: str, signed: bool) -> int:
    import test_fuzz as tf

    root = Path(tempfile.mkdtemp(prefix="meterota-fuzz-replay-"))
    env = tf.make_env(root, pubkey=tf.test_pubkey()) if signed else tf.make_env(root)
    recs = tf.read_cases(path)
    res = tf.run_batch(env, recs, heap=heap, save_as=None)
    shutil.rmtree(root, ignore_errors=True)
    print(res.stdout)
    print(f"{res.records} records in {res.seconds:.2f} s; peak live heap {max(res.mem or [0])} B")
    for p in res.problems:
        print("PROBLEM", p)
    print("micropython:", " ".join(res.cmd))
    return 1 if res.problems else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=100_000, help="stop after this many cases (records)")
    ap.add_argument("--minutes", type=float, default=0, help="stop after this long (0: no limit)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=None, help="base seed (default: random)")
    ap.add_argument("--heap", default=os.environ.get("METEROTA_FUZZ_HEAP", "64wK"))
    ap.add_argument("--kind", default="any", choices=["any", "frames", "serial", "uploads", "mixed", "signed"],
                    help="which cases (any: all of them, a fifth of the rounds on a signed-only device)")
    ap.add_argument("--no-shrink", action="store_true", help="save the failing batch as found")
    ap.add_argument("--replay", type=Path, help="run one saved .cases file and show the device's output")
    ap.add_argument("--signed", action="store_true", help="--replay on a signed-only device")
    args = ap.parse_args()
    if args.replay:
        return replay(args.replay, args.heap, args.signed)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 30)
    ctx = mp.get_context("fork")
    stop = ctx.Event()
    lock = ctx.Lock()
    records = ctx.Value("q", 0)
    batches = ctx.Value("q", 0)
    mem_max = ctx.Value("q", 0)
    failures = ctx.Queue()
    print(f"fuzz: seed {args.seed}, {args.jobs} job(s), heap {args.heap}, kind {args.kind}, "
          f"until {args.cases} cases" + (f" or {args.minutes} min" if args.minutes else ""), flush=True)
    procs = [ctx.Process(target=worker, args=(j, args, stop, records, batches, mem_max, lock, failures))
             for j in range(args.jobs)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    last = 0.0
    try:
        while any(p.is_alive() for p in procs):
            time.sleep(0.5)
            el = time.monotonic() - t0
            if records.value >= args.cases or (args.minutes and el >= args.minutes * 60):
                stop.set()
            if el - last >= 10:
                last = el
                print(f"  {records.value} cases, {batches.value} batches, {el:.0f} s, "
                      f"{records.value / el:.0f} cases/s, peak live heap {mem_max.value} B", flush=True)
    except KeyboardInterrupt:
        stop.set()
    for p in procs:
        p.join()
    el = time.monotonic() - t0
    print(f"fuzz: {records.value} cases in {batches.value} batches, {el:.1f} s, {records.value / el:.0f} cases/s, "
          f"peak live heap {mem_max.value} B (gc.mem_alloc after gc.collect)")
    bad = 0
    while not failures.empty():
        job, path, problems = failures.get()
        bad += 1
        print(f"FAILURE (job {job}): saved {path}")
        for pr in problems:
            print("  ", pr if pr.startswith("Traceback") else pr[:600])
        if path:
            print(f"  replay: .venv/bin/python tools/fuzz.py --replay {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
