"""The Istio example in deploy/istio agrees with the code and with the base it patches.

The overlay is rendered by `kubectl kustomize` (no cluster needed) and the result read as
Kubernetes would: the Deployment's env names are numbersvc settings and parse, the sidecar's
XFCC setting is SANITIZE_SET, and PeerAuthentication STRICT selects the Deployment's pods.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from numbersvc.config import Config
from numbersvc.xfcc import peer_address
from tests.ci import require
from tests.deploy.test_manifests import ROOT, SETTING_NAMES

ISTIO_DIR: Final = ROOT / "deploy" / "istio"
# Where Istio's sidecar connects from (its inbound passthrough binds 127.0.0.6).
SIDECAR_PEER: Final = "ipv4:127.0.0.6:40000"


def kubectl() -> str:
    """kubectl on PATH; CI fails without one."""
    return require(
        shutil.which("kubectl"), "kubectl not found: it renders deploy/istio (`kubectl kustomize`)"
    )


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, Any]]:
    """The overlay's objects by kind, as `kubectl apply -k deploy/istio` would send them."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(ISTIO_DIR)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    kinds = [doc["kind"] for doc in objects]
    assert len(kinds) == len(set(kinds)), kinds
    return {doc["kind"]: doc for doc in objects}


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["numbersvc"]
    return containers[0]


def test_the_overlay_keeps_the_base_and_adds_strict_mutual_tls(
    rendered: dict[str, dict[str, Any]],
) -> None:
    assert {"Deployment", "Service", "PersistentVolumeClaim", "PeerAuthentication"} <= set(rendered)
    policy = rendered["PeerAuthentication"]
    assert policy["spec"]["mtls"]["mode"] == "STRICT"
    labels = rendered["Deployment"]["spec"]["template"]["metadata"]["labels"]
    selector = policy["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items(), "the policy must select numbersvc's pods"


def test_the_sidecar_replaces_the_callers_header(rendered: dict[str, dict[str, Any]]) -> None:
    annotations = rendered["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    proxy_config = yaml.safe_load(annotations["proxy.istio.io/config"])
    assert proxy_config == {"proxyHeaders": {"forwardedClientCert": "SANITIZE_SET"}}


def test_env_names_are_settings_and_trust_the_sidecar(
    rendered: dict[str, dict[str, Any]],
) -> None:
    env = {e["name"]: e.get("value") for e in _container(rendered["Deployment"])["env"]}
    assert set(env) - SETTING_NAMES - {"PLIVO_AUTH_ID", "PLIVO_AUTH_TOKEN"} == set()
    config = Config.from_env({k: v for k, v in env.items() if v is not None})
    networks = config.trusted_xfcc_networks()
    sidecar = peer_address(SIDECAR_PEER)
    assert any(sidecar in network for network in networks), networks
    assert config.callers_file, "XFCC names callers only when there is a callers file"
    mounts = {m["mountPath"] for m in _container(rendered["Deployment"])["volumeMounts"]}
    assert str(Path(config.callers_file).parent) in mounts
