"""``lepton k8s``: no Kubernetes cluster runs here. The printed manifests are validated against the
Kubernetes OpenAPI schemas (kubernetes-validate, strict: no unknown fields) and read back for what
makes Lepton's recovery work there: the workers' restart policy, the Secret, the Service and the
requests. The coordinator flags they rely on (``--resume-existing``, ``--store-port``, ``--advertise``,
``--token-file``) and ``worker --join`` waiting for the join file run for real in test_startup.py-style
processes below."""

from __future__ import annotations

import pytest
import yaml

from conftest import expect_cli_error, job_dict, make_classification_csv, run_cli

kubernetes_validate = pytest.importorskip("kubernetes_validate")

K8S_VERSION = "1.33"  # a version the schemas of kubernetes-validate cover


def _print(tmp_path, *extra, job=None) -> list[dict]:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job or job_dict("s3://data/train.csv")))
    r = run_cli(
        "k8s", path, "--workers", 3, "--image", "registry.example/lepton:1", "--storage", "s3://bucket/runs",
        "--env-secret", "aws", *extra, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return list(yaml.safe_load_all(r.stdout))


def test_the_manifests_validate_against_the_kubernetes_schemas(tmp_path):
    objects = _print(tmp_path)
    assert [o["kind"] for o in objects] == ["ConfigMap", "Secret", "Service", "Deployment", "Job"]
    for o in objects:
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)  # raises ValidationError


def test_one_worker_pod_dying_is_restarted_alone_and_the_coordinator_resumes(tmp_path):
    cm, secret, service, deploy, job = _print(tmp_path, "--namespace", "ml", "--cpus", "2", "--memory", "3Gi")
    name = "t"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 3
    assert spec["backoffLimit"] > 0  # the Job retries a pod; nothing restarts the set
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "OnFailure"  # a dead container restarts in place and rejoins
    (worker,) = pod["containers"]
    assert worker["command"][:4] == ["lepton", "worker", "--join", f"s3://bucket/runs/{name}/join"]
    assert worker["resources"]["requests"] == {"cpu": "2", "memory": "3Gi"}
    assert worker["envFrom"] == [{"secretRef": {"name": "aws"}}]

    assert len(secret["stringData"]["token"]) >= 32
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"]["type"] == "Recreate"
    (coord,) = deploy["spec"]["template"]["spec"]["containers"]
    cmd = coord["command"]
    assert cmd[:3] == ["lepton", "coordinator", "/etc/lepton/job/job.yaml"]
    flag = lambda f: cmd[cmd.index(f) + 1]  # noqa: E731
    assert flag("--run-dir") == f"s3://bucket/runs/{name}" and "--resume-existing" in cmd
    assert flag("--advertise") == f"{service['metadata']['name']}.ml.svc"
    assert flag("--token-file").startswith("/etc/lepton/token/")
    assert coord["livenessProbe"]["httpGet"]["path"] == "/healthz"
    volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"]["volumes"]}
    assert volumes["token"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert volumes["job"]["configMap"]["name"] == cm["metadata"]["name"]
    assert yaml.safe_load(cm["data"]["job.yaml"])["cluster"]["workers"] == 3

    # the Service reaches the coordinator's pod, on both of its ports
    assert service["spec"]["selector"] == deploy["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports == {"api": int(flag("--bind").rpartition(":")[2]), "store": int(flag("--store-port"))}
    assert {p["containerPort"] for p in coord["ports"]} == set(ports.values())


def test_a_cuda_job_asks_for_a_gpu_per_worker(tmp_path):
    objects = _print(tmp_path, job=job_dict("s3://data/train.csv", cluster__device="cuda"))
    worker = objects[-1]["spec"]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    kubernetes_validate.validate(objects[-1], K8S_VERSION, strict=True)


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--storage", "/mnt/runs"], "--storage '/mnt/runs': give an object-storage URL"),
        (["--namespace", "Bad_NS"], "--namespace 'Bad_NS'"),
        (["--cpus", "two"], "--cpus 'two': not a Kubernetes quantity"),
        (["--image", ""], "--image: give the container image"),
    ],
)
def test_bad_flags_are_one_line(tmp_path, flags, needle):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job_dict(make_classification_csv(tmp_path / "d.csv", rows=50))))
    base = {"--workers": "2", "--image": "img", "--storage": "s3://b/r"}
    base.update(dict(zip(flags[::2], flags[1::2])))
    r = run_cli("k8s", path, *[x for kv in base.items() for x in kv], timeout=60)
    expect_cli_error(r, needle)


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_the_pods_commands_run_a_job_that_survives_a_coordinator_restart(procs, tmp_path):
    """What the manifests start, as processes of this machine with the run on S3 (moto): two workers
    started before their coordinator wait for the join file; the coordinator (`--resume-existing`, a fixed
    `--store-port`, `--advertise`d name in its certificate, the Secret's `--token-file`) is SIGKILLed
    mid-run and started again with the same command, as a Deployment does; the workers ride out the
    outage at the same URL, are adopted, and the run ends with the uninterrupted run's model. Started
    once more on the completed run, it holds until SIGTERM (no restart loop)."""
    import json
    import signal

    pytest.importorskip("s3fs")
    from conftest import free_port, kill_session, max_rel_diff, wait_for, weights
    from lepton.storage.checkpoint import read_model
    from s3server import S3Server, data_and_reference

    s3 = S3Server()
    try:
        over = dict(train__epochs=4, checkpoint__every_steps=5, cluster__shares=[0.5, 0.5])
        bucket, data_url, ref = data_and_reference(s3, tmp_path, **over)
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(job_dict(data_url, **over)))
        (tmp_path / "token").write_text("k8s-secret-token-0123456789abcdefghijklmnop\n")
        url = f"s3://{bucket}/runs/t"
        store = s3.storage(url)
        port, store_port = free_port(), free_port()
        pace = {**s3.env, "LEPTON_FAULTS": "slow:rank=*:seconds=0.05"}
        workers = [
            procs.lepton("worker", "--join", f"{url}/join", "--connect-timeout", 120, env=pace)
            for _ in range(2)
        ]

        def coordinator(**env):
            return procs.lepton(
                "coordinator", tmp_path / "job.yaml", "--run-dir", url, "--resume-existing",
                "--bind", f"127.0.0.1:{port}", "--store-port", store_port, "--advertise", "localhost",
                "--tls", "on", "--token-file", tmp_path / "token", "--workers", 2, env={**s3.env, **env},
            )  # fmt: skip

        def state() -> dict:
            try:
                return json.loads(store.read("state.json"))
            except (OSError, ValueError):
                return {}

        first = coordinator()
        wait_for(lambda: (state().get("latest_checkpoint") or {}).get("step", 0) >= 10, 120, "step 10")
        join = json.loads(store.read("join"))
        assert join["url"] == f"https://localhost:{port}" and join["token"].startswith("k8s-secret-token")
        kill_session(first)  # the pod is gone; its replacement runs the same command
        second = coordinator()
        out, err = second.communicate(timeout=180)
        assert second.returncode == 0, err
        assert all(w.wait(timeout=30) == 0 for w in workers), [w.stderr.read() for w in workers]
        events = [json.loads(line) for line in store.read("events.jsonl").splitlines()]
        adopted = [e for e in events if e["kind"] == "worker_adopted"]
        assert adopted, sorted({e["kind"] for e in events})  # the same two workers, not new ones
        assert max_rel_diff(read_model("model", storage=store)[0], weights(ref.run_dir)) <= 1e-4

        third = coordinator(KUBERNETES_SERVICE_HOST="10.0.0.1")  # as in a pod
        wait_for(lambda: "nothing to resume" in (third.stdout.readline() or ""), 60, "the completed notice")
        third.send_signal(signal.SIGTERM)
        assert third.wait(timeout=30) == 0
    finally:
        s3.close()


def test_a_worker_waits_for_its_join_file_then_says_it_is_missing(tmp_path):
    missing = tmp_path / "run" / "join"
    r = run_cli("worker", "--join", missing, "--connect-timeout", 2, timeout=60)
    expect_cli_error(r, str(missing), "join file not found")
    assert f"waiting up to 2 s for the join file {missing}" in r.stdout
