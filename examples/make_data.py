"""Export scikit-learn's bundled data sets to the CSVs in examples/data/ (already committed; rerun to
regenerate). Both are real data shipped inside scikit-learn, so nothing is downloaded."""

from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer, load_digits

HERE = Path(__file__).parent / "data"


def write(path: Path, x: np.ndarray, y, names: list[str], target: str) -> None:
    header = ",".join(names + [target])
    rows = [",".join([f"{v:.6g}" for v in row] + [str(label)]) for row, label in zip(x, y)]
    path.write_text(header + "\n" + "\n".join(rows) + "\n")


def main() -> None:
    HERE.mkdir(exist_ok=True)
    bc = load_breast_cancer()
    names = [n.replace(" ", "_") for n in bc.feature_names]
    write(HERE / "breast_cancer.csv", bc.data, [bc.target_names[t] for t in bc.target], names, "diagnosis")
    dg = load_digits()
    write(HERE / "digits.csv", dg.data, dg.target, [f"px{i}" for i in range(64)], "digit")


if __name__ == "__main__":
    main()
