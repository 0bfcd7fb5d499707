#!/usr/bin/env python3
"""Cross-check the fake apiserver with an independent client: the official Python
`kubernetes` package (and kubectl, if one is on PATH). No real kube-apiserver is involved.

Usage: crosscheck.py PATH/TO/fake-apiserver
Install: pip install kubernetes
Exits non-zero on the first failed check; every step is bounded in time.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import urllib3

from kubernetes import client, watch
from kubernetes.client.rest import ApiException

PROXY_SELECTOR = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"


class Fake:
    """The fake-apiserver binary, driven through its stdin control commands."""

    def __init__(self, binary):
        self.proc = subprocess.Popen(
            [binary, "--bookmark-interval-ms", "300"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )
        line = self.proc.stdout.readline().strip()
        assert line.startswith("listening "), f"unexpected banner {line!r}"
        self.url = line.split(" ", 1)[1]
        self.lock = threading.Lock()

    def cmd(self, line):
        with self.lock:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
            reply = self.proc.stdout.readline().strip()
        assert reply.startswith("ok"), f"{line!r} -> {reply!r}"
        return reply[3:]

    def apply(self, obj):
        return int(self.cmd("apply " + json.dumps(obj)))

    def close(self):
        self.proc.kill()
        self.proc.wait(timeout=5)


def svc(name, labels=None, ns="default"):
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
            "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok   {what}")


def in_background(delay, fn):
    t = threading.Timer(delay, fn)
    t.start()
    return t


def main(binary):
    fake = Fake(binary)
    try:
        run(fake)
    finally:
        fake.close()


def run(fake):
    cfg = client.Configuration()
    cfg.host = fake.url
    api = client.ApiClient(cfg)
    core, disc = client.CoreV1Api(api), client.DiscoveryV1Api(api)

    for i in range(7):
        fake.apply(svc(f"s{i}"))
    fake.apply(svc("headless", {"service.kubernetes.io/headless": ""}))
    for i in range(3):
        fake.apply({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": f"s0-{i}", "namespace": "default",
                                 "labels": {"kubernetes.io/service-name": "s0"}},
                    "addressType": "IPv4",
                    "endpoints": [{"addresses": [f"10.0.0.{i + 1}"]}]})
    fake.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}})

    # LIST with paging.
    names, token, pages = [], None, 0
    while True:
        page = core.list_service_for_all_namespaces(limit=3, _continue=token, _request_timeout=5)
        pages += 1
        check(page.metadata.resource_version, f"page {pages} has a list resourceVersion")
        names += [s.metadata.name for s in page.items]
        token = page.metadata._continue
        if not token:
            break
    check(pages == 3 and len(names) == 8 and len(set(names)) == 8, f"paged list: {pages} pages, {names}")
    sel = core.list_service_for_all_namespaces(label_selector=PROXY_SELECTOR, _request_timeout=5)
    check(sorted(s.metadata.name for s in sel.items) == [f"s{i}" for i in range(7)],
          "kube-proxy label selector filters server-side")
    slices = disc.list_namespaced_endpoint_slice("default", _request_timeout=5)
    check(len(slices.items) == 3 and slices.items[0].endpoints[0].addresses, "endpointslices list decodes")
    check(core.read_node("n1", _request_timeout=5).metadata.name == "n1", "GET one node")
    try:
        core.read_node("missing", _request_timeout=5)
        check(False, "missing node is a 404")
    except ApiException as e:
        check(e.status == 404 and json.loads(e.body)["reason"] == "NotFound", "missing node is a 404 Status")

    # WATCH with bookmarks, a modify, a selector transition and a delete, ended by timeoutSeconds.
    rv = sel.metadata.resource_version
    in_background(0.5, lambda: fake.apply(svc("s1", {"tier": "web"})))
    in_background(0.8, lambda: fake.apply(svc("s2", {"service.kubernetes.io/headless": ""})))
    in_background(1.1, lambda: fake.cmd("delete services default s3"))
    seen, started = [], time.monotonic()
    for ev in watch.Watch().stream(core.list_service_for_all_namespaces, label_selector=PROXY_SELECTOR,
                                   resource_version=rv, allow_watch_bookmarks=True, timeout_seconds=2,
                                   _request_timeout=10):
        name = ev["raw_object"]["metadata"].get("name", "")
        seen.append((ev["type"], name))
    elapsed = time.monotonic() - started
    typed = [s for s in seen if s[0] != "BOOKMARK"]
    check(typed == [("MODIFIED", "s1"), ("DELETED", "s2"), ("DELETED", "s3")],
          f"watch events incl. selector transition: {typed}")
    check(sum(1 for s in seen if s[0] == "BOOKMARK") >= 3, "bookmarks on the watch")
    check(1.8 < elapsed < 5, f"watch ended by timeoutSeconds=2 after {elapsed:.1f}s")

    # Too old RV after compaction: the client gets the in-stream 410 (retries once, then raises).
    fake.cmd("compact")
    try:
        for _ in watch.Watch().stream(core.list_service_for_all_namespaces, resource_version=rv,
                                      timeout_seconds=3, _request_timeout=10):
            pass
        check(False, "compacted watch raises 410")
    except ApiException as e:
        check(e.status == 410 and "Expired" in str(e.reason), f"compacted watch raises 410: {e.reason}")
    fresh = core.list_service_for_all_namespaces(_request_timeout=5)
    check(sorted(s.metadata.name for s in fresh.items) == sorted(["s0", "s1", "s2", "s4", "s5", "s6", "headless"]),
          "relist after 410 shows the current state")

    # A severed watch breaks the client's chunked read instead of ending cleanly.
    in_background(0.5, lambda: fake.cmd("sever"))
    broke = None
    try:
        for _ in watch.Watch().stream(core.list_service_for_all_namespaces, resource_version=fresh.metadata.resource_version,
                                      timeout_seconds=5, _request_timeout=10):
            pass
    except Exception as e:  # urllib3 ProtocolError: connection broken mid-chunk
        broke = e
    check(isinstance(broke, urllib3.exceptions.ProtocolError),
          f"severed watch is an abrupt cut: {type(broke).__name__}: {broke}")

    kubectl = shutil.which("kubectl")
    if kubectl:
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as kc:
            kc.write(f"apiVersion: v1\nkind: Config\nclusters:\n- name: f\n  cluster:\n    server: {fake.url}\n"
                     "contexts:\n- name: f\n  context:\n    cluster: f\n    user: f\ncurrent-context: f\n"
                     "users:\n- name: f\n  user: {}\n")
        env = dict(os.environ, KUBECONFIG=kc.name)
        def kctl(*args):
            return subprocess.run([kubectl, *args], env=env, capture_output=True, text=True, timeout=20)
        out = kctl("get", "--raw", "/api/v1/namespaces/default/services")
        check(out.returncode == 0 and json.loads(out.stdout)["kind"] == "ServiceList", "kubectl get --raw")
        out = kctl("get", "services", "-A")
        check(out.returncode == 0 and "s0" in out.stdout, f"kubectl get services -A (discovery): {out.stderr.strip()[:200]}")
        out = kctl("get", "endpointslices", "-n", "default")
        check(out.returncode == 0 and "s0-1" in out.stdout, f"kubectl get endpointslices: {out.stderr.strip()[:200]}")
        watcher = subprocess.Popen([kubectl, "get", "services", "-w", "-n", "default"], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        in_background(1.0, lambda: fake.apply(svc("watched-by-kubectl")))
        try:
            out, err = watcher.communicate(timeout=3)
        except subprocess.TimeoutExpired:
            watcher.kill()
            out, err = watcher.communicate(timeout=5)
        check("s0" in out and "watched-by-kubectl" in out, f"kubectl get services -w: {err.strip()[:200]}")
        os.unlink(kc.name)
    else:
        print("skip kubectl (not on PATH)")
    print("crosscheck passed")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
