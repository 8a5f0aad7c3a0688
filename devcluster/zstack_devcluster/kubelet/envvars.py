"""Container environment: env, envFrom, the downward API and $(VAR) expansion.

Mirrors the real kubelet's makeEnvironmentVariables: envFrom sources first (in
order, with their prefix), then env entries in order; every env value and every
command/args word is expanded with $(VAR) against the variables defined so far.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

HOST_IP = "127.0.0.1"
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_INDEXED = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")

# What a lookup callable returns: an object's "data" (already decoded to str) or None if it is missing.
Lookup = Callable[[str, str, str], "dict[str, str] | None"]


class ConfigError(Exception):
    """The container cannot be created from its spec (CreateContainerConfigError)."""


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes $(VAR) expansion: $$ escapes, unknown references stay as they are."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "$" and i + 1 < n:
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2 : end]
                    out.append(env.get(name, f"$({name})"))
                    i = end + 1
                    continue
            out.append("$" + nxt)
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def field_value(pod: dict[str, Any], path: str, pod_ip: str) -> str:
    """The value of a downward-API fieldRef.fieldPath."""
    meta, spec = pod.get("metadata", {}), pod.get("spec", {})
    m = _INDEXED.match(path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": HOST_IP,
        "status.hostIPs": HOST_IP,
    }
    if path in simple:
        return simple[path]
    if path in ("metadata.labels", "metadata.annotations"):
        return format_map(meta.get(path.split(".")[1]) or {})
    raise ConfigError(f"unsupported fieldRef fieldPath {path!r}")


def format_map(m: Mapping[str, str]) -> str:
    """Labels/annotations as the downward API writes them: key="value" lines, sorted."""
    return "\n".join(f'{k}="{_escape(v)}"' for k, v in sorted(m.items()))


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


_SUFFIX = {
    "": 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}


def quantity(q: str | int | float) -> Decimal:
    """Parse a resource.Quantity ("100m", "1Gi", "2") into a Decimal."""
    s = str(q).strip()
    m = re.match(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)$", s)
    if not m or m.group(2) not in _SUFFIX:
        raise ConfigError(f"cannot parse quantity {q!r}")
    return Decimal(m.group(1)) * Decimal(_SUFFIX[m.group(2)])


def resource_value(container: dict[str, Any], ref: dict[str, Any], node_allocatable: Mapping[str, str]) -> str:
    """A resourceFieldRef: the container's limit/request, else the node's allocatable."""
    resource = ref["resource"]
    kind, _, name = resource.partition(".")
    res = container.get("resources") or {}
    value = (res.get(kind) or {}).get(name)
    if value is None and kind == "requests":
        value = (res.get("limits") or {}).get(name)
    if value is None:
        value = node_allocatable.get(name, "0") if kind == "limits" else "0"
    divisor = quantity(ref.get("divisor") or "1")
    return str(math.ceil(quantity(value) / divisor))


def build_env(
    pod: dict[str, Any],
    container: dict[str, Any],
    pod_ip: str,
    lookup: Lookup,
    base: Mapping[str, str],
    node_allocatable: Mapping[str, str],
) -> dict[str, str]:
    """The full environment of one container process.

    `base` holds what the process gets before the spec is applied (host basics,
    KUBECONFIG, POD_ROOT...). `lookup(kind, namespace, name)` returns the decoded
    data of a ConfigMap or Secret, or None when it does not exist.
    """
    ns = pod["metadata"]["namespace"]
    env: dict[str, str] = dict(base)
    spec_env: dict[str, str] = {}
    for src in container.get("envFrom") or []:
        prefix = src.get("prefix", "")
        kind, ref = ("configmap", src["configMapRef"]) if "configMapRef" in src else ("secret", src.get("secretRef"))
        if not ref:
            continue
        data = lookup(kind, ns, ref["name"])
        if data is None:
            if ref.get("optional"):
                continue
            raise ConfigError(f'{"configmap" if kind == "configmap" else "secret"} "{ref["name"]}" not found')
        for k, v in data.items():
            if _ENV_NAME.match(prefix + k):
                spec_env[prefix + k] = v
    for item in container.get("env") or []:
        name = item["name"]
        if "valueFrom" not in item:
            spec_env[name] = expand(item.get("value", ""), {**env, **spec_env})
            continue
        value = _value_from(pod, container, item["valueFrom"], pod_ip, lookup, node_allocatable)
        if value is None:
            continue
        spec_env[name] = value
    env.update(spec_env)
    return env


def _value_from(
    pod: dict[str, Any],
    container: dict[str, Any],
    vf: dict[str, Any],
    pod_ip: str,
    lookup: Lookup,
    node_allocatable: Mapping[str, str],
) -> str | None:
    ns = pod["metadata"]["namespace"]
    if "fieldRef" in vf:
        return field_value(pod, vf["fieldRef"]["fieldPath"], pod_ip)
    if "resourceFieldRef" in vf:
        return resource_value(container, vf["resourceFieldRef"], node_allocatable)
    for key, kind in (("configMapKeyRef", "configmap"), ("secretKeyRef", "secret")):
        if key in vf:
            ref = vf[key]
            data = lookup(kind, ns, ref["name"])
            if data is None or ref["key"] not in data:
                if ref.get("optional"):
                    return None
                what = f'{kind} "{ref["name"]}"' if data is None else f'key "{ref["key"]}" in {kind} "{ref["name"]}"'
                raise ConfigError(f"couldn't find {what}")
            return data[ref["key"]]
    raise ConfigError(f"unsupported valueFrom {sorted(vf)}")


def decode_data(obj: dict[str, Any], kind: str) -> dict[str, str]:
    """data (+binaryData) of a ConfigMap or Secret as str values."""
    out: dict[str, str] = {}
    if kind == "secret":
        for k, v in (obj.get("data") or {}).items():
            out[k] = base64.b64decode(v).decode(errors="replace")
        out.update(obj.get("stringData") or {})
    else:
        out.update(obj.get("data") or {})
        for k, v in (obj.get("binaryData") or {}).items():
            out[k] = base64.b64decode(v).decode(errors="replace")
    return out
