"""Load test: ApplyEdit throughput and latency for 1, 4 and 16 concurrent clients (loopback only).

Bounded in requests and in time: each client sends at most `requests` edits and stops once
`max_seconds` have passed. Edits accumulate (a client that re-edits a fact supersedes the older
edit). The server has one writer, but single edits that queue behind it are applied together as one
update (coalesced), so edits/s grows with the number of clients.

    python -m server.load_test --address 127.0.0.1:50051 --clients 1 4 16 [--replica 127.0.0.1:50052]
    mend loadtest            # starts its own server on a scratch journal, also times forward+backward

With a replica of the server (`--replica`, `loadtest.replica`), a sampler asks both for their
revision every 5 ms during the load: how many revisions the replica is behind, and how many ms
after the leader first showed a revision the replica first showed it.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from mend.records import EditRecord
from mend.resources import WORLD
from server.client import EditClient


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class LagSampler:
    """Polls the leader's revision (`leader_revision()`) and a replica's (GetModelInfo) every `interval` s."""

    def __init__(self, leader_revision, replica: str, token: str = "", interval: float = 0.005):
        self.leader_revision, self.client = leader_revision, EditClient(replica, token=token, timeout=10)
        self.interval, self.samples = interval, []  # (time read, leader revision, time answered, replica revision)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            began, leader = time.perf_counter(), self.leader_revision()
            replica = self.client.info().model_revision  # as of about the middle of the call
            self.samples.append((began, leader, (began + time.perf_counter()) / 2, replica))
            self._stop.wait(self.interval)

    def __enter__(self) -> "LagSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        end = time.monotonic() + 30  # let the replica finish: the last revisions' lag counts too
        while self.samples and self.samples[-1][3] < self.samples[-1][1] and time.monotonic() < end:
            time.sleep(self.interval)
        self._stop.set()
        self._thread.join()
        self.client.close()

    def summary(self) -> dict:
        """Revisions behind (over samples) and ms behind (over revisions: when the replica was first
        seen at or past a revision, minus when the leader was)."""
        behind = [max(0, lead - rep) for _, lead, _, rep in self.samples]
        ms = []
        if self.samples:
            for revision in range(self.samples[0][1] + 1, self.samples[-1][1] + 1):
                lead = next(t for t, r, _, _ in self.samples if r >= revision)
                rep = next((t for _, _, t, r in self.samples if r >= revision), None)
                if rep is not None:
                    ms.append(1000 * max(0.0, rep - lead))
        return {"behind_p50": statistics.median(behind) if behind else 0, "behind_max": max(behind, default=0),
                "lag_p50_ms": statistics.median(ms) if ms else 0.0, "lag_p99_ms": _percentile(ms, 0.99) if ms else 0.0}


def run_load(address: str, records: list[EditRecord], clients: int, requests: int, max_seconds: float, token: str = "",
             replica: str = "", leader_revision=None) -> dict:
    """`replica`: also sample how far that replica is behind; the leader's revision comes from
    `leader_revision()`, by default from GetModelInfo (which then takes one of the leader's call slots)."""
    for a in filter(None, (address, replica)):
        if not a.startswith(("127.", "localhost", "[::1]")):
            raise ValueError(f"the load test only runs against loopback addresses, not {a}")
    if replica:
        leader = None if leader_revision else EditClient(address, token=token, timeout=10)
        try:
            with LagSampler(leader_revision or (lambda: leader.info().model_revision), replica, token) as sampler:
                row = run_load(address, records, clients, requests, max_seconds, token)
        finally:
            if leader is not None:
                leader.close()
        return {**row, **sampler.summary()}
    end = time.monotonic() + max_seconds

    def one_client(c: int) -> tuple[list[float], int]:
        latencies, refused = [], 0
        with EditClient(address, token=token) as client:
            for i in range(requests):
                if time.monotonic() > end:
                    break
                r = records[(c * requests + i) % len(records)]
                start = time.perf_counter()
                try:
                    client.apply(EditRecord(prompt=r.prompt, target_new=r.target_new))
                except grpc.RpcError as e:  # refused as unstable while many edits were in place at once
                    if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                        raise
                    refused += 1
                    continue
                finally:
                    latencies.append(time.perf_counter() - start)
        return latencies, refused

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        per_client = list(pool.map(one_client, range(clients)))
    wall = time.perf_counter() - start
    latencies = [x for lat, _ in per_client for x in lat]
    refused = sum(n for _, n in per_client)
    return {"clients": clients, "edits": len(latencies) - refused, "refused": refused, "seconds": wall,
            "edits_per_s": (len(latencies) - refused) / wall,
            "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * _percentile(latencies, 0.99)}


def resident_mb() -> float:
    """This process's resident memory in MiB (Linux /proc; elsewhere its peak, from getrusage)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _bytes_under(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def memory_profile(address: str, records: list[EditRecord], journal: Path, counts=(100, 1000), chunk: int = 100,
                   token: str = "") -> list[dict]:
    """Resident memory of this process, which holds the server, with 0 and then `counts` active edits
    (distinct facts, applied with ApplyEdits of `chunk`), and what each edit adds to the journal on disk."""
    if len(records) < max(counts):
        raise ValueError(f"{max(counts)} active edits need as many distinct records, got {len(records)}")
    gc.collect()
    rows, applied, start_bytes = [{"active": 0, "rss_mb": resident_mb()}], 0, _bytes_under(journal)
    with EditClient(address, token=token) as client:
        for n in counts:
            for i in range(applied, n, chunk):
                client.apply_batch([EditRecord(prompt=r.prompt, target_new=r.target_new) for r in records[i : min(i + chunk, n)]])
            applied = n
            gc.collect()
            rows.append({"active": n, "rss_mb": resident_mb(), "journal_kb_per_edit": (_bytes_under(journal) - start_bytes) / n / 1024})
    return rows


def format_rows(rows: list[dict]) -> str:
    lag = "behind_max" in rows[0]
    lines = ["| clients | edits | refused | edits/s | ApplyEdit p50 ms | ApplyEdit p99 ms |"
             + (" replica behind p50 / max (revisions) | replica lag p50 / p99 ms |" if lag else ""),
             "|---|---|---|---|---|---|" + ("---|---|" if lag else "")]
    lines += [f"| {r['clients']} | {r['edits']} | {r['refused']} | {r['edits_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |"
              + (f" {r['behind_p50']:g} / {r['behind_max']} | {r['lag_p50_ms']:.0f} / {r['lag_p99_ms']:.0f} |" if lag else "") for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from mend.data.world import World

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=20, help="edits per client at most")
    parser.add_argument("--max-seconds", type=float, default=60)
    parser.add_argument("--world", default=str(WORLD), help="where the edit prompts come from")
    parser.add_argument("--token", default="", help="write token, when the server has one")
    parser.add_argument("--replica", default="", help="a replica of the server: measure how far behind it follows")
    args = parser.parse_args(argv)
    records = World.load(args.world).edit_split("test").records
    rows = [run_load(args.address, records, n, args.requests, args.max_seconds, args.token, args.replica) for n in args.clients]
    print(format_rows(rows))


if __name__ == "__main__":
    main()
