"""Rendering a kustomization as `kubectl apply -k` would send it, and reading the result.

The tests in this folder check what a cluster receives, not the files that make it up: an
overlay's patches, its image and its name changes only exist once `kubectl kustomize` has
rendered them. No cluster is needed.
"""

from __future__ import annotations

import functools
import posixpath
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from tests.ci import require

ROOT: Final = Path(__file__).resolve().parents[2]
KUBE_DIR: Final = ROOT / "deploy" / "kubernetes"
BASE_DIR: Final = KUBE_DIR / "base"
OVERLAYS: Final = ("ha", "single")


def overlay_dir(name: str) -> Path:
    """deploy/kubernetes/overlays/`name`."""
    return KUBE_DIR / "overlays" / name


def kubectl() -> str:
    """kubectl on PATH; CI fails without one."""
    return require(
        shutil.which("kubectl"), "kubectl not found: it renders deploy/ (`kubectl kustomize`)"
    )


@functools.cache
def _render(directory: Path) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(directory: Path) -> Rendered:
    """The objects `kubectl apply -k directory` would send (rendered once per run)."""
    return Rendered(list(_render(directory)))


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a `matchLabels` selector (no expressions here) selects `labels`."""
    assert selector.keys() <= {"matchLabels"}, f"only matchLabels is read: {selector}"
    match: dict[str, str] = selector["matchLabels"]
    return match.items() <= labels.items()


@dataclass(frozen=True)
class Rendered:
    """A rendered kustomization: its objects, and the parts of them the tests read."""

    objects: list[dict[str, Any]]

    def all_of(self, kind: str) -> list[dict[str, Any]]:
        """Every object of `kind`."""
        return [doc for doc in self.objects if doc["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        """The one object of `kind`."""
        found = self.all_of(kind)
        assert len(found) == 1, f"expected one {kind}, got {len(found)}"
        return found[0]

    @property
    def deployment(self) -> dict[str, Any]:
        """The Deployment."""
        return self.one("Deployment")

    @property
    def pod_spec(self) -> dict[str, Any]:
        """The Deployment's pod spec."""
        return pod_spec(self.deployment)

    @property
    def container(self) -> dict[str, Any]:
        """The Deployment's one container, numbersvc."""
        return only_container(self.deployment)

    def pods(self) -> list[dict[str, Any]]:
        """The pod templates of every workload (the Deployment, a Job)."""
        return [doc["spec"]["template"] for doc in self.objects if doc["kind"] in _WORKLOADS]


_WORKLOADS: Final = frozenset({"Deployment", "Job"})


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    """A Deployment's or a Job's pod spec."""
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def only_container(workload: dict[str, Any]) -> dict[str, Any]:
    """A workload's one container (and no init container)."""
    spec = pod_spec(workload)
    containers: list[dict[str, Any]] = spec["containers"]
    assert len(containers) == 1, "the pod runs exactly one container"
    assert not spec.get("initContainers"), "no init container"
    return containers[0]


def env_entries(container: dict[str, Any]) -> list[dict[str, Any]]:
    """A container's env entries; envFrom would hide which settings are set."""
    assert "envFrom" not in container, "envFrom would hide which settings are set"
    entries: list[dict[str, Any]] = container.get("env", [])
    return entries


def env_literals(container: dict[str, Any]) -> dict[str, str]:
    """A container's env entries that carry a literal `value`."""
    return {e["name"]: str(e["value"]) for e in env_entries(container) if "value" in e}


def secret_file(workload: dict[str, Any], path: str) -> tuple[str, str]:
    """(Secret name, key) of the file at `path` in a workload's container: a Secret volume."""
    mounts = only_container(workload).get("volumeMounts", [])
    matches = [m for m in mounts if posixpath.dirname(path) == m["mountPath"]]
    assert len(matches) == 1, f"{path}: not in exactly one mounted directory"
    assert "subPath" not in matches[0], "a subPath mount never sees a rotated Secret"
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
    secret = volumes[matches[0]["name"]].get("secret")
    assert secret is not None, f"{path}: not on a Secret volume"
    assert "items" not in secret, "items would rename the Secret's keys"
    return secret["secretName"], posixpath.basename(path)
