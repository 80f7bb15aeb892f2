"""The failure policy stepped on its own (pure decisions), and the controller's transition record:
one writer of the phase, every transition an event with previous → next, no file written when the
controller has no observers."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import job_dict
from lepton.coordinator.controller import Controller
from lepton.coordinator.failure_policy import Action, FailurePolicy
from lepton.coordinator.journal import Observer
from lepton.coordinator.state import MemberState, Phase
from lepton.protocol import Heartbeat, RegisterRequest, Report
from lepton.spec import parse_job
from lepton.storage.rundir import RunDir

CONTROLLER = Path(__file__).resolve().parents[1] / "lepton" / "coordinator" / "controller.py"


def _policy(tmp_path, **cluster):
    over = {f"cluster__{k}": v for k, v in cluster.items()}
    return FailurePolicy(parse_job(job_dict(tmp_path / "d.csv", **over)).cluster)


def test_a_lost_member_regroups_only_a_running_generation(tmp_path):
    p = _policy(tmp_path)
    assert p.member_lost("w1", "process exited with code -9", True).action == Action.REGROUP
    assert p.member_lost("w1", "heartbeat timeout", False).action == Action.NONE


def test_a_collective_error_from_an_old_generation_changes_nothing(tmp_path):
    p = _policy(tmp_path)
    assert p.collective_error("w0", True).action == Action.REGROUP
    assert p.collective_error("w0", False).action == Action.NONE


def test_a_worker_error_fails_the_run_only_when_every_member_reports_one(tmp_path):
    p = _policy(tmp_path)
    # the one member of its generation: the run fails, and says who
    d = p.worker_error("w3", "ValueError: boom", {"w3": "ValueError: boom"}, ["w3"], True)
    assert d.action == Action.FAIL and d.reason == "worker w3 failed: ValueError: boom"
    # one of two: a lost worker, the generation regroups without it (or nothing, if not running)
    one = p.worker_error("w3", "ValueError: boom", {"w3": "ValueError: boom"}, ["w1", "w3"], True)
    assert one.action == Action.REGROUP and "w3" in one.reason
    assert p.worker_error("w3", "boom", {"w3": "boom"}, ["w1", "w3"], False).action == Action.NONE
    # both: a deterministic bug fails the run with its error
    both = p.worker_error(
        "w1", "KeyError: 'x'", {"w3": "KeyError: 'x'", "w1": "KeyError: 'x'"}, ["w1", "w3"], True
    )
    assert both.action == Action.FAIL and "KeyError: 'x'" in both.reason and "2 of 2" in both.reason
    # a diverged model: every member sees it; the reason is the error as it is
    div = "training diverged at step 7"
    assert p.worker_error("w3", div, {"w3": div}, ["w1", "w3"], True).action == Action.REGROUP
    d = p.worker_error("w1", div, {"w3": div, "w1": div}, ["w1", "w3"], True)
    assert d.action == Action.FAIL and d.reason == div


def test_too_few_workers_waits_until_the_deadline_but_not_while_checkpointing(tmp_path):
    p = _policy(tmp_path, min_workers=2, wait_for_workers_s=30)
    assert p.too_few_workers(1, 29.0, 4, checkpointing=False).action == Action.WAIT
    late = p.too_few_workers(1, 31.0, 4, checkpointing=False)
    assert late.action == Action.FAIL and "cluster.min_workers=2" in late.reason and "step 4" in late.reason
    assert p.too_few_workers(1, 99.0, 4, checkpointing=True).action == Action.WAIT


def test_local_restarts_follow_restart_failed_and_max_restarts(tmp_path):
    p = _policy(tmp_path, restart_failed=True, max_restarts=2)
    assert p.local_exit(1, 0, run_final=False).action == Action.RESTART_LOCAL
    assert "(2/2)" in p.local_exit(1, 1, run_final=False).reason
    assert p.local_exit(1, 2, run_final=False).action == Action.NONE  # none left
    assert p.local_exit(0, 0, run_final=False).action == Action.NONE  # a clean exit is no failure
    assert p.local_exit(1, 0, run_final=True).action == Action.NONE  # the run is over
    assert "keep failing" in p.no_local_workers(2).reason
    off = _policy(tmp_path, restart_failed=False)
    assert off.local_exit(1, 0, run_final=False).action == Action.NONE
    assert off.no_local_workers(0).reason == "every local worker exited"


class _Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


class _Recorder(Observer):
    def __init__(self):
        self.events: list[dict] = []

    def on_event(self, event: dict) -> None:
        self.events.append(event)


def test_every_phase_change_is_one_event_with_previous_and_next(tmp_path):
    """Stepped through join → loss → wait → rejoin → completion with only an in-memory observer: the
    events' from/to chain is exactly the sequence of phases, and no file is written."""
    rec = _Recorder()
    job = parse_job(job_dict(tmp_path / "d.csv", cluster__min_workers=2, cluster__heartbeat_timeout_s=5))
    run = RunDir(tmp_path / "run")
    c = Controller(job, run, 2, train_rows=100, clock=_Clock(), observers=[rec])
    phases = [c.phase]

    def ready(pid: int) -> str:
        wid = c.register(RegisterRequest(host="h", pid=pid))
        c.plan(wid)
        phases.append(c.phase)
        return wid

    a, b = ready(1), ready(2)
    c.process_exited(2, -9)  # b dies: regroup, then too few: wait
    phases.append(c.phase)
    c.report(
        Report(worker_id=a, kind="paused", payload={"reason": "collective_error", "generation": 0, "step": 3})
    )
    phases.append(c.phase)
    c.report(Report(worker_id=a, kind="checkpoint", payload={"step": 3, "path": "/ck3"}))
    d = ready(3)
    c.report(Report(worker_id=a, kind="finished", payload={"summary": {"steps": 21}}))
    c.report(Report(worker_id=d, kind="finished"))
    phases.append(c.phase)

    changes = [(e["from"], e["to"]) for e in rec.events if "to" in e]
    distinct = [p.value for i, p in enumerate(phases) if i == 0 or p != phases[i - 1]]
    assert changes == list(zip(distinct, distinct[1:]))
    assert distinct == ["waiting", "running", "regrouping", "waiting", "running", "completed"]
    kinds = [e["kind"] for e in rec.events if "to" in e]
    assert kinds == ["generation", "regroup", "waiting", "generation", "completed"]
    assert c.members[b].state == MemberState.LOST and "code -9" in c.members[b].cause
    assert c.state.cause == "training completed at step 21"
    assert not run.root.exists()  # no observer of the run directory: nothing written


def test_a_heartbeat_timeout_is_a_lost_member_with_its_cause(tmp_path):
    job = parse_job(job_dict(tmp_path / "d.csv", cluster__heartbeat_timeout_s=5))
    clock = _Clock()
    c = Controller(job, RunDir(tmp_path / "run"), 1, train_rows=100, clock=clock, observers=[])
    a = c.register(RegisterRequest(host="h", pid=1))
    c.plan(a)
    c.heartbeat(Heartbeat(worker_id=a, generation=0, step=1))
    clock.t = 6.0
    c.tick()
    assert c.phase == Phase.WAITING and c.members[a].state == MemberState.LOST
    assert c.members[a].cause.startswith("heartbeat timeout (6.0 s silent")
    assert c.status()["workers"][0]["cause"] == c.members[a].cause


def test_the_phase_has_one_writer():
    """``Controller.state`` (which holds the phase) is assigned in ``_transition`` and the constructor
    only."""
    tree = ast.parse(CONTROLLER.read_text())
    writers = set()
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    for t in targets:
                        for el in ast.walk(t):
                            if isinstance(el, ast.Attribute) and el.attr in ("state", "phase"):
                                if isinstance(el.value, ast.Name) and el.value.id == "self":
                                    writers.add(fn.name)
    assert writers == {"__post_init__", "_transition"}


def test_start_up_waits_for_the_workers_that_can_still_come(tmp_path):
    p = _policy(tmp_path, workers=3, min_workers=2, start_grace_s=60, start_timeout_s=600)
    assert p.start_up(2, 3, 10.0).action == Action.WAIT  # any worker may still come
    assert p.start_up(3, 3, 10.0).action == Action.START
    lost = "worker-1 exited with code -9 before training started (log: r/logs/worker-1.log)"
    d = p.start_up(2, 3, 10.0, can_come=2, lost=lost)
    assert d.action == Action.START and lost in d.reason  # the dead one is not waited for
    assert p.start_up(1, 3, 10.0, can_come=2, lost=lost).action == Action.WAIT  # the other still loads


def test_start_up_fails_at_once_when_too_few_can_come(tmp_path):
    p = _policy(tmp_path, workers=3, min_workers=2)
    lost = "worker-1 exited with code 17 before training started (log: r/logs/worker-1.log)"
    d = p.start_up(1, 3, 1.0, can_come=1, lost=lost)
    assert d.action == Action.FAIL and "\n" not in d.reason
    assert lost in d.reason and "cluster.min_workers=2" in d.reason


def test_start_up_grace_period_then_deadline(tmp_path):
    p = _policy(tmp_path, workers=3, min_workers=2, start_grace_s=60, start_timeout_s=600)
    assert p.start_up(2, 3, 59.0).action == Action.WAIT
    d = p.start_up(2, 3, 60.0)
    assert d.action == Action.START and "cluster.start_grace_s=60" in d.reason
    assert p.start_up(1, 3, 599.0).action == Action.WAIT  # below min_workers: the grace rule waits
    d = p.start_up(1, 3, 600.0)
    assert d.action == Action.FAIL and "cluster.start_timeout_s=600" in d.reason and "1 of 3" in d.reason
