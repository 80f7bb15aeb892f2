"""Single-process reference accuracies for the bundled examples, on exactly Lepton's split.

    .venv/bin/python examples/reference.py [--lepton]

For each example job, Lepton's own data preparation (same seed, split and preprocessing) feeds
scikit-learn's MLPClassifier (hidden layers as in the job's Dense layers; for the CNN job a 64-unit
MLP), and its test accuracy is printed. With --lepton, the job is also trained by Lepton with 2
workers and its test accuracy printed next to it.
"""

import argparse
import tempfile
from pathlib import Path

from sklearn.neural_network import MLPClassifier

from lepton.spec import load_job
from lepton.storage.prepared import prepare

HERE = Path(__file__).parent
JOBS = ["breast_cancer_mlp.yaml", "digits_cnn.yaml"]


def reference_accuracy(job_path: Path) -> float:
    job = load_job(job_path)
    data = prepare(job).arrays
    if job.model.type == "mlp":
        hidden = tuple(layer.units for layer in job.model.layers)
    else:
        hidden = (64,)
    clf = MLPClassifier(hidden_layer_sizes=hidden, max_iter=2000, random_state=job.seed)
    flat = lambda a: a.reshape(len(a), -1)  # noqa: E731 - images to vectors for the MLP
    clf.fit(flat(data["train_x"]), data["train_y"])
    return float(clf.score(flat(data["test_x"]), data["test_y"]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lepton", action="store_true", help="also train each job with Lepton (2 workers)")
    a = ap.parse_args()
    print(f"{'job':<26}{'sklearn MLP':>12}{'lepton x2':>11}")
    for name in JOBS:
        ref = reference_accuracy(HERE / name)
        ours = ""
        if a.lepton:
            import lepton

            with tempfile.TemporaryDirectory() as tmp:
                res = lepton.train(HERE / name, workers=2, run_dir=Path(tmp) / "run")
                ours = f"{res.summary['test']['accuracy']:.4f}"
        print(f"{name:<26}{ref:>12.4f}{ours:>11}")


if __name__ == "__main__":
    main()
