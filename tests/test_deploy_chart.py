"""The Helm chart (deploy/helm/parley), rendered offline and validated without a cluster.

Helm itself comes from PyPI (``helm-python-sdk`` bundles Helm's Go SDK as a native library) and the
Kubernetes OpenAPI schemas from ``kubernetes-validate``; both are test extras in pyproject.toml.
No chart repository is reachable here, so the NATS dependency is rendered disabled (an external
NATS URL) or left out of the render, and its declared values are checked against the NATS chart's
1.x value layout separately.
"""

from __future__ import annotations

import ast
import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

try:
    import helm_python as helm
    import kubernetes_validate
except ImportError as exc:  # pragma: no cover - both are test extras: a missing one is a broken install
    raise ImportError(f"{exc}: install the test extras (pip install -e '.[test]')") from exc

from parley.cli.main import SERVICES
from parley.gateway.app import DRAIN_TIMEOUT_S

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "parley"
PRODUCTION = CHART / "ci" / "production-values.yaml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
CHART_ALERTS = CHART / "files" / "alerts.yaml"
RELEASE, NAMESPACE = "parley", "chat"
# The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest schema bundled.
KUBE_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
SECRET_KEYS = {"PARLEY_JWT_SECRET", "PARLEY_ADMIN_KEY", "PARLEY_TRANSCRIPT_DSN"}
EXTERNAL_NATS = {"nats": {"enabled": False}, "externalNats": {"urls": ["nats://nats.messaging.svc:4222"]}}
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


# --- rendering ------------------------------------------------------------------------------------
def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def production_values() -> dict[str, Any]:
    return yaml.safe_load(PRODUCTION.read_text())


def render(values: dict[str, Any] | None = None, release: str = RELEASE) -> list[dict[str, Any]]:
    """Every object the chart renders for these values (NOTES.txt left out)."""
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values or {}, name=release, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(manifests.items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def render_error(values: dict[str, Any]) -> str:
    """The message of a render that must fail (schema or template ``fail``)."""
    with pytest.raises(helm.HelmError) as info:
        render(values)
    return str(info.value)


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def component(obj: dict[str, Any]) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def deployments(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {component(d): d for d in of_kind(docs, "Deployment")}


def container(deploy: dict[str, Any]) -> dict[str, Any]:
    containers = deploy["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(deploy: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(deploy).get("env", [])}


def configmap_data(docs: list[dict[str, Any]]) -> dict[str, str]:
    return one(docs, "ConfigMap")["data"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


SCENARIOS = {
    "defaults": {},
    "defaults-external-nats": EXTERNAL_NATS,
    "production": None,  # ci/production-values.yaml
}


@pytest.fixture(scope="module", params=list(SCENARIOS))
def scenario(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    values = production_values() if request.param == "production" else SCENARIOS[request.param]
    return request.param, values, render(values)


@pytest.fixture(scope="module")
def default_docs() -> list[dict[str, Any]]:
    return render({})


@pytest.fixture(scope="module")
def production_docs() -> list[dict[str, Any]]:
    return render(production_values())


# --- every object is a valid Kubernetes object ---------------------------------------------------
def test_every_object_validates_against_the_kubernetes_schema_in_strict_mode(scenario) -> None:
    name, _, docs = scenario
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue  # no bundled schema for CRDs: checked in test_servicemonitor_and_prometheusrule
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"[{name}] {doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {version}: {exc}")


def test_objects_are_namespaced_labelled_and_unique(scenario) -> None:
    _, _, docs = scenario
    seen = set()
    for doc in docs:
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in seen, f"duplicate {key}"
        seen.add(key)
        assert doc["metadata"]["namespace"] == NAMESPACE
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/part-of"] == "parley"
        assert len(doc["metadata"]["name"]) <= 63


def test_chart_lints_clean_apart_from_the_unfetched_nats_dependency() -> None:
    report = helm.lint(str(CHART), strict=True, kube_version="v1.27.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    # `helm dependency build` needs the NATS chart repository, which is not reachable here.
    allowed = "chart directory is missing these dependencies: nats"
    assert [m["error"] for m in problems if m["error"] != allowed] == []
    report = helm.lint(str(CHART), production_values(), strict=True, kube_version="v1.27.0")
    assert [m["error"] for m in report["messages"] if m["severity"] >= 2 and m["error"] != allowed] == []


# --- one Deployment per service, probes, security, spread ------------------------------------------
def test_a_deployment_per_cli_service_running_that_service(scenario) -> None:
    _, values, docs = scenario
    deploys = deployments(docs)
    assert set(deploys) == set(SERVICES)
    for svc, deploy in deploys.items():
        c = container(deploy)
        assert c["args"] == [svc], "the image's ENTRYPOINT is `parley`; args pick the service"
        assert "command" not in c, "keep the image's ENTRYPOINT"
        assert c["image"].startswith(merge(render_defaults(), values)["image"]["repository"] + ":"), c["image"]


def test_probes_on_every_deployment_hit_the_health_endpoints_on_parley_http_port(scenario) -> None:
    _, _, docs = scenario
    http_port = int(configmap_data(docs)["PARLEY_HTTP_PORT"])
    for svc, deploy in deployments(docs).items():
        c = container(deploy)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"http": http_port}, svc
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
            assert c[probe]["httpGet"]["path"] == path, (svc, probe)
            assert c[probe]["httpGet"]["port"] in ("http", http_port), (svc, probe)
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"], svc
        assert c["resources"]["limits"]["memory"], svc


def test_pods_run_non_root_with_a_read_only_root_and_no_capabilities(scenario) -> None:
    _, _, docs = scenario
    for svc, deploy in deployments(docs).items():
        pod = deploy["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, svc
        assert pod["securityContext"]["runAsUser"] > 0, svc
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", svc
        assert pod["automountServiceAccountToken"] is False, svc
        sc = container(deploy)["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0, svc
        assert sc["readOnlyRootFilesystem"] is True, svc
        assert sc["allowPrivilegeEscalation"] is False, svc
        assert sc.get("privileged", False) is False, svc
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), svc
        # A read-only root still needs a writable /tmp.
        mounts = {m["mountPath"] for m in container(deploy)["volumeMounts"]}
        assert "/tmp" in mounts, svc


def test_pods_spread_over_zones_and_nodes(scenario) -> None:
    _, _, docs = scenario
    for svc, deploy in deployments(docs).items():
        pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
        constraints = deploy["spec"]["template"]["spec"]["topologySpreadConstraints"]
        keys = {c["topologyKey"] for c in constraints}
        assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}, svc
        for c in constraints:
            assert selects(c["labelSelector"]["matchLabels"], pod_labels), svc


def test_each_deployment_has_a_pod_disruption_budget(scenario) -> None:
    _, _, docs = scenario
    pdbs = of_kind(docs, "PodDisruptionBudget")
    for svc, deploy in deployments(docs).items():
        pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
        matching = [p for p in pdbs if selects(p["spec"]["selector"]["matchLabels"], pod_labels)]
        assert len(matching) == 1, f"{svc}: {len(matching)} PDBs"
        pdb = matching[0]["spec"]
        # maxUnavailable (not minAvailable): a one-replica service must not block node drains forever.
        assert pdb["maxUnavailable"] == 1 and "minAvailable" not in pdb, svc


def test_rolling_updates_never_reduce_capacity(scenario) -> None:
    _, values, docs = scenario
    for svc, deploy in deployments(docs).items():
        strategy = deploy["spec"]["strategy"]
        if svc == "transcript" and merge(render_defaults(), values)["transcript"]["database"]["type"] == "sqlite":
            assert strategy["type"] == "Recreate", "one SQLite writer on a ReadWriteOnce volume"
            continue
        assert strategy["type"] == "RollingUpdate", svc
        assert strategy["rollingUpdate"]["maxUnavailable"] == 0, svc
        assert strategy["rollingUpdate"]["maxSurge"] >= 1, svc


def render_defaults() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


# --- gateway drain: preStop, grace period, HPA, Service, Ingress -----------------------------------
def test_gateway_prestop_and_grace_period_cover_the_drain(scenario) -> None:
    _, _, docs = scenario
    deploys = deployments(docs)
    gw = deploys["gateway"]
    command = container(gw)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    sleep_s = int(command[1])
    assert sleep_s >= 3, "endpoints, kube-proxy and the ingress need a few seconds to drop the pod"
    grace = gw["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # The grace period counts from the preStop hook: sleep, then SIGTERM → drain (reconnect + 1012,
    # DRAIN_TIMEOUT_S at most) → HTTP/NATS shutdown.
    assert grace >= sleep_s + DRAIN_TIMEOUT_S + 5, (grace, sleep_s, DRAIN_TIMEOUT_S)
    for svc in ("router", "presence", "transcript"):
        # They take no connections: SIGTERM at once, finish in-flight work, leave the rest for redelivery.
        assert "lifecycle" not in container(deploys[svc]), svc
        assert deploys[svc]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 10


def test_grace_period_too_short_for_the_drain_is_refused() -> None:
    message = render_error({"gateway": {"preStopSleepSeconds": 10, "terminationGracePeriodSeconds": 20}})
    assert "terminationGracePeriodSeconds" in message


def test_gateway_hpa_owns_the_replica_count(scenario) -> None:
    _, _, docs = scenario
    hpa = one(docs, "HorizontalPodAutoscaler")
    gw = deployments(docs)["gateway"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": gw["metadata"]["name"]}
    assert "replicas" not in gw["spec"], "with an HPA the Deployment must not reset the count on upgrade"
    assert hpa["spec"]["minReplicas"] >= 2, "one gateway is a single point of failure"
    scale_down = hpa["spec"]["behavior"]["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] >= 300
    assert all(p["type"] == "Pods" and p["value"] == 1 for p in scale_down["policies"])
    for svc, deploy in deployments(docs).items():
        if svc != "gateway":
            assert deploy["spec"]["replicas"] >= 1


def test_gateway_without_autoscaling_has_fixed_replicas() -> None:
    docs = render({"gateway": {"autoscaling": {"enabled": False, "minReplicas": 2, "maxReplicas": 2}, "replicas": 4}})
    assert of_kind(docs, "HorizontalPodAutoscaler") == []
    assert deployments(docs)["gateway"]["spec"]["replicas"] == 4


def test_gateway_service_and_websocket_friendly_ingress(production_docs) -> None:
    gw = deployments(production_docs)["gateway"]
    services = {s["metadata"]["name"]: s for s in of_kind(production_docs, "Service")}
    gw_service = services[gw["metadata"]["name"]]
    assert selects(gw_service["spec"]["selector"], gw["spec"]["template"]["metadata"]["labels"])
    assert [p["targetPort"] for p in gw_service["spec"]["ports"]] == ["http"]
    ingress = one(production_docs, "Ingress")
    notes = ingress["metadata"]["annotations"]
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert int(notes["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 3600
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"][0]["hosts"] == ["chat.example.com"]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == gw_service["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in gw_service["spec"]["ports"]}


def test_no_ingress_unless_enabled(default_docs) -> None:
    assert of_kind(default_docs, "Ingress") == []


# --- configuration and secrets ---------------------------------------------------------------------
def test_configmap_variables_are_ones_parley_reads(scenario) -> None:
    _, _, docs = scenario
    source = "\n".join(p.read_text() for d in ("services", "shared") for p in (ROOT / d).rglob("*.py"))
    for key in configmap_data(docs):
        if key.startswith("PARLEY_"):
            assert f'"{key}"' in source, f"{key} is set by the chart but read nowhere in services/ or shared/"
        else:
            assert key.startswith("OTEL_"), key


def test_secrets_never_in_configmaps(scenario) -> None:
    _, _, docs = scenario
    for cm in of_kind(docs, "ConfigMap"):
        assert not SECRET_KEYS & set(cm["data"]), cm["data"].keys()
    for svc, deploy in deployments(docs).items():
        for name, entry in env_of(deploy).items():
            if name in SECRET_KEYS and not entry.get("value", "").startswith("sqlite:"):
                assert "value" not in entry, f"{svc}: {name} given in plain text"
                assert entry["valueFrom"]["secretKeyRef"]["key"] == name
    # Least privilege: only the gateway sees the JWT secret and admin key, only writers the DSN.
    deploys = deployments(docs)
    for svc in ("router", "presence", "transcript"):
        assert not {"PARLEY_JWT_SECRET", "PARLEY_ADMIN_KEY"} & set(env_of(deploys[svc])), svc
    assert {"PARLEY_JWT_SECRET", "PARLEY_ADMIN_KEY"} <= set(env_of(deploys["gateway"]))
    for svc in ("gateway", "router", "presence"):
        assert "PARLEY_TRANSCRIPT_DSN" not in env_of(deploys[svc]), svc
    assert "PARLEY_TRANSCRIPT_DSN" in env_of(deploys["transcript"])


def test_given_secret_values_appear_only_in_the_secret() -> None:
    values = merge(production_values(), {"secrets": {
        "existingSecret": "", "jwtSecret": "jwt-Zq81x-very-secret", "adminKey": "admin-Kp20y-very-secret",
        "transcriptDsn": "postgresql://parley:pw-Hx73@db.example.com:5432/parley",
    }})
    docs = render(values)
    secret = one(docs, "Secret")
    assert set(secret["data"]) == SECRET_KEYS
    for doc in docs:
        if doc["kind"] == "Secret":
            continue
        text = yaml.safe_dump(doc)
        for needle in ("jwt-Zq81x", "admin-Kp20y", "pw-Hx73", "db.example.com"):
            assert needle not in text, f"{needle} leaked into {doc['kind']}/{doc['metadata']['name']}"
    for deploy in deployments(docs).values():
        for entry in env_of(deploy).values():
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == secret["metadata"]["name"]


def test_existing_secret_is_referenced_and_no_secret_is_rendered(production_docs) -> None:
    assert of_kind(production_docs, "Secret") == []
    refs = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for d in deployments(production_docs).values()
        for e in env_of(d).values()
        if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]
    }
    assert refs == {"parley-secrets"}


def test_generated_secrets_by_default(default_docs) -> None:
    secret = one(default_docs, "Secret")
    assert set(secret["data"]) == {"PARLEY_JWT_SECRET", "PARLEY_ADMIN_KEY"}
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_nats_url_from_secret_when_it_carries_credentials() -> None:
    docs = render({
        "nats": {"enabled": False},
        "externalNats": {"urlFromSecret": True, "clusterSize": 3},
        "secrets": {"natsUrl": "nats://parley:pw-Qn55@nats-0:4222,nats://parley:pw-Qn55@nats-1:4222"},
    })
    assert "PARLEY_NATS_URL" not in configmap_data(docs)
    assert "PARLEY_NATS_URL" in one(docs, "Secret")["data"]
    for deploy in deployments(docs).values():
        assert env_of(deploy)["PARLEY_NATS_URL"]["valueFrom"]["secretKeyRef"]["key"] == "PARLEY_NATS_URL"
    assert configmap_data(docs)["PARLEY_STREAM_REPLICAS"] == "3"


def test_otel_settings(production_docs, default_docs) -> None:
    data = configmap_data(production_docs)
    assert data["OTEL_TRACES_EXPORTER"] == "otlp"
    assert data["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability.svc:4318"
    assert data["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    assert "OTEL_SERVICE_NAME" not in data, "one service.name per service, set on each Deployment"
    for svc, deploy in deployments(production_docs).items():
        env = env_of(deploy)
        assert env["OTEL_SERVICE_NAME"]["value"] == f"parley-{svc}"
        assert "deployment.environment=production" in env["OTEL_RESOURCE_ATTRIBUTES"]["value"]
        assert env["PARLEY_NODE_ID"]["value"] == "$(POD_NAME)"
    assert configmap_data(default_docs)["OTEL_TRACES_EXPORTER"] == "none"


# --- NATS and stream replicas ----------------------------------------------------------------------
def test_stream_replicas_match_the_nats_cluster(default_docs, production_docs) -> None:
    assert configmap_data(default_docs)["PARLEY_STREAM_REPLICAS"] == "3"  # bundled 3-node cluster
    assert configmap_data(production_docs)["PARLEY_STREAM_REPLICAS"] == "3"  # external, clusterSize 3
    cases = [
        (EXTERNAL_NATS, "1"),
        (merge(EXTERNAL_NATS, {"externalNats": {"clusterSize": 5}}), "3"),
        (merge(EXTERNAL_NATS, {"externalNats": {"clusterSize": 5}, "streamReplicas": 5}), "5"),
        ({"nats": {"config": {"cluster": {"replicas": 5}}}}, "3"),
        ({"nats": {"config": {"cluster": {"enabled": False}}}}, "1"),
    ]
    for values, expected in cases:
        assert configmap_data(render(values))["PARLEY_STREAM_REPLICAS"] == expected, values
    message = render_error(merge(EXTERNAL_NATS, {"externalNats": {"clusterSize": 3}, "streamReplicas": 5}))
    assert "streamReplicas" in message


def test_nats_url_points_at_the_bundled_cluster_or_the_external_one(default_docs, production_docs) -> None:
    assert configmap_data(default_docs)["PARLEY_NATS_URL"] == f"nats://{RELEASE}-nats.{NAMESPACE}.svc:4222"
    # The NATS chart names itself like Helm's usual fullname helper: a release called *nats* keeps its name.
    docs = render({}, release="chat-nats")
    assert configmap_data(docs)["PARLEY_NATS_URL"] == f"nats://chat-nats.{NAMESPACE}.svc:4222"
    urls = configmap_data(production_docs)["PARLEY_NATS_URL"].split(",")
    assert urls == production_values()["externalNats"]["urls"]


def test_chart_declares_the_official_nats_chart_as_a_conditional_dependency() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2"
    (dep,) = meta["dependencies"]
    assert dep["name"] == "nats"
    assert dep["repository"] == "https://nats-io.github.io/k8s/helm/charts/"
    assert dep["condition"] == "nats.enabled"
    assert re.match(r"^[~^]?1\.", dep["version"]), "the values below follow the NATS chart's 1.x layout"


# Value paths of the official NATS chart 1.x that this chart sets (its values.yaml layout).
NATS_CHART_1X_PATHS = {
    "config.cluster.enabled", "config.cluster.replicas",
    "config.jetstream.enabled", "config.jetstream.fileStore.enabled", "config.jetstream.fileStore.dir",
    "config.jetstream.fileStore.pvc.enabled", "config.jetstream.fileStore.pvc.size",
    "config.jetstream.fileStore.pvc.storageClassName", "config.jetstream.fileStore.maxSize",
    "config.jetstream.memoryStore.enabled", "config.jetstream.memoryStore.maxSize",
    "config.jetstream.merge", "config.merge",
    "container.merge", "podTemplate.topologySpreadConstraints", "podTemplate.merge",
    "podDisruptionBudget.enabled", "natsBox.enabled", "promExporter.enabled", "promExporter.podMonitor.enabled",
    "fullnameOverride", "nameOverride", "statefulSet.merge",
}
# Maps whose contents are free-form (merged into the NATS config or the Kubernetes object).
NATS_FREEFORM = {"config.jetstream.merge", "config.merge", "container.merge", "podTemplate.merge",
                 "podTemplate.topologySpreadConstraints", "statefulSet.merge"}


def leaf_paths(tree: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path not in NATS_FREEFORM:
            yield from leaf_paths(value, path + ".")
        else:
            yield path


def test_nats_dependency_values_form_a_durable_three_node_jetstream_cluster() -> None:
    nats = render_defaults()["nats"]
    assert nats["enabled"] is True
    passed = {k: v for k, v in nats.items() if k != "enabled"}
    unknown = set(leaf_paths(passed)) - NATS_CHART_1X_PATHS
    assert not unknown, f"not values of the NATS 1.x chart: {unknown}"
    cfg = nats["config"]
    assert cfg["cluster"]["enabled"] is True and cfg["cluster"]["replicas"] == 3
    js = cfg["jetstream"]
    assert js["enabled"] is True
    assert js["fileStore"]["enabled"] is True and js["fileStore"]["pvc"]["enabled"] is True
    assert re.match(r"^\d+Gi$", js["fileStore"]["pvc"]["size"])
    assert js["memoryStore"]["enabled"] is False
    # SPEC §3: acknowledged writes must survive power loss.
    assert js["merge"]["sync_interval"] == "always"
    assert nats["podDisruptionBudget"]["enabled"] is True
    spread = nats["podTemplate"]["topologySpreadConstraints"]
    assert spread["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule", "one NATS server per node"


# --- network policies ------------------------------------------------------------------------------
def test_network_policies_cover_every_pod_and_allow_what_it_needs(scenario) -> None:
    name, values, docs = scenario
    policies = of_kind(docs, "NetworkPolicy")
    for svc, deploy in deployments(docs).items():
        pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
        (policy,) = [p for p in policies if selects(p["spec"]["podSelector"]["matchLabels"], pod_labels)]
        spec = policy["spec"]
        assert set(spec["policyTypes"]) == {"Ingress", "Egress"}, svc
        egress_ports = {(p["port"], p.get("protocol", "TCP")) for rule in spec["egress"] for p in rule.get("ports", [])}
        assert (53, "UDP") in egress_ports and (4222, "TCP") in egress_ports, svc
        ingress_ports = {p["port"] for rule in spec["ingress"] for p in rule.get("ports", [])}
        assert ingress_ports == {"http"}, svc
        full = merge(render_defaults(), values)
        if svc == "transcript" and full["transcript"]["database"]["type"] == "postgresql":
            assert (full["transcript"]["database"]["postgresPort"], "TCP") in egress_ports
        if full["otel"]["enabled"]:
            assert (4318, "TCP") in egress_ports, svc
        if svc == "gateway" and full["gateway"]["networkPolicyFrom"]:
            # Narrowed client access: the scrape rule on the same port must be narrowed too.
            peers = [peer for rule in spec["ingress"] for peer in rule.get("from", [{}])]
            assert peers == full["gateway"]["networkPolicyFrom"] + full["networkPolicy"]["metricsFrom"], name


# --- monitoring ------------------------------------------------------------------------------------
def test_servicemonitor_and_prometheusrule(production_docs, default_docs) -> None:
    assert not CRD_KINDS & {d["kind"] for d in default_docs}, "CRD objects only when asked for"
    monitor = one(production_docs, "ServiceMonitor")
    selected = [s for s in of_kind(production_docs, "Service")
                if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
    assert {component(s) for s in selected} == set(SERVICES), "every service's /metrics is scraped"
    for s in selected:
        assert "http" in {p["name"] for p in s["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["http"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    rule = one(production_docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text()), "the chart ships deploy/prometheus/alerts.yaml unchanged"


def test_alert_rules_are_kept_in_one_place() -> None:
    assert CHART_ALERTS.read_bytes() == ALERTS.read_bytes(), (
        "deploy/helm/parley/files/alerts.yaml must be a copy of deploy/prometheus/alerts.yaml: "
        "cp deploy/prometheus/alerts.yaml deploy/helm/parley/files/alerts.yaml"
    )


DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_alert_rules_are_well_formed() -> None:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    names = [g["name"] for g in groups]
    assert len(names) == len(set(names))
    rules = alert_rules()
    assert len(rules) >= 10
    alerts = [r["alert"] for r in rules]
    assert len(alerts) == len(set(alerts)), "duplicate alert names"
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule["alert"]
        assert re.match(r"^Parley[A-Za-z]+$", rule["alert"])
        assert DURATION.match(str(rule["for"])), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        expr = rule["expr"]
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), rule["alert"]
        assert expr.count('"') % 2 == 0, rule["alert"]
        for window in re.findall(r"\[([^\]]+)\]", expr):
            assert DURATION.match(window), (rule["alert"], window)


def defined_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every Prometheus metric constructed in services/ and shared/: name → (type, label names)."""
    found: dict[str, tuple[str, tuple[str, ...]]] = {}
    for path in [*(ROOT / "services").rglob("*.py"), *(ROOT / "shared").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            kind = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if kind not in ("Counter", "Gauge", "Histogram", "Summary") or not node.args:
                continue
            if not (isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                continue
            labels_node = node.args[2] if len(node.args) > 2 else next(
                (k.value for k in node.keywords if k.arg == "labelnames"), None)
            labels = tuple(e.value for e in getattr(labels_node, "elts", []) if isinstance(e, ast.Constant))
            found[node.args[0].value] = (kind, labels)
    return found


def exposed_names() -> dict[str, tuple[str, ...]]:
    """Series names as Prometheus scrapes them (prometheus_client's suffixes) → label names."""
    exposed: dict[str, tuple[str, ...]] = {}
    for name, (kind, labels) in defined_metrics().items():
        if kind == "Counter":
            base = name.removesuffix("_total")
            suffixes = ["_total", "_created"]
        elif kind == "Gauge":
            base, suffixes = name, [""]
        elif kind == "Histogram":
            base, suffixes = name, ["_bucket", "_sum", "_count", "_created"]
        else:
            base, suffixes = name, ["_sum", "_count", "_created", ""]
        for suffix in suffixes:
            exposed[base + suffix] = labels + (("le",) if suffix == "_bucket" else ())
    return exposed


def test_every_metric_in_the_alert_rules_exists_in_the_code() -> None:
    exposed = exposed_names()
    assert "parley_gateway_connections" in exposed and "parley_gateway_nacks_total" in exposed
    used = set()
    for rule in alert_rules():
        for metric, selector in re.findall(r"\b(parley_[a-z0-9_]+)(\{[^}]*\})?", rule["expr"]):
            used.add(metric)
            assert metric in exposed, f"{rule['alert']}: {metric} is not a metric of services/ or shared/"
            for label in re.findall(r"([a-z_]+)\s*=~?", selector):
                assert label in exposed[metric], f"{rule['alert']}: {metric} has no label {label!r}"
        for label in re.findall(r"\bby \(([^)]*)\)", rule["expr"]):
            for name in (n.strip() for n in label.split(",")):
                # Target labels Prometheus adds at scrape time, or the metric's own.
                assert name in {"namespace", "pod", "le", "job", "instance"} or any(
                    name in exposed[m] for m in used), (rule["alert"], name)
    services = {m.split("_")[1] for m in used}
    assert {"gateway", "router", "presence", "transcript"} <= services, "alerts for every service"


# --- values.schema.json: bad values fail at install time -------------------------------------------
BAD_VALUES = {
    "unknown top-level key": {"replicaCount": 3},
    "unknown key in a service": {"gateway": {"replica": 3}},
    "replicas as a string": {"router": {"replicas": "3"}},
    "zero replicas": {"presence": {"replicas": 0}},
    "routing mode": {"config": {"routingMode": "random"}},
    "log level": {"config": {"logLevel": "verbose"}},
    "dedupe window under the 2 minutes of G2": {"config": {"dedupeWindowS": 30}},
    "queue policy field": {"config": {"queues": {"*": {"max_wait": 10}}}},
    "secret through extraEnv": {"config": {"extraEnv": {"PARLEY_JWT_SECRET": "x"}}},
    "lower-case env name": {"config": {"extraEnv": {"foo": "x"}}},
    "sqlite with two writers": {"transcript": {"replicas": 2}},
    "database type": {"transcript": {"database": {"type": "mysql"}}},
    "non-postgres DSN": {"secrets": {"transcriptDsn": "mysql://db/parley"}},
    "nats off without URLs": {"nats": {"enabled": False}},
    "bad NATS URL": {"nats": {"enabled": False}, "externalNats": {"urls": ["localhost:4222"]}},
    "image digest": {"image": {"digest": "latest"}},
    "pull policy": {"image": {"pullPolicy": "Sometimes"}},
    "ingress host": {"gateway": {"ingress": {"host": "Chat Example"}}},
    "short proxy timeout": {"gateway": {"ingress": {"proxyTimeoutSeconds": 30}}},
    "service type": {"gateway": {"service": {"type": "ExternalName"}}},
    "resource quantity": {"gateway": {"resources": {"requests": {"cpu": "lots"}}}},
    "pdb shape": {"router": {"pdb": {"minAvailable": 1}}},
    "stream replicas": {"streamReplicas": 7},
    "otel protocol": {"otel": {"protocol": "grpc"}},
    "spread policy": {"topologySpread": {"zone": {"whenUnsatisfiable": "Maybe"}}},
    "transcript batch": {"transcript": {"batch": 0}},
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_schema_rejects_bad_values(case: str) -> None:
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(BAD_VALUES[case])
    # and an install/template with them fails too
    render_error(BAD_VALUES[case])


def test_schema_accepts_the_shipped_values() -> None:
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema({})
        chart.validate_schema(production_values())
        chart.validate_schema(EXTERNAL_NATS)


def test_template_guards_what_the_schema_cannot() -> None:
    message = render_error({"transcript": {"replicas": 2, "database": {"type": "postgresql"}}})
    assert "transcriptDsn" in message, "PostgreSQL needs a DSN (or an existing Secret)"
    message = render_error({"config": {"dedupeWindowS": 7200, "streamMaxAgeS": 3600}})
    assert "dedupeWindowS" in message
    message = render_error({"otel": {"enabled": True}})
    assert "otel.endpoint" in message
    message = render_error({"gateway": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 3}}})
    assert "minReplicas" in message


def test_sqlite_demo_mode_keeps_one_writer_on_a_volume(default_docs) -> None:
    transcript = deployments(default_docs)["transcript"]
    assert transcript["spec"]["replicas"] == 1
    env = env_of(transcript)
    assert env["PARLEY_TRANSCRIPT_DSN"]["value"].startswith("sqlite:////")
    db_path = env["PARLEY_TRANSCRIPT_DSN"]["value"].removeprefix("sqlite:///")
    mounts = {m["mountPath"]: m["name"] for m in container(transcript)["volumeMounts"]}
    assert any(db_path.startswith(path + "/") for path in mounts), "the database file must be on a volume"
    pvc = one(default_docs, "PersistentVolumeClaim")
    volumes = {v["name"]: v for v in transcript["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]


def test_postgresql_mode_scales_writers(production_docs) -> None:
    transcript = deployments(production_docs)["transcript"]
    assert transcript["spec"]["replicas"] == 3
    assert of_kind(production_docs, "PersistentVolumeClaim") == []
    assert env_of(transcript)["PARLEY_TRANSCRIPT_DSN"]["valueFrom"]["secretKeyRef"]["key"] == "PARLEY_TRANSCRIPT_DSN"


def test_config_change_rolls_the_pods() -> None:
    a = deployments(render(EXTERNAL_NATS))["router"]["spec"]["template"]["metadata"]["annotations"]
    b = deployments(render(merge(EXTERNAL_NATS, {"config": {"rateLimit": 50}})))["router"]
    assert a["checksum/config"] != b["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
