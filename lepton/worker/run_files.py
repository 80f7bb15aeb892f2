"""How a worker reaches the run directory: the same folder as the coordinator's, a storage URL both
can read, or the coordinator's file API (issue 26: a worker needs the URL and the token, nothing else).

``--run-files auto`` (the default) takes the coordinator's folder only when it is provably the same
run: the folder of that name on this host holds a token file with this worker's token. Otherwise a
folder of the same name elsewhere (another host's /tmp/run) would be read as this run's. A URL
(``s3://...``) is opened with fsspec; anything else goes through the coordinator (``RemoteStorage``).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import LeptonError
from ..protocol import RegisterResponse
from ..remote import RemoteStorage
from ..spec import JobSpec
from ..storage.backend import FsspecStorage
from ..storage.rundir import INIT_WEIGHTS, TOKEN, RunDir

RUN_FILES = ("auto", "shared", "coordinator")


def _same_run(folder: Path, token: str) -> bool:
    try:
        return (folder / TOKEN).read_text().strip() == token
    except (OSError, UnicodeDecodeError):
        return False


def open_run_files(
    reg: RegisterResponse, url: str, token: str, how: str = "auto", ca: str | None = None
) -> RunDir:
    """The run directory of the coordinator at ``url``, reached as ``how`` says (``RUN_FILES``)."""
    if how not in RUN_FILES:
        raise LeptonError(f"--run-files {how!r}: expected one of {', '.join(RUN_FILES)}")
    where = reg.run_dir
    if how != "coordinator":
        if "://" in where:
            return RunDir(FsspecStorage(where))
        if _same_run(Path(where), token):
            return RunDir(where)
        if how == "shared":
            raise LeptonError(
                f"--run-files shared: {where} is not this run's folder on this host (no token file"
                " with this token); use --run-files auto to fetch through the coordinator"
            )
    return RunDir(RemoteStorage(url, token, reg.worker_id, reg.credential, where, ca=ca))


def localise(job: JobSpec, run: RunDir) -> None:
    """The job's paths into the run directory made readable here: ``model.init_weights`` names the
    run's copy on the coordinator's host (``RunDir.copy_init_weights``); a worker elsewhere reads a
    cached download of it."""
    if job.model.init_weights and run.storage.local_root is None and run.storage.exists(INIT_WEIGHTS):
        if str(job.model.init_weights) == run.where(INIT_WEIGHTS):
            job.model.init_weights = str(run.storage.local_path(INIT_WEIGHTS))
