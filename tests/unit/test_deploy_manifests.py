"""deploy/ checked without a container engine or a network: the compose file
against the Compose specification's JSON schema (the copy check-jsonschema
ships), the Kubernetes manifests against the API's schemas (the copies
kubernetes-validate ships, strict: unknown fields fail), the NATS node configs
with ``nats-server -t`` on secrets made by deploy/make_secrets.py, and the
probe script against a worker's real /healthz."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import kubernetes_validate.utils as k8s
import pytest
import yaml

from esper.infra.nats_server import nats_server_binary
from esper.infra.ports import free_port
from esper.settings import Settings
from esper.workers.metrics import WorkerMetrics

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.33.0"
STAGES = ("compile", "validate", "deploy")
# Every Secret the manifests may reference; created by the operator, never inlined.
K8S_SECRETS = {"esper-nats-ca", "esper-nats-auth", "esper-postgres", "esper-signing"}


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"deploy_{name}", DEPLOY / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())  # type: ignore[no-any-return]


def _run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; the caller judges its exit code and output."""
    return subprocess.run(cmd, env=env, check=False, capture_output=True, text=True, timeout=60)


def _check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                 "vendor.compose-spec", str(path)])


def _settings_env_names() -> set[str]:
    return {f"ESPER_{name.upper()}" for name in Settings.model_fields}


# -- compose ----------------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification(tmp_path: Path) -> None:
    result = _check_compose_schema(DEPLOY / "compose.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    # The validator is live: a misspelt key in a copy is refused.
    broken = tmp_path / "compose.yaml"
    broken.write_text((DEPLOY / "compose.yaml").read_text().replace(
        "stop_grace_period: 150s", "stop_grace_perod: 150s"))
    result = _check_compose_schema(broken)
    assert result.returncode != 0 and "stop_grace_perod" in result.stdout + result.stderr


def test_compose_runs_a_replicated_cluster_with_scalable_workers() -> None:
    services = _compose()["services"]
    for i in (1, 2, 3):
        node = services[f"nats-{i}"]
        assert f"./nats/nats-{i}.conf:/etc/nats/nats-server.conf:ro" in node["volumes"]
        assert f"nats-{i}-data:/data" in node["volumes"]
        assert "healthcheck" in node
    common = services["compile"]["environment"]
    urls = common["ESPER_NATS_URL"].split(",")
    assert urls == [f"tls://nats-{i}:4222" for i in (1, 2, 3)]
    assert common["ESPER_STREAM_REPLICAS"] == "3"
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["migrate"]["restart"] == "no"
    assert services["jetstream-init"]["entrypoint"][-1].endswith("deploy/jetstream_init.py")
    for stage in STAGES:
        worker = services[stage]
        assert worker["command"] == ["worker", stage]
        # --scale needs no fixed name and no host port.
        assert "container_name" not in worker and "ports" not in worker
        assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert worker["depends_on"]["jetstream-init"]["condition"] == (
            "service_completed_successfully")
        assert worker["environment"]["ESPER_METRICS_PORT"]
    trainer = services["trainer"]
    assert trainer["command"][:3] == ["train", "--device", "cuda"]
    device = trainer["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"


def test_compose_secrets_come_from_files_and_keys_go_only_where_needed() -> None:
    compose = _compose()
    declared = compose["secrets"]
    assert all(set(s) == {"file"} and s["file"].startswith("./secrets/")
               for s in declared.values())
    services = compose["services"]
    for name, service in services.items():
        assert set(service.get("secrets", [])) <= set(declared), name
        for key, value in (service.get("environment") or {}).items():
            text = str(value)
            if "/run/secrets/" in text:
                secret = text.rsplit("/", 1)[1]
                assert secret in service["secrets"], f"{name}: {key} names unmounted {secret}"
            # A credential in a URL is interpolated from deploy/.env, never written here.
            for userinfo in re.findall(r"//([^/@]*)@", text):
                assert ":" not in userinfo or "${" in userinfo, f"{name}: {key}"
            if re.search(r"(PASSWORD|TOKEN|SEED)$", key):
                assert text.startswith("/run/secrets/") or key.endswith("_FILE"), (name, key)
    assert "signing_key" in services["compile"]["secrets"]
    for name in ("validate", "deploy", "trainer"):  # only compile workers may sign
        assert "signing_key" not in services[name]["secrets"]


def test_every_esper_variable_in_the_manifests_is_a_setting() -> None:
    known = _settings_env_names()
    used: set[str] = set()
    for service in _compose()["services"].values():
        used |= {k for k in (service.get("environment") or {}) if k.startswith("ESPER_")}
    for doc in _k8s_docs():
        if doc["kind"] == "ConfigMap":
            used |= {k for k in doc["data"] if k.startswith("ESPER_")}
        for container in _containers(doc):
            used |= {e["name"] for e in container.get("env", []) if e["name"].startswith("ESPER_")}
    assert used and used <= known, used - known


# -- NATS node configs ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    out = tmp_path_factory.mktemp("deploy") / "secrets"
    values = _load_script("make_secrets").make_secrets(out)
    return out, values


def _resolved_conf(conf: Path, secrets: Path, data: Path) -> Path:
    """``conf`` with compose's /run/secrets/<name> mounts pointing at the files the
    compose file maps them from, and its store on ``data``."""
    mapping = {name: secrets / Path(s["file"]).name for name, s in _compose()["secrets"].items()}
    text = conf.read_text()
    for name in set(re.findall(r"/run/secrets/(\w+)", text)):
        assert name in mapping, f"{conf.name} reads secret {name} that compose does not define"
        text = text.replace(f"/run/secrets/{name}", str(mapping[name]))
    text = text.replace("store_dir: /data", f"store_dir: {data}")
    out = data.parent / conf.name
    out.write_text(text)
    return out


@pytest.mark.parametrize("node", [1, 2, 3])
def test_nats_config_passes_the_servers_own_check(
    node: int, secrets_dir: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    conf = DEPLOY / "nats" / f"nats-{node}.conf"
    text = conf.read_text()
    assert f"server_name: nats-{node}" in text
    assert re.search(r"^\s*sync_interval: always$", text, re.M)
    assert set(re.findall(r"nats-route://(nats-\d):6222", text)) == {"nats-1", "nats-2", "nats-3"}
    mounted = set(_compose()["services"][f"nats-{node}"]["secrets"])
    assert set(re.findall(r"/run/secrets/(\w+)", text)) <= mounted
    secrets, values = secrets_dir
    resolved = _resolved_conf(conf, secrets, tmp_path / "data")
    binary = str(nats_server_binary())
    env = {**os.environ, "NATS_USER_NKEY": values["NATS_USER_NKEY"]}
    check = _run([binary, "--config", str(resolved), "-t"], env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "is valid" in check.stdout + check.stderr
    # The check is real: without the nkey the server refuses the file.
    env.pop("NATS_USER_NKEY")
    check = _run([binary, "--config", str(resolved), "-t"], env)
    assert check.returncode != 0 and "NATS_USER_NKEY" in check.stdout + check.stderr


def test_make_secrets_writes_a_working_set(secrets_dir: tuple[Path, dict[str, str]]) -> None:
    import nkeys
    from cryptography import x509

    from esper.artifacts.signing import load_private_key, load_public_key, public_pem

    out, values = secrets_dir
    assert out.stat().st_mode & 0o777 == 0o700
    assert (out / "ca.key").stat().st_mode & 0o777 == 0o600
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificates((out / "nats-server.crt").read_bytes())[0]
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(names.get_values_for_type(x509.DNSName))
    assert {"nats-1", "nats-2", "nats-3", "nats", "localhost"} <= dns
    assert "*.nats-headless.esper.svc.cluster.local" in dns
    seed = bytearray((out / "nats-user.nk").read_bytes().strip())
    assert nkeys.from_seed(seed).public_key.decode() == values["NATS_USER_NKEY"]
    private = load_private_key(out / "signing.pem")
    assert public_pem(load_public_key(out / "signing.pub")) == public_pem(private.public_key())
    assert (out / "postgres-password").read_text() == values["POSTGRES_PASSWORD"]
    assert re.fullmatch(r"[0-9a-f]{48}", (out / "nats-password").read_text())
    refused = _run([sys.executable, str(DEPLOY / "make_secrets.py"), "--out", str(out),
                    "--env-file", str(out.parent / ".env")])
    assert refused.returncode == 1 and "--force" in refused.stderr


# -- Kubernetes ----------------------------------------------------------------------------


def _kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())  # type: ignore[no-any-return]


def _k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for resource in _kustomization()["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / resource).read_text()) if d]
    return docs


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
        return doc["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    return None


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = _pod_spec(doc)
    return [] if spec is None else [*spec.get("initContainers", []), *spec["containers"]]


def test_k8s_manifests_match_the_kubernetes_schemas() -> None:
    kustomization = _kustomization()
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    docs = _k8s_docs()
    for doc in docs:
        k8s.validate(doc, K8S_VERSION, strict=True)
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
    assert kinds == sorted([
        "Namespace/esper", "ConfigMap/esper-config", "Service/postgres", "StatefulSet/postgres",
        "Job/esper-migrate", "Deployment/esper-compile", "Deployment/esper-validate",
        "Deployment/esper-deploy", "Job/esper-trainer",
    ])
    # The validator is live: a misspelt field fails strict validation.
    broken = next(d for d in docs if d["kind"] == "Deployment")
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinessprobe"] = container.pop("readinessProbe")
    with pytest.raises(k8s.ValidationError, match="readinessprobe"):
        k8s.validate(broken, K8S_VERSION, strict=True)


def test_k8s_workers_probe_health_and_the_trainer_asks_for_a_gpu() -> None:
    docs = {f"{d['kind']}/{d['metadata']['name']}": d for d in _k8s_docs()}
    images = {i["name"] for i in _kustomization()["images"]}
    for stage in STAGES:
        deployment = docs[f"Deployment/esper-{stage}"]
        (worker,) = deployment["spec"]["template"]["spec"]["containers"]
        assert worker["args"] == ["worker", stage]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert worker[probe]["exec"]["command"][-1] == "/opt/esper/deploy/healthcheck.py"
        init = deployment["spec"]["template"]["spec"]["initContainers"]
        assert init[0]["command"][-1] == "/opt/esper/deploy/wait_for_schema.py"
    (trainer,) = docs["Job/esper-trainer"]["spec"]["template"]["spec"]["containers"]
    assert trainer["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == "1"
    migrate = docs["Job/esper-migrate"]["spec"]["template"]["spec"]["containers"]
    assert [c.get("args") or c.get("command") for c in migrate] == [
        ["db", "upgrade"], ["python", "/opt/esper/deploy/jetstream_init.py"]]
    assert docs["ConfigMap/esper-config"]["data"]["ESPER_STREAM_REPLICAS"] == "3"
    for doc in docs.values():
        for container in _containers(doc):
            assert container["image"] in images | {"postgres:17"}


def test_k8s_secrets_are_referenced_never_inlined() -> None:
    referenced: set[str] = set()
    for doc in _k8s_docs():
        assert doc["kind"] != "Secret"
        spec = _pod_spec(doc)
        if spec is None:
            continue
        referenced |= {v["secret"]["secretName"] for v in spec.get("volumes", [])
                       if "secret" in v}
        for container in _containers(doc):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref is not None:
                    referenced.add(ref["name"])
                else:  # a literal value never carries a credential
                    assert not re.search(r"//[^/@$]+:[^/@$]+@", env["value"]), env
    assert referenced == K8S_SECRETS
    # The signing key's private half only reaches compile workers.
    for doc in _k8s_docs():
        spec = _pod_spec(doc)
        for volume in (spec or {}).get("volumes", []):
            items = {i["key"] for i in volume.get("secret", {}).get("items", [])}
            if "signing.pem" in items:
                assert doc["metadata"]["name"] == "esper-compile"


def test_nats_helm_values_make_a_secure_replicated_cluster() -> None:
    values = yaml.safe_load((K8S / "nats-values.yaml").read_text())
    config = values["config"]
    assert config["cluster"]["enabled"] is True and config["cluster"]["replicas"] == 3
    assert config["cluster"]["tls"]["enabled"] is True
    assert config["cluster"]["tls"]["merge"]["verify"] is True
    store = config["jetstream"]["fileStore"]
    assert config["jetstream"]["enabled"] and store["enabled"] and store["pvc"]["enabled"]
    assert config["jetstream"]["merge"]["sync_interval"] == "always"
    assert config["nats"]["tls"] == {"enabled": True, "secretName": "esper-nats-server-tls"}
    assert values["tlsCA"]["secretName"] in K8S_SECRETS
    (user,) = config["merge"]["authorization"]["users"]
    # The password is a server-side variable filled from a Secret, not a value here.
    assert user["password"] == "<< $NATS_PASSWORD >>"
    ref = values["container"]["env"]["NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] in K8S_SECRETS


# -- the image --------------------------------------------------------------------------------


def test_dockerfile_builds_one_non_root_esper_image_per_variant() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert "ARG VARIANT=cpu" in lines and "ARG TORCH_VERSION=2.13.0" in lines
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert froms == ["FROM ${PYTHON_IMAGE} AS base-cpu", "FROM ${CUDA_IMAGE} AS base-cuda",
                     "FROM base-${VARIANT} AS esper"]
    assert "ARG PYTHON_IMAGE=python:3.12-slim" in lines
    assert "ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in lines
    assert lines[-2:] == ['ENTRYPOINT ["esper"]', 'CMD ["--help"]']
    user = [ln for ln in lines if ln.startswith("USER ")]
    assert user == ["USER 10001:10001"]
    assert any(ln.startswith("HEALTHCHECK ") for ln in lines)
    assert 'VOLUME ["/var/lib/esper"]' in lines and "ENV ESPER_HOME=/var/lib/esper \\" in lines
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for line in (ln for ln in lines if ln.startswith("COPY ")):
        sources = line.split()[1:-1]
        for source in sources:
            assert "secret" not in source and ".env" not in source
            assert (REPO / source).exists(), source
            assert f"!{source}" in ignore or f"!{source.rstrip('/')}/" in ignore, source


# -- the probe --------------------------------------------------------------------------------


def _probe(port: int | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ESPER_METRICS_PORT"}
    if port is not None:
        env["ESPER_METRICS_PORT"] = str(port)
    return _run([sys.executable, str(DEPLOY / "healthcheck.py")], env)


def test_the_probe_follows_the_workers_healthz() -> None:
    metrics = WorkerMetrics("deploy")
    port = free_port()
    metrics.serve(port)
    first = _probe(port)
    assert first.returncode == 1 and "503" in first.stderr  # JetStream not seen yet
    metrics.set_lag(0, 0)
    assert _probe(port).returncode == 0
    metrics.health_max_age = 0.05  # the lag probe went quiet: a hung loop, a lost bus
    time.sleep(0.1)
    stale = _probe(port)
    assert stale.returncode == 1 and '"ok": false' in stale.stderr
    assert _probe(None).returncode == 0  # jobs and trainers serve no port
    assert _probe(free_port()).returncode == 1  # a worker whose server is gone
