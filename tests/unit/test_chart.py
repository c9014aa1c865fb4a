"""The Helm chart, rendered and linted by the real Helm engine (helm-python-sdk binds Helm's Go
SDK), every manifest validated against the Kubernetes JSON schemas (kubernetes-validate, strict:
unknown fields fail) and, for custom resources, against the chart's CRDs and our models."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate as kv
import pytest
import typer.main
import yaml

from hyperfleet.operator.gitsource import WEBHOOK_SECRET_ENV
from tests import chartutil as cu

#: Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas shipped.
KUBE_VERSIONS = ("1.32", str(kv.latest_version()))  # selectableFields are GA in 1.32

SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "ha-gitops": {
        "controller": {"replicas": 2},
        "gitSource": {"enabled": True, "url": "https://git.example.com/fleet.git",
                      "ref": {"branch": "prod"}, "path": "clusters/prod", "secretRef": "fleet-git",
                      "interval": "30s", "healthCheck": {"timeout": "10m"},
                      "verify": {"provider": "ssh", "secretRef": {"name": "fleet-signers"}}},
        "gitops": {"webhook": {"enabled": True, "secret": "s3cr3t"},
                   "secretNamespaces": ["tenants"]},
    },
    "custom-ch-no-metrics": {
        "agent": {"cloudHypervisor": {"path": "/opt/ch/bin/cloud-hypervisor"},
                  "hostPaths": ["/srv/images", "/srv/disks"], "stateDir": "/srv/disks",
                  "cpus": 32, "memory": "128Gi",
                  "pool": "gpu", "tolerations": [{"key": "dedicated", "operator": "Exists"}]},
        "metrics": {"enabled": False},
        "image": {"repository": "registry.example.com/hyperfleet", "tag": "1.2.3"},
        "logFormat": "text",
    },
    "privileged-no-device-plugin": {
        "agent": {"privileged": True, "devices": {"kvm": "", "tun": ""},
                  "cloudHypervisor": {"mountFromHost": False}},
        "gitops": {"enabled": False},
    },
    "hostpath-devices": {"agent": {"devices": {"kvm": "", "tun": ""}}, "rbac": {"create": True}},
    "device-plugin": {"agent": {"devices": {"mode": "devicePlugin"}}},
    "monitoring-ha": {
        "controller": {"replicas": 2},
        "metrics": {"agent": {"bindAddress": "hostIP"}, "serviceMonitor": {"enabled": True},
                    "podMonitor": {"enabled": True, "labels": {"release": "prom"}}},
        "grafana": {"dashboard": {"enabled": True}},
        "image": {"digest": "sha256:" + "ab" * 32},
    },
}
#: Kinds of the prometheus-operator CRDs: no Kubernetes schema; checked by test_monitoring_*.
MONITORING_KINDS = ("ServiceMonitor", "PodMonitor")


@pytest.fixture(params=sorted(SCENARIOS), scope="module")
def scenario(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    name: str = request.param
    values = SCENARIOS[name]
    return name, values, cu.objects(values)


def _walk_containers(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    yield from spec.get("containers", [])
    yield from spec.get("initContainers", [])


# ---------------------------------------------------------------------------- lint and schema


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_helm_lint_strict(name: str) -> None:
    report = helm.lint(str(cu.CHART), copy.deepcopy(SCENARIOS[name]), strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], problems or report["errors"]


def test_values_schema_rejects_typos_and_bad_types() -> None:
    for bad in ({"agent": {"socketdir": "/run/x"}}, {"controller": {"replicas": "two"}},
                {"gitSource": {"ref": {"branch": "a", "tag": "b"}}}, {"logFormat": "xml"},
                {"gitSource": {"verify": {"provider": "x509"}}},
                {"gitSource": {"healthCheck": {"timeout": "soon"}}}):
        report = helm.lint(str(cu.CHART), bad, strict=True)
        assert report["errors"], f"values.schema.json accepted {bad}"


def test_every_manifest_validates_against_kubernetes_schemas(
    scenario: tuple[str, dict[str, Any], list[dict[str, Any]]],
) -> None:
    _, _, objs = scenario
    crds = {c["spec"]["names"]["kind"]: c for c in (yaml.safe_load(t) for t in cu.chart_crd_files().values())}
    seen: set[tuple[str, str | None, str]] = set()
    for obj in objs:
        key = (obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])
        assert key not in seen, f"{key} rendered twice"
        seen.add(key)
        group = obj["apiVersion"].rpartition("/")[0]
        if obj["kind"] in MONITORING_KINDS:
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        if obj["kind"] in crds:
            crd = crds[obj["kind"]]
            assert group == crd["spec"]["group"]
            schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
            jsonschema.validate(obj, schema)
            continue
        for version in KUBE_VERSIONS:
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as exc:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} (k8s {version}): {exc.message} "
                            f"at {'.'.join(str(p) for p in exc.absolute_path)}")


def test_namespaced_objects_live_in_the_release_namespace(
    scenario: tuple[str, dict[str, Any], list[dict[str, Any]]],
) -> None:
    _, values, objs = scenario
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"}
    allowed = {cu.NAMESPACE, *values.get("gitops", {}).get("secretNamespaces", [])}
    for obj in objs:
        ns = obj["metadata"].get("namespace")
        if obj["kind"] in cluster_scoped:
            assert ns is None, f"{obj['kind']} is cluster-scoped"
        else:
            assert ns in allowed, f"{obj['kind']}/{obj['metadata']['name']} in {ns!r}"
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "hyperfleet", obj["metadata"]["name"]


def test_notes_render_for_every_scenario() -> None:
    for values in SCENARIOS.values():
        text = cu.notes(values)
        assert "kubectl get workernodes" in text


# ---------------------------------------------------------------------------- CRDs


def test_chart_crds_equal_generated_crds() -> None:
    """charts/hyperfleet/crds/ == crds/ (byte for byte) + kopf's peering CRDs; fix drift with
    `python -m tests.chartutil sync-crds`."""
    chart = cu.chart_crd_files()
    want = cu.expected_hyperfleet_crds()
    for path in sorted(cu.CRDS.glob("*.yaml")):
        assert chart.get(path.name) == path.read_text(), (
            f"charts/hyperfleet/crds/{path.name} differs from crds/{path.name}: "
            "run `python -m tests.chartutil sync-crds`")
    for name, text in want.items():
        assert chart.get(name) == text, f"{name} is stale: run `python -m tests.chartutil sync-crds`"
    assert set(chart) == set(want) | set(cu.KOPF_PEERING_CRDS), "unexpected files in the chart's crds/"


def test_chart_crds_are_valid_crds() -> None:
    for name, text in cu.chart_crd_files().items():
        crd = yaml.safe_load(text)
        for version in KUBE_VERSIONS:
            kv.validate(crd, version, strict=True)
        spec = crd["spec"]
        assert crd["metadata"]["name"] == f"{spec['names']['plural']}.{spec['group']}" == name[:-5]


def test_kopf_peering_crds_match_what_kopf_looks_for() -> None:
    # The selectors kopf resolves its peering resources by (kopf.dev/v1, by plural).
    from kopf._cogs.structs.references import CLUSTER_PEERINGS_K, NAMESPACED_PEERINGS_K

    files = cu.chart_crd_files()
    crds = {c["spec"]["names"]["kind"]: c for c in (yaml.safe_load(files[n]) for n in cu.KOPF_PEERING_CRDS)}
    assert set(crds) == {"ClusterKopfPeering", "KopfPeering"}
    for kind, selector, scope in (("ClusterKopfPeering", CLUSTER_PEERINGS_K, "Cluster"),
                                  ("KopfPeering", NAMESPACED_PEERINGS_K, "Namespaced")):
        spec = crds[kind]["spec"]
        assert spec["scope"] == scope
        assert (spec["group"], spec["versions"][0]["name"], spec["names"]["plural"]) == (
            selector.group, selector.version, selector.any_name)
        status = spec["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
        assert status.get("x-kubernetes-preserve-unknown-fields") is True  # keep-alives survive pruning


# ---------------------------------------------------------------------------- RBAC


def test_no_wildcards_or_escalation(scenario: tuple[str, dict[str, Any], list[dict[str, Any]]]) -> None:
    _, _, objs = scenario
    for role in (o for o in objs if o["kind"] in ("ClusterRole", "Role")):
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule.get(key, []), f"{role['metadata']['name']}: {key} has '*'"
            assert not rule.get("nonResourceURLs"), "discovery is granted by system:discovery"
            assert not set(rule["verbs"]) & {"escalate", "bind", "impersonate", "deletecollection"}
            if "secrets" in rule["resources"]:
                assert role["kind"] == "Role" and rule["verbs"] == ["get"], "Secrets: get, per namespace"
    for binding in (o for o in objs if o["kind"].endswith("RoleBinding")):
        assert binding["roleRef"]["name"] not in ("cluster-admin", "admin", "edit")


def test_rbac_binds_the_workloads_service_accounts(
    scenario: tuple[str, dict[str, Any], list[dict[str, Any]]],
) -> None:
    _, values, objs = scenario
    grants = cu.grants_by_subject(objs)
    ctl = cu.service_account_of(objs, "Deployment")
    agent = cu.service_account_of(objs, "DaemonSet")
    assert ctl != agent
    assert set(grants) == {ctl, agent}
    assert {o["metadata"]["name"] for o in objs if o["kind"] == "ServiceAccount"} == {
        ctl.rpartition(":")[2], agent.rpartition(":")[2]}
    # The agent never writes VM specs' placement, never reads Secrets, never deletes anything.
    assert not cu.allowed(grants[agent], "hyperfleet.dev", "virtualmachines", "delete", "x")
    assert not [g for g in grants[agent] if g.resource == "secrets" or g.verb == "delete"]
    gitops = values.get("gitops", {}).get("enabled", True)
    assert bool(cu.allowed(grants[ctl], "hyperfleet.dev", "gitsources", "watch", None)) == gitops
    peering = values.get("controller", {}).get("replicas", 1) > 1
    assert bool(cu.allowed(grants[ctl], "kopf.dev", "clusterkopfpeerings", "patch", None)) == peering
    if gitops:
        for ns in {cu.NAMESPACE, *values.get("gitops", {}).get("secretNamespaces", [])}:
            assert cu.allowed(grants[ctl], "", "secrets", "get", ns)
        assert not cu.allowed(grants[ctl], "", "secrets", "get", "kube-system")


def test_the_controller_may_run_virtual_machine_pools(
    scenario: tuple[str, dict[str, Any], list[dict[str, Any]]],
) -> None:
    _, _, objs = scenario
    grants = cu.grants_by_subject(objs)
    ctl = cu.service_account_of(objs, "Deployment")
    agent = cu.service_account_of(objs, "DaemonSet")
    g = "hyperfleet.dev"
    for resource, verb in (("virtualmachinepools", "list"), ("virtualmachinepools", "watch"),
                           ("virtualmachinepools", "patch"),  # its finalizer
                           ("virtualmachinepools/status", "patch"),
                           ("virtualmachinepools/finalizers", "update"),  # blockOwnerDeletion
                           ("virtualmachines", "create"), ("virtualmachines", "delete")):
        assert cu.allowed(grants[ctl], g, resource, verb, "team"), f"{verb} {resource}"
    # Pools are the controller's: the agent never touches them, and nobody needs pools/scale
    # but users (kubectl scale) and autoscalers, which have their own roles.
    assert not [x for x in grants[agent] if x.resource.startswith("virtualmachinepools")]
    assert not [x for x in grants[ctl] if x.resource == "virtualmachinepools/scale"]


# ---------------------------------------------------------------------------- workloads


def _agent(objs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    ds = cu.one(objs, "DaemonSet")
    return ds, ds["spec"]["template"]["spec"]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env") or []}


def test_agent_mounts_the_device_nodes_by_default_without_any_device_plugin() -> None:
    """Default devices.mode hostPath: no KubeVirt (or other) device plugin assumed; the
    device cgroup admits /dev/kvm only in a privileged container, and that is all it gets."""
    objs = cu.objects({})
    ds, pod = _agent(objs)
    (c,) = pod["containers"]
    assert c["securityContext"] == {"runAsUser": 0, "privileged": True, "readOnlyRootFilesystem": True}
    assert not pod.get("hostPID") and not pod.get("hostIPC")
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    host_paths = {v["hostPath"]["path"]: v["hostPath"]["type"] for v in pod["volumes"] if "hostPath" in v}
    assert host_paths == {"/run/hyperfleet": "DirectoryOrCreate", "/usr/bin/cloud-hypervisor": "File",
                          "/var/lib/hyperfleet": "DirectoryOrCreate", "/dev/kvm": "CharDevice",
                          "/dev/net/tun": "CharDevice"}
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/dev/kvm", "/dev/net/tun"} <= mounts and "/dev" not in mounts
    assert "devices.kubevirt.io" not in json.dumps(c["resources"])
    ch_mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/usr/bin/cloud-hypervisor")
    assert ch_mount["readOnly"] is True
    assert pod["nodeSelector"] == {"hyperfleet.dev/worker": "true"}
    assert _env(c)["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert ds["spec"]["updateStrategy"] == {"type": "OnDelete"}
    assert "--ch-binary=/usr/bin/cloud-hypervisor" in c["args"]
    assert "--socket-dir=/run/hyperfleet" in c["args"]


@pytest.mark.parametrize("names, want", [
    ({}, {"devices.kubevirt.io/kvm", "devices.kubevirt.io/tun"}),
    ({"kvm": "squat.ai/kvm", "tun": "squat.ai/tun"}, {"squat.ai/kvm", "squat.ai/tun"}),
])
def test_device_plugin_mode_is_least_privileged(names: dict[str, str], want: set[str]) -> None:
    _, pod = _agent(cu.objects({"agent": {"devices": {"mode": "devicePlugin", **names}}}))
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert sc["readOnlyRootFilesystem"] is True
    for res in want:
        assert c["resources"]["limits"][res] == c["resources"]["requests"][res] == 1
    assert not [v for v in pod["volumes"] if v.get("hostPath", {}).get("path", "").startswith("/dev")]


def test_agent_memory_is_not_limited_by_default() -> None:
    """The VMMs share the agent container's cgroup: a memory limit there caps every VM's RAM."""
    for name in sorted(SCENARIOS):
        _, pod = _agent(cu.objects(SCENARIOS[name]))
        (c,) = pod["containers"]
        assert "memory" not in c.get("resources", {}).get("limits", {}), name
        assert c["resources"]["requests"]["memory"] == "128Mi", name
    _, pod = _agent(cu.objects({"agent": {"resources": {"limits": {"memory": "70Gi"}},
                                          "devices": {"mode": "devicePlugin"}}}))
    (c,) = pod["containers"]
    assert c["resources"]["limits"] == {"memory": "70Gi", "devices.kubevirt.io/kvm": 1,
                                        "devices.kubevirt.io/tun": 1}  # an explicit limit stays


def test_agent_privileged_only_when_asked() -> None:
    objs = cu.objects(SCENARIOS["privileged-no-device-plugin"])
    _, pod = _agent(objs)
    (c,) = pod["containers"]
    assert c["securityContext"] == {"privileged": True}
    assert "devices.kubevirt.io/kvm" not in json.dumps(c.get("resources", {}))
    host_paths = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert host_paths == {"/run/hyperfleet", "/var/lib/hyperfleet"}, "no CH mount when it is in the image"


def test_agent_without_device_plugin_mounts_only_the_two_device_nodes() -> None:
    _, pod = _agent(cu.objects(SCENARIOS["hostpath-devices"]))
    (c,) = pod["containers"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    devices = {v["hostPath"]["path"]: v["hostPath"]["type"] for v in pod["volumes"]
               if v.get("hostPath", {}).get("path", "").startswith("/dev")}
    assert devices == {"/dev/kvm": "CharDevice", "/dev/net/tun": "CharDevice"}
    assert "devices.kubevirt.io" not in json.dumps(c["resources"])


def test_custom_cloud_hypervisor_path_and_host_paths() -> None:
    objs = cu.objects(SCENARIOS["custom-ch-no-metrics"])
    _, pod = _agent(objs)
    (c,) = pod["containers"]
    assert "--ch-binary=/opt/ch/bin/cloud-hypervisor" in c["args"]
    assert _env(c)["HYPERFLEET_CH_BINARY"] == "/opt/ch/bin/cloud-hypervisor"
    assert {"--cpus=32", "--memory=128Gi", "--pool=gpu", "--log-format=text",
            "--state-dir=/srv/disks", "--allowed-path-root=/srv/images",
            "--allowed-path-root=/srv/disks"} <= set(c["args"])
    host_paths = {v["hostPath"]["path"]: v["hostPath"]["type"] for v in pod["volumes"] if "hostPath" in v}
    assert host_paths["/opt/ch/bin/cloud-hypervisor"] == "File"
    assert {"/srv/images", "/srv/disks"} <= set(host_paths) and "/var/lib/hyperfleet" not in host_paths
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]
    assert c["image"] == "registry.example.com/hyperfleet:1.2.3"


def test_metrics_disabled_removes_ports_and_services() -> None:
    objs = cu.objects(SCENARIOS["custom-ch-no-metrics"])
    assert not [o for o in objs if o["kind"] == "Service"]
    for w in (o for o in objs if o["kind"] in ("Deployment", "DaemonSet")):
        for c in _walk_containers(w):
            assert not any(a.startswith("--metrics") for a in c["args"])
            assert "metrics" not in {p["name"] for p in c.get("ports", [])}
    objs = cu.objects({"metrics": {"enabled": False}, "health": {"enabled": False}})
    for w in (o for o in objs if o["kind"] in ("Deployment", "DaemonSet")):
        for c in _walk_containers(w):
            assert "ports" not in c and not {"livenessProbe", "readinessProbe"} & set(c)
            assert not any(a.startswith("--health") for a in c["args"])


def test_agent_metrics_bind_loopback_by_default() -> None:
    """Host network: 0.0.0.0 would be an unauthenticated port on every address of the node."""
    objs = cu.objects({})
    (c,) = _agent(objs)[1]["containers"]
    assert "--metrics-address=127.0.0.1" in c["args"]
    assert "HYPERFLEET_METRICS_ADDRESS" not in _env(c)
    assert not [o for o in objs if o["metadata"]["name"].endswith("agent-metrics")]


@pytest.mark.parametrize("bind, arg", [("hostIP", None), ("10.0.0.5", "--metrics-address=10.0.0.5")])
def test_agent_metrics_bind_address(bind: str, arg: str | None) -> None:
    objs = cu.objects({"metrics": {"agent": {"bindAddress": bind}}})
    (c,) = _agent(objs)[1]["containers"]
    if arg is None:  # the node's own address, from the downward API
        assert _env(c)["HYPERFLEET_METRICS_ADDRESS"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
        assert not any(a.startswith("--metrics-address") for a in c["args"])
    else:
        assert arg in c["args"]
    cu.one(objs, "Service", "agent-metrics")


def test_image_digest_overrides_the_tag() -> None:
    digest = "sha256:" + "0" * 64
    for w in (o for o in cu.objects({"image": {"tag": "1.2.3", "digest": digest}})
              if o["kind"] in ("Deployment", "DaemonSet")):
        (c,) = w["spec"]["template"]["spec"]["containers"]
        assert c["image"] == f"hyperfleet/hyperfleet@{digest}"
    report = helm.lint(str(cu.CHART), {"image": {"digest": "latest"}}, strict=True)
    assert report["errors"], "a digest that is not sha256:<64 hex> must be refused"


def test_metrics_services_select_their_pods() -> None:
    objs = cu.objects({"metrics": {"agent": {"bindAddress": "hostIP"}}})
    for component, port in (("controller", 9090), ("agent", 9091)):
        svc = cu.one(objs, "Service", f"{component}-metrics")
        workload = cu.one(objs, "Deployment" if component == "controller" else "DaemonSet")
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        (c,) = workload["spec"]["template"]["spec"]["containers"]
        assert f"--metrics-port={port}" in c["args"]
        assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in c["ports"]


def test_controller_runs_as_non_root_with_a_read_only_root() -> None:
    dep = cu.one(cu.objects({}), "Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    (c,) = pod["containers"]
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    assert not any(a.startswith("--peering") for a in c["args"])
    assert not [o for o in cu.objects({}) if o["kind"] == "ClusterKopfPeering"]


def test_replicas_turn_on_kopf_peering() -> None:
    objs = cu.objects(SCENARIOS["ha-gitops"])
    dep = cu.one(objs, "Deployment")
    assert dep["spec"]["replicas"] == 2 and dep["spec"]["strategy"]["type"] == "RollingUpdate"
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert "--peering=hyperfleet-controller" in c["args"]
    peering = cu.one(objs, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == "hyperfleet-controller"


def test_only_the_active_controller_is_a_webhook_endpoint() -> None:
    """A standby answers pushes with 503, so readiness is /readyz (active only) and liveness
    /healthz (every replica); with readiness meaning "active", a rollout that kept a replica
    available would wait forever for a new pod to become active beside the old one."""
    dep = cu.one(cu.objects(SCENARIOS["ha-gitops"]), "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "webhook"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "webhook"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "webhook"}
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate",
                                       "rollingUpdate": {"maxUnavailable": "100%", "maxSurge": 0}}
    # Peering without the receiver: kopf's liveness endpoint, every replica ready, so replicas
    # are replaced one at a time.
    dep = cu.one(cu.objects({"controller": {"replicas": 2}}), "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}, probe
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 0}


def test_probes_are_on_by_default_on_kopfs_health_endpoint() -> None:
    objs = cu.objects({})
    (ctl,) = cu.one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert "--health-port=8081" in ctl["args"]
    assert {"name": "health", "containerPort": 8081, "protocol": "TCP"} in ctl["ports"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert ctl[probe]["httpGet"] == {"path": "/healthz", "port": "health"}, probe
    (agent,) = _agent(objs)[1]["containers"]
    # Host network: the endpoint is on the node's loopback, where the kubelet probes it.
    assert {"--health-port=9092", "--health-address=127.0.0.1"} <= set(agent["args"])
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert agent[probe]["httpGet"] == {"host": "127.0.0.1", "path": "/healthz", "port": "health"}
    # Restarting the agent restarts the node's VMs: liveness waits minutes, not seconds.
    live = agent["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 300


def test_controller_pdb_only_with_a_replica_to_fail_over_to() -> None:
    pdb = cu.one(cu.objects({"controller": {"replicas": 2}}), "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    dep = cu.one(cu.objects({"controller": {"replicas": 2}}), "Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    for values in ({}, {"controller": {"peering": {"enabled": True}}},  # one replica: drains would block
                   {"controller": {"replicas": 2, "podDisruptionBudget": {"enabled": False}}},
                   SCENARIOS["ha-gitops"]):  # only the active replica is Ready: same
        assert not [o for o in cu.objects(values) if o["kind"] == "PodDisruptionBudget"], values


def test_monitoring_objects_only_when_enabled() -> None:
    assert not [o for o in cu.objects({}) if o["kind"] in MONITORING_KINDS]
    # Agents on loopback cannot be scraped from Prometheus: only the controller is monitored.
    objs = cu.objects({"metrics": {"serviceMonitor": {"enabled": True}}})
    assert [o["metadata"]["name"] for o in objs if o["kind"] in MONITORING_KINDS] == [
        "hyperfleet-controller"]
    objs = cu.objects(SCENARIOS["monitoring-ha"])
    for component in ("controller", "agent"):
        sm = cu.one(objs, "ServiceMonitor", component)
        svc = cu.one(objs, "Service", f"{component}-metrics")
        assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        assert sm["spec"]["namespaceSelector"] == {"matchNames": [cu.NAMESPACE]}
        assert sm["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
        pm = cu.one(objs, "PodMonitor", component)
        assert pm["metadata"]["labels"]["release"] == "prom"
        workload = cu.one(objs, "Deployment" if component == "controller" else "DaemonSet")
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        (c,) = workload["spec"]["template"]["spec"]["containers"]
        assert pm["spec"]["podMetricsEndpoints"][0]["port"] in {p["name"] for p in c["ports"]}


def _dashboard(objs: list[dict[str, Any]]) -> dict[str, Any]:
    cm = cu.one(objs, "ConfigMap", "-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = cm["data"].values()
    dashboard: dict[str, Any] = json.loads(text)
    return dashboard


def test_dashboard_configmap_is_valid_json_querying_only_documented_series() -> None:
    from tests.unit.test_docs import metric_names

    assert not [o for o in cu.objects({}) if o["kind"] == "ConfigMap"]
    dash = _dashboard(cu.objects(SCENARIOS["monitoring-ha"]))
    assert dash == json.loads((cu.CHART / "dashboards" / "hyperfleet.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    known = set(metric_names())
    docs = (cu.REPO / "docs" / "metrics.md").read_text()
    queried = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs
               for m in re.findall(r"\bhyperfleet_[a-z_]+", e)}
    assert queried - known == set(), "the dashboard queries series no process exports"
    assert not [m for m in queried if f"`{m}`" not in docs], "undocumented series in the dashboard"
    # The panels the dashboard promises: fleet phases, VMs per node, restarts, GitSource
    # readiness and latency, node heartbeats.
    for series in ("hyperfleet_vms", "hyperfleet_node_vms", "hyperfleet_vm_restarts_total",
                   "hyperfleet_gitsource_ready", "hyperfleet_gitsource_reconcile_duration_seconds",
                   "hyperfleet_node_heartbeat_timestamp_seconds"):
        assert series in queried, series
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    assert {p["datasource"]["uid"] for p in dash["panels"] if "datasource" in p} == {"${datasource}"}


def test_dashboard_namespace_and_labels() -> None:
    values = {"grafana": {"dashboard": {"enabled": True, "namespace": "monitoring",
                                        "labels": {"grafana_dashboard": "1", "team": "infra"}}}}
    cm = cu.one(cu.objects(values), "ConfigMap", "-dashboard")
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["team"] == "infra"


def test_gitsource_from_values_is_valid() -> None:
    from hyperfleet.reconcilers.models.gitsource import GitSourceSpec

    objs = cu.objects(SCENARIOS["ha-gitops"])
    gs = cu.one(objs, "GitSource")
    assert gs["metadata"] == {**gs["metadata"], "name": "fleet", "namespace": cu.NAMESPACE}
    spec = GitSourceSpec.model_validate_json(json.dumps(gs["spec"]), strict=True)
    assert spec.url == "https://git.example.com/fleet.git" and spec.path == "clusters/prod"
    assert spec.ref is not None and spec.ref.branch == "prod"
    assert spec.secret_ref is not None and spec.secret_ref.name == "fleet-git"
    assert spec.interval_seconds == 30


def test_webhook_receiver_service_and_secret() -> None:
    objs = cu.objects(SCENARIOS["ha-gitops"])
    svc = cu.one(objs, "Service", "-webhook")
    assert svc["spec"]["ports"] == [
        {"name": "webhook", "port": 80, "targetPort": "webhook", "protocol": "TCP"}]
    secret = cu.one(objs, "Secret", "-webhook")
    assert secret["stringData"] == {"secret": "s3cr3t"}
    (c,) = cu.one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert "--webhook-port=8080" in c["args"]
    assert _env(c)["HYPERFLEET_WEBHOOK_SECRET"] == {
        "secretKeyRef": {"name": secret["metadata"]["name"], "key": "secret"}}
    assert {"name": "webhook", "containerPort": 8080, "protocol": "TCP"} in c["ports"]
    assert not [o for o in cu.objects({}) if o["metadata"]["name"].endswith("-webhook")]


def test_webhook_receiver_limits() -> None:
    """The receiver's head/body deadlines and replay window reach the controller's flags."""
    (c,) = cu.one(cu.objects(SCENARIOS["ha-gitops"]), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert {"--webhook-header-timeout=10", "--webhook-body-timeout=30",
            "--webhook-replay-window=3600"} <= set(c["args"])
    tuned = {**SCENARIOS["ha-gitops"], "gitops": {"webhook": {
        "enabled": True, "secret": "s", "headerTimeoutSeconds": 5, "replayWindowSeconds": 0}}}
    (c,) = cu.one(cu.objects(tuned), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert {"--webhook-header-timeout=5", "--webhook-replay-window=0"} <= set(c["args"])
    for bad in ({"headerTimeoutSeconds": 0}, {"replayWindowSeconds": -1}, {"bodyTimeoutSeconds": "1m"}):
        report = helm.lint(str(cu.CHART), {"gitops": {"webhook": bad}}, strict=True)
        assert report["errors"], f"values.schema.json accepted {bad}"


def test_agents_fence_well_before_the_controller_evicts() -> None:
    def args(values: dict[str, Any], kind: str) -> list[str]:
        w = next(o for o in cu.objects(values) if o["kind"] == kind)
        return list(next(iter(_walk_containers(w)))["args"])

    assert "--eviction-timeout=300" in args({}, "Deployment")
    assert "--fence-after=150" in args({}, "DaemonSet")
    tight = {"controller": {"evictionTimeoutSeconds": 60}}
    assert "--fence-after=30" in args(tight, "DaemonSet")
    assert "--fence-after=0" in args({"agent": {"fenceAfterSeconds": 0}}, "DaemonSet")


@pytest.mark.parametrize("values, message", [
    ({"agent": {"fenceAfterSeconds": 400}}, "agent.fenceAfterSeconds .400. must be below"),
    ({"agent": {"stateDir": "/srv/x"}}, r"agent.stateDir \(/srv/x\) must be one of agent.hostPaths"),
    ({"gitSource": {"enabled": True}}, "gitSource.url is required"),
    ({"gitops": {"webhook": {"enabled": True}}}, "gitops.webhook.secret"),
])
def test_missing_required_values_fail_to_render(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=message):
        cu.render(values)


# ---------------------------------------------------------------------------- the CLI contract

def _cli_options() -> dict[str, dict[str, Any]]:
    """subcommand -> option spelling -> its parameter (typer vendors its own click)."""
    from hyperfleet.operator.cli import app

    commands: dict[str, Any] = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    return {name: {opt: p for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}
            for name, cmd in commands.items()}


def _missing_flags(values: dict[str, Any]) -> dict[str, set[str]]:
    options = _cli_options()
    missing: dict[str, set[str]] = {}
    for w in cu.objects(values):
        if w["kind"] not in ("Deployment", "DaemonSet"):
            continue
        for c in _walk_containers(w):
            command, *args = c["args"]
            for arg in args:
                flag = arg.split("=", 1)[0]
                if flag not in options[command]:
                    missing.setdefault(command, set()).add(flag)
            envvars = {getattr(p, "envvar", None) for p in options[command].values()}
            envvars.add("POD_ID")  # read by kopf itself (peering identity)
            envvars.add(WEBHOOK_SECRET_ENV)  # read from the environment only, never argv
            missing.setdefault(command, set()).update(f"${n}" for n in _env(c) if n not in envvars)
    return {cmd: flags for cmd, flags in missing.items() if flags}


@pytest.mark.parametrize("name", ["defaults", "custom-ch-no-metrics", "privileged-no-device-plugin",
                                  "ha-gitops", "monitoring-ha", "device-plugin"])
def test_cli_flags_exist(name: str) -> None:
    """Every flag and environment variable the chart passes is one `hyperfleet` accepts."""
    assert _missing_flags(SCENARIOS[name]) == {}


def test_containerfile_matches_the_chart() -> None:
    """The image the chart runs: python:3.11-slim, the package pip-installed, non-root by
    default with the UID the controller's securityContext expects, `hyperfleet` as entrypoint."""
    text = (cu.REPO / "Containerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    assert any(ln.startswith("RUN pip install") and " ." in ln for ln in lines)
    for ln in lines:
        if ln.startswith("COPY "):
            for src in ln.split()[1:-1]:
                assert (cu.REPO / src).exists(), f"Containerfile copies missing {src}"
    user = [ln for ln in lines if ln.startswith("USER ")]
    pod = cu.one(cu.objects({}), "Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert user and user[-1] == f"USER {pod['runAsUser']}:{pod['runAsGroup']}"
    entry = json.loads(next(ln for ln in lines if ln.startswith("ENTRYPOINT "))[len("ENTRYPOINT "):])
    assert entry[-1] == "hyperfleet"
    pyproject = (cu.REPO / "pyproject.toml").read_text()
    assert 'hyperfleet = "hyperfleet.operator.cli:main"' in pyproject
