"""The deployment files agree with the code: the Dockerfile and deploy/kubernetes.

deploy/kubernetes is a kustomize base and two overlays, `ha` (replicas on PostgreSQL) and
`single` (one replica, a SQLite file on a volume). Each overlay is checked as `kubectl apply -k`
would send it (rendered by `kubectl kustomize`, tests/deploy/kustomize.py), against what
numbersvc itself declares: setting names and defaults from `numbersvc.config`, the health
service name from `numbersvc.server`, the shutdown order of `RunningServer.stop` and the waits
of each ledger, the `numbersvc db migrate` command of the CLI. The migration Job's command is
run against a real PostgreSQL, with the Secret mounted where the manifests say; the
Dockerfile's HEALTHCHECK command against a real server.
"""

from __future__ import annotations

import asyncio
import fnmatch
import itertools
import json
import os
import posixpath
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, Final

import psycopg
import pytest
import yaml

from numbersvc import tracing
from numbersvc.cli.main import build_parser
from numbersvc.config import Config, UpstreamKind, settings
from numbersvc.ledger import pgbudget, postgres
from numbersvc.orders import _START_SLACK_SECONDS
from numbersvc.server import _RENT_ANSWER_SECONDS, SERVICE_NAME, create_server
from tests.deploy.kustomize import (
    BASE_DIR,
    KUBE_DIR,
    OVERLAYS,
    ROOT,
    Rendered,
    env_entries,
    env_literals,
    only_container,
    overlay_dir,
    pod_spec,
    render,
    secret_file,
    selects,
)

DOCKERFILE: Final = ROOT / "Dockerfile"
DOCKERIGNORE: Final = ROOT / ".dockerignore"
PROMETHEUS_CONFIG: Final = ROOT / "deploy" / "observability" / "prometheus.yaml"
SETTING_NAMES: Final = frozenset(setting.env for _, setting, _ in settings())
CREDENTIALS: Final = ("PLIVO_AUTH_ID", "PLIVO_AUTH_TOKEN")
DATABASE_SETTINGS: Final = ("NUMBERSVC_DATABASE_URL", "NUMBERSVC_DATABASE_URL_FILE")
PLIVO_SECRET_EXAMPLE: Final = BASE_DIR / "secret.example.yaml"
DATABASE_SECRET_EXAMPLE: Final = overlay_dir("ha") / "database-secret.example.yaml"
FILES: Final = sorted(KUBE_DIR.rglob("*.yaml"))

_BUSY_TIMEOUT_SECONDS = 10.0  # the SQLite ledger's `sqlite3.connect(timeout=...)`
# The PostgreSQL ledger: a write's last attempt waits for a pooled connection, then a lock;
# closing gives up the lease within its own timeout.
_PG_LAST_WRITE_SECONDS: Final = postgres._POOL_WAIT_SECONDS + postgres._LOCK_WAIT_SECONDS
_PG_CLOSE_SECONDS: Final = postgres._CLOSE_TIMEOUT_SECONDS
_MIGRATION_JOBS: Final = 1  # connections the migration Job holds while it runs


# --- reading the Kubernetes manifests -----------------------------------------------------------


def load(path: Path) -> dict[str, Any]:
    """The one YAML document in `path`."""
    documents = list(yaml.safe_load_all(path.read_text()))
    assert len(documents) == 1, f"{path}: expected one document, got {len(documents)}"
    document = documents[0]
    assert isinstance(document, dict), f"{path}: not a mapping"
    return document


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> Rendered:
    """Each overlay, rendered."""
    return render(overlay_dir(request.param))


@pytest.fixture
def ha() -> Rendered:
    return render(overlay_dir("ha"))


@pytest.fixture
def single() -> Rendered:
    return render(overlay_dir("single"))


def grpc_port(container: dict[str, Any]) -> int:
    """The container's port named `grpc` (other ports, like metrics, may sit beside it)."""
    return named_port(container, "grpc")


def named_port(container: dict[str, Any], name: str) -> int:
    ports = [p for p in container["ports"] if p.get("name") == name]
    assert len(ports) == 1, f"the container has exactly one port named {name}"
    port: int = ports[0]["containerPort"]
    return port


def listen_port(listen: str) -> int:
    return int(listen.rpartition(":")[2])


def config_of(container: dict[str, Any]) -> Config:
    """The container's settings as the server reads them; Secrets stand in as placeholders."""
    secrets = {e["name"]: "x" for e in env_entries(container) if "valueFrom" in e}
    return Config.from_env({**env_literals(container), **secrets})


def migrate_job(rendered: Rendered) -> dict[str, Any]:
    (job,) = rendered.all_of("Job")
    return job


# --- every file, and what each overlay applies ---------------------------------------------------


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(KUBE_DIR)))
def test_every_manifest_is_one_kubernetes_object(path: Path) -> None:
    document = load(path)
    assert {"apiVersion", "kind"} <= document.keys()
    if document["kind"] != "Kustomization":
        assert document["metadata"]["name"]


@pytest.mark.parametrize("directory", [BASE_DIR, *map(overlay_dir, OVERLAYS)], ids=str)
def test_each_kustomization_uses_every_file_beside_it_but_the_examples(directory: Path) -> None:
    kustomization = load(directory / "kustomization.yaml")
    used = set(kustomization.get("resources", [])) | {
        patch["path"] for patch in kustomization.get("patches", [])
    }
    files = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
    examples = {name for name in files if name.endswith(".example.yaml")}
    assert files - examples <= used, "a manifest no kustomization applies"
    assert not examples & used, "an example Secret is applied"
    generators = {"secretGenerator", "configMapGenerator"} & kustomization.keys()
    assert not generators, "a generator would put values in the repository"


def test_an_overlay_applies_no_secret_and_one_image(overlay: Rendered) -> None:
    assert overlay.all_of("Secret") == []
    images = {only_container(w)["image"] for w in (overlay.deployment, *overlay.all_of("Job"))}
    assert len(images) == 1, f"every workload runs the same image: {images}"


# --- the server's container, in each overlay ------------------------------------------------------


def test_probes_ask_the_grpc_health_service_on_the_container_port(overlay: Rendered) -> None:
    container = overlay.container
    probes = {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    for probe in probes.values():
        assert probe.keys() & {"httpGet", "tcpSocket", "exec"} == set()
        assert probe["grpc"]["port"] == grpc_port(container)
    assert probes["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert probes["livenessProbe"]["grpc"].get("service", "") == ""
    assert probes["startupProbe"]["grpc"].get("service", "") == ""


def test_container_port_service_target_port_and_listen_port_agree(overlay: Rendered) -> None:
    container, service = overlay.container, overlay.one("Service")
    (service_port,) = (p for p in service["spec"]["ports"] if p["name"] == "grpc")
    target = service_port["targetPort"]
    if isinstance(target, str):  # a named port: resolve it on the container
        target = named_port(container, target)
    assert grpc_port(container) == target == listen_port(config_of(container).listen)
    assert service_port["appProtocol"] == "grpc"
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels(overlay))


def test_prometheus_scrapes_the_metrics_port(overlay: Rendered) -> None:
    """deploy/observability/prometheus.yaml keeps pods by label and container port name."""
    (job,) = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
    keep = {
        rule["source_labels"][0]: rule["regex"]
        for rule in job["relabel_configs"]
        if rule.get("action") == "keep"
    }
    port_name = keep.pop("__meta_kubernetes_pod_container_port_name")
    assert named_port(overlay.container, port_name) == listen_port(
        config_of(overlay.container).metrics_listen
    )
    prefix = "__meta_kubernetes_pod_label_"
    for source, regex in keep.items():
        assert source.startswith(prefix), f"prometheus.yaml keeps on {source}: not read here"
        labels = {re.sub(r"[^a-zA-Z0-9_]", "_", k): v for k, v in pod_labels(overlay).items()}
        assert re.fullmatch(regex, labels.get(source.removeprefix(prefix), "")), source


def test_env_names_are_settings_and_parse(overlay: Rendered) -> None:
    for workload in (overlay.deployment, *overlay.all_of("Job")):
        names = [entry["name"] for entry in env_entries(only_container(workload))]
        assert len(names) == len(set(names)), f"duplicate env entries: {names}"
        assert set(names) - SETTING_NAMES == set(), "unknown settings"
    config = config_of(overlay.container)
    assert config.resolved_upstream() is UpstreamKind.PLIVO
    assert env_literals(overlay.container)["NUMBERSVC_UPSTREAM"] == "plivo"


def test_credentials_come_only_from_a_secret(overlay: Rendered) -> None:
    example = load(PLIVO_SECRET_EXAMPLE)
    by_name = {entry["name"]: entry for entry in env_entries(overlay.container)}
    for name in CREDENTIALS:
        entry = by_name[name]
        assert "value" not in entry, f"{name} has a literal value"
        ref = entry["valueFrom"]["secretKeyRef"]
        assert ref["name"] == example["metadata"]["name"]
        assert ref["key"] in example["stringData"]
    assert set(CREDENTIALS) & docker_env().keys() == set()
    build_args = {args.partition("=")[0] for word, args in instructions() if word == "ARG"}
    assert set(CREDENTIALS) & build_args == set()


@pytest.mark.parametrize("path", [PLIVO_SECRET_EXAMPLE, DATABASE_SECRET_EXAMPLE], ids=str)
def test_example_secrets_hold_placeholders_only(path: Path) -> None:
    example = load(path)
    assert example["kind"] == "Secret"
    assert "data" not in example, "the example holds placeholders in stringData only"
    for value in example["stringData"].values():
        if "://" not in value:
            assert value.startswith("REPLACE_")
            continue
        password = psycopg.conninfo.conninfo_to_dict(value).get("password")
        assert str(password).startswith("REPLACE_"), "the example URL's password"


def test_termination_grace_outlasts_the_servers_shutdown(overlay: Rendered) -> None:
    # `RunningServer.stop`: drain, then `server.stop(grace)` while the rent desk gives up on
    # POSTs still out before the grace ends; a write the ledger refuses gets one last attempt
    # (SQLite: its busy timeout; PostgreSQL: a pooled connection, then a lock); PostgreSQL's
    # ledger then gives up its lease; last, queued spans get their bounded flush (counted
    # always: tracing is switched on by OTEL_* variables a cluster may add to any overlay).
    config = config_of(overlay.container)  # unset settings keep the Config defaults
    on_postgres = bool(config.database_url_file or config.database_url)
    last_write = (
        _PG_LAST_WRITE_SECONDS + _PG_CLOSE_SECONDS if on_postgres else _BUSY_TIMEOUT_SECONDS
    )
    shutdown_seconds = (
        config.drain_seconds
        + config.shutdown_grace_seconds
        + last_write
        + tracing.DEFAULT_FLUSH_SECONDS
    )
    assert overlay.pod_spec["terminationGracePeriodSeconds"] > shutdown_seconds


def test_runs_as_non_root_on_a_read_only_root(overlay: Rendered) -> None:
    for pod in overlay.pods():
        spec = pod["spec"]
        (container,) = spec["containers"]
        pod_context, context = spec["securityContext"], container["securityContext"]
        assert pod_context["runAsNonRoot"] is True
        assert context.get("runAsNonRoot", True) is True
        assert context.get("runAsUser", pod_context.get("runAsUser", 0)) != 0
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"]
        assert spec["automountServiceAccountToken"] is False
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        scratch = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        assert "/tmp" in {mounts[name] for name in scratch}
        assert_mounts_apart(container)
        if any("secret" in v for v in spec["volumes"]):
            # A Secret's files (mode 0400, root's) are readable by the pod's group only.
            assert pod_context.get("fsGroup") == pod_context["runAsGroup"]


def assert_mounts_apart(container: dict[str, Any]) -> None:
    """No mount inside another: the outer one (a read-only Secret) would hide or refuse it."""
    paths = sorted(m["mountPath"].rstrip("/") + "/" for m in container.get("volumeMounts", []))
    for outer, inner in itertools.pairwise(paths):
        assert not inner.startswith(outer), f"{inner} is mounted inside {outer}"


def pod_labels(rendered: Rendered) -> dict[str, str]:
    labels: dict[str, str] = rendered.deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(rendered.deployment["spec"]["selector"], labels)
    return labels


# --- ha: replicas on PostgreSQL ---------------------------------------------------------------


def test_ha_rolls_replicas_without_losing_one(ha: Rendered) -> None:
    spec = ha.deployment["spec"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["type"] == "RollingUpdate"
    rolling = spec["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0
    assert isinstance(rolling["maxSurge"], int), "a count, so the database sizing can use it"
    assert 1 <= rolling["maxSurge"] <= spec["replicas"]


def test_ha_disruption_budget_selects_the_pods_and_lets_one_go(ha: Rendered) -> None:
    budget = ha.one("PodDisruptionBudget")["spec"]
    assert selects(budget["selector"], pod_labels(ha))
    replicas = ha.deployment["spec"]["replicas"]
    allowed = budget.get("maxUnavailable", replicas - budget.get("minAvailable", replicas))
    assert isinstance(allowed, int), "a count, not a percentage"
    assert 1 <= allowed < replicas, "a drain may evict one pod, never all but none"


def test_ha_spreads_over_nodes_and_prefers_zones(ha: Rendered) -> None:
    constraints = {c["topologyKey"]: c for c in ha.pod_spec["topologySpreadConstraints"]}
    nodes = constraints["kubernetes.io/hostname"]
    zones = constraints["topology.kubernetes.io/zone"]
    assert nodes["whenUnsatisfiable"] == "DoNotSchedule"
    assert zones["whenUnsatisfiable"] == "ScheduleAnyway"
    for constraint in (nodes, zones):
        assert constraint["maxSkew"] == 1
        assert selects(constraint["labelSelector"], pod_labels(ha))
        assert "pod-template-hash" in constraint.get("matchLabelKeys", [])


def test_ha_reads_the_database_url_from_a_secret_and_has_no_volume(ha: Rendered) -> None:
    literals = env_literals(ha.container)
    assert "NUMBERSVC_DATABASE_URL" not in literals, "the URL holds a password: a Secret only"
    assert "NUMBERSVC_LEDGER_PATH" not in literals
    assert config_of(ha.container).database_url_file
    name, key = secret_file(ha.deployment, literals["NUMBERSVC_DATABASE_URL_FILE"])
    example = load(DATABASE_SECRET_EXAMPLE)
    assert name == example["metadata"]["name"]
    assert key in example["stringData"]
    assert ha.all_of("PersistentVolumeClaim") == []
    assert not [v for v in ha.pod_spec["volumes"] if "persistentVolumeClaim" in v]


def test_ha_lets_a_rent_in_flight_run_its_whole_timeout(ha: Rendered) -> None:
    # A rent may start until the drain ends; the desk then waits the grace less its answer
    # second before giving it up as outcome unknown.
    config = config_of(ha.container)
    patience = config.shutdown_grace_seconds - _RENT_ANSWER_SECONDS
    assert patience >= config.rent_timeout_seconds + _START_SLACK_SECONDS
    grace = ha.pod_spec["terminationGracePeriodSeconds"]
    assert grace >= config.drain_seconds + config.rent_timeout_seconds + _START_SLACK_SECONDS


def test_ha_states_the_database_connections_it_needs() -> None:
    """The sizing comment in overlays/ha/deployment.yaml is the sum the manifests make."""
    rendered = render(overlay_dir("ha"))
    spec = rendered.deployment["spec"]
    pods = spec["replicas"] + spec["strategy"]["rollingUpdate"]["maxSurge"]
    per_pod = config_of(rendered.container).database_pool_max + pgbudget._CONNECTIONS
    needed = pods * per_pod + _MIGRATION_JOBS
    text = (overlay_dir("ha") / "deployment.yaml").read_text()
    assert re.search(rf"= {needed}\b", text), f"the sizing comment must say {needed}"


# --- ha: the migration Job --------------------------------------------------------------------


def test_migrate_job_runs_db_migrate_with_the_deployments_database(ha: Rendered) -> None:
    job = migrate_job(ha)
    container = only_container(job)
    assert container["image"] == ha.container["image"]
    args = build_parser().parse_args(container["command"][1:])
    assert container["command"][0] == "numbersvc"
    assert args.local_command.name == "migrate_command"
    assert env_literals(container) == {
        k: v for k, v in env_literals(ha.container).items() if k in DATABASE_SETTINGS
    }
    path = env_literals(container)["NUMBERSVC_DATABASE_URL_FILE"]
    assert secret_file(job, path) == secret_file(ha.deployment, path)
    assert pod_spec(job)["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] >= 1
    assert job["spec"]["ttlSecondsAfterFinished"] > 0, "a new image needs a new Job"


def test_migrate_job_is_none_of_the_servers_pods(ha: Rendered) -> None:
    labels = migrate_job(ha)["spec"]["template"]["metadata"]["labels"]
    selectors = [
        ha.deployment["spec"]["selector"],
        ha.one("PodDisruptionBudget")["spec"]["selector"],
        {"matchLabels": ha.one("Service")["spec"]["selector"]},
        *(c["labelSelector"] for c in ha.pod_spec["topologySpreadConstraints"]),
    ]
    assert not [s for s in selectors if selects(s, labels)]


def test_migrate_job_migrates_a_real_database(
    ha: Rendered, empty_postgres_url: str, tmp_path: Path
) -> None:
    """The Job's command and env, its Secret's file where it mounts it, on real PostgreSQL."""
    job = migrate_job(ha)
    container = only_container(job)
    env = env_literals(container)
    path = env["NUMBERSVC_DATABASE_URL_FILE"]
    _, key = secret_file(job, path)
    (tmp_path / key).write_text(empty_postgres_url)  # what the Secret's key holds
    env["NUMBERSVC_DATABASE_URL_FILE"] = str(tmp_path / key)

    def numbersvc(*argv: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "numbersvc", *argv]
        return subprocess.run(
            command, env={**os.environ, **env}, capture_output=True, text=True, timeout=60
        )

    pending = numbersvc("db", "status")
    assert pending.returncode != 0, pending.stdout  # nothing applied yet
    migrated = numbersvc(*container["command"][1:])
    assert migrated.returncode == 0, migrated.stderr
    status = numbersvc("db", "status")
    assert status.returncode == 0, status.stdout + status.stderr


# --- single: one replica on a SQLite volume ---------------------------------------------------


def test_single_is_one_replica_replaced_by_recreate(single: Rendered) -> None:
    spec = single.deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate"
    assert single.all_of("PodDisruptionBudget") == []
    assert single.all_of("Job") == []


def test_single_keeps_the_ledger_on_its_volume_and_no_database(single: Rendered) -> None:
    assert not set(DATABASE_SETTINGS) & {e["name"] for e in env_entries(single.container)}
    pvc = single.one("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    claims = [v for v in single.pod_spec["volumes"] if "persistentVolumeClaim" in v]
    (volume,) = (
        v for v in claims if v["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    )
    mounts = {m["name"]: m for m in single.container["volumeMounts"]}
    ledger_dir = posixpath.dirname(config_of(single.container).ledger_path)
    assert mounts[volume["name"]]["mountPath"] == ledger_dir
    assert not mounts[volume["name"]].get("readOnly")


# --- reading the Dockerfile -----------------------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.strip().startswith("#") or (not line.strip() and not pending):
            continue
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, args = pending.partition(" ")
        result.append((word.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return result


def stages() -> list[list[tuple[str, str]]]:
    """The instructions of each build stage; instructions before the first FROM are dropped."""
    result: list[list[tuple[str, str]]] = []
    for word, args in instructions():
        if word == "FROM":
            result.append([])
        if result:
            result[-1].append((word, args))
    return result


def runtime(word: str) -> list[str]:
    """The arguments of every `word` instruction in the final (runtime) stage."""
    return [args for w, args in stages()[-1] if w == word]


def docker_env() -> dict[str, str]:
    """Every ENV key and value, in every stage (`ENV K=V ...` and the legacy `ENV K V`)."""
    env: dict[str, str] = {}
    for word, args in instructions():
        if word != "ENV":
            continue
        tokens = shlex.split(args)
        if "=" not in tokens[0]:
            env[tokens[0]] = " ".join(tokens[1:])
            continue
        for token in tokens:
            key, sep, value = token.partition("=")
            assert sep, f"ENV {args!r}: mixes K=V and legacy forms"
            env[key] = value
    return env


def healthcheck_argv() -> list[str]:
    (healthcheck,) = runtime("HEALTHCHECK")
    _, sep, command = healthcheck.partition(" CMD ")
    assert sep, f"HEALTHCHECK without CMD: {healthcheck!r}"
    argv = json.loads(command)
    assert isinstance(argv, list), "HEALTHCHECK CMD must be the exec (JSON) form"
    return [str(arg) for arg in argv]


# --- the Dockerfile -----------------------------------------------------------------------------


def test_dockerfile_env_names_are_settings_and_parse() -> None:
    assert docker_env().keys() - SETTING_NAMES == set(), "unknown settings in the Dockerfile"
    Config.from_env(docker_env())


def test_dockerfile_runs_as_a_numeric_non_root_user(overlay: Rendered) -> None:
    # Numeric: Kubernetes' runAsNonRoot cannot check a user name.
    (user,) = runtime("USER")
    uid = user.partition(":")[0]
    assert uid.isdigit(), f"USER {user!r}: not a numeric uid"
    assert int(uid) != 0, f"USER {user!r}: root"
    for pod in overlay.pods():
        run_as = pod["spec"]["securityContext"].get("runAsUser")
        assert run_as in (None, int(uid)), "a pod's runAsUser differs from the image's USER"


def test_dockerfile_exposes_and_serves_the_deployment_port(overlay: Rendered) -> None:
    exposed = {int(port.partition("/")[0]) for args in runtime("EXPOSE") for port in args.split()}
    assert (
        exposed == {listen_port(docker_env()["NUMBERSVC_LISTEN"])} == {grpc_port(overlay.container)}
    )


def test_dockerfile_shape() -> None:
    assert len(stages()) >= 2, "multi-stage: build, then runtime"
    assert runtime("STOPSIGNAL") == ["SIGTERM"]
    assert [json.loads(args) for args in runtime("ENTRYPOINT")] == [["numbersvc", "serve"]]
    ledger_dir = posixpath.dirname(docker_env()["NUMBERSVC_LEDGER_PATH"])
    assert ledger_dir in {v for args in runtime("VOLUME") for v in json.loads(args)}
    argv = healthcheck_argv()
    assert argv[:2] == ["python", "-c"]
    assert "grpc_health" in argv[2]
    assert repr(SERVICE_NAME) in argv[2]


def test_dockerfile_copies_what_pip_install_reads_and_dockerignore_keeps_it() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {".git", ".venv", "node_modules", "tests", ".mypy_cache"} <= set(patterns)
    sources: set[str] = set()
    for stage in stages():
        for word, args in stage:
            if word in {"COPY", "ADD"} and not args.startswith("--from"):
                sources.update(args.split()[:-1])
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["readme"]
    assert {"pyproject.toml", readme, "numbersvc"} <= sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file"
        hits = [p for p in patterns if fnmatch.fnmatch(source, p) or source.startswith(p + "/")]
        assert not hits, f".dockerignore drops {source} ({hits}), which the Dockerfile copies"


async def test_dockerfile_healthcheck_command_follows_a_real_server(tmp_path: Path) -> None:
    """Run the HEALTHCHECK command as Docker would: exit 0 when serving, 1 otherwise."""
    argv = [sys.executable, *healthcheck_argv()[1:]]

    async def healthcheck(port: int) -> int:
        env = {**os.environ, "NUMBERSVC_LISTEN": f"0.0.0.0:{port}"}
        process = await asyncio.create_subprocess_exec(
            *argv, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        return await asyncio.wait_for(process.wait(), timeout=30)

    config = Config(
        listen="127.0.0.1:0",
        upstream=UpstreamKind.SANDBOX,
        ledger_path=str(tmp_path / "ledger.sqlite3"),
        metrics_listen="127.0.0.1:0",
    )
    running = await create_server(config)
    try:
        assert await healthcheck(running.port) == 0
        await running.health.enter_graceful_shutdown()  # what SIGTERM does first
        assert await healthcheck(running.port) == 1
    finally:
        await running.stop()
    assert await healthcheck(running.port) == 1  # nothing listening
