"""schemathesis hooks for scripts/fuzz-api.sh (loaded through
SCHEMATHESIS_HOOKS=fuzz_hooks).

An enrollment needs the node's single-use secret, which no schema can
generate: of the schema-valid bodies for POST /api/v1/agents/enroll, this
turns two in three into a real enrollment - a node that exists (one is
added when none does) and a secret minted for it just before through the
admin API - so the fuzz also drives the path that succeeds and checks its
response against the schema. Every other body goes out as generated (and
is refused with 403: no such secret)."""

import json
import os
import urllib.error
import urllib.request

import schemathesis
from schemathesis.generation.modes import GenerationMode

URL = os.environ["CORRAL_FUZZ_URL"]
TOKEN = os.environ["CORRAL_FUZZ_TOKEN"]
_count = 0


def _admin(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(URL + path, data=data, method=method)
    req.add_header("Authorization", "Bearer " + TOKEN)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as res:
        return json.load(res)


def _node_with_secret():
    nodes = [n["name"] for n in _admin("GET", "/api/v1/nodes") if n["state"] != "draining"]
    if not nodes:
        nodes = [_admin("POST", "/api/v1/nodes", {"role": "web"})["name"]]
    name = nodes[_count % len(nodes)]
    return name, _admin("POST", "/api/v1/nodes/%s/enroll-secret" % name)["secret"]


@schemathesis.hook
def map_case(context, case):
    global _count
    if case.operation.path != "/api/v1/agents/enroll" or case.operation.method.upper() != "POST":
        return case
    meta = case.meta
    if meta is None or meta.generation.mode != GenerationMode.POSITIVE:
        return case
    if not isinstance(case.body, dict):
        return case
    _count += 1
    if _count % 3 == 0:
        return case
    try:
        node, secret = _node_with_secret()
    except (urllib.error.URLError, KeyError, ValueError):
        # The fuzz removed the node in between: send the case as it is.
        return case
    case.body = dict(case.body, node=node, secret=secret)
    return case
