"""A real S3-compatible server for the tests: moto's standalone server (``moto_server``), a process of
its own, reached over HTTP as any S3 endpoint is (not a mock inside the client)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

CREDENTIALS = {"key": "testing", "secret": "testing"}


class S3Server:
    """``moto_server`` listening on ``host``; ``env`` is what a process needs to reach it through the
    usual AWS variables (s3fs and botocore read ``AWS_ENDPOINT_URL``)."""

    def __init__(self, host: str = "127.0.0.1"):
        server = shutil.which("moto_server", path=str(Path(sys.executable).parent))
        assert server, "moto[server] is in the test extras: `make test` installs it"
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [server, "-H", host, "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.url = f"http://{host}:{port}"
        self.env = {
            "AWS_ACCESS_KEY_ID": CREDENTIALS["key"],
            "AWS_SECRET_ACCESS_KEY": CREDENTIALS["secret"],
            "AWS_DEFAULT_REGION": "us-east-1",  # moto's default: no location constraint
            "AWS_ENDPOINT_URL": self.url,
        }
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection((host, port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise AssertionError("moto_server did not start") from None
                time.sleep(0.1)

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(**CREDENTIALS, client_kwargs={"endpoint_url": self.url})

    def bucket(self) -> str:
        """A new, empty bucket."""
        name = f"lepton-{uuid.uuid4().hex[:12]}"
        self.fs().mkdir(name)
        return name

    def storage(self, url: str):
        from lepton.storage.backend import FsspecStorage

        return FsspecStorage(url, **CREDENTIALS, client_kwargs={"endpoint_url": self.url})

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


def data_and_reference(s3: S3Server, tmp_path: Path, **over):
    """A 400-row CSV in a new bucket, and the reference: ``lepton.train`` of 2 workers on its local copy
    with the job fields ``over``. Returns (bucket, the data's URL, the reference's result)."""
    import lepton
    from conftest import job_dict, make_classification_csv

    data = make_classification_csv(tmp_path / "data.csv", rows=400)
    bucket = s3.bucket()
    s3.fs().put_file(str(data), f"{bucket}/in/data.csv")
    ref = lepton.train(job_dict(data, **over), workers=2, run_dir=tmp_path / "ref")
    assert ref.status == "completed", ref.reason
    return bucket, f"s3://{bucket}/in/data.csv", ref
