"""The deployment files of a hospital site node: the agent's image (deploy/docker/Dockerfile.site),
its Compose file (deploy/site/) and its Kubernetes manifests (deploy/k8s/site/).

What they must never do: give the agent a server secret, the database, the broker's server
login or the model store; accept a connection; write to the site's data; run as root.

Needs no Docker engine or cluster. docker-compose runs as a program: skipped on a developer's
machine without it, a failure with CI=true (`make system-packages` installs it).
"""

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile.site"
SITE_COMPOSE = ROOT / "deploy" / "site" / "docker-compose.yml"
SITE_K8S = ROOT / "deploy" / "k8s" / "site"
KUBERNETES_VERSION = "1.30"
IN_CI = os.environ.get("CI", "").lower() == "true"

SITE_HOME = "/var/lib/fedlens-site"
# Settings and mounts of the server that a site must never receive.
SERVER_ONLY_VARIABLES = {
    "DATABASE_URL",
    "REDIS_URL",
    "REDIS_PASSWORD",
    "DJANGO_SECRET_KEY",
    "DJANGO_SETTINGS_MODULE",
    "POSTGRES_PASSWORD",
    "FEDLENS_DATA_DIR",
    "FEDLENS_METRICS_TOKEN",
}
MODEL_STORE_VOLUME = "fedlens-data"


def required_program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (`make system-packages` installs it)"
        if IN_CI:
            pytest.fail(f"CI=true: {message}")
        pytest.skip(message)
    return path


# --- The image -----------------------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            found.append((keyword.upper(), arguments.strip()))
    return found


def final_stage(text: str) -> list[tuple[str, str]]:
    steps = instructions(text)
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def runs_as_root(text: str) -> bool:
    """Whether the image's final stage leaves its processes running as root."""
    users = [arguments for keyword, arguments in final_stage(text) if keyword == "USER"]
    if not users:
        return True
    user = users[-1].split(":")[0]
    return user in {"root", "0"}


def test_the_root_check_sees_a_missing_or_root_user():
    text = DOCKERFILE.read_text()
    assert not runs_as_root(text)
    assert runs_as_root(re.sub(r"^USER .*$", "", text, flags=re.MULTILINE))
    assert runs_as_root(text + "\nUSER root\n")
    assert runs_as_root(text + "\nUSER 0:0\n")


def test_the_site_image_runs_the_agent_as_a_non_root_user():
    text = DOCKERFILE.read_text()
    assert not runs_as_root(text)
    stage = dict(final_stage(text))
    assert stage["ENTRYPOINT"] == '["python", "-m", "workers.site"]'
    assert stage["CMD"].startswith('["run"')
    assert "workers.site" in stage["HEALTHCHECK"]


def test_the_site_image_holds_only_the_agent_and_its_requirements():
    steps = instructions(DOCKERFILE.read_text())
    copies = [arguments for keyword, arguments in steps if keyword == "COPY"]
    sources = {arguments.split()[-2] for arguments in copies if not arguments.startswith("--from=")}
    assert sources == {"requirements/site.txt", "workers/", "training/"}
    text = DOCKERFILE.read_text()
    assert "-r /tmp/requirements/site.txt" in text
    assert "base.txt" not in text and "production.txt" not in text
    assert "manage.py" not in text and "DJANGO_SETTINGS_MODULE" not in text


def test_the_site_image_bakes_in_no_secret():
    for keyword, arguments in instructions(DOCKERFILE.read_text()):
        if keyword in {"ENV", "ARG", "LABEL"}:
            assert not re.search(r"SECRET|PASSWORD|TOKEN|CREDENTIAL", arguments, re.I), arguments


def test_site_requirements_are_a_pinned_subset_of_base_without_django():
    def pins(name: str) -> dict[str, str]:
        found = {}
        for line in (ROOT / "requirements" / name).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line and not line.startswith("-r"):
                package, _, version = line.partition("==")
                assert version, f"{name}: {line} is not pinned"
                found[package.lower()] = version
        return found

    site, base = pins("site.txt"), pins("base.txt")
    assert {"torch", "numpy", "safetensors", "celery[redis]", "redis", "requests"} <= set(site)
    assert not any(package.startswith("django") for package in site)
    for package, version in site.items():
        if package in base:
            assert version == base[package], package


# --- Docker Compose ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose_config(tmp_path_factory) -> dict:
    """`docker-compose config` of the site file with a copy of its .env.example."""
    program = required_program("docker-compose")
    env_file = tmp_path_factory.mktemp("site") / ".env"
    shutil.copy(SITE_COMPOSE.parent / ".env.example", env_file)
    result = subprocess.run(
        [program, "--env-file", str(env_file), "-f", str(SITE_COMPOSE), "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def mounts(service: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read-only) of every volume of a `config` output's service."""
    found = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            found.append(
                (volume.get("source", ""), volume["target"], bool(volume.get("read_only")))
            )
        else:
            parts = volume.split(":")
            found.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return found


def agent_problems(service: dict) -> list[str]:
    """What is wrong with a site agent service: server settings, ports, writable data."""
    problems = []
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.partition("=")[::2] for item in environment)
    problems += [f"environment {name}" for name in SERVER_ONLY_VARIABLES & set(environment)]
    if "env_file" in service:
        problems.append("env_file (it could carry the server's settings)")
    for key in ("ports", "expose", "network_mode"):
        if key in service:
            problems.append(key)
    for source, target, read_only in mounts(service):
        if source == MODEL_STORE_VOLUME or source.endswith(f"_{MODEL_STORE_VOLUME}"):
            problems.append(f"model store volume at {target}")
        if target != SITE_HOME and not read_only:
            problems.append(f"{source}:{target} is writable")
    return problems


def test_the_site_compose_file_is_valid_with_the_example_env(compose_config):
    assert set(compose_config["services"]) == {"agent"}


def test_the_site_agent_gets_no_server_setting_no_port_and_read_only_data(compose_config):
    agent = compose_config["services"]["agent"]
    assert agent_problems(agent) == []
    targets = {target: (source, read_only) for source, target, read_only in mounts(agent)}
    assert targets["/data"] == ("/srv/imaging", True)
    assert targets[SITE_HOME][0] == "site-home"
    assert agent["environment"]["FEDLENS_SITE_HOME"] == SITE_HOME
    assert agent["read_only"] is True
    assert agent["command"][0] == "run"
    assert agent["restart"] == "unless-stopped"
    assert agent["build"]["dockerfile"] == "deploy/docker/Dockerfile.site"


def test_the_agent_check_finds_server_settings_ports_and_writable_data(compose_config):
    agent = copy.deepcopy(compose_config["services"]["agent"])
    agent["environment"]["DATABASE_URL"] = "postgres://x"
    agent["environment"]["DJANGO_SECRET_KEY"] = "x"
    agent["ports"] = [{"published": 8000, "target": 8000}]
    agent["volumes"] = [*agent["volumes"], "fedlens-data:/models:rw", "/srv/imaging:/data2:rw"]
    problems = agent_problems(agent)
    assert "environment DATABASE_URL" in problems
    assert "environment DJANGO_SECRET_KEY" in problems
    assert "ports" in problems
    assert "model store volume at /models" in problems
    assert "/srv/imaging:/data2 is writable" in problems


def test_the_site_env_example_names_every_variable_the_compose_file_uses():
    used = set(re.findall(r"\$\{(\w+)", SITE_COMPOSE.read_text()))
    example = (SITE_COMPOSE.parent / ".env.example").read_text()
    defined = set(re.findall(r"^(\w+)=", example, re.MULTILINE))
    assert used <= defined, used - defined
    assert not (SERVER_ONLY_VARIABLES & defined)


# --- Kubernetes ----------------------------------------------------------------------------------


def load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomization() -> dict:
    return yaml.safe_load((SITE_K8S / "kustomization.yaml").read_text())


def site_objects(kind: str) -> dict[str, dict]:
    return {
        doc["metadata"]["name"]: doc
        for name in kustomization()["resources"]
        for doc in load_documents(SITE_K8S / name)
        if doc["kind"] == kind
    }


SITE_DOCUMENTS = [
    pytest.param(doc, id=f"{path.name}:{doc['kind']}/{doc['metadata']['name']}")
    for path in sorted(SITE_K8S.glob("*.yaml"))
    if path.name != "kustomization.yaml"
    for doc in load_documents(path)
]


@pytest.mark.parametrize("document", SITE_DOCUMENTS)
def test_site_manifest_is_valid_kubernetes_in_strict_mode(document):
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_site_kustomization_lists_every_manifest_but_the_examples():
    files = {path.name for path in SITE_K8S.glob("*.yaml")} - {"kustomization.yaml"}
    examples = {name for name in files if name.endswith(".example.yaml")}
    assert {"secret.example.yaml", "data-volume.example.yaml"} <= examples
    assert set(kustomization()["resources"]) == files - examples
    assert kustomization()["namespace"] == "fedlens-site"
    for name in kustomization()["resources"]:
        for doc in load_documents(SITE_K8S / name):
            if doc["kind"] == "Namespace":
                assert doc["metadata"]["name"] == "fedlens-site"
                labels = doc["metadata"]["labels"]
                assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
            else:
                assert doc["metadata"]["namespace"] == "fedlens-site", name


def test_the_site_agent_pod_is_unprivileged_and_reads_its_credentials_and_data_only():
    (deployment,) = site_objects("Deployment").values()
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    spec = deployment["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    # The credentials Secret, mounted read-only wherever it is mounted.
    (secret_volume,) = [
        name
        for name, volume in volumes.items()
        if any(
            source.get("secret", {}).get("name") == "fedlens-site-credentials"
            for source in volume.get("projected", {}).get("sources", [])
        )
    ]
    for container in spec["initContainers"] + spec["containers"]:
        where = container["name"]
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, where
        assert context["allowPrivilegeEscalation"] is False, where
        assert context["capabilities"]["drop"] == ["ALL"], where
        assert "ports" not in container and "envFrom" not in container, where
        assert not (SERVER_ONLY_VARIABLES & {item["name"] for item in container.get("env", [])})
        for mount in container["volumeMounts"]:
            volume = volumes[mount["name"]]
            assert "hostPath" not in volume, "restricted pods refuse hostPath"
            if mount["name"] == secret_volume or "persistentVolumeClaim" in volume:
                assert mount.get("readOnly") is True, f"{where}: {mount['mountPath']}"
            else:
                assert "emptyDir" in volume, f"{where}: {mount['mountPath']} is writable"
    (init,) = spec["initContainers"]
    assert "cp -L /etc/fedlens-site/*" in init["command"][-1]
    (agent,) = spec["containers"]
    assert agent["args"][0] == "run"
    environment = {item["name"]: item for item in agent["env"]}
    assert environment["FEDLENS_SITE_HOME"]["value"] == SITE_HOME
    by_path = {mount["mountPath"]: mount for mount in agent["volumeMounts"]}
    # The agent's home: a private folder the init container filled, on the pod's own disk.
    home = by_path[SITE_HOME]
    assert "emptyDir" in volumes[home["name"]] and home["subPath"] == "home"
    data = by_path["/data"]
    claim = volumes[data["name"]]["persistentVolumeClaim"]
    assert claim == {"claimName": "fedlens-site-data", "readOnly": True}
    assert data["readOnly"] is True
    assert not site_objects("Service"), "nothing connects to the agent"


def egress_ports(policy: dict) -> set[int]:
    return {port["port"] for rule in policy["spec"].get("egress", []) for port in rule["ports"]}


def ingress_allowed(policies: dict[str, dict]) -> list[str]:
    """Names of the policies that let some connection in."""
    return [name for name, policy in policies.items() if policy["spec"].get("ingress")]


def test_site_network_policies_deny_ingress_and_allow_only_dns_https_and_broker_tls():
    policies = site_objects("NetworkPolicy")
    deny = policies["default-deny-all"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert ingress_allowed(policies) == []
    (agent_policy,) = [
        policy
        for policy in policies.values()
        if policy["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/component")
        == "agent"
    ]
    assert "Ingress" in agent_policy["spec"]["policyTypes"]
    assert egress_ports(agent_policy) == {53, 443, 6380}
    for rule in agent_policy["spec"]["egress"]:
        ports = {port["port"] for port in rule["ports"]}
        if ports != {53}:
            for peer in rule["to"]:
                assert peer["ipBlock"]["cidr"].endswith("/32"), "one address each, not the world"
    assert sum(egress_ports(policy) != set() for policy in policies.values()) == 1


def test_the_ingress_check_sees_a_rule_that_lets_connections_in():
    policies = copy.deepcopy(site_objects("NetworkPolicy"))
    policies["agent-outbound-only"]["spec"]["ingress"] = [{"from": [{"podSelector": {}}]}]
    assert ingress_allowed(policies) == ["agent-outbound-only"]


def test_the_site_credentials_template_holds_a_placeholder_only():
    (secret,) = load_documents(SITE_K8S / "secret.example.yaml")
    assert secret["kind"] == "Secret" and "data" not in secret
    assert secret["stringData"] == {"credentials.json": "REPLACE-ME"}
    assert "secret.example.yaml" not in kustomization()["resources"]
