"""The Kubernetes deployment (k8s/), checked offline: every rendered document against the
Kubernetes schemas (kubernetes-validate, strict), yamllint, the consistency checks no schema
tool does, the alert rules and dashboard against the metrics a running node exports, and the
Dockerfile's and the manifests' command lines against `relay serve --dry-run`."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import yaml

from relay.config import Config
from tests.helpers import Admin, start_relay, started_node

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
# The oldest and the newest Kubernetes versions the manifests are checked against.
VERSIONS = ("1.25.0", "1.37.0")
LABELS = {"app.kubernetes.io/name": "relay"}
CRD_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"):
               K8S / "schemas" / "servicemonitor-monitoring.coreos.com-v1.json"}


def render(directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize` (kubectl bundles kustomize): what `kubectl apply -k` applies."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise AssertionError(
            "kubectl 1.27+ is not installed (scripts/install-test-deps.sh installs it only "
            "where an apt source offers it): https://kubernetes.io/docs/tasks/tools/")
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True,
                         text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return render(K8S / "base")


@pytest.fixture(scope="module")
def dev() -> list[dict[str, Any]]:
    return render(K8S / "overlays" / "dev")


def validate(doc: dict[str, Any], version: str) -> None:
    """Strict schema validation; a kind without a schema is an error, except the CRDs whose
    (abridged) schema the project keeps in k8s/schemas/."""
    crd = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if crd is not None:
        jsonschema.validate(doc, json.loads(crd.read_text()))
        return
    kubernetes_validate.validate(doc, version, strict=True)


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("overlay", ["base", "dev"])
def test_every_document_is_valid(overlay: str, version: str, request: pytest.FixtureRequest,
                                 ) -> None:
    docs = request.getfixturevalue(overlay)
    assert len(docs) >= 9
    for doc in docs:
        validate(doc, version)


def test_the_validation_can_fail(base: list[dict[str, Any]]) -> None:
    """Strict mode rejects an unknown field; a kind without a schema is an error."""
    deployment = json.loads(json.dumps(one(base, "Deployment", "relay")))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment, VERSIONS[-1])
    monitor = json.loads(json.dumps(one(base, "ServiceMonitor", "relay")))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor, VERSIONS[-1])
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}},
                 VERSIONS[-1])


def test_yamllint_is_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-c", str(ROOT / ".yamllint.yaml"),
         str(K8S)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- consistency no schema checks -----------------------------------------------------------


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec = one(docs, "Deployment", "relay")["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["containers"]] == ["relay"]
    return dict(spec["containers"][0])


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("overlay", ["base", "dev"])
def test_selectors_match_the_pods(overlay: str, request: pytest.FixtureRequest) -> None:
    docs = request.getfixturevalue(overlay)
    deployment = one(docs, "Deployment", "relay")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    for name in ("relay", "relay-peers"):
        assert _matches(one(docs, "Service", name)["spec"]["selector"], pod_labels), name
    assert _matches(one(docs, "PodDisruptionBudget", "relay")["spec"]["selector"]["matchLabels"],
                    pod_labels)
    policy = one(docs, "NetworkPolicy", "relay")["spec"]
    assert _matches(policy["podSelector"]["matchLabels"], pod_labels)
    for constraint in deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]:
        assert _matches(constraint["labelSelector"]["matchLabels"], pod_labels)
    target = one(docs, "HorizontalPodAutoscaler", "relay")["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1", "Deployment", deployment["metadata"]["name"])
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert len(monitors) == (1 if overlay == "base" else 0)  # dev deletes it (no operator)
    for monitor in monitors:
        peers = one(docs, "Service", "relay-peers")
        selector = monitor["spec"]["selector"]["matchLabels"]
        assert _matches(selector, peers["metadata"]["labels"])
        assert not _matches(selector, one(docs, "Service", "relay")["metadata"]["labels"])
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["internal"]


def _flag(args: list[str], name: str) -> str:
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name:
            return args[i + 1]
    raise AssertionError(f"{name} not in {args}")


@pytest.mark.parametrize("overlay", ["base", "dev"])
def test_ports_probes_and_flags_agree(overlay: str, request: pytest.FixtureRequest) -> None:
    docs = request.getfixturevalue(overlay)
    container = _container(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = container["args"]
    assert ports == {"sdk": int(_flag(args, "--port")),
                     "internal": int(_flag(args, "--admin-port"))}
    assert _flag(args, "--host") == "0.0.0.0"
    # The internal port binds 127.0.0.1 unless told: probes and peers come to the pod IP.
    assert _flag(args, "--admin-host") == "0.0.0.0"
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"),
                        ("startupProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert (get["path"], get["port"]) == (path, "internal"), probe
    public = one(docs, "Service", "relay")["spec"]
    assert public["type"] == "LoadBalancer" and public["sessionAffinity"] == "None"
    assert [p["targetPort"] for p in public["ports"]] == ["sdk"]  # only the SDK port
    peers = one(docs, "Service", "relay-peers")["spec"]
    assert peers["clusterIP"] == "None" and peers["publishNotReadyAddresses"] is True
    assert [p["targetPort"] for p in peers["ports"]] == ["internal"]
    service, _, port = _flag(args, "--discovery").removeprefix("dns:").rpartition(":")
    assert service == "relay-peers" and int(port) == ports["internal"]
    env = {e["name"]: e for e in container["env"]}
    assert env["RELAY_ADVERTISE"]["value"] == f"$(POD_IP):{ports['internal']}"
    assert env["RELAY_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


SECRET_FILES = {"RELAY_ADMIN_TOKEN_FILE": "admin-token", "RELAY_PEER_TOKEN_FILE": "peer-token",
                "RELAY_SDK_KEY_SECRET_FILE": "sdk-key-secret"}


def _secret_mount(docs: list[dict[str, Any]]) -> tuple[str, int]:
    """The mount path and file mode of the relay-tokens Secret's volume."""
    pod = one(docs, "Deployment", "relay")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = [m for m in _container(docs)["volumeMounts"]
              if volumes[m["name"]].get("secret", {}).get("secretName") == "relay-tokens"]
    assert len(mounts) == 1 and mounts[0]["readOnly"] is True
    secret = volumes[mounts[0]["name"]]["secret"]
    assert "items" not in secret  # every key of the Secret is a file
    return mounts[0]["mountPath"], int(secret["defaultMode"])


@pytest.mark.parametrize("overlay", ["base", "dev"])
def test_the_secrets_are_files_of_the_secret(overlay: str, request: pytest.FixtureRequest,
                                             ) -> None:
    """The tokens and the SDK-key secret reach relay as files of the relay-tokens Secret,
    readable by the pod's group (fsGroup) and by no one else, writable by no one; never as
    values in the environment."""
    docs = request.getfixturevalue(overlay)
    pod = one(docs, "Deployment", "relay")["spec"]["template"]["spec"]
    path, mode = _secret_mount(docs)
    assert mode & 0o040 and not mode & 0o027, oct(mode)
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    env = {e["name"]: e for e in _container(docs)["env"]}
    for name, key in SECRET_FILES.items():
        assert env[name]["value"] == f"{path}/{key}"
    for name in ("RELAY_ADMIN_TOKEN", "RELAY_PEER_TOKEN", "RELAY_SDK_KEY_SECRET"):
        assert name not in env
    assert not any("secretKeyRef" in e.get("valueFrom", {}) for e in env.values())


@pytest.mark.parametrize("overlay", ["base", "dev"])
def test_the_drain_fits_in_the_grace_period(overlay: str, request: pytest.FixtureRequest) -> None:
    docs = request.getfixturevalue(overlay)
    pod = one(docs, "Deployment", "relay")["spec"]["template"]["spec"]
    container = _container(docs)
    config = one(docs, "ConfigMap", "relay-config")["data"]
    deadline = float(config["RELAY_DRAIN_DEADLINE"])
    assert float(config["RELAY_DRAIN_WINDOW"]) < deadline
    assert pod["terminationGracePeriodSeconds"] > deadline + 10
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["relay", "drain"] and "--wait" in command
    assert command[2] == f"127.0.0.1:{_flag(container['args'], '--admin-port')}"


@pytest.mark.parametrize("overlay", ["base", "dev"])
def test_security_and_network_policy(overlay: str, request: pytest.FixtureRequest) -> None:
    docs = request.getfixturevalue(overlay)
    pod = one(docs, "Deployment", "relay")["spec"]["template"]["spec"]
    container = _container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    rules = one(docs, "NetworkPolicy", "relay")["spec"]["ingress"]
    internal = [r for r in rules if any(p["port"] == "internal" for p in r["ports"])]
    for rule in internal:  # never open to everyone
        assert rule.get("from"), rule
    peers = [r for r in internal
             if any(f.get("podSelector", {}).get("matchLabels") == LABELS and
                    "namespaceSelector" not in f for f in r["from"])]
    assert peers, "the relay pods reach each other's internal port"
    open_rules = [r for r in rules if not r.get("from")]
    assert [p["port"] for r in open_rules for p in r["ports"]] == ["sdk"]


@pytest.mark.parametrize("overlay", ["base", "dev"])
def test_every_setting_is_one_relay_reads(overlay: str, request: pytest.FixtureRequest) -> None:
    """A misspelt RELAY_* key would be ignored without a word."""
    docs = request.getfixturevalue(overlay)
    known = {"RELAY_" + f.upper() for f in Config.__dataclass_fields__}
    keys = set(one(docs, "ConfigMap", "relay-config")["data"])
    keys |= {e["name"] for e in _container(docs)["env"] if e["name"].startswith("RELAY_")}
    assert keys <= known, keys - known


def test_the_dev_overlay_runs_its_own_redis(dev: list[dict[str, Any]]) -> None:
    config = one(dev, "ConfigMap", "relay-config")["data"]
    redis = one(dev, "Service", "relay-redis")
    host, port = config["RELAY_STORE"].removeprefix("redis://").split("/")[0].split(":")
    assert host == redis["metadata"]["name"] and int(port) == redis["spec"]["ports"][0]["port"]
    args = one(dev, "Deployment", "relay-redis")["spec"]["template"]["spec"]["containers"][0]
    assert "--appendfsync" in args["args"]
    assert {d["metadata"].get("namespace") for d in dev if d["kind"] != "Namespace"} == {
        "relay-dev"}
    secret = one(dev, "Secret", "relay-tokens")
    assert set(secret["data"]) == set(SECRET_FILES.values())


# --- the metric names in the alerts and the dashboard -----------------------------------------

_METRIC = re.compile(r"\b(relay_[a-z0-9_]+)")


async def test_alerts_and_dashboard_use_only_exported_metrics(tmp_path: Path) -> None:
    node = await started_node(tmp_path)
    admin = Admin(node.admin_url)
    try:
        _, text = await admin.call("GET", "/metrics", token="")
    finally:
        await admin.close()
        await node.stop()
    exported: set[str] = set()  # the series names each metric family has
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            total = name if name.endswith("_total") else name + "_total"
            exported |= {"counter": {total},
                         "histogram": {name + "_bucket", name + "_sum", name + "_count"},
                         }.get(kind, {name})
    rules = yaml.safe_load((K8S / "monitoring" / "relay-alerts.yaml").read_text())
    alert_exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dashboard = json.loads((K8S / "monitoring" / "relay-dashboard.json").read_text())
    panel_exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    for where, exprs in (("alerts", alert_exprs), ("dashboard", panel_exprs)):
        for expr in exprs:
            promql_parser.parse(expr)  # raises ValueError on a syntax error
        used = {m for e in exprs for m in _METRIC.findall(e)}
        assert used, where
        assert used <= exported, f"{where} use metrics relay does not export: {used - exported}"
    # Each alert says what it means and where its runbook section is.
    runbook = (ROOT / "docs" / "runbook.md").read_text().lower()
    for group in rules["groups"]:
        for rule in group["rules"]:
            anchor = rule["annotations"]["runbook"].split("#")[1]
            assert f"### {anchor}" in runbook.replace("`", ""), anchor


# --- the command lines ---------------------------------------------------------------------


def _dry_run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    return subprocess.run([sys.executable, "-m", "relay", *args, "--dry-run"],
                          capture_output=True, text=True, env={**clean, **env}, timeout=60)


def _secret_volume(docs: list[dict[str, Any]], root: Path, mode: int | None = None) -> Path:
    """The relay-tokens Secret as the kubelet mounts it, under `root`: each key a symlink
    into `..data`, itself a symlink to a timestamped directory of files (defaultMode)."""
    secret = one(docs, "Secret", "relay-tokens")
    _, default_mode = _secret_mount(docs)
    stamped = root / "..2026_01_01_00_00_00.000000000"
    stamped.mkdir(parents=True)
    (root / "..data").symlink_to(stamped.name)
    for key, value in secret["data"].items():
        (stamped / key).write_bytes(base64.b64decode(value))
        (stamped / key).chmod(default_mode if mode is None else mode)
        (root / key).symlink_to(f"..data/{key}")
    return root


def _pod_env(docs: list[dict[str, Any]], secrets: Path | None = None) -> dict[str, str]:
    """The container's environment as the kubelet makes it: envFrom first, then env in order,
    `$(VAR)` expanded from the variables defined before (fields made up); paths into the
    Secret's volume lead to `secrets` (`_secret_volume`)."""
    made_up = {"metadata.name": "relay-7c9-abcde", "status.podIP": "10.1.2.3"}
    mount, _ = _secret_mount(docs)
    env = dict(one(docs, "ConfigMap", "relay-config")["data"])
    for item in _container(docs)["env"]:
        source = item.get("valueFrom", {})
        if "fieldRef" in source:
            value = made_up[source["fieldRef"]["fieldPath"]]
        else:
            value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), item["value"])
            if secrets is not None and value.startswith(mount + "/"):
                value = str(secrets / value.removeprefix(mount + "/"))
        env[item["name"]] = value
    return env


def test_the_manifests_command_line_is_accepted(dev: list[dict[str, Any]], tmp_path: Path,
                                                ) -> None:
    container = _container(dev)
    env = _pod_env(dev, _secret_volume(dev, tmp_path / "tokens"))
    assert env["RELAY_ADVERTISE"] == "10.1.2.3:8081"
    result = _dry_run(container["args"], env)
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout
    assert "discovery = 'dns:relay-peers:8081'" in result.stdout
    assert "advertise = '10.1.2.3:8081'" in result.stdout
    assert "admin_host = '0.0.0.0'" in result.stdout
    assert f"sdk_key_secret_file = '{tmp_path / 'tokens' / 'sdk-key-secret'}'" in result.stdout
    # The secret files were read (a missing or unsafe one is refused), their values not shown.
    values = [base64.b64decode(v).decode()
              for v in one(dev, "Secret", "relay-tokens")["data"].values()]
    assert all(v not in result.stdout + result.stderr for v in values)
    # And one the parser refuses, to show the check can fail.
    bad = _dry_run(container["args"], {**env, "RELAY_DRAIN_WINDOW": "600"})
    assert bad.returncode == 1 and "--drain-window" in bad.stderr
    # An advertise address left unexpanded (POD_IP defined after it) is refused.
    bad = _dry_run(container["args"], {**env, "RELAY_ADVERTISE": "$(POD_IP):8081"})
    assert bad.returncode == 1 and "unexpanded" in bad.stderr
    # A Secret volume others could write to is refused; so is one that is not there.
    unsafe = _pod_env(dev, _secret_volume(dev, tmp_path / "unsafe", mode=0o666))
    bad = _dry_run(container["args"], unsafe)
    assert bad.returncode == 1 and "is writable by group and others" in bad.stderr
    bad = _dry_run(container["args"], _pod_env(dev, tmp_path / "none"))
    assert bad.returncode == 1 and "does not exist" in bad.stderr


def test_the_prestop_hook_finds_the_admin_token(dev: list[dict[str, Any]], tmp_path: Path,
                                                ) -> None:
    """The preStop `relay drain` runs with the container's environment only: it reads the
    admin token from RELAY_ADMIN_TOKEN_FILE, as the node does."""
    container = _container(dev)
    env = _pod_env(dev, _secret_volume(dev, tmp_path / "tokens"))
    node = start_relay(tmp_path / "data",
                       env={"RELAY_ADMIN_TOKEN_FILE": env["RELAY_ADMIN_TOKEN_FILE"]})
    try:
        command = list(container["lifecycle"]["preStop"]["exec"]["command"])
        assert command[2] == "127.0.0.1:8081"
        command[2] = node.admin_url.removeprefix("http://")
        clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        result = subprocess.run([sys.executable, "-m", *command], capture_output=True,
                                text=True, env={**clean, **env}, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "drained and stopping" in result.stdout
        assert node.proc.wait(30) == 0
    finally:
        node.stop()


def test_the_dockerfile_command_line_is_accepted() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+\S+", text, re.M)
    assert len(stages) == 2, "a build stage and a runtime stage"
    final = text[text.rindex("\nFROM "):]
    assert re.search(r"^USER\s+10001", final, re.M), "the runtime stage runs as a user"
    for tool in ("gcc", "build-essential", "apt-get install"):
        assert tool not in final, tool
    entrypoint = json.loads(re.search(r"^ENTRYPOINT\s+(\[.*\])$", final, re.M)[1])  # type: ignore[index]
    cmd = json.loads(re.search(r"^CMD\s+(\[.*\])$", final, re.M)[1])  # type: ignore[index]
    assert entrypoint == ["relay"]
    result = _dry_run(cmd, {})
    assert result.returncode == 0, result.stderr
    assert "admin_host = '0.0.0.0'" in result.stdout  # probes and peers come from outside
    container = _container(render(K8S / "base"))
    assert container["args"][0] == cmd[0] == "serve"  # the manifests run the same entrypoint
