"""deploy/kubernetes/ validated against the Kubernetes API schemas (kubernetes-validate, strict),
and checked for what the guide promises."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from stickyproxy.config import Settings, env_name, options
from stickyproxy.providers.dns import Target

DIR = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
DOCS = [(path.name, doc) for path in sorted(DIR.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text()) if doc]
BY_KIND = {(doc["kind"], doc["metadata"]["name"]): doc for _, doc in DOCS}


@pytest.mark.parametrize("name, doc", DOCS, ids=[f"{n}:{d['kind']}/{d['metadata']['name']}" for n, d in DOCS])
def test_manifest_is_valid_for_the_api(name, doc):
    kubernetes_validate.validate(doc, "1.30.0", strict=True)


def container(kind_name):
    return BY_KIND[kind_name]["spec"]["template"]["spec"]["containers"][0]


def test_phantomjs_pods_are_capped_and_found_by_a_headless_service():
    phantom = container(("Deployment", "phantomjs"))
    assert phantom["resources"]["limits"]["memory"]
    service = BY_KIND[("Service", "phantomjs")]
    assert service["spec"]["clusterIP"] == "None"
    port_name = service["spec"]["ports"][0]["name"]
    namespace = service["metadata"]["namespace"]
    env = {e["name"]: e.get("value") for e in container(("Deployment", "stickyproxy"))["env"]}
    target = Target.parse(env["STICKYPROXY_BACKEND_DNS"])
    assert target.port is None  # SRV: the records carry the port
    assert target.name == f"_{port_name}._tcp.phantomjs.{namespace}.svc.cluster.local"


def test_stickyproxy_replicas_share_a_key_and_probe_the_stats_port():
    deployment = BY_KIND[("Deployment", "stickyproxy")]
    assert deployment["spec"]["replicas"] >= 2
    proxy = container(("Deployment", "stickyproxy"))
    env = {e["name"]: e for e in proxy["env"]}
    assert env["STICKYPROXY_SESSION_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "stickyproxy"
    known = {env_name(f) for f in options()}
    assert set(env) <= known  # every variable is a real option
    stats_port = next(p for p in proxy["ports"] if p["name"] == "stats")["containerPort"]
    assert stats_port == Settings().stats_listen[1]
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "stats"}
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "stats"}
    service = BY_KIND[("Service", "stickyproxy")]
    assert {p["port"] for p in service["spec"]["ports"]} == {8910, 8911}
    assert "sessionAffinity" not in service["spec"]  # stateless: no stickiness needed


def test_phantomjs_is_reachable_only_from_stickyproxy():
    policy = BY_KIND[("NetworkPolicy", "phantomjs-only-from-stickyproxy")]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "phantomjs"}
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "stickyproxy"}}}]
    for _, doc in DOCS:
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        assert not spec.get("hostNetwork")
