"""The chaos soak, shortened (benchmarks/chaos.py): a coordinator and 3 workers as real processes under
tens of seeded faults of every kind (SIGKILL at random and aimed moments, SIGSTOP, SIGTERM, the
coordinator SIGKILLed and resumed), replacements keeping the population. The run must complete at the
planned step, the step trace must show every step once and every sample once per epoch, and over this
short horizon (~110 steps) the final model must equal the failure-free run's within 1e-4."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import chaos  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

# 1000 rows → 700 training rows, 22 steps an epoch, 5 epochs: 110 steps, paced 0.15 s apart
CFG = chaos.Config(
    workers=3, duration=25.0, faults=20, seed=11, step_s=0.15, rows=1000, steps=110, checkpoint_every=10
)


def test_chaos_soak_short(tmp_path):
    clean = chaos.run_once(chaos.Config(**{**CFG.__dict__, "step_s": 0.0}), tmp_path / "clean", False)
    assert clean.status == "completed", clean.findings
    run = chaos.run_once(chaos.Config(**{**CFG.__dict__, "deadline_s": 200.0}), tmp_path / "chaos", True)
    print(chaos.table(run, clean, (clean, run)))
    for finding in run.findings:
        print("FINDING:", finding)
    rep = run.trace
    assert run.status == "completed", run.findings
    assert len(run.faults) >= 10, [f.kind for f in run.faults]
    assert run.final_step == run.planned_steps == 110
    assert rep.samples_lost == 0 and rep.samples_duplicated == 0, rep.problems()
    assert rep.contiguous, rep.problems()
    assert rep.ok, rep.problems()
    diff = chaos.max_rel_diff(run.run_dir, clean.run_dir)
    assert diff <= 1e-4, f"the model after {run.planned_steps} steps with faults differs by {diff:.2e}"
