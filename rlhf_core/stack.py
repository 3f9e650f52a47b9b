"""`rlhf stack`: the real servers on this machine without Docker, on 127.0.0.1.

SeaweedFS (S3), an MLflow tracking server (SQLite backend, artifacts proxied to S3), a Prefect server
and a Prefect worker for a `process` work pool. Each runs in its own session (process group) with its
log under the stack folder; `stack.json` there records what `up` started (PID and the kernel's start
time of that PID, so `down` never signals a recycled PID) and `down` stops exactly that.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhf_core.config import STACK_HOST, StackConfig
from rlhf_core.errors import UserError
from rlhf_core.services import port_is_free, weed_mini_command

HOST = STACK_HOST
STATE_FILE = "stack.json"
CREDENTIALS_FILE = "credentials.env"
"""The servers' credentials (mode 0600), in the clients' variable names: `set -a; . FILE; set +a`
gives a shell what the worker and its pipeline runs use."""
MLFLOW_ADMIN = "rlhf"


@dataclass
class Started:
    name: str
    pid: int
    start_ticks: (
        int  # /proc/<pid>/stat field 22: tells this process from a later one with the same PID
    )
    url: str
    log: str
    cmd: list[str]


def _start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def is_ours(s: Started) -> bool:
    """The recorded process is still alive (a zombie is not: its parent has gone, and only init may reap it)."""
    return _start_ticks(s.pid) == s.start_ticks and not _zombie(s.pid)


BASE_ENV = re.compile(
    r"^(PATH|HOME|USER|LOGNAME|LANG|LC_[A-Z]+|TZ|TMPDIR|VIRTUAL_ENV|SSL_CERT_FILE|SSL_CERT_DIR)$"
)
"""What every server needs of the caller's environment; nothing else of it is passed on (a
shell's tokens and keys stay with the shell)."""

PIPELINE_ENV = re.compile(
    r"^(RLHF_[A-Z0-9_]+|HF_(HOME|HUB_[A-Z_]+|DATASETS_[A-Z_]+)|TRANSFORMERS_[A-Z_]+|OMP_NUM_THREADS"
    r"|MKL_NUM_THREADS"
    r"|CUDA_VISIBLE_DEVICES|AWS_(DEFAULT_)?REGION|(?!PREFECT_)[A-Z][A-Z0-9_]*_API_KEY)$"
)
"""What the worker's pipeline runs read besides: project settings, model caches and offline flags,
thread counts, the judge's API key (labels.judge.api_key_env ends in _API_KEY). Not a Prefect
Cloud key: it would take precedence over the stack's auth string."""


def service_env(allowed: re.Pattern = BASE_ENV) -> dict[str, str]:
    """The caller's environment variables whose names `allowed` matches."""
    return {k: v for k, v in os.environ.items() if allowed.match(k)}


def load_credentials(path: Path) -> dict[str, str]:
    """The stack's credentials file, refused when others may read it."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise UserError(f"{path} is readable by others (mode {mode:o}): chmod 600 it")
    pairs = (line.split("=", 1) for line in path.read_text().splitlines())
    return {k: v for k, v in (p for p in pairs if len(p) == 2) if not k.startswith("#")}


def basic_auth(user_colon_password: str) -> dict[str, str]:
    """The Authorization header of HTTP basic authentication."""
    return {"Authorization": "Basic " + base64.b64encode(user_colon_password.encode()).decode()}


def _http_ok(
    url: str,
    method: str = "GET",
    body: dict | None = None,
    timeout: float = 3.0,
    headers: dict[str, str] | None = None,
) -> tuple[bool, object]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url,
        data=data,
        method=method,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            text = resp.read().decode()
            try:
                return 200 <= resp.status < 300, json.loads(text)
            except json.JSONDecodeError:
                return 200 <= resp.status < 300, text
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return False, str(exc)


class Stack:
    ORDER = ("s3", "mlflow", "prefect", "worker")

    def __init__(self, settings: StackConfig, root: Path):
        self.s = settings
        self.root = Path(root)

    # -- state ---------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.root / STATE_FILE

    @property
    def credentials_path(self) -> Path:
        return self.root / CREDENTIALS_FILE

    def credentials(self) -> dict[str, str]:
        """The servers' credentials, generated at the first `up` (a fresh MLflow user store and S3
        store go with fresh credentials: MLflow creates its admin only in an empty store, and
        SeaweedFS takes its keys at start)."""
        if not self.credentials_path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "data" / "mlflow-auth.db").unlink(missing_ok=True)
            creds = {
                "PREFECT_API_AUTH_STRING": f"rlhf:{secrets.token_urlsafe(24)}",
                "MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN,
                "MLFLOW_TRACKING_PASSWORD": secrets.token_urlsafe(24),
            }
            text = "# rlhf stack credentials; a shell gets them with: set -a; . THIS_FILE; set +a\n"
            fd = os.open(self.credentials_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(text + "".join(f"{k}={v}\n" for k, v in creds.items()))
        creds = load_credentials(self.credentials_path)
        if "AWS_ACCESS_KEY_ID" not in creds:  # the S3 store's own keys, never a shell's cloud keys
            s3 = {
                "AWS_ACCESS_KEY_ID": f"rlhf-{secrets.token_hex(6)}",
                "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
            }
            with open(self.credentials_path, "a") as fh:
                fh.write("".join(f"{k}={v}\n" for k, v in s3.items()))
            creds |= s3
        return creds

    def _auth(self, service: str) -> dict[str, str]:
        """Authorization header for the stack's Prefect API or MLflow server (none before `up`)."""
        if not self.credentials_path.exists():
            return {}
        c = self.credentials()
        if service == "prefect":
            return basic_auth(c["PREFECT_API_AUTH_STRING"])
        return basic_auth(f"{c['MLFLOW_TRACKING_USERNAME']}:{c['MLFLOW_TRACKING_PASSWORD']}")

    def started(self) -> dict[str, Started]:
        if not self.state_path.exists():
            return {}
        raw = json.loads(self.state_path.read_text())
        return {k: Started(**v) for k, v in raw.get("services", {}).items()}

    def _save(self, started: dict[str, Started]) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "services": {k: asdict(v) for k, v in started.items()},
                    "settings": self.s.model_dump(mode="json"),
                },
                indent=2,
            )
        )
        os.replace(tmp, self.state_path)

    # -- health --------------------------------------------------------------------------------
    def health(self) -> dict[str, tuple[bool, str, str]]:
        """name -> (healthy, url, detail)."""
        s = self.s
        out = {}
        ok, detail = self._s3_health()
        out["s3"] = (ok, s.s3_url, detail)
        ok, body = _http_ok(f"{s.mlflow_url}/health")
        out["mlflow"] = (ok, s.mlflow_url, "ok" if ok else str(body))
        ok, body = _http_ok(f"{s.prefect_url}/health")
        out["prefect"] = (ok, s.prefect_ui, "ok" if ok else str(body))
        ok, detail = self._worker_health() if out["prefect"][0] else (False, "prefect server down")
        out["worker"] = (ok, f"{s.prefect_ui}/work-pools/work-pool/{s.work_pool}", detail)
        return out

    def _s3_health(self) -> tuple[bool, str]:
        try:
            import boto3
            from botocore.config import Config

            creds = self.credentials() if self.credentials_path.exists() else {}
            key, secret = creds.get("AWS_ACCESS_KEY_ID", ""), creds.get("AWS_SECRET_ACCESS_KEY", "")
            client = boto3.client(
                "s3",
                endpoint_url=self.s.s3_url,
                aws_access_key_id=key,
                aws_secret_access_key=secret,
                region_name="us-east-1",
                config=Config(connect_timeout=2, read_timeout=3, retries={"max_attempts": 1}),
            )
            client.head_bucket(Bucket=self.s.bucket)
            return True, f"bucket {self.s.bucket}"
        except Exception as exc:  # noqa: BLE001 - any failure is "not healthy", with its reason
            return False, str(exc).splitlines()[0][:200]

    @property
    def worker_name(self) -> str:
        return f"rlhf-worker-{self.s.prefect_port}"

    def _worker_health(self, heartbeat_after: float | None = None) -> tuple[bool, str]:
        """Our worker is ONLINE (and, when starting it, has sent a heartbeat since it was launched: the server keeps a
        stopped worker ONLINE for a while after its last heartbeat)."""
        from datetime import datetime

        ok, body = _http_ok(
            f"{self.s.prefect_url}/work_pools/{self.s.work_pool}/workers/filter",
            "POST",
            {},
            headers=self._auth("prefect"),
        )
        if not ok:
            return False, f"work pool {self.s.work_pool}: {body}"
        ours = [
            w for w in body if w.get("name") == self.worker_name and w.get("status") == "ONLINE"
        ]
        if heartbeat_after is not None:
            ours = [
                w
                for w in ours
                if w.get("last_heartbeat_time")
                and datetime.fromisoformat(
                    w["last_heartbeat_time"].replace("Z", "+00:00")
                ).timestamp()
                >= heartbeat_after
            ]
        return (
            (True, f"{self.worker_name} online in pool {self.s.work_pool}")
            if ours
            else (False, f"{self.worker_name} not online in pool {self.s.work_pool}")
        )

    # -- up / down -----------------------------------------------------------------------------
    def _commands(self) -> dict[str, tuple[list[str], dict[str, str], Callable[[], bool]]]:
        s, creds = self.s, self.credentials()
        bin_dir = Path(sys.executable).parent
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        base = service_env()
        s3_env = {k: v for k, v in creds.items() if k.startswith("AWS_")} | base
        prefect_env = {  # the Prefect server holds no S3 or API keys
            **base,
            "PREFECT_HOME": str(self.root / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
            "PREFECT_UI_API_URL": s.prefect_url,
            "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": s.prefect_ui,  # its own UI, no other page
        }
        auth_ini = self.root / "mlflow-auth.ini"
        auth_ini.write_text(
            "[mlflow]\n"
            "default_permission = NO_PERMISSIONS\n"
            f"database_uri = sqlite:///{data / 'mlflow-auth.db'}\n"
            f"admin_username = {creds['MLFLOW_TRACKING_USERNAME']}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        from rlhf_core.services import free_ports

        master, volume, filer, admin = free_ports(4, with_grpc=True, start=30000, stop=40000)
        launched = time.time() - 1.0
        return {
            "s3": (
                weed_mini_command(
                    data / "seaweedfs", HOST, s.s3_port, master, volume, filer, admin, [s.bucket]
                ),
                s3_env,
                lambda: self._s3_health()[0],
            ),
            # the server alone talks to S3 (proxied artifacts): clients need no S3 credentials for MLflow
            "mlflow": (
                [
                    str(bin_dir / "mlflow"),
                    "server",
                    "--host",
                    HOST,
                    "--port",
                    str(s.mlflow_port),
                    "--workers",
                    "1",
                    "--backend-store-uri",
                    f"sqlite:///{data / 'mlflow.db'}",
                    "--serve-artifacts",
                    "--artifacts-destination",
                    f"s3://{s.bucket}/mlflow",
                    "--app-name",
                    "basic-auth",
                ],
                {
                    **s3_env,
                    "MLFLOW_S3_ENDPOINT_URL": s.s3_url,
                    "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
                    "MLFLOW_AUTH_ADMIN_PASSWORD": creds["MLFLOW_TRACKING_PASSWORD"],
                    # one server process: its CSRF key need not outlive it
                    "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(32),
                },
                lambda: _http_ok(f"{s.mlflow_url}/health")[0],
            ),
            "prefect": (
                [
                    str(bin_dir / "prefect"),
                    "server",
                    "start",
                    "--host",
                    HOST,
                    "--port",
                    str(s.prefect_port),
                    "--analytics-off",
                ],
                {**prefect_env, "PREFECT_SERVER_API_AUTH_STRING": creds["PREFECT_API_AUTH_STRING"]},
                lambda: _http_ok(f"{s.prefect_url}/health")[0],
            ),
            "worker": (
                [
                    str(bin_dir / "prefect"),
                    "worker",
                    "start",
                    "--pool",
                    s.work_pool,
                    "--type",
                    "process",
                    "--name",
                    self.worker_name,
                ],
                {
                    **prefect_env,
                    **s3_env,
                    **service_env(PIPELINE_ENV),  # the runs it starts read these
                    **creds,
                    "PREFECT_API_URL": s.prefect_url,
                    "MLFLOW_TRACKING_URI": s.mlflow_url,
                    "RLHF_S3_ENDPOINT_URL": s.s3_url,
                },
                lambda: self._worker_health(launched)[0],
            ),
        }

    def up(self, echo: Callable[[str], None] = print) -> dict[str, tuple[bool, str, str]]:
        """Start what is not running; return once every service is healthy (or raise, stopping what this call started)."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        started = {k: v for k, v in self.started().items() if is_ours(v)}
        health = self.health()
        ports = {"s3": self.s.s3_port, "mlflow": self.s.mlflow_port, "prefect": self.s.prefect_port}
        for name, port in ports.items():
            if name not in started and not port_is_free(port):
                raise UserError(
                    f"port {port} on {HOST} is taken by a program this stack did not start (stack.{name}_port)"
                )
        try:
            commands = self._commands()
        except RuntimeError as exc:  # e.g. no `weed` binary
            raise UserError(str(exc)) from None
        for name, (cmd, _, _) in commands.items():
            if not Path(cmd[0]).exists():
                raise UserError(
                    f"{cmd[0]}: not found ({name}); install the project with `make install`"
                )
        new: list[str] = []
        try:
            for name in self.ORDER:
                if name in started and health[name][0]:
                    echo(f"{name}: already running (pid {started[name].pid})")
                    continue
                if name in started:  # ours but unhealthy: restart it
                    self._stop_one(started.pop(name))
                cmd, env, healthy = commands[name]
                log = self.root / "logs" / f"{name}.log"
                with open(log, "ab") as fh:
                    proc = subprocess.Popen(
                        cmd,
                        stdout=fh,
                        stderr=subprocess.STDOUT,
                        env=env,
                        cwd=self.root,
                        start_new_session=True,
                    )
                started[name] = Started(
                    name,
                    proc.pid,
                    _start_ticks(proc.pid) or -1,
                    self.health_url(name),
                    str(log),
                    cmd,
                )
                new.append(name)
                self._save(started)
                self._wait(name, proc, healthy, log)
                echo(f"{name}: started (pid {proc.pid}), {self.health_url(name)}")
        except BaseException:
            for name in reversed(new):
                self._stop_one(started.pop(name))
            self._save(started)
            raise
        return self.health()

    def health_url(self, name: str) -> str:
        s = self.s
        return {
            "s3": s.s3_url,
            "mlflow": s.mlflow_url,
            "prefect": s.prefect_ui,
            "worker": f"{s.prefect_ui}/work-pools/work-pool/{s.work_pool}",
        }[name]

    def _wait(
        self, name: str, proc: subprocess.Popen, healthy: Callable[[], bool], log: Path
    ) -> None:
        deadline = time.monotonic() + self.s.startup_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise UserError(
                    f"{name} exited with code {proc.returncode} while starting; see {log}"
                )
            if healthy():
                return
            time.sleep(0.5)
        raise UserError(f"{name} not healthy after {self.s.startup_timeout_s:.0f}s; see {log}")

    def _stop_one(self, s: Started, timeout: float = 20.0) -> bool:
        """SIGTERM the process group `up` started, then SIGKILL whatever of it is left (children such as
        the MLflow server's uvicorn workers included). False when the PID is no longer the one we started."""
        if not is_ours(s):
            return False
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(s.pid, sig)
            except ProcessLookupError:
                return True
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                _reap(s.pid)
                if not _group_alive(s.pid):
                    return True
                time.sleep(0.2)
        return not _group_alive(s.pid)

    def down(self, echo: Callable[[str], None] = print) -> list[str]:
        started = self.started()
        stopped = []
        for name in reversed(self.ORDER):
            s = started.get(name)
            if s is None:
                continue
            if self._stop_one(s):
                echo(f"{name}: stopped (pid {s.pid})")
                stopped.append(name)
            else:
                echo(f"{name}: pid {s.pid} is no longer ours; left alone")
            started.pop(name)
            self._save(started)
        if self.state_path.exists() and not started:
            self.state_path.unlink()
        return stopped


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _group_alive(pgid: int) -> bool:
    """Any live (non-zombie) process left in the group."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
