"""The Istio example in deploy/istio agrees with the code and with the ha overlay it patches.

The overlay is rendered by `kubectl kustomize` (no cluster needed) and the result read as
Kubernetes would: it is deploy/kubernetes/overlays/ha plus the mesh; the Deployment's env names
are numbersvc settings and parse, the sidecar's XFCC setting is SANITIZE_SET, PeerAuthentication
STRICT selects the Deployment's pods (and leaves /metrics to Prometheus), and the migration Job
runs without a sidecar that would keep it from completing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from numbersvc.config import Config
from numbersvc.xfcc import peer_address
from tests.deploy.kustomize import ROOT, only_container, overlay_dir, render
from tests.deploy.test_manifests import SETTING_NAMES, assert_mounts_apart, named_port

ISTIO_DIR: Final = ROOT / "deploy" / "istio"
# Where Istio's sidecar connects from (its inbound passthrough binds 127.0.0.6).
SIDECAR_PEER: Final = "ipv4:127.0.0.6:40000"


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, Any]]:
    """The overlay's objects by kind, as `kubectl apply -k deploy/istio` would send them."""
    objects = render(ISTIO_DIR).objects
    kinds = [doc["kind"] for doc in objects]
    assert len(kinds) == len(set(kinds)), kinds
    return {doc["kind"]: doc for doc in objects}


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    container = only_container(deployment)
    assert container["name"] == "numbersvc"
    return container


def test_the_overlay_is_ha_in_the_mesh(rendered: dict[str, dict[str, Any]]) -> None:
    ha = render(overlay_dir("ha"))
    assert {doc["kind"] for doc in ha.objects} | {"PeerAuthentication"} == set(rendered)
    spec, ha_spec = rendered["Deployment"]["spec"], ha.deployment["spec"]
    for key in ("replicas", "strategy"):
        assert spec[key] == ha_spec[key]
    for key in ("topologySpreadConstraints", "terminationGracePeriodSeconds"):
        assert spec["template"]["spec"][key] == ha.pod_spec[key]
    env = _container(rendered["Deployment"])["env"]
    assert [entry for entry in ha.container["env"] if entry not in env] == []
    assert_mounts_apart(_container(rendered["Deployment"]))


def test_the_migration_job_runs_without_a_sidecar(rendered: dict[str, dict[str, Any]]) -> None:
    labels = rendered["Job"]["spec"]["template"]["metadata"]["labels"]
    assert labels["sidecar.istio.io/inject"] == "false"


def test_prometheus_may_scrape_without_mutual_tls(rendered: dict[str, dict[str, Any]]) -> None:
    levels = rendered["PeerAuthentication"]["spec"]["portLevelMtls"]
    metrics = named_port(_container(rendered["Deployment"]), "metrics")
    assert levels == {str(metrics): {"mode": "PERMISSIVE"}}, "only /metrics is left open"


def test_the_overlay_adds_strict_mutual_tls(
    rendered: dict[str, dict[str, Any]],
) -> None:
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
