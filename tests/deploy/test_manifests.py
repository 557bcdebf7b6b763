"""The deployment files agree with the code: the Dockerfile and deploy/kubernetes/*.yaml.

Each check reads the files as a tool would (YAML documents, Dockerfile instructions) and compares
them with what numbersvc itself declares: setting names and defaults from `numbersvc.config`,
the health service name from `numbersvc.server`, the shutdown order of `RunningServer.stop`.
The Dockerfile's HEALTHCHECK command is also run against a real server.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import posixpath
import shlex
import sys
import tomllib
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from numbersvc.config import Config, UpstreamKind, settings
from numbersvc.server import SERVICE_NAME, create_server

ROOT: Final = Path(__file__).resolve().parents[2]
KUBE_DIR: Final = ROOT / "deploy" / "kubernetes"
DOCKERFILE: Final = ROOT / "Dockerfile"
DOCKERIGNORE: Final = ROOT / ".dockerignore"
EXAMPLE_SECRET: Final = "secret.example.yaml"
SETTING_NAMES: Final = frozenset(setting.env for _, setting, _ in settings())
CREDENTIALS: Final = ("PLIVO_AUTH_ID", "PLIVO_AUTH_TOKEN")
MANIFESTS: Final = sorted(path.name for path in KUBE_DIR.glob("*.yaml"))

_BUSY_TIMEOUT_SECONDS = 10.0  # the ledger's `sqlite3.connect(timeout=...)`


# --- reading the Kubernetes manifests -----------------------------------------------------------


def load(name: str) -> dict[str, Any]:
    """The one YAML document in deploy/kubernetes/`name`."""
    documents = list(yaml.safe_load_all((KUBE_DIR / name).read_text()))
    assert len(documents) == 1, f"{name}: expected one document, got {len(documents)}"
    document = documents[0]
    assert isinstance(document, dict), f"{name}: not a mapping"
    return document


def of_kind(kind: str) -> dict[str, Any]:
    """The one manifest of `kind` among those the kustomization applies."""
    found = [doc for doc in map(load, kustomized()) if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in kustomization.yaml, got {len(found)}"
    return found[0]


def kustomized() -> list[str]:
    resources: list[str] = load("kustomization.yaml")["resources"]
    return resources


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = of_kind("Deployment")["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod_spec()["containers"]
    assert len(containers) == 1, "the pod runs exactly one container, numbersvc"
    return containers[0]


def container_port() -> int:
    """The container's port named `grpc` (other ports, like metrics, may sit beside it)."""
    ports = [p for p in container()["ports"] if p.get("name") == "grpc"]
    assert len(ports) == 1, "the container has exactly one port named grpc"
    port: int = ports[0]["containerPort"]
    return port


def env_entries() -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = container().get("env", [])
    return entries


def env_literals() -> dict[str, str]:
    """The Deployment's env entries that carry a literal `value`."""
    return {entry["name"]: str(entry["value"]) for entry in env_entries() if "value" in entry}


def listen_port(listen: str) -> int:
    return int(listen.rpartition(":")[2])


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


# --- the Kubernetes manifests -------------------------------------------------------------------


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_manifest_is_one_kubernetes_object(name: str) -> None:
    document = load(name)
    assert {"apiVersion", "kind"} <= document.keys()
    if document["kind"] != "Kustomization":
        assert document["metadata"]["name"]


def test_kustomization_applies_every_manifest_but_the_example_secret() -> None:
    assert sorted(kustomized()) == sorted(set(MANIFESTS) - {"kustomization.yaml", EXAMPLE_SECRET})
    assert all(load(name)["kind"] != "Secret" for name in kustomized())
    images = {image["name"] for image in load("kustomization.yaml").get("images", [])}
    assert images <= {container()["image"].partition(":")[0]}


def test_probes_ask_the_grpc_health_service_on_the_container_port() -> None:
    readiness, liveness = container()["readinessProbe"], container()["livenessProbe"]
    assert readiness.keys() & {"httpGet", "tcpSocket", "exec"} == set()
    assert liveness.keys() & {"httpGet", "tcpSocket", "exec"} == set()
    assert readiness["grpc"]["port"] == container_port()
    assert readiness["grpc"]["service"] == SERVICE_NAME
    assert liveness["grpc"]["port"] == container_port()
    assert liveness["grpc"].get("service", "") == ""


def test_container_port_service_target_port_and_listen_port_agree() -> None:
    (service_port,) = (p for p in of_kind("Service")["spec"]["ports"] if p["name"] == "grpc")
    target = service_port["targetPort"]
    if isinstance(target, str):  # a named port: resolve it on the container
        target = next(p["containerPort"] for p in container()["ports"] if p.get("name") == target)
    assert container_port() == target == listen_port(env_literals()["NUMBERSVC_LISTEN"])
    assert service_port["appProtocol"] == "grpc"
    assert of_kind("Service")["spec"].get("type", "ClusterIP") == "ClusterIP"


def test_deployment_env_names_are_settings_and_parse() -> None:
    names = [entry["name"] for entry in env_entries()]
    assert len(names) == len(set(names)), f"duplicate env entries: {names}"
    assert set(names) - SETTING_NAMES == set(), "unknown settings in deployment.yaml"
    assert "envFrom" not in container(), "envFrom would hide which settings are set"
    # Secrets stand in as placeholders: the literals must parse and mean Plivo, not the sandbox.
    secrets = {entry["name"]: "x" for entry in env_entries() if "valueFrom" in entry}
    config = Config.from_env({**env_literals(), **secrets})
    assert config.resolved_upstream() is UpstreamKind.PLIVO
    assert env_literals()["NUMBERSVC_UPSTREAM"] == "plivo"


def test_credentials_come_only_from_a_secret() -> None:
    example = load(EXAMPLE_SECRET)
    by_name = {entry["name"]: entry for entry in env_entries()}
    for name in CREDENTIALS:
        entry = by_name[name]
        assert "value" not in entry, f"{name} has a literal value in deployment.yaml"
        ref = entry["valueFrom"]["secretKeyRef"]
        assert ref["name"] == example["metadata"]["name"]
        assert ref["key"] in example["stringData"]
    assert all(value.startswith("REPLACE_") for value in example["stringData"].values())
    assert "data" not in example, "the example holds placeholders in stringData only"
    assert set(CREDENTIALS) & docker_env().keys() == set()
    build_args = {args.partition("=")[0] for word, args in instructions() if word == "ARG"}
    assert set(CREDENTIALS) & build_args == set()
    generators = {"secretGenerator", "configMapGenerator"} & load("kustomization.yaml").keys()
    assert not generators, "a generator would put values in the repository"


def test_termination_grace_outlasts_drain_grace_and_a_last_ledger_write() -> None:
    # `RunningServer.stop`: drain, then `server.stop(grace)` while the rent desk gives up on
    # POSTs still out before the grace ends; a write the ledger refuses gets one last attempt,
    # which may wait out SQLite's busy timeout.
    config = Config.from_env(env_literals())  # unset settings keep the Config defaults
    shutdown_seconds = config.drain_seconds + config.shutdown_grace_seconds + _BUSY_TIMEOUT_SECONDS
    assert pod_spec()["terminationGracePeriodSeconds"] > shutdown_seconds


def test_one_replica_replaced_by_recreate() -> None:
    spec = of_kind("Deployment")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate"


def test_the_ledger_directory_is_the_persistent_volume() -> None:
    pvc = of_kind("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    claims = [v for v in pod_spec()["volumes"] if "persistentVolumeClaim" in v]
    (volume,) = (
        v for v in claims if v["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    )
    mounts = {m["name"]: m["mountPath"] for m in container()["volumeMounts"]}
    ledger_dir = posixpath.dirname(env_literals()["NUMBERSVC_LEDGER_PATH"])
    assert mounts[volume["name"]] == ledger_dir
    assert not [m for m in container()["volumeMounts"] if m.get("readOnly")]


def test_runs_as_non_root_on_a_read_only_root() -> None:
    pod_context, context = pod_spec()["securityContext"], container()["securityContext"]
    assert context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is True
    assert pod_context["runAsNonRoot"] is True
    assert context.get("runAsUser", pod_context.get("runAsUser", 1)) != 0
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    mounts = {m["name"]: m["mountPath"] for m in container()["volumeMounts"]}
    scratch = {v["name"] for v in pod_spec()["volumes"] if "emptyDir" in v}
    assert "/tmp" in {mounts[name] for name in scratch}


# --- the Dockerfile -----------------------------------------------------------------------------


def test_dockerfile_env_names_are_settings_and_parse() -> None:
    assert docker_env().keys() - SETTING_NAMES == set(), "unknown settings in the Dockerfile"
    Config.from_env(docker_env())


def test_dockerfile_runs_as_a_numeric_non_root_user() -> None:
    # Numeric: Kubernetes' runAsNonRoot cannot check a user name.
    (user,) = runtime("USER")
    uid = user.partition(":")[0]
    assert uid.isdigit(), f"USER {user!r}: not a numeric uid"
    assert int(uid) != 0, f"USER {user!r}: root"
    run_as = pod_spec()["securityContext"].get("runAsUser")
    assert run_as in (None, int(uid)), "the pod's runAsUser differs from the image's USER"


def test_dockerfile_exposes_and_serves_the_deployment_port() -> None:
    exposed = {int(port.partition("/")[0]) for args in runtime("EXPOSE") for port in args.split()}
    assert exposed == {listen_port(docker_env()["NUMBERSVC_LISTEN"])} == {container_port()}


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
