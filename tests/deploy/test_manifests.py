"""The KubeRay manifests are valid and agree with the Serve config, the cluster configs and the image.

Schemas: the KubeRay v1 CRDs (their openAPIV3Schema, made strict: an unknown
field is an error, as with `kubectl apply --validate=strict`) from
../shared/kuberay/, and the core Kubernetes schemas of kubernetes-validate for
the Service and for every pod template inside a RayService. CEL rules
(x-kubernetes-validations) are not evaluated.
"""

import copy
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from cluster.cli import build_parser
from cluster.config import ClusterConfig, load_config
from cluster.serve.app import AppArgs

REPO = Path(__file__).resolve().parents[2]
KUBERAY_CRDS = REPO.parent / "shared" / "kuberay"
MANIFESTS = sorted((REPO / "deploy" / "kuberay").glob("*.yaml"))
SERVE_CONFIG = REPO / "deploy" / "serve" / "specfleet.yaml"
KUBERNETES_VERSION = "1.37"
HTTP_PORT, GRPC_PORT = 8000, 50051
HEAD_SERVE_LABELS = {"ray.io/node-type": "head", "ray.io/serve": "true"}  # set by KubeRay on a serving head


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def all_documents() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in MANIFESTS for doc in documents(path)]


def rayservices() -> list[dict]:
    return [doc for _, doc in all_documents() if doc["kind"] == "RayService"]


def doc_id(item) -> str:
    path, doc = item if isinstance(item, tuple) else (None, item)
    return f"{path.name + ':' if path else ''}{doc['kind']}/{doc['metadata']['name']}"


# ---- schemas -----------------------------------------------------------------------------------------------


def strict(schema):
    """The schema with unknown fields forbidden wherever it lists the known ones."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: strict(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        closed["additionalProperties"] = False
    return closed


@pytest.fixture(scope="module")
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the strict openAPIV3Schema, for every version of the KubeRay CRDs."""
    if not KUBERAY_CRDS.is_dir():
        pytest.fail(f"KubeRay CRDs not found at {KUBERAY_CRDS}: the manifests cannot be checked without "
                    "ray.io_rayclusters.yaml and ray.io_rayservices.yaml from ray-project/kuberay there")
    schemas = {}
    for crd_file in sorted(KUBERAY_CRDS.glob("ray.io_*.yaml")):
        crd = yaml.load(crd_file.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1 MB each: C parser when there
        for version in crd["spec"]["versions"]:
            key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
            schemas[key] = strict(version["schema"]["openAPIV3Schema"])
    assert ("ray.io/v1", "RayService") in schemas, f"no RayService v1 schema in {KUBERAY_CRDS}"
    return schemas


def crd_errors(schemas: dict, doc: dict) -> list[str]:
    schema = schemas.get((doc["apiVersion"], doc["kind"]))
    assert schema is not None, f"no KubeRay CRD for {doc['apiVersion']} {doc['kind']}"
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'.'.join(map(str, error.path))}: {error.message}" for error in validator.iter_errors(doc)]


def pod_templates(rayservice: dict) -> dict[str, dict]:
    """Group name ('head' for the head) -> pod template."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = {group["groupName"]: group["template"] for group in cluster.get("workerGroupSpecs", [])}
    return {"head": cluster["headGroupSpec"]["template"], **groups}


def core_validate(doc: dict) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_there_are_manifests_for_gpu_and_cpu_clusters():
    names = {path.name for path in MANIFESTS}
    assert {"specfleet-gpu.yaml", "specfleet-cpu.yaml"} <= names, names


@pytest.mark.parametrize("item", all_documents(), ids=doc_id)
def test_manifest_validates(item, crd_schemas):
    _, doc = item
    if doc["apiVersion"].startswith("ray.io/"):
        assert crd_errors(crd_schemas, doc) == []
        for group, template in pod_templates(doc).items():
            core_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": template})
    else:
        core_validate(doc)


def test_the_schema_check_catches_unknown_fields_and_wrong_types(crd_schemas):
    rayservice = copy.deepcopy(rayservices()[0])
    cluster = rayservice["spec"]["rayClusterConfig"]
    cluster["workerGroupSpecs"][0]["rayStartParam"] = {"num-cpus": "0"}  # misspelt
    cluster["workerGroupSpecs"][0]["replicas"] = "three"
    errors = "\n".join(crd_errors(crd_schemas, rayservice))
    assert "rayStartParam" in errors and "'three' is not of type 'integer'" in errors
    with pytest.raises(kubernetes_validate.ValidationError):
        core_validate({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"ports": [{"prot": 1}]}})


# ---- the Serve config --------------------------------------------------------------------------------------


def serve_config_v2(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def without_deployment_args(serve_config: dict) -> dict:
    """The Serve config less each application's args.config and args.grpc_tls, the fields a deployment changes
    (its cluster config, and the gRPC door's certificate files, mounted from a Secret on Kubernetes)."""
    stripped = copy.deepcopy(serve_config)
    for application in stripped["applications"]:
        application["args"].pop("config")
        application["args"].pop("grpc_tls", None)
    return stripped


def test_the_serve_config_file_is_a_valid_serve_deploy_config():
    serve_config = yaml.safe_load(SERVE_CONFIG.read_text())
    ServeDeploySchema.model_validate(serve_config)
    [application] = serve_config["applications"]
    assert application["import_path"] == "cluster.serve.app:build_app"
    args = AppArgs.model_validate(application["args"])  # what build_app accepts
    assert isinstance(load_config(REPO / args.config), ClusterConfig)


@pytest.mark.parametrize("rayservice", rayservices(), ids=doc_id)
def test_serve_config_v2_is_the_serve_config_file_but_for_the_cluster_config_path(rayservice):
    embedded = serve_config_v2(rayservice)
    ServeDeploySchema.model_validate(embedded)
    assert without_deployment_args(embedded) == without_deployment_args(yaml.safe_load(SERVE_CONFIG.read_text()))


# ---- the cluster config behind each RayService -------------------------------------------------------------


def image_workdir() -> str:
    return re.findall(r"^WORKDIR\s+(\S+)", (REPO / "Dockerfile").read_text(), re.MULTILINE)[-1]


def cluster_config_path(rayservice: dict) -> Path:
    """The repository file the embedded Serve config names by its path inside the image."""
    [application] = serve_config_v2(rayservice)["applications"]
    in_image = Path(application["args"]["config"])
    assert in_image.is_absolute(), f"{in_image}: give the path inside the image, so the Ray worker's directory does not matter"
    return REPO / in_image.relative_to(image_workdir())


def cluster_config(rayservice: dict) -> ClusterConfig:
    return load_config(cluster_config_path(rayservice))


def worker_groups(rayservice: dict) -> list[dict]:
    return rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]


def ray_resources(start_params: dict) -> dict[str, float]:
    """rayStartParams `resources`: JSON, quoted for the shell line KubeRay builds (`ray start --resources=...`)."""
    [argument] = shlex.split(start_params.get("resources", "{}"))  # what `ray start` receives
    return json.loads(argument)


def container(template: dict) -> dict:
    return template["spec"]["containers"][0]


def gpu_limit(template: dict) -> int:
    return int(container(template).get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def cpu_limit(template: dict) -> float:
    cpu = str(container(template)["resources"]["limits"]["cpu"])
    return float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)


def ray_cpus(group: dict) -> float:
    """The CPUs a pod offers Ray: rayStartParams num-cpus, else (as KubeRay does) the container's CPU limit."""
    return float(group["rayStartParams"].get("num-cpus", cpu_limit(group["template"])))


def group_of_pool(rayservice: dict, pool_resources: dict[str, float]) -> dict:
    groups = [g for g in worker_groups(rayservice) if set(pool_resources) & set(ray_resources(g["rayStartParams"]))]
    assert len(groups) == 1, f"pool resources {pool_resources} must be offered by exactly one worker group, not {len(groups)}"
    return groups[0]


def actors_per_pod(group: dict, pool_resources: dict[str, float]) -> int:
    offered = ray_resources(group["rayStartParams"])
    return min(int(offered.get(name, 0) // amount) for name, amount in pool_resources.items())


def actors_by_pool(config: ClusterConfig) -> dict[str, tuple[int, int]]:
    """Pool name -> (actors at start, most actors the controller may scale to) over every model on it."""
    counts = dict.fromkeys(config.pools, (0, 0))
    for model in [*config.drafters.values(), *config.targets.values()]:
        at_start, most = counts[model.pool]
        counts[model.pool] = (at_start + model.replicas, most + (model.autoscale.max_replicas if model.autoscale else model.replicas))
    return counts


def test_the_gpu_manifest_uses_the_gpu_cluster_config():
    [rayservice] = documents(REPO / "deploy" / "kuberay" / "specfleet-gpu.yaml")[:1]
    assert cluster_config_path(rayservice) == REPO / "deploy" / "configs" / "gpu.yaml"
    assert all(pool.num_gpus > 0 for pool in cluster_config(rayservice).pools.values())


@pytest.mark.parametrize("rayservice", rayservices(), ids=doc_id)
def test_worker_groups_offer_each_pool_room_for_all_its_actors(rayservice):
    config = cluster_config(rayservice)
    for pool_name, (at_start, most) in actors_by_pool(config).items():
        pool = config.pools[pool_name]
        assert pool.resources, f"pool {pool_name!r} needs a custom Ray resource to tie it to a worker group"
        group = group_of_pool(rayservice, pool.resources)
        per_pod = actors_per_pod(group, pool.resources)
        assert per_pod >= 1 and group["minReplicas"] * per_pod >= at_start, (pool_name, group["groupName"], "at start")
        assert group["maxReplicas"] * per_pod >= most, (pool_name, group["groupName"], "scaled up")
        assert per_pod * pool.num_gpus <= gpu_limit(group["template"]), f"{group['groupName']}: too few GPUs per pod"
        assert per_pod * pool.num_cpus <= ray_cpus(group), f"{group['groupName']}: too few CPUs per pod"


@pytest.mark.parametrize("rayservice", rayservices(), ids=doc_id)
def test_gpu_models_run_on_gpu_pools_on_gpu_nodes(rayservice):
    config = cluster_config(rayservice)
    for name, model in {**config.drafters, **config.targets}.items():
        pool = config.pools[model.pool]
        assert (model.device.startswith("cuda")) == (pool.num_gpus > 0), f"{name}: device {model.device}, {pool.num_gpus} GPUs"
    for group in worker_groups(rayservice):
        spec = group["template"]["spec"]
        if gpu_limit(group["template"]):
            assert spec.get("nodeSelector"), f"{group['groupName']}: a GPU group names its node type"
            assert any(t["key"] == "nvidia.com/gpu" for t in spec.get("tolerations", [])), group["groupName"]


@pytest.mark.parametrize("rayservice", rayservices(), ids=doc_id)
def test_workers_keep_kuberays_serve_aware_readiness(rayservice):
    """KubeRay sends HTTP (the serve Service) to every Ready worker: readiness must include its Serve proxy."""
    for group in worker_groups(rayservice):
        assert "readinessProbe" not in container(group["template"]), group["groupName"]


@pytest.mark.parametrize("rayservice", rayservices(), ids=doc_id)
def test_the_head_hosts_no_drafter_or_target(rayservice):
    pool_resources = {name for pool in cluster_config(rayservice).pools.values() for name in pool.resources}
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert not pool_resources & set(ray_resources(head["rayStartParams"]))
    assert gpu_limit(head["template"]) == 0


# ---- ports, the gRPC Service, the image --------------------------------------------------------------------


def grpc_service_of(path: Path) -> dict:
    [service] = [doc for doc in documents(path) if doc["kind"] == "Service"]
    return service


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_ports_agree_everywhere(path):
    [rayservice] = [doc for doc in documents(path) if doc["kind"] == "RayService"]
    serve = serve_config_v2(rayservice)
    assert serve["http_options"]["port"] == HTTP_PORT
    [args] = [AppArgs.model_validate(app["args"]) for app in serve["applications"]]
    assert args.grpc_port == GRPC_PORT
    assert args.grpc_host == "0.0.0.0", "inside a pod, gRPC must listen beyond localhost"
    head = container(pod_templates(rayservice)["head"])
    ports = {port["name"]: port["containerPort"] for port in head["ports"]}
    assert ports["serve"] == HTTP_PORT and ports["grpc"] == GRPC_PORT
    assert liveness_probe_args(head).server == f"127.0.0.1:{GRPC_PORT}"
    [service_port] = grpc_service_of(path)["spec"]["ports"]
    assert service_port["port"] == GRPC_PORT and ports[service_port["targetPort"]] == GRPC_PORT


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_the_grpc_service_selects_the_serving_head_only(path):
    [rayservice] = [doc for doc in documents(path) if doc["kind"] == "RayService"]
    selector = grpc_service_of(path)["spec"]["selector"]
    templates = pod_templates(rayservice)
    head_labels = {**templates.pop("head")["metadata"]["labels"], **HEAD_SERVE_LABELS}
    assert selector.items() <= head_labels.items()
    assert selector["ray.io/serve"] == "true", "wait for Ray Serve on the head"
    for template in templates.values():
        worker_labels = {**template.get("metadata", {}).get("labels", {}), "ray.io/node-type": "worker", "ray.io/serve": "true"}
        assert not selector.items() <= worker_labels.items()


def liveness_probe_args(head: dict):
    """The head's liveness probe, parsed by the `specfleet` command it runs."""
    command = head["livenessProbe"]["exec"]["command"]
    assert command[:2] == ["specfleet", "health"]
    return build_parser().parse_args(command[1:])


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_the_grpc_door_serves_tls_from_a_secret_and_its_probe_checks_it(path):
    [rayservice] = [doc for doc in documents(path) if doc["kind"] == "RayService"]
    [args] = [AppArgs.model_validate(app["args"]) for app in serve_config_v2(rayservice)["applications"]]
    template = pod_templates(rayservice)["head"]
    head = container(template)
    [mount] = head["volumeMounts"]
    [volume] = [v for v in template["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "specfleet-grpc-tls" and mount["readOnly"]
    in_mount = lambda file: Path(file).parent == Path(mount["mountPath"])  # noqa: E731
    assert args.grpc_tls is not None and in_mount(args.grpc_tls.cert_file) and in_mount(args.grpc_tls.key_file)
    probe = liveness_probe_args(head)
    assert in_mount(probe.tls_ca), "the probe checks the door's certificate"
    assert probe.tls_server_name == grpc_service_of(path)["metadata"]["name"], "the name clients reach the door by"
    assert probe.timeout < head["livenessProbe"]["timeoutSeconds"]


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.mark.parametrize("rayservice", rayservices(), ids=doc_id)
def test_every_pod_runs_the_projects_image_with_its_ray_version(rayservice):
    project = pyproject()["project"]
    [ray_pin] = [dep for dep in project["dependencies"] if dep.startswith("ray[")]
    assert rayservice["spec"]["rayClusterConfig"]["rayVersion"] == ray_pin.split("==")[1]
    images = {container(template)["image"] for template in pod_templates(rayservice).values()}
    assert images == {f"specfleet:{project['version']}"}


def test_the_dockerfile_copies_what_the_package_and_manifests_need():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.MULTILINE)
    copied = {Path(source).parts[0] for line in re.findall(r"^COPY (.+)$", dockerfile, re.MULTILINE)
              for source in line.split()[:-1] if not source.startswith("--")}
    setuptools = pyproject()["tool"]["setuptools"]
    package_roots = {Path(setuptools["package-dir"].get(pkg.split(".")[0], pkg.split(".")[0])).parts[0]
                     for pkg in setuptools["packages"]}
    needed = package_roots | {"pyproject.toml", "README.md", "deploy", "models"}
    assert needed <= copied, f"not copied into the image: {needed - copied}"
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert not needed & ignored, f".dockerignore drops {needed & ignored}"
