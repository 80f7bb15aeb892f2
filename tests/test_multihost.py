"""Many hosts that share nothing but a network (issue 26), as namespaces on this machine (netns.py):
each worker on a host of its own, with no view of the coordinator's run directory or data, a private
/dev/shm and a host name that resolves nowhere. It gets everything from the coordinator's URL and the
token (and the run's CA: off loopback the control plane is TLS), all in the join file: the job, the
prepared data, the model and the state over the file API, its data-plane address from the route to
the coordinator. Real processes, real gloo over veth links."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

import lepton
import netns
from conftest import job_dict, make_classification_csv, max_rel_diff, wait_for, weights

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

PORT = 7700  # each host has its own port space


@pytest.fixture
def hosts():
    netns.require()
    made: list[netns.Hosts] = []

    def make(n: int) -> netns.Hosts:
        made.append(netns.Hosts(n))
        return made[-1]

    yield make
    for h in made:
        h.close()


def _start(
    tmp_path,
    h: netns.Hosts,
    job: dict,
    workers: int,
    env: dict | None = None,
    per_host: int = 1,
    launch: bool = True,
):
    """The coordinator on host 0 (which sees tmp_path), ``workers`` workers on hosts 1.., ``per_host``
    to a host, which do not (``launch``: start them too)."""
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    run = tmp_path / "run"
    coord = h.lepton(
        0,
        "coordinator",
        tmp_path / "job.yaml",
        "--bind",
        f"{h.address(0)}:{PORT}",
        "--run-dir",
        run,
        "--workers",
        workers * per_host,
        log=tmp_path / "coordinator.log",
    )
    wait_for(lambda: (run / "join").exists() or coord.poll() is not None, 60, "the run's join file")
    assert coord.poll() is None, _log(tmp_path, "coordinator.log")
    # off loopback the coordinator serves TLS under the run's CA; the join file (URL, token, CA) is what
    # a user copies to each worker host: here, a folder beside tmp_path that the hosts do see
    join = tmp_path.parent / f"{tmp_path.name}.join"
    join.write_bytes((run / "join").read_bytes())
    assert json.loads(join.read_text())["url"] == f"https://{h.address(0)}:{PORT}"
    env = {"LEPTON_CACHE_DIR": str(tmp_path / "cache"), **(env or {})}
    if not launch:
        return coord, [], run
    if per_host == 1:
        ws = [
            h.lepton(k, "worker", "--join", join, hide=[tmp_path], env=env, log=tmp_path / f"worker-{k}.log")
            for k in range(1, workers + 1)
        ]
    else:  # the logs are written from inside the host: beside tmp_path, which it does not see
        logs = [
            tmp_path.parent / f"{tmp_path.name}.worker-{k}-{j}.log"
            for k in range(workers)
            for j in range(per_host)
        ]
        ws = [
            h.lepton_many(
                k,
                per_host,
                "worker",
                "--join",
                join,
                hide=[tmp_path],
                env=env,
                logs=logs[(k - 1) * per_host : k * per_host],
                log=tmp_path / f"worker-{k}.log",
            )
            for k in range(1, workers + 1)
        ]
    return coord, ws, run


def _events(run) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines() if line.strip()]


def _log(tmp_path, name: str) -> str:
    return (tmp_path / name).read_text(errors="replace")


def test_a_host_sees_nothing_of_the_coordinator(hosts, tmp_path):
    h = hosts(2)
    (tmp_path / "secret").write_text("x")
    shm = Path("/dev/shm") / f"lepton-probe-{h.tag}"
    shm.write_text("x")
    try:
        checks = (
            f"test ! -e {tmp_path}/secret && test ! -e {shm} && test $(hostname) = {h.names[1]}-nodns"
            f" && ! getent hosts $(hostname) && ip -o addr show eth0 | grep -q {h.address(1)}; echo rc=$?"
        )
        probe = h.popen(1, ["sh", "-c", checks], hide=[tmp_path], log=tmp_path / "probe.log")
        assert probe.wait(timeout=30) == 0
    finally:
        shm.unlink()
    assert "rc=0" in _log(tmp_path, "probe.log"), _log(tmp_path, "probe.log")


def test_a_worker_that_would_bind_loopback_is_refused_with_the_reason(hosts, tmp_path):
    """The issue's finding: a worker whose data plane binds 127.0.0.1 (here ``--iface lo``) while it
    reaches the coordinator from another host; its peers would retry connecting to their own loopback.
    Registration refuses it at once with one line that says what to do."""
    data = make_classification_csv(tmp_path / "data.csv", rows=200)
    h = hosts(2)
    coord, _, run = _start(tmp_path, h, job_dict(data), workers=1, launch=False)
    join = tmp_path.parent / f"{tmp_path.name}.join"
    w = h.lepton(1, "worker", "--join", join, "--iface", "lo", hide=[tmp_path], log=tmp_path / "w.log")
    assert w.wait(timeout=60) == 2
    lines = [line for line in _log(tmp_path, "w.log").splitlines() if line.strip() and "[W" not in line]
    assert len(lines) == 1 and "127.0.0.1 (loopback)" in lines[0] and "--iface" in lines[0], lines
    assert coord.poll() is None


def test_three_hosts_train_the_model_of_one_host(hosts, tmp_path):
    data = make_classification_csv(tmp_path / "data.csv", rows=400)
    job = job_dict(data, train__epochs=2, cluster__workers=3)
    ref = lepton.train(job, workers=3, run_dir=tmp_path / "ref")
    assert ref.status == "completed", ref.reason
    coord, ws, run = _start(tmp_path, hosts(4), job, workers=3)
    assert coord.wait(timeout=180) == 0, _log(tmp_path, "coordinator.log")
    for k, w in enumerate(ws, 1):
        assert w.wait(timeout=30) == 0, _log(tmp_path, f"worker-{k}.log")
        assert "Traceback" not in _log(tmp_path, f"worker-{k}.log")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["workers"] == 3 and summary["replicas_agree"]
    hosts_seen = {e["host"] for e in _events(run) if e["kind"] == "worker_registered"}
    assert len(hosts_seen) == 3 and all(s.endswith("-nodns") for s in hosts_seen), hosts_seen
    # the checkpoints and the model came back through the file API into the coordinator's folder
    assert any(p.name.startswith("step-") for p in (run / "checkpoints").iterdir())
    diff = max_rel_diff(weights(run), weights(ref.run_dir))
    assert diff <= 1e-4, f"three hosts differ from one by {diff:.2e}"


def test_two_hosts_of_two_workers_reduce_hierarchically(hosts, tmp_path):
    """Within a host the shared segment, across hosts one leader each on gloo, the result shared back:
    the model of one host's 4 workers (within 1e-4: the summation order differs), replicas equal."""
    data = make_classification_csv(tmp_path / "data.csv", rows=400)
    job = job_dict(data, train__epochs=2, cluster__workers=4)
    ref = lepton.train(job, workers=4, run_dir=tmp_path / "ref")
    assert ref.status == "completed", ref.reason
    coord, ws, run = _start(tmp_path, hosts(3), job, workers=2, per_host=2)
    assert coord.wait(timeout=240) == 0, _log(tmp_path, "coordinator.log")
    for k, w in enumerate(ws, 1):
        assert w.wait(timeout=30) == 0, _log(tmp_path, f"worker-{k}.log")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["workers"] == 4 and summary["replicas_agree"]
    firsts = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    transports = {r["transport"] for r in firsts if r.get("kind") == "generation_first_step"}
    assert transports == {"shm+gloo (2 hosts)"}, transports
    diff = max_rel_diff(weights(run), weights(ref.run_dir))
    assert diff <= 1e-4, f"2 hosts x 2 workers differ from one host by {diff:.2e}"


def test_a_cut_host_is_lost_fenced_and_a_new_host_joins(hosts, tmp_path):
    """Host 3's link cut mid-run: its worker is lost after the heartbeat timeout and the others go on;
    a worker on a new host 4 joins at a step boundary (fetching the data while the others train); when
    host 3's link comes back its worker is told to exit (fenced off: lost members may not write)."""
    data = make_classification_csv(tmp_path / "data.csv", rows=600)
    job = job_dict(
        data,
        train__epochs=8,
        cluster__workers=3,
        cluster__min_workers=2,
        cluster__heartbeat_timeout_s=3,
        cluster__collective_timeout_s=8,
    )
    # paced (a sleep before each step, no change to the math) so that the cut lands mid-run
    h = hosts(5)
    pace = {"LEPTON_FAULTS": "slow:rank=*:seconds=0.1"}
    coord, ws, run = _start(tmp_path, h, job, 3, env=pace)

    def step() -> int:
        try:
            return int(json.loads((run / "state.json").read_text()).get("step", 0))
        except (OSError, ValueError):
            return 0

    def kinds(kind: str) -> list[dict]:
        return [e for e in _events(run) if e["kind"] == kind]

    wait_for(lambda: step() >= 15 or coord.poll() is not None, 120, "step 15")
    assert coord.poll() is None, _log(tmp_path, "coordinator.log")
    cut_at, cut_time = step(), time.monotonic()
    h.cut(3)  # the worker of host 3 lives on; only its link goes
    wait_for(lambda: kinds("worker_lost") or coord.poll() is not None, 60, "the cut worker declared lost")
    lost_after = time.monotonic() - cut_time
    join = tmp_path.parent / f"{tmp_path.name}.join"
    env = {"LEPTON_CACHE_DIR": str(tmp_path / "cache4"), **pace}
    new = h.lepton(4, "worker", "--join", join, hide=[tmp_path], env=env, log=tmp_path / "worker-4.log")
    h.uncut(3)
    assert coord.wait(timeout=180) == 0, _log(tmp_path, "coordinator.log")
    assert new.wait(timeout=30) == 0, _log(tmp_path, "worker-4.log")
    assert ws[2].wait(timeout=60) is not None  # the fenced worker did not linger
    assert "Traceback" not in _log(tmp_path, "worker-3.log"), _log(tmp_path, "worker-3.log")[-3000:]
    state = json.loads((run / "state.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert state["status"] == "completed" and summary["workers"] == 3, (state, summary)
    assert state["step"] == state["total_steps"] == summary["steps"], (state, summary)
    # the survivors went on from the most advanced of them: at most the step in flight is redone
    assert all(e["steps_lost"] <= 1 for e in kinds("recovered")), kinds("recovered")
    hosts_of = {e["worker"]: e["host"] for e in kinds("worker_registered")}
    assert hosts_of[kinds("worker_lost")[0]["worker"]] == f"{h.names[3]}-nodns"
    last = kinds("generation")[-1]
    assert f"{h.names[4]}-nodns" in {hosts_of[w] for w in last["members"]}, last
    lost_steps = [e["steps_lost"] for e in kinds("recovered")]
    print(
        f"cut at step {cut_at}, lost {lost_after:.1f} s later, steps lost {lost_steps};"
        " host 4 joined; completed with 3 workers"
    )


def test_the_coordinator_killed_and_restarted_on_another_host_resumes_from_s3(hosts, tmp_path):
    """The run directory and the data on S3 (moto's server, on this machine's address on the hosts'
    bridge): the coordinator of host 0 is SIGKILLed mid-run with its workers, and one started on host 1,
    which sees nothing of tmp_path, resumes from the bucket alone (`--resume --run-dir s3://...`);
    workers restarted on hosts 2 and 3 find it through the join file it rewrote in the bucket. The run
    ends with the model of the uninterrupted run on one host."""
    pytest.importorskip("s3fs")
    from conftest import kill_session
    from s3server import S3Server, data_and_reference

    h = hosts(4)
    s3 = S3Server(h.attach_this_machine())
    try:
        over = dict(train__epochs=4, checkpoint__every_steps=5, cluster__shares=[0.5, 0.5])
        bucket, data_url, ref = data_and_reference(s3, tmp_path, **over)

        url = f"s3://{bucket}/run"
        store = s3.storage(url)
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(job_dict(data_url, **over)))
        env = {**s3.env, "LEPTON_CACHE_DIR": str(tmp_path.parent / f"{tmp_path.name}.cache")}
        pace = {**env, "LEPTON_FAULTS": "slow:rank=*:seconds=0.05"}  # so that the kill lands mid-run

        def coordinator(k: int, *args, name: str, **kw):
            return h.lepton(
                k, "coordinator", *args, "--bind", f"{h.address(k)}:{PORT}", "--run-dir", url,
                env=env, log=tmp_path / name, **kw,
            )  # fmt: skip

        def joined(k: int) -> bool:
            try:
                return json.loads(store.read("join"))["url"] == f"https://{h.address(k)}:{PORT}"
            except (OSError, ValueError):
                return False

        def workers(tag: str):
            return [
                h.lepton(k, "worker", "--join", f"{url}/join", hide=[tmp_path], env=pace,
                         log=tmp_path / f"worker-{k}-{tag}.log")
                for k in (2, 3)
            ]  # fmt: skip

        def state() -> dict:
            try:
                return json.loads(store.read("state.json"))
            except (OSError, ValueError):
                return {}

        first = coordinator(0, tmp_path / "job.yaml", name="coordinator-0.log")
        wait_for(lambda: joined(0) or first.poll() is not None, 90, "host 0's join file in the bucket")
        assert first.poll() is None, _log(tmp_path, "coordinator-0.log")
        old = workers("a")
        ckpt = lambda: (state().get("latest_checkpoint") or {}).get("step", 0)  # noqa: E731
        wait_for(lambda: ckpt() >= 10 or first.poll() is not None, 120, "a checkpoint at step >= 10")
        for p in [first, *old]:  # host 0 and every process of the run gone at once
            kill_session(p)
        assert state()["status"] == "running" and state()["step"] < state()["total_steps"], state()

        second = coordinator(1, "--resume", name="coordinator-1.log", hide=[tmp_path])
        wait_for(lambda: joined(1) or second.poll() is not None, 90, "host 1's join file in the bucket")
        new = workers("b")
        assert second.wait(timeout=180) == 0, _log(tmp_path, "coordinator-1.log")
        assert all(w.wait(timeout=30) == 0 for w in new), _log(tmp_path, "worker-2-b.log")
        assert state()["status"] == "completed", state()
        events = [json.loads(line) for line in store.read("events.jsonl").splitlines()]
        starts = [e["start_step"] for e in events if e["kind"] == "generation"]
        assert starts[0] == 0 and starts[-1] >= 10, starts
        from lepton.storage.checkpoint import read_model

        got = read_model("model", storage=store)[0]
        assert max_rel_diff(got, weights(ref.run_dir)) <= 1e-4
        print(f"killed after the checkpoint of step {ckpt()}; host 1 resumed from {starts[-1]} and completed")
    finally:
        s3.close()


def test_a_worker_whose_data_plane_address_is_unreachable_is_named_and_left_out(hosts, tmp_path):
    """Host 3's worker binds its data plane on an interface no other host routes to (`--iface` naming
    the wrong one): the probe before gloo's connect names it and its address within seconds, it stops
    with that line, and the others form the generation again without it and complete."""
    data = make_classification_csv(tmp_path / "data.csv", rows=300)
    job = job_dict(data, train__epochs=2, cluster__workers=3, cluster__min_workers=2)
    h = hosts(4)
    h.add_interface(3, "side0", "192.168.213.3")
    coord, _, run = _start(tmp_path, h, job, 3, launch=False)  # waits for three: the first has all
    join = tmp_path.parent / f"{tmp_path.name}.join"
    t0 = time.monotonic()
    ws = [
        h.lepton(k, "worker", "--join", join, *(["--iface", "side0"] if k == 3 else []), hide=[tmp_path],
                 env={"LEPTON_CACHE_DIR": str(tmp_path / f"cache{k}")}, log=tmp_path / f"worker-{k}.log")
        for k in (1, 2, 3)
    ]  # fmt: skip
    bad = ws.pop()
    assert bad.wait(timeout=120) == 1, _log(tmp_path, "worker-3.log")
    named_after = time.monotonic() - t0
    log = _log(tmp_path, "worker-3.log")
    assert (
        "data-plane address 192.168.213.3 (interface side0) cannot be reached from 2 of its 2 peers" in log
    ), log
    assert "Traceback" not in log, log
    assert coord.wait(timeout=180) == 0, _log(tmp_path, "coordinator.log")
    assert all(w.wait(timeout=30) == 0 for w in ws)
    events = _events(run)
    errors = [e for e in events if e["kind"] == "worker_error"]
    assert len(errors) == 1 and "192.168.213.3" in errors[0]["reason"], errors
    paused = [e for e in events if e["kind"] == "regroup" and "192.168.213.3" in str(e)]
    assert paused, [e for e in events if e["kind"] == "regroup"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["workers"] == 2 and json.loads((run / "state.json").read_text())["status"] == "completed"
    print(f"the unreachable worker named and stopped {named_after:.1f} s after it started")
