"""The Python `kubernetes` client against rkube: create, patch with each type, list, watch.

Run by crates/rkube/tests/python_client.rs with KUBECONFIG pointing at a fresh cluster.
Prints one line per check; exits non-zero on the first failure.
"""
import sys
import threading

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

config.load_kube_config()
core = client.CoreV1Api()
apps = client.AppsV1Api()
NS = "default"


def check(what, cond, detail=""):
    if not cond:
        print(f"FAIL {what}: {detail}")
        sys.exit(1)
    print(f"ok {what}")


# create
core.create_namespaced_config_map(NS, client.V1ConfigMap(
    metadata=client.V1ObjectMeta(name="py", labels={"from": "python"}), data={"a": "1"}))
dep = client.V1Deployment(
    metadata=client.V1ObjectMeta(name="pyweb"),
    spec=client.V1DeploymentSpec(
        replicas=1,
        selector=client.V1LabelSelector(match_labels={"app": "pyweb"}),
        template=client.V1PodTemplateSpec(
            metadata=client.V1ObjectMeta(labels={"app": "pyweb"}),
            spec=client.V1PodSpec(containers=[client.V1Container(name="web", image="nginx:1.26")]))))
apps.create_namespaced_deployment(NS, dep)
got = apps.read_namespaced_deployment("pyweb", NS)
check("create", got.spec.template.spec.containers[0].image == "nginx:1.26" and got.metadata.uid)

# merge patch
core.patch_namespaced_config_map("py", NS, {"data": {"b": "2"}}, _content_type="application/merge-patch+json")
check("merge patch", core.read_namespaced_config_map("py", NS).data == {"a": "1", "b": "2"})

# JSON patch (a list body)
core.patch_namespaced_config_map("py", NS, [{"op": "replace", "path": "/data/a", "value": "9"}])
check("json patch", core.read_namespaced_config_map("py", NS).data["a"] == "9")

# strategic merge patch (the client's default for a dict body): merges containers by name
apps.patch_namespaced_deployment("pyweb", NS, {"spec": {"template": {"spec": {"containers": [
    {"name": "side", "image": "busybox"}]}}}})
names = [c.name for c in apps.read_namespaced_deployment("pyweb", NS).spec.template.spec.containers]
check("strategic merge patch", names == ["web", "side"], names)

# server-side apply
applied = core.patch_namespaced_config_map(
    "py-ssa", NS, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "py-ssa"}, "data": {"k": "v"}},
    field_manager="py", _content_type="application/apply-patch+yaml")
managers = [(m.manager, m.operation) for m in applied.metadata.managed_fields]
check("apply patch", applied.data == {"k": "v"} and ("py", "Apply") in managers, managers)

# list with a selector
items = core.list_namespaced_config_map(NS, label_selector="from=python").items
check("list", [i.metadata.name for i in items] == ["py"], [i.metadata.name for i in items])

# watch: ADDED, MODIFIED, DELETED for an object made after the watch starts
events = []
started = threading.Event()


def watcher():
    w = watch.Watch()
    rv = core.list_namespaced_config_map(NS).metadata.resource_version
    started.set()
    for ev in w.stream(core.list_namespaced_config_map, NS, resource_version=rv, timeout_seconds=30):
        if ev["object"].metadata.name == "watched":
            events.append(ev["type"])
            if ev["type"] == "DELETED":
                w.stop()


t = threading.Thread(target=watcher)
t.start()
started.wait(30)
core.create_namespaced_config_map(NS, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="watched")))
core.patch_namespaced_config_map("watched", NS, {"data": {"x": "1"}}, _content_type="application/merge-patch+json")
core.delete_namespaced_config_map("watched", NS)
t.join(60)
check("watch", events == ["ADDED", "MODIFIED", "DELETED"], events)

# errors arrive as Status objects the client understands
try:
    core.read_namespaced_config_map("missing", NS)
    check("404", False, "found")
except ApiException as e:
    check("404", e.status == 404 and "not found" in e.body, e.body)
print("python client: all checks passed")
