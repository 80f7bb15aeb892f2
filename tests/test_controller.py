"""The coordinator's state machine, stepped against fake workers with a fake clock: no sleeps, no network."""

import json

import pytest

from conftest import job_dict
from fakes import Clock, event_kinds, make_coordinator, measure, ready
from lepton.coordinator.controller import Controller
from lepton.coordinator.state import Phase
from lepton.protocol import Heartbeat, RegisterRequest, Report, Resources
from lepton.records import BestRecord, DecisionRecord, EvalRecord, TrainRecord
from lepton.spec import parse_job
from lepton.storage.rundir import RunDir


def test_heartbeat_records_reach_metrics_and_state_json_is_throttled(tmp_path):
    """Metrics records ride in heartbeats; a step that only progress moved reaches state.json at most
    every PROGRESS_PERSIST_S (or at the next tick once due), anything else at once."""
    c, clock = make_coordinator(tmp_path, 2)
    a, b = ready(c, 1), ready(c, 2)
    gen = c.plan(a).generation.id
    state = lambda: json.loads((tmp_path / "run" / "state.json").read_text())

    def train(step):
        return TrainRecord(
            step=step,
            epoch=0,
            total_steps=21,
            loss=1.0,
            lr=0.01,
            samples_per_s=10.0,
            generation=gen,
            workers=2,
        ).to_dict()

    clock.t = 5.0
    c.heartbeat(Heartbeat(worker_id=a, generation=gen, step=1, records=[train(1)]))
    assert state()["step"] == 1  # a second after the last write: written at once
    clock.t = 5.2
    c.heartbeat(Heartbeat(worker_id=a, generation=gen, step=2, records=[train(2)]))
    assert c.step == 2 and state()["step"] == 1  # progress alone, too soon
    c.report(Report(worker_id=a, kind="checkpoint", payload={"step": 2, "path": "/x"}))
    assert state()["step"] == 2 and state()["latest_checkpoint"]["step"] == 2  # at once
    clock.t = 5.4
    c.heartbeat(Heartbeat(worker_id=b, generation=gen, step=3, records=[train(3)]))
    c.tick()
    assert state()["step"] == 2
    clock.t = 6.3
    c.tick()  # due: the tick writes it
    assert state()["step"] == 3
    steps = [json.loads(l)["step"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_machine_forms_generation_and_completes(tmp_path):
    c, clock = make_coordinator(tmp_path, 2, cluster__shares=[1, 3])
    a = c.register(RegisterRequest(host="h", pid=1))
    b = c.register(RegisterRequest(host="h", pid=2))
    assert c.phase == Phase.WAITING  # registered but not ready yet
    assert c.plan(a).action == "wait"
    assert c.plan(b).action == "run" and c.phase == Phase.RUNNING
    pa, pb = c.plan(a), c.plan(b)
    assert (pa.generation.rank, pb.generation.rank) == (0, 1)
    assert pa.generation.shares == [1, 3] and pa.generation.world == 2
    assert c.total_steps == 7 * 3
    c.report(Report(worker_id=a, kind="checkpoint", payload={"step": 5, "path": "/x"}))
    assert json.loads((tmp_path / "run" / "state.json").read_text())["latest_checkpoint"]["step"] == 5
    c.report(
        Report(worker_id=a, kind="finished", payload={"summary": {"steps": 21, "test": {"accuracy": 1.0}}})
    )
    assert c.phase == Phase.RUNNING  # b has not finished yet
    clock.t = 3.0
    c.report(Report(worker_id=b, kind="finished"))
    assert c.phase == Phase.COMPLETED
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["status"] == "completed" and s["workers"] == 2 and s["wall_s"] == 3.0 and s["steps"] == 21
    assert c.plan(a).action == "exit" and c.heartbeat(Heartbeat(worker_id=b)).action == "exit"


def test_machine_replans_as_soon_as_every_speed_is_in(tmp_path):
    c, _ = make_coordinator(tmp_path, 2)
    a, b = ready(c, 1), ready(c, 2)
    assert c.phase == Phase.RUNNING and c.shares == [0.5, 0.5]
    # a's first full window: the re-plan is due but waits for b's
    assert measure(c, a, 11, 0, 8, 1e-3, 0.8e-3).plan is None
    # b (3x slower per sample) completes the set: the plan comes in its reply (b's next reduction
    # carries it to a), and in a's next reply while a still reports the old plan
    r = measure(c, b, 11, 0, 8, 2.6e-3, 2.4e-3)
    assert r.plan.version == 1 and r.plan.generation == 0
    assert measure(c, a, 12, 0, 8, 1e-3, 0.8e-3).plan == r.plan
    assert r.plan.shares[0] > 0.7  # equal step ends: b's slope and both fixed costs
    # both applied v1: a measurement at the new shares replaces the old point instead of averaging it
    measure(c, a, 24, 1, 12, 1.4e-3, 1.2e-3)
    assert c.members[a].measured == (12, 1.4e-3, 1.2e-3, 0.0, 0.0, 0.0)
    measure(c, a, 30, 1, 12, 1.6e-3, 1.4e-3)  # within one plan: smoothed
    assert c.members[a].measured[1] == pytest.approx(1.5e-3)
    # b's measurement of v1 completes the set: the re-plan keeps the shares, which settles the plan
    # (re-plans every rebalance_every_steps from now on)
    measure(c, b, 31, 1, 4, 1.5e-3, 1.2e-3)
    r = measure(c, a, 31, 1, 12, 1.5e-3, 1.3e-3)
    assert r.plan is None and c.plan_version == 1
    assert c.planner.settled and c.planner.replan_step() == 31 + 20
    # the first plan came from capacity-based shares and could go anywhere; later ones leave every
    # worker at least half its share, however slow one window makes it look (b: 25x slower per sample)
    assert c.planner.guessed
    before = c.step_plan.shares
    measure(c, b, 52, 1, 4, 100e-3, 99e-3)
    r = measure(c, a, 52, 1, 12, 1.5e-3, 1.3e-3)
    assert r.plan.version == 2 and r.plan.shares[1] == pytest.approx(before[1] / 2, rel=1e-3)


def test_fixed_shares_for_another_membership_are_balanced(tmp_path):
    """cluster.shares names one share per worker; once a worker is lost the survivors have none fixed:
    they start from capacity shares and are re-planned from their measured speeds like any others."""
    c, _ = make_coordinator(
        tmp_path, 3, cluster__workers=3, cluster__shares=[1, 2, 5], cluster__min_workers=2
    )
    a, b, d = (ready(c, pid) for pid in (1, 2, 3))
    assert c.shares == [1, 2, 5]
    for w in (a, b, d):
        measure(c, w, 11, 0, 8, 1e-3, 0.8e-3)
    assert c.plan_version == 0  # fixed: never re-planned
    c.report(
        Report(
            worker_id=a, kind="paused", payload={"reason": "collective_error", "generation": 0, "step": 11}
        )
    )
    c.report(
        Report(
            worker_id=b, kind="paused", payload={"reason": "collective_error", "generation": 0, "step": 11}
        )
    )
    c.process_exited(3, -9)
    assert c.generation == 1 and c.shares == [0.5, 0.5]
    beat = lambda w, busy: c.heartbeat(
        Heartbeat(
            worker_id=w,
            generation=1,
            step=22,
            plan_version=0,
            step_samples=8,
            step_busy_s=busy,
            step_compute_s=busy,
            step_compute_fixed_s=0.0,
        )
    )
    beat(a, 1e-3)
    r = beat(b, 3e-3)  # b is 3x slower per sample
    assert r.plan is not None and r.plan.shares[0] == pytest.approx(0.75, abs=0.02)


def test_adopted_generation_is_replanned_only_once_every_member_is_back(tmp_path):
    """A restarted coordinator (--resume) adopts the running workers one heartbeat at a time; a plan
    made before the last one is back would have fewer shares than ranks (IndexError in the worker)."""
    job = parse_job(job_dict(tmp_path / "d.csv"))
    c = Controller(job, RunDir(tmp_path / "run"), 2, train_rows=100, clock=Clock(), previous_generation=3)

    def beat(w, rank, busy):
        return c.heartbeat(
            Heartbeat(
                worker_id=w,
                generation=3,
                rank=rank,
                world=2,
                state="training",
                step=40,
                plan_version=2,
                step_samples=8,
                step_busy_s=busy,
                step_compute_s=busy / 2,
            )
        )

    assert beat("w0", 0, 1e-3).plan is None and c.plan_version == 2  # the predecessor's plan 2
    plan = beat("w1", 1, 4e-3).plan  # both back: re-planned
    assert plan.version == 3 and len(plan.shares) == 2 and plan.shares[0] > plan.shares[1]


def test_adopted_generation_keeps_its_shares_and_capacities(tmp_path):
    """Heartbeats carry the worker's shares and resources: a restarted coordinator re-plans from the
    predecessor's plan (each share shrinks at most by balance.SHRINK) with the capacities of the
    placement, not from equal shares on a full core each."""
    job = parse_job(job_dict(tmp_path / "d.csv", train__batch_size=100))
    c = Controller(job, RunDir(tmp_path / "run"), 3, train_rows=1000, clock=Clock(), previous_generation=3)
    shares, cpus = [0.8, 0.1, 0.1], [[0], [1], [1]]
    for rank in range(3):
        c.heartbeat(
            Heartbeat(
                worker_id=f"w{rank}",
                generation=3,
                rank=rank,
                world=3,
                state="training",
                step=40,
                plan_version=2,
                shares=shares,
                resources=Resources(cpus=1, cpu_list=cpus[rank]),
                step_samples=100 * shares[rank],
                step_busy_s=3e-3 * (1, 0.5, 0.5)[rank],
                step_compute_s=2e-3 * (1, 0.5, 0.5)[rank],
            )
        )
    assert [c.members[f"w{r}"].capacity for r in range(3)] == [1.0, 0.5, 0.5]
    # each took 3 ms of its share of a core per step at these shares: balanced, the plan stays
    assert c.step_plan.shares == shares and c.plan_version == 2 and c.planner.settled
    # the predecessor's plan 3 reaches the workers after the adoption: followed, so re-plans go on
    newer = [0.7, 0.15, 0.15]
    for rank in range(3):
        c.heartbeat(
            Heartbeat(
                worker_id=f"w{rank}",
                generation=3,
                rank=rank,
                world=3,
                state="training",
                step=300,
                plan_version=3,
                shares=newer,
                step_samples=100 * newer[rank],
                step_busy_s=3e-3 * (1, 0.5, 0.5)[rank],
                step_compute_s=2e-3 * (1, 0.5, 0.5)[rank],
            )
        )
    assert c.plan_version >= 3 and c.step_plan.version == c.plan_version
    assert c.step_plan.shares != shares


def test_a_generation_never_has_more_workers_than_the_batch_has_samples(tmp_path):
    """A rank without a sample measures no speed (the re-plan divided by it: every heartbeat then
    failed); workers beyond the batch size wait as standby, and a max_workers above it is refused."""
    c, _ = make_coordinator(tmp_path, 2, train__batch_size=2)
    ready(c, 1), ready(c, 2)
    assert c.phase == Phase.RUNNING and len(c.generation_members) == 2
    ready(c, 3)
    assert (
        c.phase == Phase.RUNNING and len(c.generation_members) == 2 and "regroup" not in event_kinds(tmp_path)
    )
    with pytest.raises(Exception, match=r"cluster.max_workers \(3\) is larger than train.batch_size \(2\)"):
        parse_job(job_dict(tmp_path / "d.csv", train__batch_size=2, cluster__max_workers=3))


def test_a_worker_told_to_train_on_its_cpu_counts_its_cores_not_its_gpu(tmp_path):
    """cluster.device cpu on a host with GPUs: each worker lists its GPU in its resources, and the
    capacities counted one device each (equal shares for workers that share a core)."""
    c, _ = make_coordinator(tmp_path, 3, cluster__device="cpu")
    for pid, cpus in ((1, [0]), (2, [1]), (3, [1])):
        w = c.register(
            RegisterRequest(host="h", pid=pid, resources=Resources(cpu_list=cpus, gpus=["H100 GPU-1"]))
        )
        c.plan(w)
    assert [c.members[w].capacity for w in c.generation_members] == [1.0, 0.5, 0.5]


def test_member_not_yet_started_when_a_regroup_begins_still_starts(tmp_path):
    """A generation forms on one worker's plan request; another learns of it only at its next poll. If
    a regroup begins in between (here: a third worker joins), it must still be told to start, or it
    would stay 'training' for good and the coordinator would wait on it forever."""
    c, _ = make_coordinator(tmp_path, 2)
    a = ready(c, 1)
    b = ready(c, 2)  # forms generation 0; b is told to run, a has not asked yet
    assert c.phase == Phase.RUNNING and c.plan(b).action == "run"
    ready(c, 3)  # a join: regroup
    assert c.phase == Phase.REGROUPING
    pa = c.plan(a)
    assert pa.action == "run" and pa.generation.id == 0
    assert c.plan(a).action == "wait"  # told once: a second request during the regroup is not a start
    for w in (a, b):
        assert c.heartbeat(Heartbeat(worker_id=w, generation=0, step=1)).regroup_generation == 0
        c.report(
            Report(worker_id=w, kind="paused", payload={"reason": "regroup", "generation": 0, "step": 1})
        )
    assert c.phase == Phase.RUNNING and c.generation == 1 and len(c.generation_members) == 3


def test_regroup_during_the_final_evaluation_still_completes(tmp_path):
    """Rank 1 finished; a stop request turns it into a paused member; rank 0's summary then completes
    the job instead of leaving it regrouping for good."""
    c, _ = make_coordinator(tmp_path, 2)
    a, b = ready(c, 1), ready(c, 2)
    c.report(Report(worker_id=b, kind="finished", payload={"step": 21}))
    c.request_stop("interrupted")
    assert c.phase == Phase.REGROUPING
    c.report(Report(worker_id=a, kind="finished", payload={"step": 21, "summary": {"steps": 21}}))
    assert c.phase == Phase.COMPLETED and c.summary["steps"] == 21
    c.report(Report(worker_id=b, kind="finished", payload={"step": 21}))  # late: changes nothing
    assert event_kinds(tmp_path).count("completed") == 1


def test_reports_from_a_lost_member_do_not_bring_it_back(tmp_path):
    c, clock = make_coordinator(tmp_path, 2, cluster__heartbeat_timeout_s=5, cluster__min_workers=1)
    a, b = ready(c, 1), ready(c, 2)
    clock.t = 6.0
    c.heartbeat(Heartbeat(worker_id=a, generation=0, step=3))
    c.tick()  # b silent for 6 s: lost
    assert c.members[b].state == "lost"
    c.report(Report(worker_id=b, kind="paused", payload={"reason": "regroup", "generation": 0, "step": 3}))
    c.report(Report(worker_id=b, kind="failed", payload={"error": "boom"}))
    assert c.members[b].state == "lost" and not c.phase.final
    c.report(
        Report(worker_id=a, kind="paused", payload={"reason": "collective_error", "generation": 0, "step": 3})
    )
    assert c.phase == Phase.RUNNING and c.generation_members == [a]


def test_replicas_that_never_got_the_state_do_not_send_progress_back(tmp_path):
    """Found by the chaos soak: a generation starts from the checkpoint at step 40, its rank 0 dies
    before the state broadcast, and the survivor pauses at step 0 (its initial state). The next
    generation must start from the checkpoint again, not from that survivor."""
    c, _ = make_coordinator(tmp_path, 2, cluster__min_workers=2)
    a, _ = ready(c, 1), ready(c, 2)
    c.report(Report(worker_id=a, kind="checkpoint", payload={"step": 40, "path": "/ck40"}))
    c.heartbeat(Heartbeat(worker_id=a, generation=0, step=44))
    c.process_exited(1, -9)  # every replica gone: the next generation starts from the checkpoint
    c.process_exited(2, -9)
    x, y = ready(c, 3), ready(c, 4)
    assert c.generation_members == [x, y] and c.generation_start_step == 40 and c.source_is_checkpoint
    gen = c.generation
    c.process_exited(3, -9)  # its rank 0, before the broadcast
    paused = {"reason": "collective_error", "generation": gen, "step": 0}
    c.report(Report(worker_id=y, kind="paused", payload=paused))
    ready(c, 5)
    assert c.generation == gen + 1 and y in c.generation_members
    assert c.generation_start_step == 40 and c.source_is_checkpoint
    rank0 = c.generation_members[0]
    assert c.plan(rank0).generation.resume_checkpoint == "/ck40"


def test_a_lost_member_may_no_longer_write_into_the_run(tmp_path):
    """Fencing (the file API asks ``write_refused``): a worker whose link was cut is lost; when it comes
    back it must not commit what it holds (a stale generation's checkpoint)."""
    c, clock = make_coordinator(tmp_path, 2, cluster__heartbeat_timeout_s=5, cluster__min_workers=1)
    a, b = ready(c, 1), ready(c, 2)
    assert c.write_refused(a) is None and c.write_refused(b) is None
    clock.t = 6.0
    c.heartbeat(Heartbeat(worker_id=a, generation=0, step=3))
    c.tick()  # b silent for 6 s: lost
    assert "lost or left" in (c.write_refused(b) or "") and c.write_refused(a) is None
    assert "not a member" in (c.write_refused("w9-forged") or "")
    assert c.heartbeat(Heartbeat(worker_id=b, generation=0, step=3)).action == "exit"


def test_progress_goes_back_to_the_checkpoint_a_generation_restarts_from(tmp_path):
    """The only replica died at step 55, the checkpoint is at 40: progress (status, state.json) says 40."""
    c, _ = make_coordinator(tmp_path, 1, cluster__min_workers=1)
    a = ready(c, 1)
    c.report(Report(worker_id=a, kind="checkpoint", payload={"step": 40, "path": "/ck40"}))
    c.heartbeat(Heartbeat(worker_id=a, generation=0, step=55))
    c.process_exited(1, -9)
    ready(c, 2)
    assert c.generation == 1 and c.generation_start_step == 40
    assert (
        c.status()["step"] == 40 and json.loads((tmp_path / "run" / "state.json").read_text())["step"] == 40
    )


def test_resume_keeps_the_recorded_generation_until_it_adopts(tmp_path):
    """A --resume coordinator that ends before any worker came back leaves state.json's generation as
    it found it: the next --resume can still adopt the live workers."""
    job = parse_job(job_dict(tmp_path / "d.csv"))
    Controller(job, RunDir(tmp_path / "run"), 2, train_rows=100, clock=Clock(), previous_generation=7)
    assert json.loads((tmp_path / "run" / "state.json").read_text())["generation"] == 7


def test_machine_regroups_from_the_most_advanced_survivor(tmp_path):
    c, clock = make_coordinator(tmp_path, 3)
    a, b, d = (ready(c, pid) for pid in (1, 2, 3))
    assert c.phase == Phase.RUNNING and c.generation == 0
    for w in (a, b, d):
        c.heartbeat(Heartbeat(worker_id=w, generation=0, step=6))
    # d dies; b had completed step 7 when the collective failed, a had not
    c.report(
        Report(worker_id=a, kind="paused", payload={"reason": "collective_error", "generation": 0, "step": 6})
    )
    assert c.phase == Phase.REGROUPING
    assert c.heartbeat(Heartbeat(worker_id=b, generation=0, step=7)).regroup_generation == 0
    c.report(
        Report(worker_id=b, kind="paused", payload={"reason": "collective_error", "generation": 0, "step": 7})
    )
    assert c.phase == Phase.REGROUPING  # d has not answered yet
    c.process_exited(3, -9)
    assert c.phase == Phase.RUNNING and c.generation == 1
    pb, pa = c.plan(b), c.plan(a)
    assert pb.generation.rank == 0 and pa.generation.rank == 1  # the source is rank 0
    assert pb.generation.start_step == 7 and pb.generation.resume_checkpoint is None
    assert c.plan(d).action == "exit"
    clock.t = 1.0
    c.heartbeat(Heartbeat(worker_id=b, generation=1, step=8))
    rec = [e for e in c.events if e["kind"] == "recovered"]
    assert len(rec) == 1 and rec[0]["resumed_at_step"] == 7 and rec[0]["recovery_s"] == 1.0


def test_status_shows_the_running_plan_only_after_a_worker_is_lost(tmp_path):
    """A lost member keeps the share and speed of a plan that no longer runs: `lepton status`, the
    progress bar and /metrics show the new generation's fractions, and no speed for the lost one."""
    from rich.console import Console

    from lepton.console import TrainingProgress, status_table

    c, _ = make_coordinator(tmp_path, 3, cluster__balance="off", cluster__min_workers=2)
    a, b, d = (ready(c, pid) for pid in (1, 2, 3))
    for w, speed in ((a, 180.0), (b, 90.0), (d, 12_345.0)):
        c.heartbeat(Heartbeat(worker_id=w, generation=0, step=6, samples_per_s=speed))
    assert [w["share_fraction"] for w in c.status()["workers"]] == pytest.approx([1 / 3] * 3, abs=1e-4)
    c.report(
        Report(worker_id=a, kind="paused", payload={"reason": "collective_error", "generation": 0, "step": 6})
    )
    c.report(
        Report(worker_id=b, kind="paused", payload={"reason": "collective_error", "generation": 0, "step": 6})
    )
    c.process_exited(3, -9)
    assert c.phase == Phase.RUNNING and c.generation == 1
    by_id = {w["worker_id"]: w for w in c.status()["workers"]}
    assert [by_id[w]["share_fraction"] for w in (a, b)] == [0.5, 0.5]
    assert (
        by_id[d]["state"] == "lost"
        and by_id[d]["share_fraction"] is None
        and by_id[d]["samples_per_s"] is None
    )
    rec = Console(record=True, width=200)
    rec.print(status_table(c.status()))
    rows = {line.split("│")[1].strip(): line for line in rec.export_text().splitlines() if "│" in line}
    assert "50%" in rows[a] and "50%" in rows[b] and "33%" not in rec.export_text()
    assert "12,345" not in rows[d]
    # the progress bar: slow workers' speeds are not rounded to "0k"
    for w in (a, b):
        c.heartbeat(Heartbeat(worker_id=w, generation=1, step=7, samples_per_s=180.0 if w == a else 90.0))
    bar = TrainingProgress(enabled=False)
    bar.update(c.status())
    assert bar.progress.tasks[0].fields["shares"] == "share@samples/s 50%@180 50%@90"


def test_machine_loses_silent_members_and_waits_for_min_workers(tmp_path):
    c, clock = make_coordinator(
        tmp_path, 2, cluster__heartbeat_timeout_s=5, cluster__min_workers=2, cluster__wait_for_workers_s=30
    )
    a, b = ready(c, 1), ready(c, 2)
    clock.t = 4.0
    c.heartbeat(Heartbeat(worker_id=a, generation=0, step=3))
    c.tick()
    assert c.phase == Phase.RUNNING and c.step == 3
    clock.t = 6.0
    c.tick()  # b silent for 6 s: lost
    assert c.phase == Phase.REGROUPING and c.members[b].state == "lost"
    c.report(
        Report(worker_id=a, kind="paused", payload={"reason": "collective_error", "generation": 0, "step": 3})
    )
    assert c.phase == Phase.WAITING
    assert c.plan(a).action == "checkpoint"  # keep the live state safe while waiting
    # a background checkpoint of an earlier step lands late: it is not the live state asked for
    c.report(Report(worker_id=a, kind="checkpoint", payload={"step": 2, "path": "/ck2"}))
    assert c.plan(a).action == "checkpoint"
    c.report(Report(worker_id=a, kind="checkpoint", payload={"step": 3, "path": "/ck3"}))
    assert c.plan(a).action == "wait"
    clock.t = 20.0
    c.heartbeat(Heartbeat(worker_id=a, generation=0, step=3))
    e = ready(c, 5)  # a new worker arrives in time
    assert c.phase == Phase.RUNNING and c.generation == 1
    assert c.plan(e).generation.rank == 1 and c.plan(a).generation.start_step == 3
    assert "worker_lost" in event_kinds(tmp_path) and "waiting" in event_kinds(tmp_path)


def test_machine_gives_up_after_the_wait_deadline(tmp_path):
    c, clock = make_coordinator(tmp_path, 1, cluster__wait_for_workers_s=10, cluster__heartbeat_timeout_s=100)
    a = ready(c, 1)
    c.report(Report(worker_id=a, kind="checkpoint", payload={"step": 4, "path": "/ck"}))
    c.process_exited(1, 1)
    assert c.phase == Phase.WAITING
    clock.t = 11.0
    c.tick()
    assert c.phase == Phase.FAILED and "cluster.min_workers=1" in c.reason and "step 4" in c.reason


def test_machine_join_and_stop(tmp_path):
    c, clock = make_coordinator(tmp_path, 1)
    a = ready(c, 1)
    c.heartbeat(Heartbeat(worker_id=a, generation=0, step=2))
    b = ready(c, 2)  # joins a running job: regroup
    assert c.phase == Phase.REGROUPING and c.plan(b).action == "wait"
    assert c.heartbeat(Heartbeat(worker_id=a, generation=0, step=3)).regroup_generation == 0
    c.report(Report(worker_id=a, kind="paused", payload={"reason": "regroup", "generation": 0, "step": 4}))
    assert c.phase == Phase.RUNNING and c.generation == 1 and len(c.generation_members) == 2
    c.request_stop("Ctrl-C")
    assert c.phase == Phase.REGROUPING
    for w in (a, b):
        c.report(
            Report(worker_id=w, kind="paused", payload={"reason": "regroup", "generation": 1, "step": 9})
        )
    assert c.plan(a).action == "checkpoint" and c.plan(b).action == "wait"
    c.report(Report(worker_id=a, kind="checkpoint", payload={"step": 9, "path": "/ck9"}))
    assert c.phase == Phase.STOPPED and c.plan(b).action == "exit"
    assert json.loads((tmp_path / "run" / "state.json").read_text())["latest_checkpoint"]["step"] == 9


def test_machine_graceful_leave(tmp_path):
    c, _ = make_coordinator(tmp_path, 2)
    a, b = ready(c, 1), ready(c, 2)
    c.report(Report(worker_id=b, kind="paused", payload={"reason": "leaving", "generation": 0, "step": 5}))
    assert c.members[b].state == "left" and c.phase == Phase.REGROUPING
    c.report(Report(worker_id=a, kind="paused", payload={"reason": "regroup", "generation": 0, "step": 5}))
    assert c.phase == Phase.RUNNING and c.generation_members == [a] and not c.incidents


def test_machine_fails_on_a_worker_error(tmp_path):
    c, _ = make_coordinator(tmp_path, 1)
    a = ready(c, 42)
    c.report(Report(worker_id=a, kind="failed", payload={"error": "ValueError: boom"}))
    assert c.phase == Phase.FAILED and "boom" in c.reason


def test_machine_records_policy_decisions_and_best_as_events(tmp_path):
    c, _ = make_coordinator(tmp_path, 1)
    a = ready(c, 1)
    c.report(
        Report(
            worker_id=a,
            kind="metrics",
            payload={
                "records": [
                    EvalRecord(split="val", step=14, epoch=1, metrics={"loss": 0.5}).to_dict(),
                    BestRecord(step=14, value=0.5, metric="val.loss").to_dict(),
                    DecisionRecord(
                        decision="lr",
                        step=28,
                        reason="val.loss has not improved",
                        details={"metric": "val.loss", "lr": 0.005},
                        lr=0.005,
                    ).to_dict(),
                    DecisionRecord(
                        decision="early_stop", step=42, reason="early stop", details={}, lr=0.005
                    ).to_dict(),
                    {"kind": "decision", "step": 50},  # malformed: journaled, not acted on
                ]
            },
        )
    )
    ev = [e for e in c.events if e["kind"] in ("best", "lr", "early_stop")]
    assert [(e["kind"], e["step"]) for e in ev] == [("best", 14), ("lr", 28), ("early_stop", 42)]
    assert ev[1]["lr"] == 0.005 and "not improved" in ev[1]["reason"]


def test_first_generation_waits_for_no_worker_that_died_before_registering(tmp_path):
    """``lepton train``'s supervisor saw worker-2 exit unregistered: the first generation forms from
    the other two at once, and says why."""
    c, clock = make_coordinator(tmp_path, 3, cluster__workers=3, cluster__min_workers=2)
    ready(c, 1), ready(c, 2)
    assert c.phase == Phase.WAITING
    c.workers_left(2, "worker-2 exited with code -9 before training started (log: L)")
    assert c.phase == Phase.RUNNING and len(c.generation_members) == 2
    gen = [e for e in c.events if e["kind"] == "generation"][0]
    assert "worker-2 exited with code -9" in gen["started_because"]


def test_first_generation_fails_with_one_line_when_too_few_can_come(tmp_path):
    c, clock = make_coordinator(tmp_path, 3, cluster__workers=3, cluster__min_workers=3)
    ready(c, 1), ready(c, 2)
    lost = "worker-2 exited with code 17 before training started (log: RUN/logs/worker-2.log)"
    c.workers_left(2, lost)
    assert c.phase == Phase.FAILED and lost in c.reason and "\n" not in c.reason
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["status"] == "failed" and lost in state["reason"]


def test_start_grace_then_start_timeout_on_the_fake_clock(tmp_path):
    c, clock = make_coordinator(
        tmp_path,
        3,
        cluster__workers=3,
        cluster__start_grace_s=30,
        cluster__start_timeout_s=100,
        cluster__heartbeat_timeout_s=1000,  # no beats from these fake workers
    )
    ready(c, 1)
    clock.t = 29.0
    c.tick()
    assert c.phase == Phase.WAITING
    clock.t = 30.5
    c.tick()  # grace over, 1 >= min_workers (1): start with the one that is there
    assert c.phase == Phase.RUNNING and len(c.generation_members) == 1
    assert (
        "cluster.start_grace_s=30" in [e for e in c.events if e["kind"] == "generation"][0]["started_because"]
    )

    d, clock = make_coordinator(
        tmp_path / "b",
        2,
        cluster__min_workers=2,
        cluster__start_timeout_s=100,
        cluster__heartbeat_timeout_s=1000,
    )
    ready(d, 1)
    clock.t = 99.0
    d.tick()
    assert d.phase == Phase.WAITING and d.plan(next(iter(d.members))).action == "wait"
    clock.t = 100.5
    d.tick()
    assert d.phase == Phase.FAILED and "cluster.start_timeout_s=100" in d.reason
    assert [e["kind"] for e in d.events][-1] == "failed"
    assert d.plan(next(iter(d.members))).action == "exit"
