"""The deployment and monitoring configuration: Kubernetes manifests (deploy/k8s), Prometheus
configuration and alerts (deploy/prometheus), the Grafana dashboard (deploy/grafana),
docker-compose.yml and the GitHub Actions workflow.

Needs no cluster, Docker engine or network. promtool (Debian's `prometheus` package) and
docker-compose run as programs; on a developer's machine without them those tests are skipped,
with CI=true they fail (`make system-packages` installs both).
"""

import copy
import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import kubernetes_validate
import pytest
import redis as redis_client
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"

# The oldest Kubernetes release the manifests must be valid for.
KUBERNETES_VERSION = "1.30"
IN_CI = os.environ.get("CI", "").lower() == "true"

COMPONENT = "app.kubernetes.io/component"
APP_COMPONENTS = {"web", "worker", "beat", "migrate", "flower"}
# The container path of the writable scratch volume (the root filesystem is read-only).
TMP = "/tmp"  # noqa: S108 - a path inside the containers, not used by the tests
SECRET_KEYS = {
    "DJANGO_SECRET_KEY",
    "POSTGRES_PASSWORD",
    "REDIS_PASSWORD",
    "FLOWER_BASIC_AUTH",
    "FEDLENS_METRICS_TOKEN",
}


def required_program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (`make system-packages` installs it)"
        if IN_CI:
            pytest.fail(f"CI=true: {message}")
        pytest.skip(message)
    return path


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    return result


# --- Kubernetes -----------------------------------------------------------------------------


def load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def manifests() -> list[tuple[str, dict]]:
    """Every object of the manifests kustomization.yaml lists, with its file name."""
    return [
        (name, doc) for name in kustomization()["resources"] for doc in load_documents(K8S / name)
    ]


def objects(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in manifests() if doc["kind"] == kind}


def workloads() -> dict[str, dict]:
    """Deployments, StatefulSets and Jobs by name."""
    found = {}
    for kind in ("Deployment", "StatefulSet", "Job"):
        found.update(objects(kind))
    return found


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def all_containers(workload: dict) -> list[dict]:
    spec = pod_spec(workload)
    return spec.get("initContainers", []) + spec["containers"]


def component(workload: dict) -> str:
    return workload["spec"]["template"]["metadata"]["labels"][COMPONENT]


def env_of(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


def test_kustomization_lists_every_manifest_except_the_secret_template():
    files = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    listed = set(kustomization()["resources"])
    assert "secret.example.yaml" in files
    assert "secret.example.yaml" not in listed, "the Secret template must never be applied"
    assert listed == files - {"secret.example.yaml"}
    assert kustomization()["namespace"] == "fedlens"


ALL_K8S_DOCUMENTS = [
    pytest.param(doc, id=f"{path.name}:{doc['kind']}/{doc['metadata']['name']}")
    for path in sorted(K8S.glob("*.yaml"))
    if path.name != "kustomization.yaml"
    for doc in load_documents(path)
]


@pytest.mark.parametrize("document", ALL_K8S_DOCUMENTS)
def test_manifest_is_valid_kubernetes_in_strict_mode(document):
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_strict_validation_rejects_an_unknown_field():
    deployment = copy.deepcopy(workloads()["fedlens-web"])
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_every_object_lives_in_the_fedlens_namespace():
    for name, doc in manifests():
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == "fedlens"
        else:
            assert doc["metadata"].get("namespace") == "fedlens", f"{name}: {doc['kind']}"


def test_worker_pods_each_request_one_gpu_on_gpu_nodes():
    worker = workloads()["fedlens-worker"]
    spec = pod_spec(worker)
    (container,) = spec["containers"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"], "workers must be placed on GPU nodes"
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    # No surge pod during an update: it would need a spare GPU.
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    environment = env_of(container)
    assert environment["FEDLENS_WORKER_METRICS_PORT"]["value"] == "9808"
    assert "PROMETHEUS_MULTIPROC_DIR" in environment
    assert {"name": "metrics", "containerPort": 9808} in container["ports"]
    # The image's command (workers.launch) runs: one worker per visible GPU.
    assert "command" not in container and "args" not in container
    # No other workload asks for a GPU.
    for name, workload in workloads().items():
        if name != "fedlens-worker":
            for other in all_containers(workload):
                assert "nvidia.com/gpu" not in str(other.get("resources")), name


def test_beat_runs_exactly_once():
    beat = workloads()["fedlens-beat"]
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"] == {"type": "Recreate"}
    targets = {
        hpa["spec"]["scaleTargetRef"]["name"] for hpa in objects("HorizontalPodAutoscaler").values()
    }
    assert "fedlens-beat" not in targets
    (container,) = pod_spec(beat)["containers"]
    assert container["command"][:4] == ["celery", "-A", "flproject", "beat"]
    assert "/data/celerybeat-schedule" in container["command"]


def test_web_has_replicas_probes_autoscaler_and_disruption_budget():
    web = workloads()["fedlens-web"]
    assert web["spec"]["replicas"] == 2
    (container,) = pod_spec(web)["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"]["cpu"], "the CPU autoscaler needs a CPU request"
    hpa = objects("HorizontalPodAutoscaler")["fedlens-web"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "fedlens-web",
    }
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    pdb = objects("PodDisruptionBudget")["fedlens-web"]
    assert (
        pdb["spec"]["selector"]["matchLabels"].items()
        <= web["spec"]["template"]["metadata"]["labels"].items()
    )


def test_pods_run_unprivileged_with_read_only_root_and_no_api_token():
    for name, workload in workloads().items():
        spec = pod_spec(workload)
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["serviceAccountName"] == "fedlens", name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        mounts_tmp = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for container in all_containers(workload):
            where = f"{name}/{container['name']}"
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert container["resources"]["requests"]["memory"], where
            assert container["resources"]["limits"]["memory"], where
            scratch = [m["name"] for m in container["volumeMounts"] if m["mountPath"] == TMP]
            assert scratch and scratch[0] in mounts_tmp, f"{where}: {TMP} must be an emptyDir"
    for account in objects("ServiceAccount").values():
        assert account["automountServiceAccountToken"] is False


def test_the_application_role_grants_nothing():
    assert objects("Role")["fedlens"]["rules"] == []
    binding = objects("RoleBinding")["fedlens"]
    assert binding["roleRef"]["name"] == "fedlens"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "fedlens", "namespace": "fedlens"}
    ]


def test_the_data_volume_is_shared_read_write_many_by_web_workers_and_beat():
    claim = objects("PersistentVolumeClaim")["fedlens-data"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for name in ("fedlens-web", "fedlens-worker", "fedlens-beat"):
        spec = pod_spec(workloads()[name])
        volumes = {v["name"]: v for v in spec["volumes"]}
        (container,) = spec["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/data"]
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == "fedlens-data", name


def test_databases_are_stateful_sets_with_their_own_volumes():
    sets = objects("StatefulSet")
    postgres, redis = sets["postgres"], sets["redis"]
    assert postgres["spec"]["template"]["spec"]["containers"][0]["image"] == "postgres:16"
    assert redis["spec"]["template"]["spec"]["containers"][0]["image"] == "redis:7"
    assert "--appendonly" in redis["spec"]["template"]["spec"]["containers"][0]["args"]
    for statefulset in (postgres, redis):
        (template,) = statefulset["spec"]["volumeClaimTemplates"]
        assert template["spec"]["accessModes"] == ["ReadWriteOnce"]
    services = objects("Service")
    assert services["postgres"]["spec"]["clusterIP"] == "None", "postgres has a headless Service"
    assert postgres["spec"]["serviceName"] == "postgres"
    assert "redis" in services


def test_the_config_map_holds_no_secret():
    data = objects("ConfigMap")["fedlens-config"]["data"]
    for key, value in data.items():
        assert not re.search(r"SECRET|PASSWORD|TOKEN|AUTH|PRIVATE|CREDENTIAL", key), key
        assert not re.search(r"://[^/@\s]*:[^/@\s]*@", value), f"{key} carries a password"
    assert data["DJANGO_SETTINGS_MODULE"] == "flproject.settings.production"
    assert data["DJANGO_ALLOWED_HOSTS"]


def test_secret_values_come_only_from_the_secret():
    for name, workload in workloads().items():
        for container in all_containers(workload):
            for variable, item in env_of(container).items():
                if variable in SECRET_KEYS:
                    reference = item["valueFrom"]["secretKeyRef"]
                    assert reference == {"name": "fedlens-secrets", "key": variable}, name
                if variable == "DATABASE_URL":
                    assert "$(POSTGRES_PASSWORD)" in item["value"], name


def test_the_secret_template_holds_placeholders_only():
    (secret,) = load_documents(K8S / "secret.example.yaml")
    assert secret["kind"] == "Secret" and "data" not in secret
    assert set(secret["stringData"]) == SECRET_KEYS
    for key, value in secret["stringData"].items():
        assert "REPLACE-ME" in value, key
    assert (
        "kubectl -n fedlens create secret generic fedlens-secrets"
        in (K8S / "secret.example.yaml").read_text()
    )


def test_every_app_pod_gets_the_settings_and_the_database_and_redis_urls():
    assert "REDIS_URL" not in objects("ConfigMap")["fedlens-config"]["data"]
    for name, workload in workloads().items():
        if component(workload) not in APP_COMPONENTS:
            continue
        for container in all_containers(workload):
            assert {"configMapRef": {"name": "fedlens-config"}} in container["envFrom"], name
            environment = env_of(container)
            assert {"DJANGO_SECRET_KEY", "DATABASE_URL", "REDIS_URL"} <= set(environment), name
            # Redis admits no anonymous client: every process logs in as `fedlens`. $(VAR)
            # only expands a variable defined before it.
            url = environment["REDIS_URL"]["value"]
            assert url == "redis://fedlens:$(REDIS_PASSWORD)@redis:6379/0", name
            assert list(environment).index("REDIS_PASSWORD") < list(environment).index(
                "REDIS_URL"
            ), name


def test_redis_admits_only_logged_in_users_and_offers_tls_to_sites():
    redis = objects("StatefulSet")["redis"]
    spec = pod_spec(redis)
    (container,) = spec["containers"]
    script = container["command"][2]
    assert "user default off" in script and "user fedlens on #$hash" in script
    # The server's user may manage the sites' users (ACL SETUSER/DELUSER): +@all.
    assert "~* &* +@all" in script
    assert "tls-port 6380" in script and "tls-auth-clients no" in script
    assert container["args"][-2:] == ["--include", f"{TMP}/fedlens.conf"]
    assert env_of(container)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "fedlens-secrets",
        "key": "REDIS_PASSWORD",
    }
    for probe in (container["readinessProbe"], container["livenessProbe"]):
        assert "--user fedlens" in probe["exec"]["command"][-1]
    volumes = {v["name"]: v for v in spec["volumes"]}
    (tls,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tls"]
    assert tls["readOnly"] is True
    assert volumes[tls["name"]]["secret"]["secretName"] == "fedlens-redis-tls"
    assert {"name": "redis-tls", "containerPort": 6380} in container["ports"]
    service = objects("Service")["redis-tls"]["spec"]
    assert service["type"] == "LoadBalancer"
    assert service["ports"] == [{"name": "redis-tls", "port": 6380, "targetPort": "redis-tls"}]
    # Only the TLS port is reachable from outside the namespace.
    policy = objects("NetworkPolicy")["redis-from-app"]
    (outside,) = ingress_sources(policy, 6380)
    assert "ipBlock" in outside
    site_broker = objects("ConfigMap")["fedlens-config"]["data"]["FEDLENS_SITE_BROKER_URL"]
    assert site_broker.startswith("rediss://") and ":6380/" in site_broker


def test_services_select_pods_and_name_their_ports():
    templates = [w["spec"]["template"] for w in workloads().values()]
    for name, service in objects("Service").items():
        selector = service["spec"]["selector"]
        matching = [t for t in templates if selector.items() <= t["metadata"]["labels"].items()]
        assert matching, f"Service {name} selects no pod"
        port_names = {
            port["name"]
            for t in matching
            for c in t["spec"]["containers"]
            for port in c.get("ports", [])
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"Service {name}: {port['targetPort']}"


def test_ingress_has_tls_websocket_timeouts_and_the_upload_limit():
    ingresses = objects("Ingress")
    upload_mb = objects("ConfigMap")["fedlens-config"]["data"]["FEDLENS_MAX_UPLOAD_MB"]
    services = objects("Service")
    for name, ingress in ingresses.items():
        assert ingress["spec"]["ingressClassName"] == "nginx", name
        assert ingress["spec"]["tls"][0]["secretName"] == "fedlens-tls", name
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                assert path["backend"]["service"]["name"] in services, name
    main = ingresses["fedlens"]["metadata"]["annotations"]
    assert main["nginx.ingress.kubernetes.io/proxy-body-size"] == f"{upload_mb}m"
    websocket = ingresses["fedlens-websocket"]
    assert websocket["spec"]["rules"][0]["http"]["paths"][0]["path"] == "/ws/"
    annotations = websocket["metadata"]["annotations"]
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 3600
    internal = ingresses["fedlens-internal"]
    assert internal["spec"]["rules"][0]["http"]["paths"][0]["path"] == "/metrics"


def ingress_sources(policy: dict, port: int) -> list[dict]:
    return [
        peer
        for rule in policy["spec"].get("ingress", [])
        if any(p["port"] == port for p in rule["ports"])
        for peer in rule["from"]
    ]


def test_network_policies_deny_by_default_and_open_only_the_needed_paths():
    policies = objects("NetworkPolicy")
    deny = policies["default-deny-all"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny

    for datastore, port in (("postgres", 5432), ("redis", 6379)):
        (policy,) = [
            p
            for p in policies.values()
            if p["spec"]["podSelector"].get("matchLabels", {}).get(COMPONENT) == datastore
        ]
        (peer,) = ingress_sources(policy, port)
        (expression,) = peer["podSelector"]["matchExpressions"]
        assert expression["key"] == COMPONENT
        assert set(expression["values"]) == APP_COMPONENTS
    egress = policies["app-to-datastores"]["spec"]
    assert set(egress["podSelector"]["matchExpressions"][0]["values"]) == APP_COMPONENTS
    assert {port["port"] for rule in egress["egress"] for port in rule["ports"]} == {5432, 6379}

    web = policies["web-from-ingress-and-prometheus"]
    namespaces = {
        p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for p in ingress_sources(web, 8000)
    }
    assert namespaces == {"ingress-nginx", "monitoring"}
    for name, port in (("worker-metrics-from-prometheus", 9808), ("flower-from-prometheus", 5555)):
        (peer,) = ingress_sources(policies[name], port)
        assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}


def test_migrations_run_as_a_job_and_workers_wait_for_them():
    job = workloads()["fedlens-migrate"]
    (container,) = pod_spec(job)["containers"]
    assert container["command"] == ["python", "manage.py", "migrate", "--noinput"]
    for name in ("fedlens-worker", "fedlens-beat"):
        (init,) = pod_spec(workloads()[name])["initContainers"]
        assert "migrate --check" in " ".join(init["command"]), name


# --- PromQL names ------------------------------------------------------------------------------


def read_metric_list(path: Path) -> dict[str, str]:
    metrics = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, kind = line.split()
            assert kind in {"counter", "gauge", "histogram"}, line
            metrics[name] = kind
    return metrics


EXPORTED = read_metric_list(PROMETHEUS / "exported-metrics.txt")
FLOWER = read_metric_list(PROMETHEUS / "flower-metrics.txt")
KNOWN = {**EXPORTED, **FLOWER, "up": "gauge"}

# Words of PromQL that look like metric names but are not.
PROMQL_KEYWORDS = {
    "and", "or", "unless", "bool", "by", "without", "on", "ignoring", "group_left",
    "group_right", "offset", "atmodifier", "inf", "nan",
}  # fmt: skip
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def metric_names(expression: str) -> set[str]:
    """The metric names an expression selects: identifiers that are not followed by `(` (a
    function or aggregation) and are not keywords, once string literals, label matchers, range
    selectors and grouping label lists are taken out."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expression)
    text = re.sub(r"\{[^}]*\}", "{}", text)
    text = re.sub(r"\[[^\]]*\]", "[]", text)
    text = GROUPING.sub(" ", text)
    names = set()
    for match in re.finditer(r"(?<![\w:.$])[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        name = match.group()
        if text[match.end() :].lstrip().startswith("(") or name.lower() in PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def is_known(name: str) -> bool:
    if name in KNOWN:
        return True
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and KNOWN.get(name.removesuffix(suffix)) == "histogram":
            return True
    return False


def test_metric_name_parser():
    histogram = 'rate(a_bucket{job="x", s=~"5.."}[$__rate_interval])'
    assert metric_names(f"histogram_quantile(0.95, sum by (le, view) ({histogram}))") == {
        "a_bucket"
    }
    assert metric_names('max by (queue) (d{queue=~"training"}) > 0 unless on (queue) c > 0') == {
        "d",
        "c",
    }
    assert metric_names('free/total < 0.1 and absent(up{job="w"}) or x offset 5m') == {
        "free",
        "total",
        "up",
        "x",
    }
    assert metric_names("sum(rate(m[5m])) * 60 + 1e3") == {"m"}
    assert not is_known("fedlens_experiments_bucket"), "only histograms have buckets"
    assert is_known("fedlens_round_duration_seconds_bucket")


def test_the_exported_metric_list_names_the_fedlens_metrics():
    expected = {
        "fedlens_experiments", "fedlens_rounds_closed_total", "fedlens_round_duration_seconds",
        "fedlens_client_task_duration_seconds", "fedlens_client_failures_total",
        "fedlens_client_late_total", "fedlens_global_accuracy", "fedlens_global_auc",
        "fedlens_global_loss", "fedlens_participating_clients", "fedlens_queue_depth",
        "fedlens_queue_consumers", "fedlens_rounds_overdue", "fedlens_data_disk_free_bytes",
        "fedlens_data_disk_total_bytes",
        "django_http_requests_total_by_view_transport_method_total",
        "django_http_responses_total_by_status_total",
        "django_http_requests_latency_seconds_by_view_method",
    }  # fmt: skip
    assert expected <= set(EXPORTED)
    for name, kind in EXPORTED.items():
        assert (kind == "counter") == name.endswith("_total"), name


# --- Prometheus ------------------------------------------------------------------------------


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_checks_both_configurations(tmp_path):
    promtool = required_program("promtool")
    for name in ("prometheus.yml", "prometheus-k8s.yml", "alerts.yml"):
        shutil.copy(PROMETHEUS / name, tmp_path / name)
    # The token file exists in the container only; promtool wants it to exist.
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "metrics-token").write_text("test-token")
    run([promtool, "check", "config", "prometheus.yml", "prometheus-k8s.yml"], tmp_path)


def test_promtool_checks_the_rules():
    promtool = required_program("promtool")
    result = run([promtool, "check", "rules", "alerts.yml"], PROMETHEUS)
    assert f"{len(alert_rules())} rules found" in result.stdout


def test_promtool_unit_tests_of_the_alerts_pass():
    promtool = required_program("promtool")
    run([promtool, "test", "rules", "alerts.test.yml"], PROMETHEUS)
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS / "alerts.test.yml").read_text()))
    assert len(tested) >= 2


def test_the_required_alerts_exist():
    rules = {rule["alert"]: rule for rule in alert_rules()}
    expected = {
        "FedLensWebDown": "up",
        "FedLensHighErrorRatio": "django_http_responses_total_by_status_total",
        "FedLensSlowResponses": "django_http_requests_latency_seconds_by_view_method_bucket",
        "FedLensQueueBacklog": "fedlens_queue_depth",
        "FedLensQueueWithoutConsumer": "fedlens_queue_consumers",
        "FedLensRoundOverdue": "fedlens_rounds_overdue",
        "FedLensDataDiskAlmostFull": "fedlens_data_disk_total_bytes",
    }
    for alert, metric in expected.items():
        assert metric in metric_names(rules[alert]["expr"]), alert
    assert 'status=~"5.."' in rules["FedLensHighErrorRatio"]["expr"]
    assert "0.95" in rules["FedLensSlowResponses"]["expr"]
    assert "< 0.1" in rules["FedLensDataDiskAlmostFull"]["expr"]


def test_every_alert_has_duration_severity_and_runbook():
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names))
    for rule in alert_rules():
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], name
        assert re.fullmatch(r"docs/operations\.md#alert-[a-z0-9-]+", annotations["runbook"]), name


def test_alerts_name_only_exported_metrics():
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        unknown = {name for name in names if not is_known(name)}
        assert not unknown, f"{rule['alert']}: {unknown} not in exported-metrics.txt"


def scrape_jobs(name: str) -> dict[str, dict]:
    config = yaml.safe_load((PROMETHEUS / name).read_text())
    assert config["rule_files"] == ["alerts.yml"]
    return {job["job_name"]: job for job in config["scrape_configs"]}


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus-k8s.yml"])
def test_prometheus_scrapes_web_with_the_token_workers_and_flower(name):
    jobs = scrape_jobs(name)
    web, worker, flower = jobs["fedlens-web"], jobs["fedlens-worker"], jobs["fedlens-flower"]
    for job in (web, worker):
        assert job["metrics_path"] == "/metrics"
        assert job["authorization"]["credentials_file"] == "secrets/metrics-token"
    assert web["dns_sd_configs"][0]["port"] == 8000
    assert worker["dns_sd_configs"][0]["port"] == 9808
    assert "authorization" not in flower, "Flower 2.2 serves /metrics without login"


# --- Grafana ---------------------------------------------------------------------------------


def dashboards() -> list[dict]:
    paths = sorted((GRAFANA / "dashboards").glob("*.json"))
    assert paths
    return [json.loads(path.read_text()) for path in paths]


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    queries = [
        (f"panel {panel['title']!r}", target["expr"])
        for panel in dashboard["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = (
                variable["query"]["query"]
                if isinstance(variable["query"], dict)
                else variable["query"]
            )
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            assert match, f"variable {variable['name']}: {query}"
            queries.append((f"variable {variable['name']}", match.group(1)))
    return queries


def test_dashboards_load_and_every_panel_has_a_datasource_and_targets():
    for dashboard in dashboards():
        assert dashboard["schemaVersion"] >= 38
        assert dashboard["uid"] and dashboard["title"]
        variables = {v["name"] for v in dashboard["templating"]["list"]}
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(ids) == len(set(ids))
        for panel in dashboard["panels"]:
            assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["type"] == "prometheus", panel["title"]
            uid = panel["datasource"]["uid"]
            assert uid == "fedlens-prometheus" or uid.strip("${}") in variables, panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["expr"].strip() and target["refId"], panel["title"]
                assert target["datasource"] == panel["datasource"], panel["title"]


def test_dashboards_name_only_exported_metrics():
    for dashboard in dashboards():
        for where, expression in dashboard_queries(dashboard):
            names = metric_names(expression)
            assert names, where
            unknown = {name for name in names if not is_known(name)}
            assert not unknown, f"{where}: {unknown} not in exported-metrics.txt"


def test_the_dashboard_covers_http_queues_federation_quality_and_resources():
    used = set()
    for dashboard in dashboards():
        for _, expression in dashboard_queries(dashboard):
            used |= metric_names(expression)
    expected = {
        "django_http_requests_total_by_view_transport_method_total",
        "django_http_responses_total_by_status_total",
        "django_http_requests_latency_seconds_by_view_method_bucket",
        "fedlens_queue_depth", "fedlens_queue_consumers", "fedlens_experiments",
        "fedlens_rounds_closed_total", "fedlens_round_duration_seconds_bucket",
        "fedlens_client_task_duration_seconds_bucket", "fedlens_client_failures_total",
        "fedlens_client_late_total", "fedlens_global_accuracy", "fedlens_global_auc",
        "fedlens_global_loss", "fedlens_data_disk_free_bytes", "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    }  # fmt: skip
    assert expected <= used, expected - used


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards():
    datasources = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    (datasource,) = datasources["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    providers = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "fedlens.yml").read_text()
    )
    (provider,) = providers["providers"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


# --- docker-compose ------------------------------------------------------------------------------


def compose_project(tmp_path: Path) -> Path:
    """A project folder with .env.prod copied from .env.prod.example (never the real one)."""
    shutil.copy(ROOT / ".env.prod.example", tmp_path / ".env.prod")
    return tmp_path


def compose_command(program: list[str], project: Path, *args: str) -> list[str]:
    return [
        *program, "--project-directory", str(project), "--env-file", str(project / ".env.prod"),
        "-f", str(ROOT / "docker-compose.yml"), *args,
    ]  # fmt: skip


def test_docker_compose_v1_accepts_the_file(tmp_path):
    program = [required_program("docker-compose")]
    run(compose_command(program, compose_project(tmp_path), "config", "-q"), ROOT)


def test_docker_compose_v2_accepts_the_file(tmp_path):
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run(
            [docker, "compose", "version"], capture_output=True, check=False
        ).returncode
    ):
        pytest.skip("the Docker Compose v2 plugin is not installed (optional)")
    run(compose_command([docker, "compose"], compose_project(tmp_path), "config", "-q"), ROOT)


def test_compose_monitoring_services(tmp_path):
    program = [required_program("docker-compose")]
    result = run(compose_command(program, compose_project(tmp_path), "config"), ROOT)
    services = yaml.safe_load(result.stdout)["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    for service in (prometheus, grafana):
        image, _, tag = service["image"].partition(":")
        assert tag and tag != "latest", f"{image} must be pinned"
        for port in service["ports"]:
            assert str(port).startswith("127.0.0.1:") or port.get("host_ip") == "127.0.0.1"
    assert prometheus["image"].startswith("prom/prometheus:")
    assert grafana["image"].startswith("grafana/grafana:")
    # Only the token reaches Prometheus, not the whole .env.prod.
    assert "env_file" not in prometheus
    assert set(prometheus["environment"]) == {"FEDLENS_METRICS_TOKEN"}
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "change-me"
    worker = services["worker"]["environment"]
    assert worker["FEDLENS_WORKER_METRICS_PORT"] == "9808" and worker["PROMETHEUS_MULTIPROC_DIR"]
    assert services["web"]["environment"]["PROMETHEUS_MULTIPROC_DIR"]

    raw = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name in ("prometheus", "grafana"):
        for volume in raw[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source}"
                assert volume.endswith(":ro"), f"{name}: {volume} must be read-only"


def test_the_env_example_defines_every_variable_compose_requires():
    required = set(re.findall(r"\$\{(\w+):\?", (ROOT / "docker-compose.yml").read_text()))
    defined = set(re.findall(r"^(\w+)=", (ROOT / ".env.prod.example").read_text(), re.MULTILINE))
    assert {"FEDLENS_METRICS_TOKEN", "GRAFANA_ADMIN_PASSWORD"} <= required
    assert required <= defined, required - defined


def test_compose_redis_admits_only_logged_in_users_and_offers_tls_to_sites(tmp_path):
    program = [required_program("docker-compose")]
    result = run(compose_command(program, compose_project(tmp_path), "config"), ROOT)
    services = yaml.safe_load(result.stdout)["services"]
    redis = services["redis"]
    script = redis["entrypoint"][2]
    assert "user default off" in script and "~* &* +@all" in script
    assert "tls-port 6380" in script
    assert redis["command"][-2:] == ["--include", "/run/fedlens-redis/fedlens.conf"]
    assert "--user fedlens" in redis["healthcheck"]["test"][-1]
    assert any(volume.endswith(":/tls:ro") for volume in redis["volumes"])
    # The sites' TLS port is published; the plain port never is.
    published = [
        str(port["published"]) if isinstance(port, dict) else str(port).split(":")[-2]
        for port in redis["ports"]
    ]
    assert published == ["6380"]
    users = [
        name for name, service in services.items() if "REDIS_URL" in service.get("environment", {})
    ]
    assert {"web", "worker", "beat", "flower", "migrate"} <= set(users)
    for name in users:
        environment = services[name]["environment"]
        assert environment["REDIS_URL"] == "redis://fedlens:change-me@redis:6379/0", name
    site_broker = services["web"]["environment"]["FEDLENS_SITE_BROKER_URL"]
    assert site_broker.startswith("rediss://") and ":6380/" in site_broker


def free_port() -> int:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return listener.getsockname()[1]


def redis_start_scripts() -> dict[str, tuple[str, list[str]]]:
    """The script and the redis-server arguments of docker-compose.yml and deploy/k8s."""
    service = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["redis"]
    compose_script = service["entrypoint"][2].replace("$$", "$")
    compose_script = compose_script.replace("exec docker-entrypoint.sh", "exec")
    (container,) = pod_spec(objects("StatefulSet")["redis"])["containers"]
    return {
        "compose": (compose_script, service["command"]),
        "k8s": (container["command"][2], container["args"]),
    }


def start_script_here(script: str, folder: Path, tls_port: int) -> str:
    """The script with its container paths moved under folder and its TLS port moved."""
    for container_path in ("/run/fedlens-redis/fedlens.conf", "/tmp/fedlens.conf"):  # noqa: S108
        script = script.replace(container_path, str(folder / "fedlens.conf"))
    return script.replace("/tls/", f"{folder}/tls/").replace("6380", str(tls_port))


@pytest.mark.parametrize("source", ["compose", "k8s"])
def test_redis_start_script_locks_out_anonymous_clients_and_serves_sites_over_tls(source, tmp_path):
    """Runs the real script and a real redis-server: nobody gets in without logging in, the
    server's user can create a site's user, and that user reaches its own queue over TLS only."""
    redis_server, openssl = shutil.which("redis-server"), shutil.which("openssl")
    if redis_server is None or openssl is None:
        pytest.skip("redis-server and openssl are needed to run Redis's start script")
    script, arguments = redis_start_scripts()[source]
    (tmp_path / "tls").mkdir()
    run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
            "-keyout", "tls/tls.key", "-out", "tls/tls.crt",
        ],
        tmp_path,
    )  # fmt: skip
    port, tls_port = free_port(), free_port()
    arguments = [start_script_here(a, tmp_path, tls_port) for a in arguments]
    arguments = [a for a in arguments if a not in ("--dir", "/data")]
    arguments += ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)]
    password = "server-password"
    process = subprocess.Popen(
        ["/bin/sh", "-c", start_script_here(script, tmp_path, tls_port), "redis", *arguments],
        env={**os.environ, "REDIS_PASSWORD": password},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        server = redis_client.Redis(port=port, username="fedlens", password=password)
        for _ in range(100):
            try:
                server.ping()
                break
            except redis_client.ConnectionError:
                time.sleep(0.05)
        with pytest.raises(redis_client.AuthenticationError):
            redis_client.Redis(port=port).ping()
        site_password = "site-password"
        assert server.acl_setuser(
            "site-st-mary",
            enabled=True,
            passwords=[f"+{site_password}"],
            keys=["site.st-mary"],
            commands=["+lpush", "+brpop", "+ping"],
        )
        site = redis_client.Redis(
            host="localhost",
            port=tls_port,
            ssl=True,
            ssl_ca_certs=str(tmp_path / "tls" / "tls.crt"),
            username="site-st-mary",
            password=site_password,
        )
        assert site.lpush("site.st-mary", "task") == 1
        with pytest.raises(redis_client.exceptions.NoPermissionError):
            site.lpush("site.other", "task")
        server.close()
        site.close()
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.parametrize("source", ["compose", "k8s"])
def test_redis_start_script_keeps_the_tls_port_closed_without_a_certificate(source, tmp_path):
    script, _ = redis_start_scripts()[source]
    result = subprocess.run(
        ["/bin/sh", "-c", start_script_here(script, tmp_path, 6380), "redis", "true"],
        env={**os.environ, "REDIS_PASSWORD": "pw"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert "TLS port 6380 stays closed" in result.stderr
    config = (tmp_path / "fedlens.conf").read_text()
    assert "tls-port" not in config
    assert "user default off" in config
    assert (tmp_path / "fedlens.conf").stat().st_mode & 0o077 == 0, "the file is private"


# --- GitHub Actions -----------------------------------------------------------------------------


def workflow() -> dict:
    data = yaml.safe_load(WORKFLOW.read_text())
    # YAML 1.1 reads the key `on` as True.
    data["on"] = data.pop(True, data.get("on"))
    return data


def test_the_ci_workflow_runs_the_suite_against_postgres_and_redis():
    data = workflow()
    assert {"push", "pull_request"} <= set(data["on"])
    test_job = data["jobs"]["test"]
    services = test_job["services"]
    assert services["postgres"]["image"] == "postgres:16"
    assert services["redis"]["image"] == "redis:7"
    for service in services.values():
        assert "--health-cmd" in service["options"]
    steps = "\n".join(
        str(step.get("run", "")) + str(step.get("uses", "")) for step in test_job["steps"]
    )
    assert "make test" in steps and "--cov-fail-under=80" in steps
    assert "make lint" in steps
    assert "check --deploy" in steps
    assert "chromium chromium-driver prometheus docker-compose" in steps
    assert "actions/setup-node" in steps
    environment = {**data.get("env", {}), **test_job.get("env", {})}
    assert str(environment["CI"]).lower() == "true"
    assert {"FEDLENS_TEST_POSTGRES_URL", "FEDLENS_TEST_REDIS_URL"} <= set(environment)


def test_the_ci_workflow_builds_both_images_on_main():
    images = workflow()["jobs"]["images"]
    assert "refs/heads/main" in images["if"]
    builds = [
        step
        for step in images["steps"]
        if str(step.get("uses", "")).startswith("docker/build-push-action")
    ]
    assert {step["with"]["file"] for step in builds} == {
        "deploy/docker/Dockerfile",
        "deploy/docker/Dockerfile.worker",
    }
