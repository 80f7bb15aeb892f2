"""GPU check (run on a machine with CUDA; CI has none): the CUDA training path and backend choice.

    PYTHONPATH=. python3 benchmarks/gpu_check.py [--out DIR]

1. digits CNN, 1 worker on the GPU vs 1 worker on the CPU: test accuracy, max relative parameter
   difference, the backend of the generation (NCCL for a worker with a GPU of its own);
2. the same with 2 workers sharing the one GPU: gloo with CUDA tensors (NCCL refuses one GPU twice);
   parameters compared with the 1-worker GPU run;
3. the throughput workload (64 → 256 → 256 → 10, batch 512) on 1 GPU vs 1 CPU thread: samples/s.
Prints one JSON line per check and a summary; asserts nothing (a report, not a test).
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def train(job: Path, run: Path, *sets: str, workers: int = 1) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    cmd = [
        sys.executable,
        "-m",
        "lepton",
        "train",
        str(job),
        "--workers",
        str(workers),
        "--run-dir",
        str(run),
        "--no-progress",
    ] + [a for s in sets for a in ("--set", s)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        return {
            "error": (p.stderr or p.stdout)[-2000:],
            "logs": [f.read_text()[-1500:] for f in (run / "logs").glob("*.log")],
        }
    summary = json.loads((run / "summary.json").read_text())
    gens = [json.loads(l) for l in (run / "events.jsonl").read_text().splitlines()]
    return {
        "wall_s": round(time.perf_counter() - t0, 2),
        "summary": summary,
        "backend": [e.get("backend") for e in gens if e["kind"] == "generation"],
    }


def max_rel(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = (
        load_file(str(a / "model" / "weights.safetensors")),
        load_file(str(b / "model" / "weights.safetensors")),
    )
    return max(float((x[k] - y[k]).abs().max() / (y[k].abs().max() + 1e-12)) for k in x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/gpu-check"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    import torch

    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "cuda": torch.cuda.is_available(),
                "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            }
        ),
        flush=True,
    )
    digits = REPO / "examples" / "digits_cnn.yaml"
    gpu1 = train(digits, a.out / "gpu1", "cluster.device=cuda")
    cpu1 = train(digits, a.out / "cpu1", "cluster.device=cpu", "cluster.balance=off")
    gpu2 = train(digits, a.out / "gpu2", "cluster.device=cuda", workers=2)
    res = {"gpu1": gpu1, "cpu1": cpu1, "gpu2": gpu2}
    if "error" not in gpu1 and "error" not in cpu1:
        res["gpu1_vs_cpu1_max_rel_diff"] = max_rel(a.out / "gpu1", a.out / "cpu1")
    if "error" not in gpu1 and "error" not in gpu2:
        res["gpu2_vs_gpu1_max_rel_diff"] = max_rel(a.out / "gpu2", a.out / "gpu1")
    # throughput workload on synthetic data (ddp_baseline.py's generator)
    g = np.random.default_rng(0)
    centers = g.normal(size=(10, 64)).astype(np.float32)
    y = g.integers(0, 10, 100_000)
    x = (centers[y] + 3.0 * g.normal(size=(100_000, 64))).astype(np.float32)
    np.savez(a.out / "synth.npz", x=x, y=y)
    job = a.out / "synth.yaml"
    job.write_text(f"""name: synth
data: {{path: {a.out / "synth.npz"}, target: y, split: {{train: 0.9, val: 0.0, test: 0.1}},
       preprocess: {{dedupe: false, normalize: none}}}}
model: {{type: mlp, layers: [{{units: 256}}, {{units: 256}}]}}
train: {{epochs: 2, batch_size: 512, optimizer: {{name: adam, lr: 0.001}}, log_every_steps: 50}}
eval: {{every: never}}
checkpoint: {{every_steps: 0}}
""")
    res["throughput_gpu"] = train(job, a.out / "tp-gpu", "cluster.device=cuda")
    res["throughput_cpu"] = train(job, a.out / "tp-cpu", "cluster.device=cpu")
    for k, v in res.items():
        print(k, json.dumps(v)[:3000], flush=True)
    (a.out / "gpu_check.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
