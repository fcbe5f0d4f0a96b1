"""``python -m pipelines.services up|down``: the local stack a newcomer needs (``make up`` / ``make down``).

``up`` starts, from the project root, a Prefect server, the ``train-ntu120/local`` deployment's serving
process (:mod:`pipelines.deploy`), the MLflow UI on the project's store and the model service
(``uvicorn serving.app:app``; it answers /health even before a bundle exists). Each runs in the
background in its own process group, with its pid and log in ``.run/``; ``up`` waits until every one
answers over HTTP, prints the URLs, and stops them all again if one does not come up. ``down`` stops
them (SIGTERM to the group, SIGKILL after a grace period) and removes the pid files. A pid file also
records the process's start time, so a pid that the system has since reused is never signalled.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from pipelines.deploy import DEPLOYMENT
from pipelines.dvc_commands import environment
from pipelines.flow import FLOW_NAME
from stages.tracking import DEFAULT_TRACKING_URI

RUN_DIR = Path(".run")
HOST = "127.0.0.1"
STOP_GRACE_S = 20.0
NAMES = ("deployment", "serving", "mlflow", "prefect")  # stop order: the deployment before its server


@dataclass(frozen=True)
class Service:
    """One background process: ``ready`` says whether it is up; ``url`` is what a user opens."""

    name: str
    command: tuple[str, ...]
    ready: Callable[[], bool]
    url: str
    env: Mapping[str, str] = field(default_factory=dict)


def answers(url: str, check: Callable[[dict], bool] | None = None) -> bool:
    """Whether ``url`` answers 200 (and its JSON body passes ``check``, when given)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return check is None or check(json.load(response))
    except (OSError, ValueError):  # refused, 404, not JSON yet
        return False


@dataclass(frozen=True)
class Stack:
    """The four services of ``make up``."""

    prefect: Service
    deployment: Service
    mlflow: Service
    serving: Service


def stack(prefect_port: int, mlflow_port: int, serve_port: int) -> Stack:
    """The four services on these local ports."""
    python = sys.executable
    api = f"http://{HOST}:{prefect_port}/api"
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)
    ui_args = ("--backend-store-uri", tracking_uri, "--host", HOST, "--port", str(mlflow_port))
    return Stack(
        prefect=Service(
            "prefect",
            (python, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(prefect_port)),
            lambda: answers(f"{api}/health"),
            f"http://{HOST}:{prefect_port}",
        ),
        deployment=Service(
            "deployment",
            (python, "-m", "pipelines.deploy"),
            # READY once the serving process polls the server for the deployment's runs.
            lambda: answers(
                f"{api}/deployments/name/{FLOW_NAME}/{DEPLOYMENT}", lambda d: d.get("status") == "READY"
            ),
            f"{FLOW_NAME}/{DEPLOYMENT}",
            {"PREFECT_API_URL": api},
        ),
        mlflow=Service(
            "mlflow",
            (python, "-m", "mlflow", "ui", *ui_args),
            lambda: answers(f"http://{HOST}:{mlflow_port}/health"),
            f"http://{HOST}:{mlflow_port}",
        ),
        serving=Service(
            "serving",
            (python, "-m", "uvicorn", "serving.app:app", "--host", HOST, "--port", str(serve_port)),
            lambda: answers(f"http://{HOST}:{serve_port}/health"),
            f"http://{HOST}:{serve_port}/docs",
        ),
    )


def start(service: Service, run_dir: Path) -> subprocess.Popen:
    """Start ``service`` in its own session, output appended to ``run_dir/<name>.log``."""
    with open(run_dir / f"{service.name}.log", "ab") as log:
        proc = subprocess.Popen(
            service.command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment(service.env),
            start_new_session=True,
        )
    created = psutil.Process(proc.pid).create_time()
    (run_dir / f"{service.name}.pid").write_text(f"{proc.pid} {created!r}\n")
    return proc


def recorded(run_dir: Path, name: str) -> psutil.Process | None:
    """The process ``run_dir/<name>.pid`` records, if it still runs (same pid and start time)."""
    try:
        pid, created = (run_dir / f"{name}.pid").read_text().split()
        process = psutil.Process(int(pid))
        return process if process.create_time() == float(created) else None
    except (FileNotFoundError, ValueError, psutil.Error):
        return None


def wait_ready(services: list[Service], processes: Mapping[str, subprocess.Popen], timeout_s: float) -> None:
    """Block until every service is ready; RuntimeError naming the one that exited or timed out."""
    deadline = time.monotonic() + timeout_s
    pending = list(services)
    while pending:
        for service in list(pending):
            if service.ready():
                pending.remove(service)
            elif processes[service.name].poll() is not None:
                raise RuntimeError(f"{service.name} exited; see {RUN_DIR / service.name}.log")
        if pending and time.monotonic() > deadline:
            names = ", ".join(s.name for s in pending)
            raise RuntimeError(f"not ready after {timeout_s:.0f} s: {names}; see their logs in {RUN_DIR}/")
        time.sleep(1.0)


def stop(run_dir: Path, name: str) -> bool:
    """Stop the process group ``name`` started; True when there was one running."""
    process = recorded(run_dir, name)
    (run_dir / f"{name}.pid").unlink(missing_ok=True)
    if process is None:
        return False
    group = [process, *process.children(recursive=True)]
    os.killpg(process.pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(group, timeout=STOP_GRACE_S)
    for leftover in alive:
        leftover.kill()
    psutil.wait_procs(alive, timeout=5)
    return True


def up(prefect_port: int, mlflow_port: int, serve_port: int, timeout_s: float) -> int:
    """Start the stack and wait until it answers; exit status 1 (nothing left running) if it does not."""
    services = stack(prefect_port, mlflow_port, serve_port)
    RUN_DIR.mkdir(exist_ok=True)
    running = [name for name in NAMES if recorded(RUN_DIR, name)]
    if running:
        print(f"already running: {', '.join(running)} (make down first)", file=sys.stderr)
        return 1
    processes: dict[str, subprocess.Popen] = {}
    try:
        # MLflow and the model service do not need the Prefect server; the deployment does.
        for service in (services.prefect, services.mlflow, services.serving):
            processes[service.name] = start(service, RUN_DIR)
        wait_ready([services.prefect], processes, timeout_s)
        processes["deployment"] = start(services.deployment, RUN_DIR)
        wait_ready([services.deployment, services.mlflow, services.serving], processes, timeout_s)
        # Another program on one of the ports answers the health check while ours fails to bind.
        exited = [name for name, proc in processes.items() if proc.poll() is not None]
        if exited:
            raise RuntimeError(f"exited (port in use?): {', '.join(exited)}; see their logs in {RUN_DIR}/")
    except (RuntimeError, KeyboardInterrupt) as exc:
        print(f"up: {exc}; stopping what was started", file=sys.stderr)
        down()
        return 1
    api = f"{services.prefect.url}/api"
    print(
        f"Prefect UI    {services.prefect.url}\n"
        f"deployment    {services.deployment.url}: "
        f"PREFECT_API_URL={api} prefect deployment run {services.deployment.url} --watch\n"
        f"MLflow UI     {services.mlflow.url}\n"
        f"model service {services.serving.url}\n"
        f"logs and pids in {RUN_DIR}/; stop everything with `make down`"
    )
    return 0


def down() -> int:
    """Stop whatever ``up`` started and still runs."""
    for name in NAMES:
        if stop(RUN_DIR, name):
            print(f"stopped {name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.services", description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("up", "down"))
    ap.add_argument("--prefect-port", type=int, default=4200)
    ap.add_argument("--mlflow-port", type=int, default=5000)
    ap.add_argument("--serve-port", type=int, default=8000)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each step of `up`")
    args = ap.parse_args(argv)
    if args.action == "up":
        return up(args.prefect_port, args.mlflow_port, args.serve_port, args.timeout)
    return down()


if __name__ == "__main__":
    sys.exit(main())
