"""Throughput: Lepton vs the hand-written torchrun + DDP baseline vs the raw compute limit.

    .venv/bin/python benchmarks/throughput.py [--rows 200000] [--epochs 1] [--work /tmp/lepton-bench]

Same data (``ddp_baseline.py --write-data``), same model (in → 256 → 256 → classes), Adam lr 1e-3,
global batch 512, same epochs, one torch thread per worker for everyone, all run in this invocation:
- Lepton with 1 and 2 workers (`lepton train ... --threads 1`), samples/s from its summary.json
  (training loop only, steady state);
- the baseline with 1 and 2 workers (torchrun), samples/s as it prints it (training loop only);
- raw_loop.py at batch 256 (one process, no framework): the compute limit of one worker of two.
Whole-command wall time is measured here around each command. Every run is repeated ``--rounds`` times
(default 3), interleaved, and the table shows medians; ratios are printed at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# the project's reference loops (ddp_baseline.py, raw_loop.py) live next to the repository, not in it
BENCH_DIR = REPO.parent / "shared" / "bench"


def synthetic_data(work: Path, bench_dir: Path, rows: int) -> Path:
    """The benchmarks' shared CSV (``ddp_baseline.py --write-data``), written once per row count."""
    data = work / f"synth-{rows}.csv"
    if not data.exists():
        print(f"writing {data} ...", flush=True)
        run(
            [
                sys.executable,
                str(bench_dir / "ddp_baseline.py"),
                "--write-data",
                str(data),
                "--rows",
                str(rows),
            ]
        )
    return data


def add_bench_dir(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--bench-dir",
        type=Path,
        default=BENCH_DIR,
        help="folder of the reference loops ddp_baseline.py and raw_loop.py (default: ../shared/bench)",
    )


def check_bench_dir(bench_dir: Path, *names: str) -> None:
    """One clear line instead of a failed subprocess when the reference loops are not there."""
    missing = [n for n in names if not (bench_dir / n).is_file()]
    if missing:
        sys.exit(
            f"{bench_dir}: no {', '.join(missing)} (the project's reference loops, in ../shared/bench next"
            " to the repository); give their folder with --bench-dir"
        )


def run(cmd: list[str], cwd: Path | None = None) -> tuple[str, float]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
    return p.stdout, wall


def last_json(text: str) -> dict:
    return json.loads([l for l in text.splitlines() if l.startswith("{")][-1])


def interleaved(runs: dict, rounds: int) -> dict[str, list[tuple]]:
    """Each callable of ``runs`` (name -> () -> (samples/s, wall s, ...)) ``rounds`` times, one of each
    per round: the machine's speed drifts over minutes, so no system is measured only in a fast or a
    slow minute. Every other round runs them in reverse order (A B C, C B A, ...): under a steady drift
    a system that always ran first would always see the same part of it. Prints progress and, with
    several rounds, every round's figure."""
    got: dict[str, list[tuple]] = {name: [] for name in runs}
    for rnd in range(rounds):
        for name, fn in list(runs.items()) if rnd % 2 == 0 else list(runs.items())[::-1]:
            got[name].append(fn())
            print(f"round {rnd + 1}/{rounds} {name}: {got[name][-1][0]:,.0f} samples/s", flush=True)
    if rounds > 1:
        print(
            "\nper round (samples/s): "
            + "; ".join(f"{name}: {', '.join(f'{r[0]:,.0f}' for r in rs)}" for name, rs in got.items())
        )
    return got


def job_yaml(data: Path, epochs: int) -> str:
    return f"""name: throughput
seed: 0
data:
  path: {data}
  target: label
  split: {{train: 0.9, val: 0.0, test: 0.1}}
  preprocess: {{missing: drop, dedupe: false, normalize: none}}
model:
  type: mlp
  layers: [{{units: 256, activation: relu}}, {{units: 256, activation: relu}}]
train:
  epochs: {epochs}
  batch_size: 512
  optimizer: {{name: adam, lr: 0.001}}
  log_every_steps: 50
eval: {{every: never}}
checkpoint: {{every_steps: 0}}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="every run this many times, interleaved; medians")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lepton-bench"))
    add_bench_dir(ap)
    a = ap.parse_args()
    check_bench_dir(a.bench_dir, "ddp_baseline.py", "raw_loop.py")
    a.work.mkdir(parents=True, exist_ok=True)
    data = synthetic_data(a.work, a.bench_dir, a.rows)
    py = sys.executable
    job = a.work / "throughput.yaml"
    job.write_text(job_yaml(data, a.epochs))

    def lepton(k: int) -> tuple[float, float, float]:
        run_dir = a.work / f"lepton-{k}"
        shutil.rmtree(run_dir, ignore_errors=True)
        _, wall = run(
            [
                str(VENV_BIN / "lepton"),
                "train",
                str(job),
                "--workers",
                str(k),
                "--threads",
                "1",
                "--run-dir",
                str(run_dir),
                "--no-progress",
            ]
        )
        s = json.loads((run_dir / "summary.json").read_text())
        return s["samples_per_s"], wall, s["test"]["accuracy"]

    def torchrun(k: int) -> tuple[float, float, float]:
        out, wall = run(
            [
                str(VENV_BIN / "torchrun"),
                "--standalone",
                "--nproc-per-node",
                str(k),
                str(a.bench_dir / "ddp_baseline.py"),
                "--data",
                str(data),
                "--epochs",
                str(a.epochs),
            ]
        )
        r = last_json(out)
        return r["samples_per_s"], wall, r["test_acc"]

    def raw() -> tuple[float, float, None]:
        out, wall = run(
            [
                py,
                str(a.bench_dir / "raw_loop.py"),
                "--data",
                str(data),
                "--batch",
                "256",
                "--epochs",
                str(a.epochs),
            ],
            cwd=a.bench_dir,
        )
        return last_json(out)["samples_per_s"], wall, None

    runs = {
        "lepton x1": lambda: lepton(1),
        "lepton x2": lambda: lepton(2),
        "torchrun+DDP x1": lambda: torchrun(1),
        "torchrun+DDP x2": lambda: torchrun(2),
        "raw loop (batch 256)": raw,
    }
    got = interleaved(runs, a.rounds)
    rows = [
        (name, median([r[0] for r in rs]), median([r[1] for r in rs]), rs[0][2]) for name, rs in got.items()
    ]

    by = {name: (sps, wall) for name, sps, wall, _ in rows}
    print(f"\n{'run':<22}{'samples/s':>12}{'wall s':>9}{'test acc':>10}")
    for name, sps, wall, acc in rows:
        print(f"{name:<22}{sps:>12,.0f}{wall:>9.2f}{'' if acc is None else f'{acc:.4f}':>10}")
    l2, b2, r1 = by["lepton x2"][0], by["torchrun+DDP x2"][0], by["raw loop (batch 256)"][0]
    print("\nratios (target in brackets)")
    print(f"  lepton x2 / baseline x2 samples/s      {l2 / b2:5.2f}  [>= 1.5]")
    print(f"  lepton x2 / (2 x raw loop) samples/s   {l2 / (2 * r1):5.2f}  [>= 0.8]")
    print(f"  lepton x1 / baseline x1 samples/s      {by['lepton x1'][0] / by['torchrun+DDP x1'][0]:5.2f}")
    for k in (1, 2):
        print(
            f"  lepton x{k} / torchrun x{k} wall time     "
            f"{by[f'lepton x{k}'][1] / by[f'torchrun+DDP x{k}'][1]:5.2f}  [<= 1.2]"
        )


if __name__ == "__main__":
    main()
