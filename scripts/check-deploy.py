#!/usr/bin/env python3
"""Static checks of deploy/ (run by scripts/test.sh after scripts/ensure-tools.sh).

1. Prometheus: `promtool check rules` and the rules' unit tests (`promtool test rules`);
   deploy/kubernetes/prometheusrule.yaml carries exactly deploy/prometheus/rules.yaml.
2. Kubernetes: every manifest validates offline — built-in kinds with `kubernetes-validate
   --strict` (bundled schemas), the Prometheus Operator kinds against the vendored schema
   subset in deploy/kubernetes/schemas/ — and the policy the issue asks for holds: the proxy is
   a native sidecar with probes on the admin port, every container is least-privilege and has
   resource requests, store credentials come from the Secret, not the ConfigMap.
3. Docker: hadolint on the Dockerfile (and on a known-bad one, so a silent linter fails the
   check); the build context has every workspace member and the .dockerignore drops none.
4. Compose and Grafana: the compose file's references exist; the dashboard is well formed and
   every recorded series it uses is defined by the rules.

`--write` regenerates prometheusrule.yaml from rules.yaml.
"""
import json
import pathlib
import re
import subprocess
import sys
import tempfile

import jsonschema
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
RULES = DEPLOY / "prometheus" / "rules.yaml"
PROMETHEUSRULE = K8S / "prometheusrule.yaml"
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
FAILURES = []


def fail(message):
    FAILURES.append(message)
    print(f"FAIL {message}", file=sys.stderr)


def run(args, cwd=ROOT):
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        fail(f"{' '.join(map(str, args))}:\n{result.stdout}{result.stderr}")
    return result


def prometheusrule_text():
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "switchyard", "labels": {"app.kubernetes.io/name": "switchyard"}},
        "spec": yaml.safe_load(RULES.read_text()),
    }
    return (
        "# GENERATED from deploy/prometheus/rules.yaml (scripts/check-deploy.py --write regenerates it;\n"
        "# the deploy check fails when the two differ). Edit rules.yaml, not this file.\n"
        + yaml.safe_dump(doc, sort_keys=False, width=100)
    )


def check_prometheus():
    run(["promtool", "check", "rules", RULES])
    run(["promtool", "test", "rules", RULES.parent / "rules.test.yaml"])
    if PROMETHEUSRULE.read_text() != prometheusrule_text():
        fail(f"{PROMETHEUSRULE} differs from {RULES}: run scripts/check-deploy.py --write")


def manifests():
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def check_kubernetes():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    if listed != present:
        fail(f"kustomization.yaml resources {sorted(listed)} != files {sorted(present)}")
    builtin = sorted({str(p) for p, d in manifests() if d["kind"] not in CRD_KINDS})
    run(["kubernetes-validate", "--strict", "--quiet", *builtin])
    docs = list(manifests())
    for path, doc in docs:
        if doc["kind"] in CRD_KINDS:
            schema = json.loads((K8S / "schemas" / f"monitoring.coreos.com_v1_{doc['kind'].lower()}.json").read_text())
            try:
                jsonschema.validate(doc, schema)
            except jsonschema.ValidationError as e:
                fail(f"{path.name}: {doc['kind']}: {e.message} at {list(e.absolute_path)}")
    check_policy(docs)


def pod_specs(docs):
    for path, doc in docs:
        if doc["kind"] in {"Deployment", "Job"}:
            yield path, doc, doc["spec"]["template"]["spec"]


def check_policy(docs):
    by_kind = {}
    for _, doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    for path, doc, spec in pod_specs(docs):
        name = f"{path.name} {doc['metadata']['name']}"
        pod_sc = spec.get("securityContext", {})
        if not (pod_sc.get("runAsNonRoot") and pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault"):
            fail(f"{name}: pod must set runAsNonRoot and seccompProfile RuntimeDefault")
        if spec.get("automountServiceAccountToken") is not False:
            fail(f"{name}: automountServiceAccountToken must be false (no API access needed)")
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c.get("securityContext", {})
            if not (sc.get("allowPrivilegeEscalation") is False and sc.get("readOnlyRootFilesystem") is True
                    and sc.get("capabilities", {}).get("drop") == ["ALL"]):
                fail(f"{name}/{c['name']}: container must drop ALL capabilities, forbid privilege "
                     "escalation and use a read-only root filesystem")
            if not c.get("resources", {}).get("requests"):
                fail(f"{name}/{c['name']}: resource requests missing")
            if c.get("image") == "switchyard":
                envs = {e["name"] for e in c.get("env", [])}
                secret_refs = [r["secretRef"]["name"] for r in c.get("envFrom", []) if "secretRef" in r]
                if secret_refs != ["switchyard-credentials"]:
                    fail(f"{name}/{c['name']}: credentials must come from the switchyard-credentials Secret")
                if any("PASSWORD" in e or e.endswith("_URL") and "value" in e for e in envs):
                    fail(f"{name}/{c['name']}: a credential is set inline")
    orders = next(d for d in by_kind["Deployment"] if d["metadata"]["name"] == "orders")
    sidecars = [c for c in orders["spec"]["template"]["spec"].get("initContainers", [])
                if c["name"] == "switchyard-proxy"]
    if not sidecars or sidecars[0].get("restartPolicy") != "Always":
        fail("app-deployment.yaml: switchyard-proxy must be a native sidecar (initContainer, restartPolicy Always)")
    else:
        proxy = sidecars[0]
        admin = {p["name"]: p["containerPort"] for p in proxy["ports"]}
        for probe, path in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/readyz")]:
            get = proxy.get(probe, {}).get("httpGet", {})
            if get.get("path") != path or get.get("port") not in admin:
                fail(f"app-deployment.yaml: the proxy's {probe} must GET {path} on the admin port")
        env = {e["name"]: e.get("value") for e in proxy["env"]}
        if env.get("SWITCHYARD_PROXY_LISTEN", "").split(":")[0] != "127.0.0.1":
            fail("app-deployment.yaml: the sidecar's data plane must listen on 127.0.0.1 only")
    control = next(d for d in by_kind["Deployment"] if d["metadata"]["name"] == "switchyard-control")
    if control["spec"]["replicas"] != 2 or "serve" not in control["spec"]["template"]["spec"]["containers"][0]["args"]:
        fail("control-deployment.yaml: two replicas of `switchyard-control serve`")
    config = by_kind["ConfigMap"][0]["data"]["switchyard.toml"]
    for url in re.findall(r'url\s*=\s*"([^"]*)"', config):
        if re.search(r"://[^/@]*:[^${/@][^/@]*@", url):
            fail(f"configmap.yaml: a password is written in the ConfigMap: {url}")
    monitored_ports = {e["port"] for d in by_kind["ServiceMonitor"] for e in d["spec"]["endpoints"]}
    service_ports = {p["name"] for d in by_kind["Service"] for p in d["spec"]["ports"]}
    if not monitored_ports <= service_ports:
        fail(f"servicemonitor.yaml: ports {monitored_ports - service_ports} are on no Service")
    pod_ports = {e["port"] for d in by_kind["PodMonitor"] for e in d["spec"]["podMetricsEndpoints"]}
    if sidecars and not pod_ports <= {p["name"] for p in sidecars[0]["ports"]}:
        fail("podmonitor.yaml: the scraped port is not the sidecar's admin port")


BAD_DOCKERFILE = "FROM debian:latest\nRUN apt-get update && apt-get install -y curl\n"


def check_docker():
    dockerfile = DEPLOY / "docker" / "Dockerfile"
    run(["hadolint", "--failure-threshold", "info", dockerfile])
    with tempfile.NamedTemporaryFile("w", suffix=".Dockerfile", delete=False) as bad:
        bad.write(BAD_DOCKERFILE)
    result = subprocess.run(["hadolint", bad.name], capture_output=True, text=True)
    if result.returncode == 0 or "DL3007" not in result.stdout:
        fail(f"hadolint accepted a known-bad Dockerfile: {result.stdout}{result.stderr}")
    pathlib.Path(bad.name).unlink()
    text = dockerfile.read_text()
    copied = set(re.findall(r"^COPY (?!--from)(\S+) ", text, re.M))
    members = re.search(r"members\s*=\s*\[([^\]]*)\]", (ROOT / "Cargo.toml").read_text()).group(1)
    for member in re.findall(r'"([^"]+)"', members):
        if member not in copied:
            fail(f"Dockerfile: workspace member {member} is not copied into the build stage")
    ignored = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
               if l.strip() and not l.startswith("#")]
    for source in copied | {"Cargo.toml", "Cargo.lock"}:
        if source in ignored:
            fail(f".dockerignore drops {source}, which the Dockerfile copies")
    if not re.search(r"^USER (?!0|root)", text, re.M):
        fail("Dockerfile: the runtime stage must run as a non-root USER")
    if len(re.findall(r"^FROM ", text, re.M)) < 2:
        fail("Dockerfile: expected a multi-stage build")
    for binary in ["switchyard-proxy", "switchyard-control"]:
        if f"target/release/{binary}" not in text:
            fail(f"Dockerfile: {binary} is not in the image")


def check_compose():
    compose_path = DEPLOY / "compose.yaml"
    compose = yaml.safe_load(compose_path.read_text())
    for name in ["postgres", "init", "proxy", "serve"]:
        if name not in compose["services"]:
            fail(f"compose.yaml: service {name} missing")
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                if not (compose_path.parent / source).exists():
                    fail(f"compose.yaml: {name} mounts {source}, which does not exist")
        build = service.get("build")
        if build:
            context = compose_path.parent / build["context"]
            if not (context / build["dockerfile"]).exists():
                fail(f"compose.yaml: {name} builds from a missing Dockerfile")


def check_grafana():
    dashboard = json.loads((DEPLOY / "grafana" / "switchyard.json").read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    if len(ids) != len(set(ids)):
        fail("grafana: panel ids are not unique")
    recorded = {r["record"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "record" in r}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            for series in re.findall(r"switchyard:[a-z0-9_:]+", target["expr"]):
                if series not in recorded:
                    fail(f"grafana: panel {panel['title']!r} uses {series}, which no rule records")
    if not any(v["name"] == "datasource" for v in dashboard["templating"]["list"]):
        fail("grafana: the dashboard needs a datasource variable")


def main():
    if "--write" in sys.argv:
        PROMETHEUSRULE.write_text(prometheusrule_text())
    for check in [check_prometheus, check_kubernetes, check_docker, check_compose, check_grafana]:
        check()
    if FAILURES:
        print(f"check-deploy: {len(FAILURES)} problem(s)", file=sys.stderr)
        return 1
    print("check-deploy: rules, rule tests, manifests, Dockerfile, compose and dashboard OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
