"""A whole ambient-ray cluster on this machine: ``cluster/local.sh up|down|status|env``.

``up`` starts, all on 127.0.0.1:
  - a Ray head with token authentication (``RAY_AUTH_MODE=token``; a fresh token in STATE/auth_token),
  - a SeaweedFS S3 server with one bucket (``ambient`` unless ``--bucket``),
  - an MLflow tracking server (SQLite store in STATE, artifacts in that S3 bucket, served through
    the server's artifact proxy),
then prints the ``export`` lines a shell needs (``eval "$(cluster/local.sh up)"``; the last one puts the
project's ``.venv/bin`` first on ``PATH``, so ``ray`` and ``ambient-ray`` are found) and writes them to
STATE/env.sh. The Ray head runs with the same S3 and MLflow variables, so jobs submitted with ``ray job submit``
read and write ``s3://BUCKET/...`` and log to the server with no further set-up.

``down`` stops what ``up`` started and nothing else: the three process groups recorded in
STATE/state.json, then any straggler whose command line names this cluster's Ray session folder.
``status`` says what is running; ``env`` prints the exports again.

STATE is ``.local-cluster/`` in the repository unless ``--state DIR`` or ``AMBIENT_CLUSTER_STATE``.
Progress goes to stderr, the exports alone to stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ambient_ray.io import services  # noqa: E402


def log(msg: str) -> None:
    print(f"local cluster: {msg}", file=sys.stderr, flush=True)


def state_dir(arg: str | None) -> str:
    return os.path.abspath(arg or os.environ.get("AMBIENT_CLUSTER_STATE") or os.path.join(REPO, ".local-cluster"))


def ray_temp_dir(state: str) -> str:
    """Ray's session folder. Its Unix socket paths must stay short (about 100 bytes), so a long STATE gets
    /tmp/ar-<hash>."""
    inside = os.path.join(state, "ray")
    return inside if len(inside) <= 40 else f"/tmp/ar-{hashlib.sha1(state.encode()).hexdigest()[:10]}"


def load_state(state: str) -> dict | None:
    path = os.path.join(state, "state.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


MARK = "AMBIENT_LOCAL_CLUSTER"  # set in the Ray head's environment only: every process it starts inherits it


def stragglers(st: dict) -> list[int]:
    """Live processes of this cluster: in its recorded process groups, naming its Ray session folder, or
    descended from its Ray head (workers, job drivers in sessions of their own) by the MARK variable."""
    import psutil

    groups = {s["pgid"] for s in st["services"].values()}
    mine = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if (
                p.pid == os.getpid() or p.info["status"] == psutil.STATUS_ZOMBIE
            ):  # a zombie is gone, just not reaped yet
                continue
            if (
                os.getpgid(p.pid) in groups
                or st["ray_temp_dir"] in " ".join(p.info["cmdline"] or [])
                or p.environ().get(MARK) == st["state"]
            ):
                mine.append(p.pid)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return mine


def write_private(path: str, text: str) -> None:
    """Write a file only its owner can read (the token, and files that hold the local S3 key)."""
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text)


def exports(env: dict) -> str:
    """The ``export`` lines of ``env``, and a last one that puts this virtual environment's tools (``ray``,
    ``ambient-ray``, ``mlflow``) first on ``PATH``: the documented commands call them by name."""
    tools = os.path.dirname(sys.executable)
    lines = [f"export {k}={shlex.quote(v)}\n" for k, v in env.items()]
    return "".join(lines) + f'export PATH={shlex.quote(tools)}:"$PATH"\n'


def dashboard_ready(url: str, token: str) -> bool:
    req = urllib.request.Request(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=5) as r:
        return r.status == 200


def up(args) -> int:
    state = state_dir(args.state)
    st = load_state(state)
    if st and all(group_alive(s["pgid"]) for s in st["services"].values()):
        log(f"already up (state {state})")
        sys.stdout.write(exports(st["env"]))
        return 0
    if st:
        log("a previous cluster is partly down; stopping its remains first")
        down(args)
    os.makedirs(state, exist_ok=True)
    started: dict[str, services.Service] = {}
    try:
        log("starting SeaweedFS (S3)")
        s3 = started["seaweedfs"] = services.start_seaweedfs(os.path.join(state, "seaweedfs"))
        os.environ.update(s3.env())
        from ambient_ray.io import storage

        storage.ensure_bucket(args.bucket)
        log("starting the MLflow server (SQLite store, artifacts in S3)")
        ml = started["mlflow"] = services.start_mlflow(
            os.path.join(state, "mlflow"), f"s3://{args.bucket}/mlflow-artifacts", env=s3.env()
        )

        token_path = os.path.join(state, "auth_token")
        token = secrets.token_hex(32)
        write_private(token_path, token)
        temp = ray_temp_dir(state)
        ports = {k: services.free_port() for k in ("gcs", "dashboard", "client", "agent", "metrics")}
        env = {
            **s3.env(),
            "MLFLOW_TRACKING_URI": ml.url,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": token_path,
        }
        env_bin = os.path.dirname(sys.executable)
        head_env = {**os.environ, **env, "PATH": env_bin + os.pathsep + os.environ.get("PATH", ""), MARK: state}
        head_env.pop("RAY_AUTH_TOKEN", None)  # the file is the one source of the token
        # every process of the cluster (workers, actors, job drivers) inherits this: code that looks the cluster up
        # by itself (Ray Train's placement-group cleaner) then finds this one even if another Ray runs on the machine
        head_env["RAY_ADDRESS"] = f"127.0.0.1:{ports['gcs']}"
        cmd = [
            os.path.join(env_bin, "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={ports['gcs']}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={ports['dashboard']}",
            f"--ray-client-server-port={ports['client']}",
            f"--dashboard-agent-listen-port={ports['agent']}",
            f"--metrics-export-port={ports['metrics']}",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        ]
        if args.num_cpus:
            cmd.append(f"--num-cpus={args.num_cpus}")
        log(f"starting the Ray head (token authentication; session folder {temp})")
        ray_log = os.path.join(state, "ray-head.log")
        proc = subprocess.Popen(
            cmd,
            stdout=open(ray_log, "ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=head_env,
            cwd=REPO,
            start_new_session=True,
        )
        dashboard = f"http://127.0.0.1:{ports['dashboard']}"
        started["ray"] = services.Service("ray", proc, dashboard, ray_log)
        services.wait_ready(
            lambda: dashboard_ready(dashboard, token), "Ray head (dashboard)", proc, ray_log, args.timeout
        )
    except BaseException:
        for svc in reversed(list(started.values())):
            svc.stop()
        raise
    env = {"RAY_ADDRESS": dashboard, **env, "AMBIENT_BUCKET": args.bucket}
    st = {
        "services": {
            n: {"pid": s.proc.pid, "pgid": s.proc.pid, "url": s.url, "log": s.log} for n, s in started.items()
        },
        "env": env,
        "ray_gcs": f"127.0.0.1:{ports['gcs']}",
        "ray_temp_dir": temp,
        "state": state,
        "started": time.time(),
    }
    write_private(os.path.join(state, "state.json"), json.dumps(st, indent=1))
    write_private(os.path.join(state, "env.sh"), exports(env))
    log(
        f"up: Ray dashboard {dashboard} (GCS {st['ray_gcs']}), "
        f"S3 {os.environ['AWS_ENDPOINT_URL']} bucket {args.bucket}, "
        f"MLflow {ml.url}; logs in {state}"
    )
    log(f'use it from a shell: eval "$(cluster/local.sh env)"   (or: source {state}/env.sh)')
    sys.stdout.write(exports(env))
    return 0


def down(args) -> int:
    state = state_dir(args.state)
    st = load_state(state)
    if not st:
        log(f"nothing to stop (no {state}/state.json)")
        return 0
    order = [n for n in ("ray", "mlflow", "seaweedfs") if n in st["services"]]
    for name in order:
        pgid = st["services"][name]["pgid"]
        if group_alive(pgid):
            log(f"stopping {name} (process group {pgid})")
            os.killpg(pgid, signal.SIGTERM)
    deadline = time.time() + args.grace
    while time.time() < deadline and stragglers(st):
        time.sleep(0.5)
    left = stragglers(st)
    if left:
        import psutil

        names = set()
        for pid in left:
            try:
                names.add(psutil.Process(pid).name())
                os.kill(pid, signal.SIGKILL)
            except (psutil.Error, ProcessLookupError):
                pass
        log(
            f"killed {len(left)} processes that did not stop in {args.grace:.0f}s after SIGTERM: "
            f"{', '.join(sorted(names))}"
        )
    deadline = time.time() + 10  # a killed process is gone once the kernel has torn it down
    while (left := stragglers(st)) and time.time() < deadline:
        time.sleep(0.2)
    if left:
        log(f"could not stop processes {left}")
        return 1
    os.remove(os.path.join(state, "state.json"))
    log("down: every process it started has stopped")
    return 0


def status(args) -> int:
    state = state_dir(args.state)
    st = load_state(state)
    if not st:
        print(f"local cluster: down (no {state}/state.json)")
        return 3
    ok = True
    for name, s in st["services"].items():
        alive = group_alive(s["pgid"])
        ok &= alive
        print(f"{name:10s} {'up  ' if alive else 'DOWN'} pid {s['pid']:<8d} {s['url']}")
    print(f"ray GCS    {st['ray_gcs']}   session folder {st['ray_temp_dir']}   state {state}")
    return 0 if ok else 1


def env(args) -> int:
    st = load_state(state_dir(args.state))
    if not st:
        log("down: run 'cluster/local.sh up' first")
        return 3
    sys.stdout.write(exports(st["env"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="cluster/local.sh", description="A local Ray cluster (token auth) with S3 and MLflow on 127.0.0.1."
    )
    ap.add_argument("command", choices=("up", "down", "status", "env"))
    ap.add_argument("--state", help="state folder (default .local-cluster/ or $AMBIENT_CLUSTER_STATE)")
    ap.add_argument("--num-cpus", type=int, help="CPUs the Ray head offers (default: all)")
    ap.add_argument("--bucket", default="ambient", help="S3 bucket to create (default ambient)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a service to start")
    ap.add_argument("--grace", type=float, default=5.0, help="down: seconds between SIGTERM and SIGKILL")
    args = ap.parse_args(argv)
    return {"up": up, "down": down, "status": status, "env": env}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
