"""tierfl against Flower and pfl-research on one identical workload, measured in one run.

Why in one run: absolute throughput on a shared 2-core box drifts by tens of
percent; ratios taken minutes apart on the same machine do not.

Workload (identical in all three): scikit-learn digits, X/16, 20 % stratified
test split (random_state 0), Dirichlet(0.5) label split over N clients
(``devices.partition.dirichlet_partition``, seed 0) computed once here and
handed to the peers as an .npz; MLP 64-64-10 (``torch.manual_seed(0)``);
1 local epoch, batch 16, SGD lr 0.05, mean CE; FedAvg weighted by samples;
all clients every round.

Each peer is installed by this script into its own venv under
``bench/.venvs/<name>`` on first use (Flower pins its own Ray) and reused
after. Measured per framework and N:

- end-to-end seconds: process start to final accuracy (tierfl: to process
  exit, which also includes its shut-down, so its number is an upper bound);
- steady-state client updates/s: N*(R-1) / wall time of rounds 2..R;
- peak memory: sum of RSS over the whole process tree (Ray workers included),
  sampled every ~50 ms;
- final accuracy on the global test split.

Each framework gets its best configuration on this machine: Flower runs
``run_simulation`` with one Ray actor per core (client resources num_cpus=1);
pfl is tried with 1 and 2 worker processes and tierfl with its ``ray`` and
``local`` backends, and the variant with the best steady state is the one
compared (every variant's numbers are printed and kept in the JSON). With
``--repeat K`` each variant runs K times and the best run counts, which
evens out interference from other work on a shared machine.

usage: .venv/bin/python bench/bench_vs_peers.py [--clients 100,1000] [--rounds 5]
       [--only tierfl,flower,pfl] [--repeat 1] [--json results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PEERS_DIR = BENCH / "peers"
VENVS = BENCH / ".venvs"
TORCH_PIN = "torch==2.13.0"  # the local CPU wheel; never let a resolver pick a CUDA build
PEER_REQUIREMENTS = {
    "flower": ["flwr[simulation]==1.42.*"],
    "pfl": ["pfl[pytorch]==0.6.*"],
}
FRAMEWORKS = ("tierfl", "flower", "pfl")
TARGET_N = 1000
RUN_TIMEOUT_S = 900.0  # per measured process; Flower at N=1,000 needs about a minute
# What tierfl is expected to reach against each peer at N = TARGET_N.
TARGETS = {
    "steady_vs_flower": 100.0,  # tierfl steady-state >= 100x Flower's
    "steady_vs_pfl": 4.0,  # tierfl steady-state >= 4x pfl's
    "e2e_vs_flower": 5.0,  # tierfl end-to-end >= 5x faster than Flower
    "e2e_vs_pfl": 0.5,  # tierfl end-to-end within 2x of pfl
    "acc_points": 1.0,  # final accuracy within 1 point of each peer
}


@dataclass(frozen=True)
class WorkloadSpec:
    """The one workload all three frameworks run (tierfl gets it as CLI flags)."""

    dataset: str = "digits"
    alpha: float = 0.5
    seed: int = 0
    epochs: int = 1
    batch_size: int = 16
    lr: float = 0.05
    model: str = "mlp"


WORKLOAD = WorkloadSpec()


def _psutil() -> Any:
    """psutil, or the copy Ray vendors (the project venv has Ray but not psutil itself)."""
    try:
        import psutil
    except ImportError:
        spec = importlib.util.find_spec("ray")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(
                "bench: needs psutil (or Ray's vendored copy) to sample memory"
            ) from None
        sys.path.append(str(Path(next(iter(spec.submodule_search_locations))) / "thirdparty_files"))
        import psutil
    return psutil


# ---------------------------------------------------------------------------
# Peer venvs
# ---------------------------------------------------------------------------


def ensure_venv(name: str) -> Path:
    """Create bench/.venvs/<name> with the peer installed, once; return its python."""
    venv = VENVS / name
    python = venv / "bin" / "python"
    marker = venv / ".bench-ready"
    reqs = PEER_REQUIREMENTS[name]
    wanted = json.dumps({"requirements": reqs, "torch": TORCH_PIN})
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    log = VENVS / f"{name}.install.log"
    VENVS.mkdir(parents=True, exist_ok=True)
    print(
        f"[setup] installing {' '.join(reqs)} into {venv.relative_to(ROOT)} "
        f"(one time; log: {log.relative_to(ROOT)})",
        flush=True,
    )
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        # torch first, alone, so pip takes the local CPU wheel; pinned again below.
        [str(python), "-m", "pip", "install", TORCH_PIN],
        [str(python), "-m", "pip", "install", *reqs, TORCH_PIN],
        [str(python), "-c", "import torch, sys; sys.exit(torch.version.cuda is not None)"],
    ]
    with log.open("w") as fh:
        for cmd in steps:
            if cmd[1:3] == ["-m", "venv"] and python.exists():
                continue
            fh.write(f"$ {' '.join(cmd)}\n")
            fh.flush()
            rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT)
            if rc != 0:
                raise SystemExit(
                    f"bench: installing {name} failed (exit {rc}) at `{' '.join(cmd)}`; see {log}"
                )
    marker.write_text(wanted)
    return python


# ---------------------------------------------------------------------------
# Workload
# ---------------------------------------------------------------------------


def write_workload(n: int, path: Path) -> dict[str, Any]:
    """The partition every framework trains on, computed once, plus a check against tierfl's."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    sys.path.insert(0, str(ROOT))
    from devices.partition import dirichlet_partition

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    parts = dirichlet_partition(y_tr, n, WORKLOAD.alpha, seed=WORKLOAD.seed)
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    np.savez(
        path,
        x_train=x_tr,
        y_train=y_tr,
        x_test=x_te,
        y_test=y_te,
        client_idx=np.concatenate(parts),
        client_offsets=offsets,
        lr=WORKLOAD.lr,
        batch_size=WORKLOAD.batch_size,
        epochs=WORKLOAD.epochs,
    )
    return {
        "clients": n,
        "train": len(y_tr),
        "test": len(y_te),
        "client_size_min": int(sizes.min()),
        "client_size_max": int(sizes.max()),
        "tierfl_partition_match": _matches_tierfl(n, x_tr, y_tr, x_te, y_te, parts),
    }


def _matches_tierfl(
    n: int,
    x_tr: np.ndarray,
    y_tr: np.ndarray,
    x_te: np.ndarray,
    y_te: np.ndarray,
    parts: list[np.ndarray],
) -> bool | None:
    """Does tierfl's own digits loader give exactly these clients? None if it cannot say."""
    try:
        from devices.datasets import load_federated
    except ImportError as e:
        print(f"[warn] cannot check tierfl's partition ({e})", flush=True)
        return None
    fed = load_federated(WORKLOAD.dataset, n, seed=WORKLOAD.seed, alpha=WORKLOAD.alpha)
    ok = (
        len(fed.devices) == n
        and np.array_equal(fed.x_test, x_te)
        and np.array_equal(fed.y_test, y_te)
        and all(
            np.array_equal(dev.x_train, x_tr[p]) and np.array_equal(dev.y_train, y_tr[p])
            for dev, p in zip(fed.devices, parts, strict=True)
        )
    )
    if not ok:
        print(f"[warn] tierfl's digits partition for N={n} differs from the bench's", flush=True)
    return ok


# ---------------------------------------------------------------------------
# Measuring one process tree
# ---------------------------------------------------------------------------


@dataclass
class Run:
    t_start: float  # time.time() just before the process was started
    t_exit: float
    returncode: int
    peak_rss_bytes: int
    peak_processes: int
    log: str


def measure(
    cmd: list[str], log: Path, cwd: Path, env: dict[str, str], interval_s: float = 0.05
) -> Run:
    """Run ``cmd``; sample the summed RSS of its whole process tree until it exits.

    A run that outlives ``RUN_TIMEOUT_S`` (a hung simulator) has its tree killed and
    comes back with return code -9.
    """
    psutil = _psutil()
    peak = [0, 0]

    def tree_rss(root: Any) -> tuple[int, int]:
        total, count = 0, 0
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0, 0
        for p in procs:
            try:
                total += p.memory_info().rss
                count += 1
            except psutil.Error:
                pass
        return total, count

    with log.open("w") as fh:
        t_start = time.time()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        root = psutil.Process(proc.pid)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                rss, count = tree_rss(root)
                peak[0] = max(peak[0], rss)
                peak[1] = max(peak[1], count)
                done.wait(interval_s)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            rc = proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _kill_tree(psutil, root)
            rc = -9
            fh.write(f"\n[bench] killed after {RUN_TIMEOUT_S:.0f} s\n")
        t_exit = time.time()
        done.set()
        sampler.join()
    return Run(t_start, t_exit, rc, peak[0], peak[1], str(log))


def _kill_tree(psutil: Any, root: Any) -> None:
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        procs = [root]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


def _peer_env() -> dict[str, str]:
    """The environment minus anything that points into tierfl's venv."""
    env = dict(os.environ)
    for k in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "RAY_ADDRESS"):
        env.pop(k, None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _tail(path: str, lines: int = 25) -> str:
    text = Path(path).read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


# ---------------------------------------------------------------------------
# The three frameworks
# ---------------------------------------------------------------------------


@dataclass
class Result:
    framework: str
    clients: int
    rounds: int
    config: str
    version: str
    e2e_s: float
    e2e_definition: str
    steady_updates_per_s: float
    round_wall_s: list[float]
    peak_rss_mb: float
    peak_processes: int
    final_accuracy: float
    accuracy: list[float]
    busy_before_pct: float  # machine CPU use by others in the second before the run
    extra: dict[str, Any] = field(default_factory=dict)


def _from_peer_file(
    framework: str, n: int, rounds: int, run: Run, out: Path, busy: float
) -> Result:
    if run.returncode != 0 or not out.exists():
        raise RuntimeError(
            f"{framework} at N={n} failed (exit {run.returncode}); log {run.log}:\n{_tail(run.log)}"
        )
    d = json.loads(out.read_text())
    t = d["round_end_unix"]
    walls = [t[0] - run.t_start] + [b - a for a, b in itertools.pairwise(t)]
    return Result(
        framework=framework,
        clients=n,
        rounds=rounds,
        config=d["config"],
        version=d["version"],
        e2e_s=t[-1] - run.t_start,
        e2e_definition="process start -> final accuracy",
        steady_updates_per_s=n * (rounds - 1) / (t[-1] - t[0]) if rounds > 1 else float("nan"),
        round_wall_s=walls,
        peak_rss_mb=run.peak_rss_bytes / 2**20,
        peak_processes=run.peak_processes,
        final_accuracy=float(d["accuracy"][-1]),
        accuracy=[float(a) for a in d["accuracy"]],
        busy_before_pct=busy,
        extra={"process_exit_s": run.t_exit - run.t_start, "log": run.log},
    )


def _peer_cmd(
    python: Path, script: str, npz: Path, rounds: int, out: Path, *extra: str
) -> list[str]:
    """A peer script's command line: the shared workload file, rounds, result file, extras."""
    return [
        str(python),
        str(PEERS_DIR / script),
        "--npz",
        str(npz),
        "--rounds",
        str(rounds),
        "--out",
        str(out),
        *extra,
    ]


def run_flower(n: int, rounds: int, npz: Path, work: Path, repeat: int) -> Result:
    python = ensure_venv("flower")
    tried: list[Result] = []
    for i in range(repeat):
        out = work / f"flower-{n}-r{i}.json"
        busy = _busy_pct()
        run = measure(
            _peer_cmd(python, "flower_peer.py", npz, rounds, out),
            work / f"flower-{n}-r{i}.log",
            PEERS_DIR,
            _peer_env(),
        )
        tried.append(_announce(_from_peer_file("flower", n, rounds, run, out, busy), "flower"))
    return _best(tried)


def run_pfl(n: int, rounds: int, npz: Path, work: Path, workers: list[int], repeat: int) -> Result:
    """pfl in each worker count asked for; the best steady state is pfl's result."""
    python = ensure_venv("pfl")
    tried: list[Result] = []
    for k in workers:
        for i in range(repeat):
            out = work / f"pfl-{n}-w{k}-r{i}.json"
            busy = _busy_pct()
            run = measure(
                _peer_cmd(python, "pfl_peer.py", npz, rounds, out, "--workers", str(k)),
                work / f"pfl-{n}-w{k}-r{i}.log",
                PEERS_DIR,
                _peer_env(),
            )
            r = _from_peer_file("pfl", n, rounds, run, out, busy)
            tried.append(_announce(r, f"pfl with {k} worker(s)"))
    return _best(tried)


def _announce(r: Result, what: str) -> Result:
    busy = " (machine busy: numbers noisy)" if _busy(r.busy_before_pct) else ""
    print(
        f"    {what}: {r.steady_updates_per_s:,.0f} updates/s steady, {r.e2e_s:.1f} s end to "
        f"end, machine busy before {r.busy_before_pct:.0f} %{busy}",
        flush=True,
    )
    return r


def _busy_pct(settle_s: float = 20.0) -> float:
    """How busy the machine is with other work just before a run, in % of all cores.

    Waits (up to ``settle_s``) for the machine to go quiet first. Niced work is
    not counted: at nice 15 it gets a few % of a core against a normal-priority
    run, so it hardly disturbs the measurement.
    """
    psutil = _psutil()
    deadline = time.monotonic() + settle_s
    while True:
        t = psutil.cpu_times_percent(interval=1.0)
        busy = max(0.0, 100.0 - t.idle - getattr(t, "nice", 0.0) - getattr(t, "iowait", 0.0))
        if not _busy(busy) or time.monotonic() > deadline:
            return float(busy)


def _busy(pct: float) -> bool:
    return pct > 25.0


def _grid(n: int) -> tuple[int, int]:
    """Gateways x devices-per-gateway for N devices: 10 gateways when N allows it."""
    g = 10 if n >= 10 and n % 10 == 0 else 1
    return g, n // g


def _best(tried: list[Result]) -> Result:
    """A framework's result is its variant with the best steady state; the rest stay on record."""
    best = max(tried, key=lambda r: r.steady_updates_per_s)
    best.extra["tried"] = [
        {
            "config": r.config,
            "steady_updates_per_s": r.steady_updates_per_s,
            "e2e_s": r.e2e_s,
            "peak_rss_mb": r.peak_rss_mb,
            "final_accuracy": r.final_accuracy,
        }
        for r in tried
    ]
    return best


def run_tierfl(n: int, rounds: int, work: Path, backends: list[str], repeat: int) -> Result:
    """`tierfl emulate` on a zero-cost G x D topology, once per backend asked for."""
    g, per = _grid(n)
    topo = work / f"tierfl-{g}x{per}.graphml"
    cli = [sys.executable, "-m", "hierarchy.cli"]
    gen = subprocess.run(
        [
            *cli,
            "topology",
            "generate",
            "--gateways",
            str(g),
            "--devices-per-gateway",
            str(per),
            "--profile",
            "zero",
            "--seed",
            "0",
            "-o",
            str(topo),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if gen.returncode != 0:
        raise RuntimeError(f"tierfl topology generate failed:\n{gen.stdout}{gen.stderr}")
    tried = []
    for backend in backends:
        for i in range(repeat):
            r = _run_tierfl_once(n, rounds, work, cli, topo, f"{g}x{per}", backend, i)
            tried.append(_announce(r, f"tierfl with backend {backend}"))
    return _best(tried)


def _run_tierfl_once(
    n: int, rounds: int, work: Path, cli: list[str], topo: Path, grid: str, backend: str, i: int
) -> Result:
    out_dir = work / f"tierfl-{n}-{backend}-r{i}"
    w = WORKLOAD
    cmd = [
        *cli,
        "emulate",
        str(topo),
        "--rounds",
        str(rounds),
        "--dataset",
        w.dataset,
        "--seed",
        str(w.seed),
        "--alpha",
        str(w.alpha),
        "--epochs",
        str(w.epochs),
        "--batch-size",
        str(w.batch_size),
        "--lr",
        str(w.lr),
        "--model",
        w.model,
        "--strategy",
        "fedavg",
        "--backend",
        backend,
        "--out",
        str(out_dir),
        "--no-plots",
        "--quiet",
    ]
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    busy = _busy_pct()
    run = measure(cmd, work / f"tierfl-{n}-{backend}-r{i}.log", ROOT, env)
    report_path = out_dir / "report.json"
    if run.returncode != 0 or not report_path.exists():
        raise RuntimeError(
            f"tierfl at N={n} failed (exit {run.returncode}); log {run.log}:\n{_tail(run.log)}"
        )
    rep = json.loads(report_path.read_text())
    rs = rep["rounds"]
    participants = [int(r["participants"]) for r in rs]
    if any(p != n for p in participants):
        print(
            f"[warn] tierfl N={n}: participants per round {participants}, expected {n}", flush=True
        )
    steady_wall = sum(r["wall_s"] for r in rs[1:])
    pl = rep.get("placement", {})
    count = {
        k: len(v) if isinstance(v, list) else v
        for k, v in pl.items()
        if k in ("trainers", "gateway_hosts")
    }
    config = (
        f"tierfl {rep.get('tierfl', '?')} `tierfl emulate --backend {backend}` "
        f"({count.get('trainers')} cohort trainer(s), {count.get('gateway_hosts')} gateway "
        f"host(s)), topology {grid} profile zero, FedAvg"
    )
    return Result(
        framework="tierfl",
        clients=n,
        rounds=rounds,
        config=config,
        version=str(rep.get("tierfl")),
        e2e_s=run.t_exit - run.t_start,
        e2e_definition="process start -> process exit (includes shut-down; upper bound)",
        steady_updates_per_s=(sum(participants[1:]) / steady_wall)
        if steady_wall > 0
        else float("nan"),
        round_wall_s=[float(r["wall_s"]) for r in rs],
        peak_rss_mb=run.peak_rss_bytes / 2**20,
        peak_processes=run.peak_processes,
        final_accuracy=float(rep["summary"]["final_accuracy"]),
        accuracy=[float(r["accuracy"]) for r in rs if r["accuracy"] is not None],
        busy_before_pct=busy,
        extra={
            "wall_total_s_in_process": rep["summary"].get("wall_total_s"),
            "wall_setup_s": rep["summary"].get("wall_setup_s"),
            "report": str(report_path),
            "log": run.log,
        },
    )


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def compare(results: list[Result]) -> list[dict[str, Any]]:
    """tierfl / peer ratios per N, and the target checks at N = TARGET_N."""
    by = {(r.framework, r.clients): r for r in results}
    rows = []
    for (fw, n), t in sorted(by.items(), key=lambda kv: kv[0][1]):
        if fw != "tierfl":
            continue
        for peer in ("flower", "pfl"):
            p = by.get((peer, n))
            if p is None:
                continue
            row: dict[str, Any] = {
                "clients": n,
                "peer": peer,
                "steady_ratio": t.steady_updates_per_s / p.steady_updates_per_s,
                "e2e_speedup": p.e2e_s / t.e2e_s,
                "accuracy_diff_points": 100 * (t.final_accuracy - p.final_accuracy),
            }
            if n == TARGET_N:
                row["targets"] = {
                    "steady": (
                        TARGETS[f"steady_vs_{peer}"],
                        row["steady_ratio"] >= TARGETS[f"steady_vs_{peer}"],
                    ),
                    "e2e": (
                        TARGETS[f"e2e_vs_{peer}"],
                        row["e2e_speedup"] >= TARGETS[f"e2e_vs_{peer}"],
                    ),
                    "accuracy": (
                        TARGETS["acc_points"],
                        abs(row["accuracy_diff_points"]) <= TARGETS["acc_points"],
                    ),
                }
            rows.append(row)
    return rows


def print_report(results: list[Result], rows: list[dict[str, Any]]) -> None:
    print("\n=== results ===")
    hdr = (
        f"{'framework':<8} {'N':>6} {'e2e s':>8} {'steady upd/s':>13} {'peak RSS MB':>12} "
        f"{'procs':>5} {'final acc':>9} {'busy%':>5}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in sorted(results, key=lambda r: (r.clients, FRAMEWORKS.index(r.framework))):
        print(
            f"{r.framework:<8} {r.clients:>6} {r.e2e_s:>8.2f} {r.steady_updates_per_s:>13,.0f} "
            f"{r.peak_rss_mb:>12,.0f} {r.peak_processes:>5} {r.final_accuracy:>9.4f} "
            f"{r.busy_before_pct:>5.0f}"
        )
    print("\nconfigurations (each framework's best variant; others tried are in the JSON):")
    for r in results:
        print(f"  N={r.clients:<5} {r.framework}: {r.config}")
        for t in r.extra.get("tried", []):
            if t["config"] != r.config:
                print(
                    f"  {'':7} also tried: {t['config']} -> "
                    f"{t['steady_updates_per_s']:,.0f} updates/s steady, {t['e2e_s']:.1f} s e2e"
                )
    print(
        "  e2e: peers = process start -> final accuracy; "
        "tierfl = process start -> process exit (upper bound)"
    )
    print(
        f"  busy% = CPU use (not niced) by other work in the second before the run "
        f"({os.cpu_count()} cores)"
    )
    busy = [r for r in results if _busy(r.busy_before_pct)]
    if busy:
        print(
            f"  [warn] {len(busy)} result(s) started on a busy machine (> 25 % CPU in use): "
            "the numbers are noisy; re-run when quiet or with --repeat 3"
        )
    if not rows:
        return
    print("\n=== tierfl vs peers ===")
    print(f"{'N':>6} {'peer':<7} {'steady ratio':>13} {'e2e speedup':>12} {'acc diff (pts)':>15}")
    for row in rows:
        print(
            f"{row['clients']:>6} {row['peer']:<7} {row['steady_ratio']:>12.1f}x "
            f"{row['e2e_speedup']:>11.2f}x {row['accuracy_diff_points']:>+15.2f}"
        )
    checks = [row for row in rows if "targets" in row]
    if checks:
        print(f"\n=== targets at N={TARGET_N} ===")
        for row in checks:
            tg = row["targets"]
            for key, what, value in (
                ("steady", "steady-state ratio", f"{row['steady_ratio']:.1f}x"),
                ("e2e", "end-to-end speedup", f"{row['e2e_speedup']:.2f}x"),
                ("accuracy", "|accuracy diff| pts", f"{abs(row['accuracy_diff_points']):.2f}"),
            ):
                bound, ok = tg[key]
                op = "<=" if key == "accuracy" else ">="
                print(
                    f"  vs {row['peer']:<7} {what:<20} {value:>8}  target {op} {bound:<5} "
                    f"{'PASS' if ok else 'FAIL'}"
                )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--clients", default="100,1000", help="comma-separated N (default 100,1000)")
    ap.add_argument("--rounds", type=int, default=5, help="federated rounds (>= 2)")
    ap.add_argument(
        "--only", default=",".join(FRAMEWORKS), help="comma-separated subset of tierfl,flower,pfl"
    )
    ap.add_argument("--json", type=Path, default=None, help="write machine-readable results here")
    ap.add_argument(
        "--pfl-workers",
        default="1,2",
        help="pfl worker counts to try; the fastest steady state counts (default 1,2)",
    )
    ap.add_argument(
        "--tierfl-backends",
        default="ray,local",
        help="tierfl emulate --backend values to try; the fastest steady state "
        "counts (default ray,local)",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per framework variant; the best steady state counts (default 1; "
        "use 2-3 on a shared machine)",
    )
    ap.add_argument(
        "--workdir",
        type=Path,
        default=BENCH / ".runs",
        help="where workloads, logs and per-run outputs go (default bench/.runs)",
    )
    args = ap.parse_args(argv)

    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    only = [f.strip() for f in args.only.split(",") if f.strip()]
    bad = [f for f in only if f not in FRAMEWORKS]
    if bad or not only:
        ap.error(f"--only: unknown framework(s) {bad}; choose from {', '.join(FRAMEWORKS)}")
    if args.rounds < 2:
        ap.error("--rounds must be >= 2 (steady state is rounds 2..R)")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    if any(c < 1 for c in clients) or not clients:
        ap.error("--clients must be positive integers")
    pfl_workers = [int(k) for k in args.pfl_workers.split(",") if k.strip()]
    tierfl_backends = [b.strip() for b in args.tierfl_backends.split(",") if b.strip()]
    if not tierfl_backends or any(b not in ("ray", "local") for b in tierfl_backends):
        ap.error("--tierfl-backends: choose from ray,local")
    if not pfl_workers or any(k < 1 for k in pfl_workers):
        ap.error("--pfl-workers must be positive integers")

    work = args.workdir / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    for peer in ("flower", "pfl"):
        if peer in only:
            ensure_venv(peer)

    results: list[Result] = []
    failures: list[dict[str, Any]] = []
    workloads = []
    for n in clients:
        npz = work / f"workload-{n}.npz"
        info = write_workload(n, npz)
        workloads.append(info)
        print(
            f"\n[N={n}] workload: {info['train']} train / {info['test']} test samples, "
            f"client sizes {info['client_size_min']}..{info['client_size_max']}, "
            f"tierfl partition identical: {info['tierfl_partition_match']}",
            flush=True,
        )
        for fw in FRAMEWORKS:
            if fw not in only:
                continue
            print(f"  running {fw} ...", flush=True)
            try:
                if fw == "tierfl":
                    r = run_tierfl(n, args.rounds, work, tierfl_backends, args.repeat)
                elif fw == "flower":
                    r = run_flower(n, args.rounds, npz, work, args.repeat)
                else:
                    r = run_pfl(n, args.rounds, npz, work, pfl_workers, args.repeat)
            except RuntimeError as e:  # one framework failing still leaves the others' numbers
                print(f"  [error] {e}", flush=True)
                failures.append({"framework": fw, "clients": n, "error": str(e)})
                continue
            print(
                f"  {fw}: {r.e2e_s:.1f} s end to end, {r.steady_updates_per_s:,.0f} updates/s "
                f"steady, peak {r.peak_rss_mb:,.0f} MB, accuracy {r.final_accuracy:.4f}",
                flush=True,
            )
            results.append(r)

    rows = compare(results)
    print_report(results, rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "machine": {
                        "cpus": os.cpu_count(),
                        "platform": platform.platform(),
                        "python": platform.python_version(),
                    },
                    "workload": {
                        **asdict(WORKLOAD),
                        "rounds": args.rounds,
                        "partitions": workloads,
                    },
                    "targets_at_clients": TARGET_N,
                    "targets": TARGETS,
                    "results": [asdict(r) for r in results],
                    "comparisons": rows,
                    "failures": failures,
                    "workdir": str(work),
                },
                indent=2,
            )
        )
        print(f"\nresults: {args.json}")
    if failures:
        print(
            f"\n{len(failures)} run(s) failed: "
            + ", ".join(f"{f['framework']} N={f['clients']}" for f in failures)
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
