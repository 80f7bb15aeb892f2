"""The ``lepton`` command: a thin layer over the Python API. User errors print one line, exit 2."""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import time

from . import api
from .cli_args import cpus, positive, split_bind
from .client import CoordinatorClient, CoordinatorUnreachable, read_ca, read_join, read_token
from .console import console, out, status_table, summary_table
from .coordinator.auth import dashboard_url
from .coordinator.server import Listener
from .coordinator.tls import JOIN, wants_tls, write_join
from .errors import LeptonError
from .export.cli import add_export_commands
from .export.report import print_report
from .launch import InterruptCounter, InterruptPolicy, open_run, start_coordinator
from .launch.k8s import add_k8s_command
from .launch.ray_engine import add_ray_command
from .launch.run import StartNotices
from .launch.slurm import add_slurm_command
from .predict import check_output
from .runs import add_runs_command
from .spec import as_job
from .storage.rundir import TOKEN, RunDir
from .worker.lifecycle import run_worker

EXIT_USER_ERROR = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lepton", description="Distributed data-parallel training.")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a job with a local coordinator and K local workers")
    t.add_argument("job", nargs="?", help="job YAML (optional with --resume: the run's job.yaml is used)")
    t.add_argument("--workers", type=positive, help="number of local workers (default: cluster.workers)")
    t.add_argument("--run-dir", help="run directory (default: runs/NAME-TIMESTAMP)")
    t.add_argument(
        "--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint"
    )
    t.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec field, e.g. --set train.epochs=3 (repeatable)",
    )
    t.add_argument("--threads", type=positive, help="torch threads per worker (default: cores / workers)")
    t.add_argument("--no-progress", action="store_true", help="no live progress bar")

    c = sub.add_parser("coordinator", help="run only the coordinator; workers join with `lepton worker`")
    c.add_argument("job", nargs="?")
    c.add_argument("--bind", default="127.0.0.1:0", help="HOST:PORT for the API and the rendezvous store")
    c.add_argument("--run-dir")
    c.add_argument("--workers", type=positive, help="start training when this many workers joined")
    c.add_argument("--resume", action="store_true")
    c.add_argument(
        "--resume-existing",
        action="store_true",
        help="resume the run in --run-dir if there is one, else start it from the job (a coordinator"
        " that its engine restarts: a Kubernetes Deployment, a requeued SLURM job)",
    )
    c.add_argument(
        "--store-port", type=int, default=0, help="the rendezvous store's port (default: any free one)"
    )
    c.add_argument(
        "--advertise",
        metavar="HOST",
        help="the name workers reach this coordinator by (a Service's DNS name), in its URL and certificate",
    )
    c.add_argument("--token-file", help="a new run's token (default: a fresh random one)")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument(
        "--tls",
        choices=("auto", "on", "off"),
        default="auto",
        help="serve HTTPS with the run's own CA (auto: when --bind is not loopback)",
    )

    w = sub.add_parser("worker", help="run one worker that joins a coordinator")
    w.add_argument("--coordinator", help="coordinator URL, e.g. https://10.0.0.1:7000")
    w.add_argument("--token-file", help="file holding the job token (default: $LEPTON_TOKEN)")
    w.add_argument("--ca-file", help="the run's CA (RUN_DIR/tls/ca.pem) for an https coordinator")
    w.add_argument("--join", help="the run's join file (RUN_DIR/join): URL, token and CA in one")
    w.add_argument("--cpus", help="CPU cores to pin this worker to, e.g. 0 or 0,1 or 0-3")
    w.add_argument("--threads", type=positive, help="torch intra-op threads")
    w.add_argument(
        "--connect-timeout",
        type=float,
        default=120.0,
        help="seconds to keep retrying while the coordinator is unreachable at start",
    )
    w.add_argument(
        "--run-files",
        choices=("auto", "shared", "coordinator"),
        default="auto",
        help="reach the run directory as a folder shared with the coordinator, or through the"
        " coordinator's API (auto: shared when this host sees the same run folder)",
    )
    w.add_argument(
        "--iface",
        help="network interface for the data plane (gloo/NCCL); default: the one that reaches"
        " the coordinator",
    )

    s = sub.add_parser("status", help="show a running job and its workers")
    s.add_argument("url", nargs="?", help="the coordinator's URL (or give --run-dir)")
    s.add_argument(
        "--run-dir",
        help="the run (a folder or a URL such as s3://bucket/run): its join file names the coordinator;"
        " when none answers, the run's state.json is shown",
    )
    s.add_argument("--token-file")
    s.add_argument("--ca-file", help="the run's CA (RUN_DIR/tls/ca.pem) for an https coordinator")
    s.add_argument("--json", action="store_true")

    pr = sub.add_parser("predict", help="predict raw CSV/Parquet rows with a trained run")
    pr.add_argument("run_dir")
    pr.add_argument("--input", required=True)
    pr.add_argument("--output", required=True)

    add_export_commands(sub)  # export, serve (lepton/export/cli.py)
    add_runs_command(sub)  # runs (lepton/runs.py)
    add_k8s_command(sub)  # k8s (lepton/launch/k8s.py)
    add_slurm_command(sub)  # slurm (lepton/launch/slurm.py)
    add_ray_command(sub)  # ray (lepton/launch/ray_engine.py)
    return p


def cmd_train(a) -> int:
    if not a.job and not a.resume:
        raise LeptonError("lepton train: give a job file (or --resume --run-dir DIR)")
    res = api.train(
        a.job,
        workers=a.workers,
        run_dir=a.run_dir,
        resume=a.resume,
        overrides=a.overrides,
        progress=not a.no_progress,
        threads=a.threads,
    )
    code = _finish(
        res.status,
        res.reason,
        res.summary,
        res.run_dir,
        console,
        out,
        summary_table,
        f"lepton train --resume --run-dir {res.run_dir}",
    )
    if res.export:
        print_report(res.export, out)
    if res.export_error:  # after the summary: the trained model is there, only its export failed
        raise LeptonError(f"training completed (summary above), but the export failed: {res.export_error}")
    return code


def _finish(status, reason, summary, run_dir, console, out, summary_table, resume: str) -> int:
    """The summary table, or why the run ended and ``resume`` (the command that continues it)."""
    if status == "completed":
        out.print(summary_table(summary, str(run_dir)))
        return 0
    # soft_wrap: the reason stays one line (a file path in it must not be cut) at any console width
    console.print(f"[red]run {status}[/red]: {reason}", highlight=False, soft_wrap=True)
    console.print(f"resume with: {resume}", highlight=False, soft_wrap=True)
    return EXIT_INTERRUPTED if status == "stopped" else EXIT_FAILED


def cmd_coordinator(a) -> int:
    host, port = split_bind(a.bind)
    if a.resume_existing:
        if not a.run_dir:
            raise LeptonError("--resume-existing needs --run-dir DIR (the run to continue or start)")
        run = RunDir(a.run_dir)
        if run.holds_run():
            if run.read_state().get("status") == "completed":
                return _hold_completed(run)
            a.resume, a.overrides = True, []  # the run keeps its own job
    if not a.job and not a.resume:
        raise LeptonError("lepton coordinator: give a job file (or --resume --run-dir DIR)")
    if a.resume and a.overrides:
        raise LeptonError(api.RESUME_KEEPS_THE_SPEC)
    overrides = list(a.overrides) + ([f"cluster.workers={a.workers}"] if a.workers and not a.resume else [])
    job = None if a.resume else as_job(a.job, overrides)
    token = read_token(a.token_file) if a.token_file else None
    try:
        listener = Listener(host, port, store_port=a.store_port, advertise=a.advertise)
    except OSError as e:
        raise LeptonError(f"--bind {a.bind} (--store-port {a.store_port}): {e.strerror or e}") from None
    opened = open_run(job, a.run_dir, a.resume, a.workers, token=token)
    server = start_coordinator(opened, listener, tls=wants_tls(a.tls, host))
    join = write_join(opened.run, server.url, opened.token, server.tls.ca_pem if server.tls else None)
    print(f"coordinator listening on {server.url}", flush=True)
    token_file = opened.run.locate(TOKEN)
    print(f"token file: {token_file}", flush=True)
    how = "a worker host reads it with" if "://" in str(join) else "copy it to a worker host:"
    print(f"join file: {join} ({how} lepton worker --join FILE)", flush=True)
    print(f"dashboard: {dashboard_url(server.url, opened.token)}", flush=True)
    notices = StartNotices(
        f"lepton worker --join {join}"
        if server.tls
        else f"lepton worker --coordinator {server.url} --token-file {token_file}"
    )
    policy = InterruptPolicy()
    with InterruptCounter() as interrupts:

        def on_poll(_status) -> None:
            with server.lock:
                policy.apply(interrupts.count, server.coord)
                line = notices.line(server.coord)
            if line:
                print(line, flush=True)

        server.wait(on_poll=on_poll)
    server.stop(linger_s=1.0)  # remote workers hear 'exit' on their next poll
    c = server.coord
    bind = (
        f"[{listener.host}]:{listener.port}" if ":" in listener.host else f"{listener.host}:{listener.port}"
    )
    return _finish(
        c.phase.value,
        c.reason,
        c.summary,
        opened.run.where(),
        console,
        out,
        summary_table,
        f"lepton coordinator --resume --run-dir {opened.run.where()} --bind {bind}",
    )


def _hold_completed(run: RunDir) -> int:
    """``--resume-existing`` on a run that completed: nothing to do. In a Kubernetes pod (a Deployment
    restarts every exit, which would loop) it waits for its stop signal; elsewhere (a requeued SLURM
    job) it exits at once."""
    if not os.environ.get("KUBERNETES_SERVICE_HOST"):
        print(f"{run.where()}: the run completed; nothing to resume", flush=True)
        return 0
    with InterruptCounter() as interrupts:  # before the line: whoever reads it may signal at once
        print(f"{run.where()}: the run completed; nothing to resume (waiting for SIGTERM)", flush=True)
        while not interrupts.count:
            time.sleep(1.0)
    return 0


def cmd_worker(a) -> int:
    if a.iface:  # read by gloo and NCCL when each group is made (comm/group.py, comm/net.py)
        try:
            socket.if_nametoindex(a.iface)
        except OSError:
            raise LeptonError(f"--iface {a.iface}: no network interface of that name on this host") from None
        os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = a.iface
    if a.join:
        if a.coordinator or a.token_file or a.ca_file:
            raise LeptonError(
                "--join holds the URL, token and CA: give it without --coordinator/--token-file/--ca-file"
            )
        url, token, ca = read_join(a.join, wait_s=a.connect_timeout)
    elif a.coordinator:
        url, token, ca = a.coordinator, read_token(a.token_file), read_ca(a.ca_file)
    else:
        raise LeptonError("lepton worker: give --coordinator URL (and a token), or --join RUN_DIR/join")
    return run_worker(url, token, cpus(a.cpus), a.threads, a.connect_timeout, a.run_files, ca)


def cmd_status(a) -> int:
    if a.run_dir:
        if a.url or a.token_file or a.ca_file:
            raise LeptonError(
                "--run-dir reads the URL, token and CA from the run's join file: give it without a URL,"
                " --token-file or --ca-file"
            )
        st = _status_from_run(a.run_dir)
        if st is None:
            return 0
    elif a.url:
        st = CoordinatorClient(a.url, read_token(a.token_file), ca=read_ca(a.ca_file)).status()
    else:
        raise LeptonError("lepton status: give the coordinator's URL (and a token), or --run-dir DIR")
    if a.json:
        print(json.dumps(st, indent=2))
        return 0
    out.print(status_table(st))
    for ev in st["events"][-5:]:
        out.print(f"  {ev['kind']}: {ev['reason']}", highlight=False)
    return 0


def _status_from_run(where: str) -> dict | None:
    """The live status of the run's coordinator, named by its join file; when there is none or it does
    not answer, the run's state.json printed instead (and None returned)."""
    run = RunDir(where)
    if not run.holds_run():
        raise LeptonError(f"{run.where()}: no run here (no job.yaml / state.json)")
    why = "the run has no join file (`lepton train` runs keep their coordinator to themselves)"
    if run.storage.exists(JOIN):
        url, token, ca = read_join(str(run.locate(JOIN)))
        try:
            return CoordinatorClient(url, token, timeout_s=5.0, ca=ca).status()
        except CoordinatorUnreachable as e:
            why = str(e)
    state = run.read_state()
    step, total = state.get("step", "-"), state.get("total_steps")
    reason = f": {state['reason']}" if state.get("reason") else ""
    out.print(
        f"{run.where()}: {state.get('status', 'unknown')} at step {step}{f'/{total}' if total else ''}"
        f" (generation {state.get('generation', '-')}){reason}",
        highlight=False,
        soft_wrap=True,
    )
    out.print(f"no live coordinator: {why}", highlight=False, soft_wrap=True)
    return None


def cmd_predict(a) -> int:
    check_output(a.output, a.input, label="--output ", model_path=a.run_dir)  # before any work
    p = api.load(a.run_dir)
    result = p.predict_file(a.input)
    p.write_csv(result, a.output)
    print(f"{len(result['prediction'])} predictions written to {a.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    handler = {
        "train": cmd_train,
        "coordinator": cmd_coordinator,
        "worker": cmd_worker,
        "status": cmd_status,
        "predict": cmd_predict,
    }.get(a.cmd) or a.handler
    try:
        return handler(a)
    except LeptonError as e:
        print(f"lepton {a.cmd}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        # Free what the command left in reference cycles (a traceback holding an ONNX Runtime session,
        # say) now, not during interpreter shutdown: destroyed that late, ORT's thread pool aborts the
        # process ("terminate called without an active exception"; seen 3 times in 40 runs).
        gc.collect()


if __name__ == "__main__":
    sys.exit(main())
