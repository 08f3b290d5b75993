"""Offline validation of the Istio manifests in istio/.

    python -m tools.istio_validate [--crds PATH] [--envoy PATH] [--template] [PATHS...]

Three checks, one output line per document or finding:

1. Schema: every Istio resource is validated against the CustomResourceDefinition Istio ships
   (`<repo>/../shared/istio/crd-all.gen.yaml` by default), the way the Kubernetes API server
   does it: structural-schema semantics with jsonschema (unknown fields rejected unless
   `x-kubernetes-preserve-unknown-fields`, types, enums, patterns, formats, oneOf/anyOf,
   int-or-string, list-type set/map uniqueness), metadata as ObjectMeta, and the CEL rules in
   `x-kubernetes-validations` evaluated with cel-python plus the Kubernetes CEL library
   (tools/kube_cel.py). A rule that cannot be evaluated fails the document. Other kinds
   (Deployment patches) are checked for well-formedness only and reported as such. Without the
   CRD file the schema check is reported as skipped.
2. Cross-checks between documents: each cluster named in a WasmPlugin's pluginConfig exists
   (an Istio `outbound|port||host` cluster with its ServiceEntry and, for TLS ports, a SIMPLE
   DestinationRule; or a cluster an EnvoyFilter adds, with the listener, volume or socket it
   needs; the token-file listener on 127.0.0.1 only), gateways named by VirtualServices exist,
   WasmPlugin, AuthorizationPolicy and Telemetry selectors select the egress gateway. Then
   Istio's semantics, each finding naming its rule:
   - phase-stats: every WasmPlugin runs in phase STATS, after Istio's RBAC filter.
   - fail-reload: every WasmPlugin has failStrategy FAIL_RELOAD (fails closed; never FAIL_OPEN).
   - gateway-plugin-match: gateway WasmPlugins match mode CLIENT on the port of the Gateway server
     that serves their hosts (80), not every listener of the gateway.
   - gateway-hosts-namespaced: Gateway server hosts are `<gateway namespace>/<host>`.
   - root-selector-labels: selectors in the root namespace (istio-system) name both `istio` and
     `app`.
   - image-pinned: every WasmPlugin has a sha256, and neither the all-zero placeholder digest nor
     a `<org>` repository placeholder. `--template` accepts exactly those placeholders: for the
     repository's own istio/ (`make validate`), never for manifests about to be applied.
   - sidecar-token-via-gateway: a sidecar WasmPlugin's token endpoint cluster is a subset of the
     egress gateway's Service (ISTIO_MUTUAL, SNI = the token endpoint's host) that a Gateway
     server and VirtualService take to the token endpoint with TLS originated at the gateway.
   - tls-origination-export: DestinationRules that originate TLS are exported to their own
     namespace only (exportTo ["."]), the egress gateway's.
   - upstream-clusters: every WasmPlugin lists the clusters its hosts' routes lead to, and only
     those, in upstream_clusters.
   - caller-rules: a plugin's `callers` load in the filter (names unique and well-formed, a
     service account per rule, principals exact or a prefix with one trailing `*`), every principal
     is a mesh workload's SPIFFE ID or a prefix that names a whole namespace, and none is already
     matched by an earlier rule (first match wins).
   - caller-peer-certificate: caller rules run on the egress gateway, behind a Gateway server that
     requires the callers' Istio certificates (ISTIO_MUTUAL), reading the peer certificate.
   - caller-fence: the DENY AuthorizationPolicy on the gateway admits every principal the rules
     name (the fence refuses everyone else before the filter runs).
   - x509-client-certificate: a plugin with subject_token source x509 calls mtls.auth.openai.com
     through a cluster that presents a client certificate (an EnvoyFilter cluster with the proxy's
     SDS secret `default` or files, or a DestinationRule MUTUAL with credentialName), verifies the
     server against a CA bundle that is not the mesh root, and sends the host as SNI; its
     upstream_clusters do the same to an mTLS API host, with the route's Host rewritten to it.
   The OpenAI ids may come from the VM environment (vmConfig.env OPENAI_IDENTITY_PROVIDER_ID /
   OPENAI_SERVICE_ACCOUNT_ID) when pluginConfig omits them, never from both.
3. Envoy: the listeners and clusters that EnvoyFilters add are loaded by a real Envoy in
   `--mode validate` (when an envoy binary is available), since the CRD does not check them.

Exit status 0 only if nothing failed.
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import celpy
import jsonschema
import re2
import yaml
from celpy import celtypes
from jsonschema.exceptions import ValidationError

from tools import kube_cel

REPO = Path(__file__).resolve().parent.parent
SHARED_ISTIO = REPO.parent / "shared" / "istio"
DEFAULT_CRDS = SHARED_ISTIO / "crd-all.gen.yaml"
ISTIO_DIR = REPO / "istio"
ROOT_NAMESPACE = "istio-system"  # Istio's default root configuration namespace
PLUGIN_SOURCES = {"header", "kubernetes", "gcp_metadata", "azure_imds", "spiffe", "x509"}
# Sources that fetch no subject token (no subject_token.cluster): the caller sends it, or, for
# x509, the certificate is in the TLS handshake of the token endpoint cluster.
NO_SUBJECT_CLUSTER = {"header", "x509"}
# OpenAI's hosts for X.509 workload identity: the token endpoint and the mTLS API hosts.
MTLS_AUTH_HOST = "mtls.auth.openai.com"
MTLS_API_HOSTS = {"mtls.api.openai.com", "mtls-us.api.openai.com", "mtls-eu.api.openai.com"}
LOOPBACK = "127.0.0.1"  # where the token-file listener must bind (the pod's containers only)
# Ports Istio's proxies (sidecars, gateways) use themselves: an added listener must avoid them.
ISTIO_PROXY_PORTS = {15000, 15001, 15004, 15006, 15008, 15009, 15020, 15021, 15053, 15090}


# --- YAML as kubectl reads it -----------------------------------------------------------------


class _KubeYamlLoader(yaml.SafeLoader):
    """YAML 1.1 like sigs.k8s.io/yaml: duplicate keys are errors, timestamps stay strings."""


_KubeYamlLoader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.copy().items()
}


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_KubeYamlLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _scan_plain(self):
    """go-yaml ends a plain scalar at ':' only when a blank follows, also in flow context, so
    `[001:db8::]` is a list of one string; PyYAML would read a mapping. While PyYAML scans a
    plain scalar in flow context, its look-ahead after a ':' is shown a neutral character
    instead of a flow indicator (the next ordinary peek still sees the real one)."""
    self._plain_scan = True
    try:
        return yaml.SafeLoader.scan_plain(self)
    finally:
        self._plain_scan = False
        self._last_peek = None


def _peek(self, index=0):
    ch = yaml.SafeLoader.peek(self, index)
    if getattr(self, "_plain_scan", False) and self.flow_level:
        last = getattr(self, "_last_peek", None)
        self._last_peek = (self.pointer, index, ch)
        if last == (self.pointer, index - 1, ":") and ch in ",[]{}":
            return "a"
    return ch


_KubeYamlLoader.scan_plain = _scan_plain
_KubeYamlLoader.peek = _peek


@dataclass
class Document:
    source: str  # file path as given
    index: int  # position among the file's YAML documents
    obj: Any = None
    parse_error: str | None = None

    @property
    def label(self) -> str:
        return f"{_shown_path(self.source)}#{self.index}"

    @property
    def kind(self) -> str:
        return self.obj.get("kind", "?") if isinstance(self.obj, dict) else "?"

    @property
    def namespace(self) -> str:
        meta = self.obj.get("metadata") if isinstance(self.obj, dict) else None
        return (meta or {}).get("namespace") or "default"

    @property
    def name(self) -> str:
        meta = self.obj.get("metadata") if isinstance(self.obj, dict) else None
        return str((meta or {}).get("name", "?"))

    @property
    def spec(self) -> dict:
        spec = self.obj.get("spec") if isinstance(self.obj, dict) else None
        return spec if isinstance(spec, dict) else {}

    @property
    def ref(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name} ({_shown_path(self.source)})"


def _shown_path(path: str) -> str:
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def load_documents(path: Path) -> list[Document]:
    """The non-empty YAML documents of one file (a parse error yields one failing document)."""
    text = path.read_text(encoding="utf-8")
    docs = []
    try:
        for index, obj in enumerate(yaml.load_all(text, Loader=_KubeYamlLoader)):
            if obj is not None:
                docs.append(Document(str(path), index, obj))
    except yaml.YAMLError as exc:
        docs.append(Document(str(path), len(docs), parse_error=f"invalid YAML: {exc}"))
    return docs


def collect_documents(paths: Iterable[Path]) -> list[Document]:
    docs = []
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml")) if path.is_dir() else [path]
        for file in files:
            docs.extend(load_documents(file))
    return docs


# --- Kubernetes-style messages ------------------------------------------------------------------

PATH = "\x00path\x00"  # replaced by the field path when the error is reported


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _show(value) -> str:
    if isinstance(value, (dict, list)):
        return f'"{_json_type(value)}"'
    return json.dumps(value)


def _field_path(parts) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<root>"


def _invalid(value, detail: str) -> ValidationError:
    return ValidationError(f"{PATH}: Invalid value: {_show(value)}: {PATH} in body {detail}")


# --- structural schema keywords -----------------------------------------------------------------

_TYPES = jsonschema.Draft4Validator.TYPE_CHECKER


def _kw_type(validator, expected, instance, schema):
    if instance is None and schema.get("nullable"):
        return
    if not validator.is_type(instance, expected):
        yield _invalid(instance, f'must be of type {expected}: "{_json_type(instance)}"')


def _kw_properties(validator, properties, instance, schema):
    if isinstance(instance, dict):
        for name, subschema in properties.items():
            if name in instance:
                yield from validator.descend(instance[name], subschema, path=name, schema_path=name)


def _kw_additional_properties(validator, additional, instance, schema):
    if not isinstance(instance, dict):
        return
    extras = [k for k in instance if k not in schema.get("properties", {})]
    if additional is False:
        for name in extras:
            yield ValidationError(f'unknown field "{PATH}"', path=[name])
    elif isinstance(additional, dict):
        for name in extras:
            yield from validator.descend(instance[name], additional, path=name)


def _kw_items(validator, items, instance, schema):
    if isinstance(instance, list):
        for index, item in enumerate(instance):
            yield from validator.descend(item, items, path=index)


def _kw_required(validator, required, instance, schema):
    if isinstance(instance, dict):
        for name in required:
            if name not in instance:
                yield ValidationError(f"{PATH}: Required value", path=[name])


def _kw_enum(validator, enum, instance, schema):
    if instance not in enum or (isinstance(instance, bool) and not any(v is instance for v in enum)):
        supported = ", ".join(json.dumps(v) for v in enum)
        yield ValidationError(f"{PATH}: Unsupported value: {json.dumps(instance)}: supported values: {supported}")


def _kw_min_length(validator, limit, instance, schema):
    if isinstance(instance, str) and len(instance) < limit:
        yield _invalid(instance, f"should be at least {limit} chars long")


def _kw_max_length(validator, limit, instance, schema):
    if isinstance(instance, str) and len(instance) > limit:
        yield _invalid(instance, f"may not be longer than {limit}")


def _kw_pattern(validator, pattern, instance, schema):
    if isinstance(instance, str) and not re2.search(pattern, instance):
        yield _invalid(instance, f"should match '{pattern}'")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kw_minimum(validator, limit, instance, schema):
    if _is_number(instance):
        if schema.get("exclusiveMinimum") and instance <= limit:
            yield _invalid(instance, f"should be greater than {limit}")
        elif instance < limit:
            yield _invalid(instance, f"should be greater than or equal to {limit}")


def _kw_maximum(validator, limit, instance, schema):
    if _is_number(instance):
        if schema.get("exclusiveMaximum") and instance >= limit:
            yield _invalid(instance, f"should be less than {limit}")
        elif instance > limit:
            yield _invalid(instance, f"should be less than or equal to {limit}")


def _kw_min_items(validator, limit, instance, schema):
    if isinstance(instance, list) and len(instance) < limit:
        yield _invalid(instance, f"should have at least {limit} items")


def _kw_max_items(validator, limit, instance, schema):
    if isinstance(instance, list) and len(instance) > limit:
        yield ValidationError(f"{PATH}: Too many: {len(instance)}: must have at most {limit} items")


def _kw_min_properties(validator, limit, instance, schema):
    if isinstance(instance, dict) and len(instance) < limit:
        yield _invalid(len(instance), f"should have at least {limit} properties")


def _kw_max_properties(validator, limit, instance, schema):
    if isinstance(instance, dict) and len(instance) > limit:
        yield _invalid(len(instance), f"should have at most {limit} properties")


def _valid_branches(validator, branches, instance) -> int:
    return sum(1 for branch in branches if not any(True for _ in validator.descend(instance, branch)))


def _kw_one_of(validator, branches, instance, schema):
    valid = _valid_branches(validator, branches, instance)
    if valid != 1:
        yield ValidationError(
            f"{PATH} in body must validate one and only one schema (oneOf). Found {valid} valid alternatives")


def _kw_any_of(validator, branches, instance, schema):
    if _valid_branches(validator, branches, instance) == 0:
        yield ValidationError(f"{PATH} in body must validate at least one schema (anyOf)")


def _kw_all_of(validator, branches, instance, schema):
    for index, branch in enumerate(branches):
        yield from validator.descend(instance, branch, schema_path=index)


def _kw_not(validator, branch, instance, schema):
    if _valid_branches(validator, [branch], instance) == 1:
        yield ValidationError(f"{PATH} in body should not validate the given schema (not)")


_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def _kw_format(validator, fmt, instance, schema):
    """The formats that constrain values in these schemas (others are descriptive only)."""
    if fmt == "int32" and isinstance(instance, int) and not isinstance(instance, bool):
        if not -(2 ** 31) <= instance < 2 ** 31:
            yield _invalid(instance, "should fit in int32")
    elif fmt == "int64" and isinstance(instance, int) and not isinstance(instance, bool):
        if not -(2 ** 63) <= instance < 2 ** 63:
            yield _invalid(instance, "should fit in int64")
    elif fmt == "byte" and isinstance(instance, str):
        try:
            base64.b64decode(instance, validate=True)
        except ValueError:
            yield _invalid(instance, 'must be of type byte: "base64"')
    elif fmt == "date-time" and isinstance(instance, str) and not _RFC3339.match(instance):
        yield _invalid(instance, f"must be of type date-time: {json.dumps(instance)}")


def _kw_int_or_string(validator, enabled, instance, schema):
    if enabled and instance is not None and (isinstance(instance, bool) or not isinstance(instance, (int, str))):
        yield _invalid(instance, f'must be of type int-or-string: "{_json_type(instance)}"')


def _kw_list_type(validator, list_type, instance, schema):
    if not isinstance(instance, list):
        return
    seen: list = []
    keys = schema.get("x-kubernetes-list-map-keys", [])
    for index, item in enumerate(instance):
        if list_type == "set":
            identity = item
        elif list_type == "map" and isinstance(item, dict):
            identity = {k: item[k] for k in keys if k in item}
        else:
            continue
        if identity in seen:
            yield ValidationError(f"{PATH}: Duplicate value: {json.dumps(identity)}", path=[index])
        seen.append(identity)


# --- CEL rules ----------------------------------------------------------------------------------

_CEL_ENV = celpy.Environment()
_CEL_RULES: dict[str, tuple[Any, str | None]] = {}  # rule -> (program, reason it cannot run)


def _compile_rule(rule: str):
    if rule not in _CEL_RULES:
        try:
            ast = _CEL_ENV.compile(rule)
        except Exception as exc:  # cel-python raises CELParseError and lark errors
            _CEL_RULES[rule] = (None, f"does not compile: {exc}")
        else:
            missing = kube_cel.function_names(ast) - kube_cel.SUPPORTED
            if kube_cel.uses_old_self(ast):
                _CEL_RULES[rule] = (None, "transition rule (oldSelf)")
            elif missing:
                _CEL_RULES[rule] = (None, f"calls functions this validator lacks: {', '.join(sorted(missing))}")
            else:
                _CEL_RULES[rule] = (_CEL_ENV.program(ast, functions=kube_cel.FUNCTIONS), None)
    return _CEL_RULES[rule]


def to_cel(value, schema: dict):
    """A value as Kubernetes presents it to CEL: typed by its schema (numbers are doubles...)."""
    kind = schema.get("type")
    if value is None or schema.get("x-kubernetes-int-or-string"):
        return celpy.json_to_cel(value)
    if kind == "object" and isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties") if isinstance(schema.get("additionalProperties"), dict) else {}
        return celtypes.MapType({
            celtypes.StringType(k): to_cel(v, props.get(k, {}) if props is not None else extra)
            for k, v in value.items()})
    if kind == "array" and isinstance(value, list):
        return celtypes.ListType([to_cel(v, schema.get("items", {})) for v in value])
    if kind == "number" and _is_number(value):
        return celtypes.DoubleType(value)
    return celpy.json_to_cel(value)


def _kw_cel_rules(validator, rules, instance, schema):
    if instance is None:
        return
    activation = {"self": to_cel(instance, schema)}
    shown_type = schema.get("type", "")
    for rule in rules:
        text = rule["rule"]
        program, reason = _compile_rule(text)
        where = PATH + rule.get("fieldPath", "")
        if reason == "transition rule (oldSelf)":
            continue  # Kubernetes runs transition rules on updates only; this is a create.
        if program is None:
            yield ValidationError(f"{where}: rule not evaluated ({reason}): {text}", validator="cel-unevaluated")
            continue
        message = rule.get("message") or f"failed rule: {' '.join(text.split())}"
        try:
            result = program.evaluate(activation)
        except Exception as exc:  # CELEvalError, or a Python error inside cel-python: the rule fails
            cause = exc.args[0] if exc.args else exc
            yield ValidationError(f'{where}: Invalid value: "{shown_type}": {cause} evaluating rule: {message}')
            continue
        if result is not True and not (isinstance(result, celtypes.BoolType) and bool(result)):
            yield ValidationError(f'{where}: Invalid value: "{shown_type}": {message}')


_KEYWORDS = {
    "type": _kw_type,
    "properties": _kw_properties,
    "additionalProperties": _kw_additional_properties,
    "items": _kw_items,
    "required": _kw_required,
    "enum": _kw_enum,
    "minLength": _kw_min_length,
    "maxLength": _kw_max_length,
    "pattern": _kw_pattern,
    "minimum": _kw_minimum,
    "maximum": _kw_maximum,
    "minItems": _kw_min_items,
    "maxItems": _kw_max_items,
    "minProperties": _kw_min_properties,
    "maxProperties": _kw_max_properties,
    "oneOf": _kw_one_of,
    "anyOf": _kw_any_of,
    "allOf": _kw_all_of,
    "not": _kw_not,
    "format": _kw_format,
    "x-kubernetes-int-or-string": _kw_int_or_string,
    "x-kubernetes-list-type": _kw_list_type,
    "x-kubernetes-validations": _kw_cel_rules,
}

StructuralValidator = jsonschema.validators.create(
    meta_schema=jsonschema.Draft4Validator.META_SCHEMA,
    validators=_KEYWORDS,
    type_checker=_TYPES,
)


def structural(schema: dict) -> dict:
    """The schema with structural pruning made explicit: objects reject fields they do not
    declare unless they preserve unknown fields; the root also holds apiVersion, kind, metadata."""
    schema = copy.deepcopy(schema)

    def close(node):
        if isinstance(node, dict):
            if (node.get("type") == "object" and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for key, value in node.items():
                if key in ("properties",):
                    for sub in value.values():
                        close(sub)
                elif key in ("items", "additionalProperties", "not"):
                    close(value)
                elif key in ("oneOf", "anyOf", "allOf"):
                    for sub in value:
                        close(sub)

    close(schema)
    schema.setdefault("properties", {}).update({
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    })
    return schema


# --- metadata (ObjectMeta) ----------------------------------------------------------------------

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_OBJECT_META = {"name", "generateName", "namespace", "labels", "annotations", "uid", "resourceVersion",
                "generation", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds",
                "finalizers", "ownerReferences", "managedFields", "selfLink"}


def _qualified_name_errors(where: str, key) -> list[str]:
    if not isinstance(key, str):
        return [f"{where}: key {key!r} must be a string"]
    prefix, slash, name = key.rpartition("/")
    errors = []
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        errors.append(f"{where}: Invalid value: {key!r}: prefix part must be a DNS-1123 subdomain")
    if len(name) > 63 or not _QUALIFIED_NAME.match(name):
        errors.append(f"{where}: Invalid value: {key!r}: name part must consist of alphanumeric characters, "
                      "'-', '_' or '.', start and end with one, at most 63 characters")
    return errors


def metadata_errors(obj: dict) -> list[str]:
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return ["metadata: Required value: must be a mapping with a name"]
    errors = [f'unknown field "metadata.{k}"' for k in meta if k not in _OBJECT_META]
    name = meta.get("name")
    if name is None and not meta.get("generateName"):
        errors.append("metadata.name: Required value")
    elif name is not None and (not isinstance(name, str) or len(name) > 253 or not _DNS_SUBDOMAIN.match(name)):
        errors.append(f"metadata.name: Invalid value: {name!r}: a lowercase RFC 1123 subdomain must consist of "
                      "lower case alphanumeric characters, '-' or '.'")
    namespace = meta.get("namespace")
    if namespace is not None and (not isinstance(namespace, str) or len(namespace) > 63
                                  or not _DNS_LABEL.match(namespace)):
        errors.append(f"metadata.namespace: Invalid value: {namespace!r}: must be a DNS-1123 label")
    for section in ("labels", "annotations"):
        values = meta.get(section)
        if values is None:
            continue
        if not isinstance(values, dict):
            errors.append(f"metadata.{section}: must be a map of strings")
            continue
        for key, value in values.items():
            where = f"metadata.{section}"
            errors += _qualified_name_errors(where, key)
            if not isinstance(value, str):
                errors.append(f"{where}[{key}]: Invalid value: {value!r}: must be a string")
            elif section == "labels" and (len(value) > 63 or not _LABEL_VALUE.match(value)):
                errors.append(f"{where}[{key}]: Invalid value: {value!r}: must be a valid label value")
    return errors


# --- the CRD catalog ----------------------------------------------------------------------------


class CrdCatalog:
    """Istio's CRDs by (group, version, kind), with a structural validator per version."""

    def __init__(self, crd_file: Path):
        self.source = crd_file
        self._versions: dict[tuple[str, str, str], dict] = {}
        self._validators: dict[tuple[str, str, str], Any] = {}
        for crd in yaml.load_all(crd_file.read_text(encoding="utf-8"), Loader=_KubeYamlLoader):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                self._versions[(group, version["name"], kind)] = version

    @property
    def groups(self) -> set[str]:
        return {group for group, _, _ in self._versions}

    def kinds(self) -> set[tuple[str, str, str]]:
        return set(self._versions)

    def validator(self, group: str, version: str, kind: str):
        key = (group, version, kind)
        if key not in self._validators:
            schema = structural(self._versions[key]["schema"]["openAPIV3Schema"])
            self._validators[key] = StructuralValidator(schema)
        return self._validators[key]

    def check(self, obj: dict) -> tuple[list[str], list[str]]:
        """(errors, unevaluated rules) for one object; errors include unevaluated rules."""
        group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
        key = (group, version, obj.get("kind"))
        if key not in self._versions:
            known = sorted(f"{g}/{v}" for g, v, k in self._versions if k == obj.get("kind"))
            hint = f" (this CRD file serves {', '.join(known)})" if known else ""
            return [f"no CustomResourceDefinition for {obj.get('apiVersion')} {obj.get('kind')}{hint}"], []
        if not self._versions[key].get("served", False):
            return [f"{obj.get('apiVersion')} {obj.get('kind')} is not served"], []
        errors, unevaluated = [], []
        for error in self.validator(*key).iter_errors(obj):
            message = error.message.replace(PATH, _field_path(error.absolute_path))
            errors.append(message)
            if error.validator == "cel-unevaluated":
                unevaluated.append(message)
        return errors + metadata_errors(obj), unevaluated


def istio_api(obj: dict) -> bool:
    return str(obj.get("apiVersion", "")).split("/")[0].endswith(".istio.io")


# --- per-document results -----------------------------------------------------------------------


@dataclass
class Result:
    doc: Document
    status: str  # OK, FAIL, BASIC (well-formedness only), SKIP (schema unavailable)
    messages: list[str] = field(default_factory=list)
    unevaluated: list[str] = field(default_factory=list)

    def line(self) -> str:
        d = self.doc
        subject = f"{d.label} {d.kind} {d.namespace}/{d.name}" if d.obj is not None else d.label
        detail = {
            "OK": "valid against the CRD schema and its CEL rules",
            "BASIC": "not an Istio kind: well-formedness only",
            "SKIP": "schema check skipped: ../shared/istio not found",
        }.get(self.status, "")
        text = f"{self.status:5} {subject}: " + ("; ".join(self.messages) if self.messages else detail)
        return text


def _well_formed_errors(obj) -> list[str]:
    if not isinstance(obj, dict):
        return ["a Kubernetes object must be a mapping"]
    errors = [f"{key}: Required value" for key in ("apiVersion", "kind")
              if not isinstance(obj.get(key), str) or not obj.get(key)]
    return errors + metadata_errors(obj)


def validate_document(doc: Document, catalog: CrdCatalog | None) -> Result:
    if doc.parse_error:
        return Result(doc, "FAIL", [doc.parse_error])
    basic = _well_formed_errors(doc.obj)
    if not isinstance(doc.obj, dict) or not istio_api(doc.obj):
        return Result(doc, "FAIL" if basic else "BASIC", basic)
    if catalog is None:
        return Result(doc, "FAIL" if basic else "SKIP", basic)
    errors, unevaluated = catalog.check(doc.obj)
    errors += [e for e in basic if e not in errors]
    return Result(doc, "FAIL" if errors else "OK", errors, unevaluated)


# --- cross-checks -------------------------------------------------------------------------------


@dataclass
class Finding:
    ok: bool
    subject: str
    message: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL':5} cross-check {self.subject}: {self.message}"


def _labels(selector) -> dict:
    if not isinstance(selector, dict):
        return {}
    labels = selector.get("matchLabels", selector.get("labels", selector))
    return {k: v for k, v in labels.items() if isinstance(v, str)} if isinstance(labels, dict) else {}


def _subset(small: dict, big: dict) -> bool:
    return all(big.get(k) == v for k, v in small.items())


def _visible(doc: Document, namespace: str) -> bool:
    """Whether a ServiceEntry/DestinationRule/VirtualService is visible from a namespace."""
    export = doc.spec.get("exportTo") or ["*"]
    return "*" in export or namespace in export or ("." in export and doc.namespace == namespace)


def _patch_context(patch: dict) -> str:
    return (patch.get("match") or {}).get("context", "ANY")


def _selects_workload(doc: Document, selector_key: str, labels: dict, namespace: str) -> bool:
    """Whether a namespaced policy (EnvoyFilter, ...) applies to a workload with these labels."""
    if doc.namespace not in (namespace, ROOT_NAMESPACE):
        return False
    return _subset(_labels(doc.spec.get(selector_key)), labels)


class Manifests:
    """The documents of istio/ indexed for the cross-checks."""

    def __init__(self, docs: list[Document]):
        self.docs = [d for d in docs if isinstance(d.obj, dict) and d.parse_error is None]
        self.by_kind: dict[str, list[Document]] = defaultdict(list)
        for doc in self.docs:
            self.by_kind[doc.kind].append(doc)

    def kind(self, kind: str) -> list[Document]:
        return self.by_kind.get(kind, [])

    def gateway_selectors(self) -> list[dict]:
        return [_labels(g.spec.get("selector")) for g in self.kind("Gateway")]

    def targets_gateway(self, doc: Document) -> bool:
        labels = _labels(doc.spec.get("selector"))
        return bool(labels) and any(_subset(labels, gw) for gw in self.gateway_selectors())

    def added(self, apply_to: str) -> list[tuple[Document, dict]]:
        """(EnvoyFilter, patch) for every object an EnvoyFilter ADDs."""
        found = []
        for ef in self.kind("EnvoyFilter"):
            for patch in ef.spec.get("configPatches") or []:
                if patch.get("applyTo") == apply_to and (patch.get("patch") or {}).get("operation") == "ADD":
                    found.append((ef, patch))
        return found

    def applicable(self, plugin: Document, apply_to: str) -> list[tuple[Document, dict]]:
        """The EnvoyFilter ADD patches that reach the proxies a WasmPlugin runs in."""
        labels = _labels(plugin.spec.get("selector"))
        contexts = {"GATEWAY", "ANY"} if self.targets_gateway(plugin) else {"SIDECAR_OUTBOUND", "ANY"}
        return [(ef, p) for ef, p in self.added(apply_to)
                if _selects_workload(ef, "workloadSelector", labels, plugin.namespace)
                and _patch_context(p) in contexts]

    def merged(self, plugin: Document, apply_to: str) -> list[tuple[Document, dict]]:
        """The EnvoyFilter MERGE patches of `apply_to` that reach the proxies a WasmPlugin runs in."""
        labels = _labels(plugin.spec.get("selector"))
        contexts = {"GATEWAY", "ANY"} if self.targets_gateway(plugin) else {"SIDECAR_OUTBOUND", "ANY"}
        return [(ef, p) for ef in self.kind("EnvoyFilter") for p in ef.spec.get("configPatches") or []
                if p.get("applyTo") == apply_to and (p.get("patch") or {}).get("operation") == "MERGE"
                and _selects_workload(ef, "workloadSelector", labels, plugin.namespace)
                and _patch_context(p) in contexts]

    def pod_volumes(self, namespace: str) -> list[tuple[Document, dict, dict]]:
        """(workload document, volume, mount) for volumes mounted into the istio-proxy container
        of the namespace's Deployments (patches), directly or with the sidecar.istio.io/userVolume
        annotations."""
        found = []
        for doc in self.kind("Deployment"):
            if doc.namespace != namespace:
                continue
            pod = ((doc.obj.get("spec") or {}).get("template") or {})
            pod_spec = pod.get("spec") or {}
            volumes = {v.get("name"): v for v in pod_spec.get("volumes") or [] if isinstance(v, dict)}
            for container in pod_spec.get("containers") or []:
                if container.get("name") != "istio-proxy":
                    continue
                for mount in container.get("volumeMounts") or []:
                    if mount.get("name") in volumes:
                        found.append((doc, volumes[mount["name"]], mount))
            annotations = (pod.get("metadata") or {}).get("annotations") or {}
            try:
                user_volumes = json.loads(annotations.get("sidecar.istio.io/userVolume", "{}"))
                user_mounts = json.loads(annotations.get("sidecar.istio.io/userVolumeMount", "{}"))
            except json.JSONDecodeError:
                continue
            for name, mount in user_mounts.items():
                if name in user_volumes:
                    found.append((doc, {"name": name, **user_volumes[name]}, {"name": name, **mount}))
        return found


def _tls_mode_for(dr: Document, port: int) -> dict | None:
    return _tls_for_policy(dr.spec.get("trafficPolicy") or {}, port)


def _tls_for_policy(policy: dict, port: int) -> dict | None:
    for setting in policy.get("portLevelSettings") or []:
        if (setting.get("port") or {}).get("number") == port and setting.get("tls"):
            return setting["tls"]
    return policy.get("tls")


def _check_outbound_cluster(m: Manifests, plugin: Document, cluster: str, port: int, subset: str,
                            host: str) -> Finding:
    subject = f"{plugin.ref} cluster {cluster}"
    entries = [se for se in m.kind("ServiceEntry") if host in (se.spec.get("hosts") or [])
               and any(p.get("number") == port for p in se.spec.get("ports") or [])]
    visible = [se for se in entries if _visible(se, plugin.namespace)]
    if not visible:
        why = "not exported to" if entries else "declared for"
        return Finding(False, subject, f"no ServiceEntry {why} namespace {plugin.namespace} with host {host} "
                                       f"and port {port}: Istio would not generate this cluster")
    se = visible[0]
    protocol = next(p.get("protocol", "") for p in se.spec.get("ports") if p.get("number") == port)
    rules = [dr for dr in m.kind("DestinationRule") if dr.spec.get("host") == host and _visible(dr, plugin.namespace)]
    if subset and not any(s.get("name") == subset for dr in rules for s in dr.spec.get("subsets") or []):
        return Finding(False, subject, f"no DestinationRule defines subset {subset} of {host}")
    if port == 443 or protocol.upper() in ("HTTPS", "TLS"):
        tls = [(dr, _tls_mode_for(dr, port)) for dr in rules]
        simple = [(dr, t) for dr, t in tls if t and (t.get("mode") == "SIMPLE" or (
            t.get("mode") == "MUTUAL" and (t.get("credentialName") or t.get("clientCertificate"))))]
        if not simple:
            return Finding(False, subject, f"port {port} of {host} needs a DestinationRule with tls.mode SIMPLE "
                                           f"(TLS origination; or MUTUAL with a client certificate); none found")
        dr, settings = simple[0]
        if settings.get("insecureSkipVerify"):
            return Finding(False, subject, f"{dr.ref} sets insecureSkipVerify: the server certificate must be verified")
        return Finding(True, subject, f"{se.ref} port {port}/{protocol} + {dr.ref} ({settings.get('mode')} TLS, sni "
                                      f"{settings.get('sni', '<auto>')})")
    return Finding(True, subject, f"{se.ref} port {port}/{protocol or 'TCP'}")


def _endpoint_addresses(cluster: dict) -> list[dict]:
    endpoints = ((cluster.get("load_assignment") or {}).get("endpoints")) or []
    return [(lb.get("endpoint") or {}).get("address") or {}
            for group in endpoints for lb in group.get("lb_endpoints") or []]


def _direct_response_bodies(listener: dict) -> list[dict]:
    bodies = []
    for chain in listener.get("filter_chains") or []:
        for flt in chain.get("filters") or []:
            route_config = (flt.get("typed_config") or {}).get("route_config") or {}
            for vhost in route_config.get("virtual_hosts") or []:
                for route in vhost.get("routes") or []:
                    body = (route.get("direct_response") or {}).get("body")
                    if body:
                        bodies.append(body)
    return bodies


def _check_token_file(m: Manifests, plugin: Document, cluster: dict) -> str | None:
    """The kubernetes source: the cluster must reach a listener on 127.0.0.1 that serves a
    projected token file from a watched directory, and that directory must be a projected token
    volume. Not an internal listener: the filter also fetches the token from Envoy's main thread,
    where internal listeners do not exist."""
    by_port = defaultdict(list)
    for _, patch in m.applicable(plugin, "LISTENER"):
        value = patch["patch"].get("value") or {}
        address = (value.get("address") or {}).get("socket_address") or {}
        if address:
            by_port[address.get("port_value")].append(value)
    for address in _endpoint_addresses(cluster):
        if "envoy_internal_address" in address:
            return ("it points at an internal listener, which Envoy's main thread (where the filter also "
                    f"fetches the token) cannot reach: use a listener on {LOOPBACK} and a STATIC cluster")
        socket = address.get("socket_address") or {}
        if socket.get("address") != LOOPBACK:
            return f"it must point at the token listener on {LOOPBACK} (got {socket.get('address')})"
        if socket.get("port_value") in ISTIO_PROXY_PORTS:
            return f"port {socket.get('port_value')} is one of the Istio proxy's own ports"
        candidates = by_port.get(socket.get("port_value")) or []
        exposed = [c for c in candidates if (c["address"]["socket_address"].get("address")) != LOOPBACK]
        if exposed:
            return (f"listener {exposed[0].get('name')} binds {exposed[0]['address']['socket_address'].get('address')}: "
                    f"bind it to {LOOPBACK} only (it serves the token, the proxy's identity)")
        if not candidates:
            return f"no EnvoyFilter adds the listener on {LOOPBACK}:{socket.get('port_value')} this cluster points at"
        listener = candidates[0]
        for body in _direct_response_bodies(listener):
            filename = body.get("filename", "")
            watched = (body.get("watched_directory") or {}).get("path", "")
            if not filename or os.path.dirname(filename) != watched.rstrip("/"):
                return (f"listener {listener.get('name')} must serve the token with direct_response body "
                        f"{{filename: <dir>/token, watched_directory: {{path: <dir>}}}} (got {body})")
            for _, volume, mount in m.pod_volumes(plugin.namespace):
                sources = (volume.get("projected") or {}).get("sources") or []
                tokens = [s["serviceAccountToken"] for s in sources if isinstance(s, dict) and "serviceAccountToken" in s]
                if mount.get("mountPath", "").rstrip("/") == watched.rstrip("/") and any(
                        t.get("path") == os.path.basename(filename) and t.get("audience") for t in tokens):
                    return None
            return (f"no projected serviceAccountToken volume (with an audience) is mounted into istio-proxy "
                    f"at {watched} with file {os.path.basename(filename)}")
        return f"listener {listener.get('name')} serves no direct_response body"
    return "cluster has no endpoint"


def _check_spiffe_socket(m: Manifests, plugin: Document, cluster: dict) -> str | None:
    options = json.dumps(cluster.get("typed_extension_protocol_options") or {}) + json.dumps(
        cluster.get("http2_protocol_options", None))
    if "http2_protocol_options" not in options:
        return "the Workload API is gRPC: the cluster needs http2_protocol_options"
    for address in _endpoint_addresses(cluster):
        socket = (address.get("pipe") or {}).get("path")
        if not socket:
            return "the Workload API cluster must point at the agent's unix socket (pipe address)"
        for _, volume, mount in m.pod_volumes(plugin.namespace):
            if (volume.get("csi") or {}).get("driver") == "csi.spiffe.io" and \
                    os.path.dirname(socket) == mount.get("mountPath", "").rstrip("/"):
                return None
        return f"no SPIFFE CSI volume (driver csi.spiffe.io) is mounted into istio-proxy at {os.path.dirname(socket)}"
    return "cluster has no endpoint"


def _check_added_cluster(m: Manifests, plugin: Document, name: str, source: str | None) -> Finding:
    subject = f"{plugin.ref} cluster {name}"
    candidates = [(ef, p) for ef, p in m.added("CLUSTER") if (p["patch"].get("value") or {}).get("name") == name]
    if not candidates:
        return Finding(False, subject, "neither an Istio outbound|<port>||<host> cluster nor added by an EnvoyFilter")
    applicable = [(ef, p) for ef, p in m.applicable(plugin, "CLUSTER") if (ef, p) in candidates]
    if not applicable:
        where = ", ".join(ef.ref for ef, _ in candidates)
        return Finding(False, subject, f"added by {where}, but not for the proxies this plugin selects "
                                       "(namespace, workloadSelector or match.context differ)")
    ef, patch = applicable[0]
    value = patch["patch"]["value"]
    problem = None
    if source == "kubernetes":
        problem = _check_token_file(m, plugin, value)
    elif source == "spiffe":
        problem = _check_spiffe_socket(m, plugin, value)
    if problem:
        return Finding(False, subject, f"added by {ef.ref}, but {problem}")
    return Finding(True, subject, f"added by {ef.ref}")


_OUTBOUND = re.compile(r"^outbound\|(\d+)\|([^|]*)\|(.+)$")

# The semantic rules, named in every finding they produce.
RULE_PHASE = "phase-stats"
RULE_FAIL = "fail-reload"
RULE_MATCH = "gateway-plugin-match"
RULE_HOSTS = "gateway-hosts-namespaced"
RULE_SELECTOR = "root-selector-labels"
RULE_PINNED = "image-pinned"
RULE_SIDECAR_TOKEN = "sidecar-token-via-gateway"
RULE_TLS_EXPORT = "tls-origination-export"
RULE_UPSTREAM = "upstream-clusters"
RULE_CALLERS = "caller-rules"
RULE_CALLER_CERT = "caller-peer-certificate"
RULE_CALLER_FENCE = "caller-fence"
RULE_X509 = "x509-client-certificate"

# The filter's ids and the VM environment variables it reads when pluginConfig omits them.
ID_ENV = {"identity_provider_id": "OPENAI_IDENTITY_PROVIDER_ID", "service_account_id": "OPENAI_SERVICE_ACCOUNT_ID"}

# What `make pin` / `python -m tools.oci_image --pin` rewrites: the committed placeholders.
PLACEHOLDER_DIGEST = "0" * 64
PLACEHOLDER_MARK = re.compile(r"<[^>]*>")  # e.g. ghcr.io/<org>/openai-wif
PIN_COMMAND = ("python -m tools.oci_image --module target/openai_wif.wasm "
               "--out target/oci-image --pin istio --repository ghcr.io/<org>/openai-wif")
# Labels every root-namespace selector must carry: both labels the istio/gateway Helm chart sets on
# the pods of a release (app: <release>, istio: <release without "istio-">).
ROOT_SELECTOR_KEYS = ("istio", "app")


def _rule(rule: str, ok: bool, subject: str, message: str) -> Finding:
    return Finding(ok, subject, f"[{rule}] {message}")


def _server_host(host: str) -> tuple[str, str]:
    """(namespace part, host) of a Gateway server host: `ns/host`, `./host`, `*/host` or `host`."""
    namespace, slash, name = host.rpartition("/")
    return (namespace if slash else ""), name


def _gateway_refs(vs: Document) -> list[tuple[str, str]]:
    """The (namespace, name) of every Gateway a VirtualService names, `mesh` excluded."""
    names = list(vs.spec.get("gateways") or [])
    for route in vs.spec.get("http") or []:
        for match in route.get("match") or []:
            names += match.get("gateways") or []
    refs = []
    for name in dict.fromkeys(names):
        if name != "mesh":
            namespace, _, gw = name.rpartition("/")
            refs.append((namespace or vs.namespace, gw))
    return refs


def _mesh_route_destinations(m: Manifests) -> set[str]:
    """The hosts that routes of the `mesh` gateway (sidecars) send to: the egress gateway's Service."""
    hosts = set()
    for vs in m.kind("VirtualService"):
        bound = vs.spec.get("gateways") or ["mesh"]
        for route in vs.spec.get("http") or []:
            matched = [g for match in route.get("match") or [] for g in match.get("gateways") or []]
            if "mesh" in (matched or bound):
                hosts.update((dest.get("destination") or {}).get("host") for dest in route.get("route") or [])
    return {h for h in hosts if h}


def _is_gateway_plugin(m: Manifests, plugin: Document) -> bool:
    """A plugin for the egress gateway: it selects a Gateway's pods or lives beside a Gateway
    (istio-system); any other plugin runs in application sidecars."""
    return m.targets_gateway(plugin) or plugin.namespace in {g.namespace for g in m.kind("Gateway")}


def _plugin_gateways(m: Manifests, plugin: Document) -> list[Document]:
    labels = _labels(plugin.spec.get("selector"))
    return [g for g in m.kind("Gateway") if labels and _subset(labels, _labels(g.spec.get("selector")))
            and plugin.namespace in (g.namespace, ROOT_NAMESPACE)]


def _check_token_via_gateway(m: Manifests, plugin: Document, cluster: str) -> Finding:
    """A sidecar plugin's token exchange: a callout goes straight to its cluster (no VirtualService
    applies), so it must name the cluster of a DestinationRule subset of the egress gateway's
    Service, over Istio mutual TLS with the token endpoint's SNI, which a Gateway server and a
    VirtualService then take to the token endpoint with TLS originated at the gateway."""
    subject = f"{plugin.ref} token_endpoint.cluster {cluster}"
    authority = ((plugin.spec.get("pluginConfig") or {}).get("token_endpoint") or {}).get("authority", "")
    match = _OUTBOUND.match(cluster)
    if not match or not match.group(2):
        return _rule(RULE_SIDECAR_TOKEN, False, subject,
                     "a sidecar plugin's token exchange must go through the egress gateway: a callout goes "
                     "straight to its cluster, so this one would connect from the application's pod to the "
                     "internet (refused where only the gateway may leave). Use outbound|80|<subset>|<gateway "
                     f"Service host>, a DestinationRule subset with tls ISTIO_MUTUAL and sni {authority}")
    port, subset, host = int(match.group(1)), match.group(2), match.group(3)
    gateway_services = _mesh_route_destinations(m)
    if host not in gateway_services:
        return _rule(RULE_SIDECAR_TOKEN, False, subject,
                     f"{host} is not the egress gateway's Service (the mesh routes API calls to "
                     f"{', '.join(sorted(gateway_services)) or 'no Service'})")
    subsets = [(dr, s) for dr in m.kind("DestinationRule") if dr.spec.get("host") == host
               and _visible(dr, plugin.namespace) for s in dr.spec.get("subsets") or [] if s.get("name") == subset]
    if not subsets:
        return _rule(RULE_SIDECAR_TOKEN, False, subject, f"no DestinationRule visible to namespace "
                     f"{plugin.namespace} defines subset {subset} of {host}: Istio would not generate this cluster")
    dr, entry = subsets[0]
    tls = _tls_for_policy(entry.get("trafficPolicy") or {}, port) or _tls_mode_for(dr, port) or {}
    if tls.get("mode") != "ISTIO_MUTUAL" or tls.get("sni") != authority:
        return _rule(RULE_SIDECAR_TOKEN, False, subject,
                     f"{dr.ref} subset {subset} must use tls mode ISTIO_MUTUAL with sni {authority} on port {port} "
                     f"(the gateway picks its server by SNI); got {tls or 'no tls settings'}")
    servers = [(g, server) for g in m.kind("Gateway") for server in g.spec.get("servers") or []
               if (server.get("port") or {}).get("number") == port
               and (server.get("tls") or {}).get("mode") == "ISTIO_MUTUAL"
               and any(_server_host(h)[1] == authority for h in server.get("hosts") or [])]
    if not servers:
        return _rule(RULE_SIDECAR_TOKEN, False, subject,
                     f"no Gateway has an ISTIO_MUTUAL server on port {port} for host {authority}")
    gateway, server = servers[0]
    routes = []
    for vs in m.kind("VirtualService"):
        if authority not in (vs.spec.get("hosts") or []) or (gateway.namespace, gateway.name) not in _gateway_refs(vs):
            continue
        for route in vs.spec.get("http") or []:
            for dest in route.get("route") or []:
                d = dest.get("destination") or {}
                if d.get("host") == authority and (d.get("port") or {}).get("number"):
                    routes.append((vs, int(d["port"]["number"])))
    if not routes:
        return _rule(RULE_SIDECAR_TOKEN, False, subject, f"no VirtualService bound to {gateway.ref} routes "
                     f"{authority} to {authority}:<port>")
    vs, upstream_port = routes[0]
    upstream = _check_outbound_cluster(m, gateway, f"outbound|{upstream_port}||{authority}", upstream_port, "",
                                       authority)
    if not upstream.ok:
        return _rule(RULE_SIDECAR_TOKEN, False, subject, f"at the gateway: {upstream.message}")
    return _rule(RULE_SIDECAR_TOKEN, True, subject,
                 f"through the egress gateway: {dr.ref} subset {subset} (ISTIO_MUTUAL, sni {authority}) -> "
                 f"{gateway.ref} server {(server.get('port') or {}).get('name')} -> {vs.ref} -> {upstream.message}")


def check_plugin_clusters(m: Manifests) -> list[Finding]:
    findings = []
    for plugin in m.kind("WasmPlugin"):
        config = plugin.spec.get("pluginConfig") or {}
        subject_token = config.get("subject_token") or {}
        source = subject_token.get("source", "header")
        refs = [("token_endpoint", (config.get("token_endpoint") or {}).get("cluster"), None)]
        if source not in NO_SUBJECT_CLUSTER:
            refs.append(("subject_token", subject_token.get("cluster"), source))
        for where, cluster, src in refs:
            if not cluster:
                findings.append(Finding(False, plugin.ref, f"pluginConfig.{where}.cluster is missing"))
                continue
            if where == "token_endpoint" and not _is_gateway_plugin(m, plugin) and source != "x509":
                findings.append(_check_token_via_gateway(m, plugin, cluster))
                continue
            match = _OUTBOUND.match(cluster)
            if match:
                findings.append(_check_outbound_cluster(m, plugin, cluster, int(match.group(1)), match.group(2),
                                                        match.group(3)))
            else:
                findings.append(_check_added_cluster(m, plugin, cluster, src))
    return findings


def _vm_env(plugin: Document) -> dict[str, dict]:
    """The plugin's vmConfig.env entries by name."""
    entries = ((plugin.spec.get("vmConfig") or {}).get("env")) or []
    return {e["name"]: e for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str)}


def _id_problems(plugin: Document, config: dict) -> tuple[list[str], list[str]]:
    """(problems, notes) for the two OpenAI ids: each is in pluginConfig or, when pluginConfig omits
    it, in the VM's environment (vmConfig.env: an INLINE value, or HOST, the istio-proxy container's
    own variable). Never both: the pluginConfig value would silently win over the environment."""
    env = _vm_env(plugin)
    problems, notes = [], []
    for key, var in ID_ENV.items():
        entry = env.get(var)
        from_host = entry is not None and entry.get("valueFrom") == "HOST"
        if key in config and entry is not None:
            problems.append(f"{key} is set in pluginConfig and {var} in vmConfig.env: the filter uses the "
                            "pluginConfig value and ignores the variable; set it in one place")
        elif key in config:
            if not config.get(key):
                problems.append(f"{key} is empty")
        elif entry is None:
            problems.append(f"{key} is missing (in pluginConfig or as {var} in vmConfig.env)")
        elif from_host:
            notes.append(f"{key} from {var} (HOST: the istio-proxy container's environment)")
        elif not entry.get("value"):
            problems.append(f"{key} is omitted from pluginConfig, but vmConfig.env {var} has no value")
        else:
            notes.append(f"{key} from {var}")
    return problems, notes


def check_plugin_config(m: Manifests) -> list[Finding]:
    """The pluginConfig follows the filter's configuration contract."""
    findings = []
    for plugin in m.kind("WasmPlugin"):
        config = plugin.spec.get("pluginConfig") or {}
        problems, notes = _id_problems(plugin, config)
        problems += [f"{key} is missing" for key in ("token_endpoint", "hosts") if not config.get(key)]
        source = (config.get("subject_token") or {}).get("source", "header")
        if source not in PLUGIN_SOURCES:
            problems.append(f"subject_token.source {source!r} is not one of {sorted(PLUGIN_SOURCES)}")
        if source == "x509":
            extra = sorted(set(config.get("subject_token") or {}) - {"source"})
            if extra:
                problems.append(f"subject_token {extra} with source x509: the filter refuses them (the certificate "
                                "is in the TLS handshake of the token endpoint cluster)")
            if config.get("subject_token_type", "x509") != "x509":
                problems.append(f"subject_token_type {config.get('subject_token_type')!r} with source x509: leave it "
                                "out (the exchange sends urn:openai:params:oauth:token-type:x509)")
        for host in config.get("hosts") or []:
            if not any(host in (se.spec.get("hosts") or []) for se in m.kind("ServiceEntry")):
                problems.append(f"host {host} has no ServiceEntry")
        findings.append(Finding(not problems, plugin.ref, "; ".join(problems) or
                                ", ".join([f"source {source}, hosts {config.get('hosts')}"] + notes)))
    return findings


def check_phase(m: Manifests) -> list[Finding]:
    """Istio orders a listener's HTTP filters: CUSTOM ext_authz, AUTHN plugins, authn, AUTHZ plugins,
    RBAC (AuthorizationPolicy), STATS plugins (pilot/pkg/networking/core/listener_builder.go,
    buildHTTPConnectionManager). Only STATS runs after the AuthorizationPolicy."""
    findings = []
    for plugin in m.kind("WasmPlugin"):
        phase = plugin.spec.get("phase", "UNSPECIFIED_PHASE")
        ok = phase == "STATS"
        findings.append(_rule(RULE_PHASE, ok, plugin.ref, "phase STATS: after Istio's RBAC filter" if ok else
                              f"phase is {phase}, must be STATS: Istio orders HTTP filters CUSTOM ext_authz, AUTHN "
                              "plugins, authn, AUTHZ plugins, RBAC, STATS plugins, so before STATS a request the "
                              "AuthorizationPolicy refuses can still cause a token exchange"))
    return findings


def check_fail_strategy(m: Manifests) -> list[Finding]:
    findings = []
    for plugin in m.kind("WasmPlugin"):
        strategy = plugin.spec.get("failStrategy", "FAIL_CLOSE (default)")
        if strategy == "FAIL_RELOAD":
            findings.append(_rule(RULE_FAIL, True, plugin.ref, "FAIL_RELOAD: fails closed, a failed VM is replaced"))
        elif strategy == "FAIL_OPEN":
            findings.append(_rule(RULE_FAIL, False, plugin.ref, "failStrategy FAIL_OPEN would forward requests "
                                  "without credentials when the module is missing: use FAIL_RELOAD"))
        else:
            findings.append(_rule(RULE_FAIL, False, plugin.ref, f"failStrategy is {strategy}, must be FAIL_RELOAD "
                                  "(fails closed like FAIL_CLOSE, and a VM that failed is replaced for the next "
                                  "request instead of failing every later request on its worker; Istio 1.27+)"))
    return findings


def check_gateway_plugin_match(m: Manifests) -> list[Finding]:
    """A gateway plugin runs on the gateway's listener that serves its hosts only: Istio matches
    gateway listeners as CLIENT (pilot/pkg/model/extensions.go, workloadModeForListenerClass),
    and a plugin without `match` (or with an entry without ports) runs on every HTTP listener,
    other egress hosts included, where a fail-closed plugin that cannot be fetched denies all."""
    findings = []
    for plugin in m.kind("WasmPlugin"):
        if not _is_gateway_plugin(m, plugin):
            continue
        hosts = set((plugin.spec.get("pluginConfig") or {}).get("hosts") or [])
        expected = {(server.get("port") or {}).get("number") for g in _plugin_gateways(m, plugin)
                    for server in g.spec.get("servers") or []
                    if any(_server_host(h)[1] in hosts for h in server.get("hosts") or [])}
        entries = plugin.spec.get("match") or []
        ports = {(p or {}).get("number") for e in entries for p in (e or {}).get("ports") or []}
        if not entries:
            problem = ("no match: the plugin would run on every HTTP listener of the gateway (other egress hosts "
                       "too), and deny them all when it fails closed")
        elif any((e or {}).get("mode") != "CLIENT" for e in entries):
            problem = "every match entry must have mode CLIENT (Istio matches gateway listeners as CLIENT)"
        elif any(not (e or {}).get("ports") for e in entries):
            problem = "every match entry needs ports (an entry without ports matches every listener)"
        elif not expected:
            problem = f"no Gateway server of the gateway it selects serves its hosts {sorted(hosts)}"
        elif ports != expected:
            problem = (f"match ports {sorted(ports)} must be the Gateway server port(s) {sorted(expected)} that serve "
                       f"{sorted(hosts)}")
        else:
            problem = ""
        findings.append(_rule(RULE_MATCH, not problem, plugin.ref, problem or
                              f"mode CLIENT, ports {sorted(ports)} (the Gateway server for {sorted(hosts)})"))
    return findings


def check_gateway_hosts(m: Manifests) -> list[Finding]:
    """Gateway server hosts carry the Gateway's namespace: only VirtualServices of that namespace
    bind (pkg/config/host/names.go, NamesForNamespace; `./host` means the Gateway's namespace)."""
    findings = []
    for gateway in m.kind("Gateway"):
        bad = [h for server in gateway.spec.get("servers") or [] for h in server.get("hosts") or []
               if _server_host(h)[0] not in (".", gateway.namespace)]
        findings.append(_rule(RULE_HOSTS, not bad, gateway.ref,
                              f"hosts {bad} must be {gateway.namespace}/<host>: with a bare or */ host a "
                              "VirtualService in any namespace can bind and add routes to the virtual host, where "
                              "requests already carry the injected token" if bad else
                              f"every server host is pinned to {gateway.namespace}"))
    return findings


def check_root_selectors(m: Manifests) -> list[Finding]:
    """In the root namespace a selector applies to matching workloads in every namespace
    (pilot/pkg/model/push_context.go looks plugins up in the proxy's and the root namespace), so
    it must name both gateway labels: `istio` alone also selects another egress gateway release."""
    findings = []
    keys = {"WasmPlugin": "selector", "AuthorizationPolicy": "selector", "EnvoyFilter": "workloadSelector",
            "Gateway": "selector", "Telemetry": "selector"}
    for kind, key in keys.items():
        for doc in m.kind(kind):
            if doc.namespace != ROOT_NAMESPACE:
                continue
            labels = _labels(doc.spec.get(key))
            missing = [k for k in ROOT_SELECTOR_KEYS if k not in labels]
            findings.append(_rule(RULE_SELECTOR, not missing, doc.ref,
                                  f"{key} {labels} lacks {missing}: in the root namespace ({ROOT_NAMESPACE}) it "
                                  f"applies to matching pods of every namespace; select on both "
                                  f"{' and '.join(ROOT_SELECTOR_KEYS)}" if missing else
                                  f"{key} has both {' and '.join(ROOT_SELECTOR_KEYS)}"))
    return findings


def check_image_pinned(m: Manifests, template: bool = False) -> list[Finding]:
    """Every plugin is pinned by digest, and not to the committed placeholders (all-zero digest,
    `<org>` in the repository), which `make pin` / `tools.oci_image --pin` replace. With
    `template`, exactly those placeholders are accepted (the repository's own check of istio/)."""
    findings = []
    for plugin in m.kind("WasmPlugin"):
        url, digest = str(plugin.spec.get("url", "")), str(plugin.spec.get("sha256") or "")
        placeholders = []
        if digest == PLACEHOLDER_DIGEST:
            placeholders.append("the all-zero sha256")
        if PLACEHOLDER_MARK.search(url):
            placeholders.append(f"the repository placeholder in {url}")
        if not digest:
            findings.append(_rule(RULE_PINNED, False, plugin.ref, "no sha256: Istio would run whatever the tag "
                                  f"points at; pin the image digest ({PIN_COMMAND})"))
        elif placeholders and template:
            findings.append(_rule(RULE_PINNED, True, plugin.ref, f"template: {' and '.join(placeholders)} must be "
                                  "pinned before applying"))
        elif placeholders:
            findings.append(_rule(RULE_PINNED, False, plugin.ref, f"not pinned: {' and '.join(placeholders)} are the "
                                  "committed placeholders (Istio cannot fetch that image, and the plugin fails "
                                  f"closed); after publishing the image run {PIN_COMMAND}"))
        else:
            findings.append(_rule(RULE_PINNED, True, plugin.ref, f"pinned to sha256 {digest[:12]}..."))
    return findings


def _originates_tls(dr: Document) -> bool:
    policies = [dr.spec.get("trafficPolicy") or {}] + [s.get("trafficPolicy") or {} for s in dr.spec.get("subsets") or []]
    settings = [p.get("tls") or {} for p in policies] + [s.get("tls") or {} for p in policies
                                                           for s in p.get("portLevelSettings") or []]
    return any(s.get("mode") in ("SIMPLE", "MUTUAL") for s in settings)


def check_tls_origination_export(m: Manifests) -> list[Finding]:
    """A DestinationRule that originates TLS (SIMPLE or MUTUAL) to an external host belongs to the
    egress gateway only: exported mesh-wide, every sidecar would originate TLS too, and an
    application's own TLS would be wrapped again (istio/istio#17031). exportTo "." in the root
    namespace applies to proxies there (pilot/pkg/model/push_context.go, destinationRule)."""
    findings = []
    gateway_namespaces = {g.namespace for g in m.kind("Gateway")}
    for dr in m.kind("DestinationRule"):
        if not _originates_tls(dr):
            continue
        export = dr.spec.get("exportTo") or []
        private = export in (["."], [dr.namespace])
        problems = []
        if not private:
            problems.append(f"exportTo is {export or 'unset (mesh-wide)'}, must be [\".\"]: exported, sidecars "
                            "originate TLS for this host too and an application's own TLS fails (TLS inside TLS)")
        if dr.namespace not in gateway_namespaces:
            problems.append(f"it must live in the egress gateway's namespace ({', '.join(sorted(gateway_namespaces)) or 'no Gateway found'})")
        findings.append(_rule(RULE_TLS_EXPORT, not problems, dr.ref, "; ".join(problems) or
                              f"originates TLS for {dr.spec.get('host')} in {dr.namespace} only"))
    return findings


def _route_clusters(m: Manifests, hosts: list, gateway_leg: bool) -> set[str]:
    """The clusters Istio builds for the routes of `hosts`: on the egress gateway (a route bound
    to a Gateway) or in sidecars (a `mesh` route). A destination is outbound|<port>|<subset>|<host>."""
    clusters = set()
    for vs in m.kind("VirtualService"):
        if not set(hosts) & set(vs.spec.get("hosts") or []):
            continue
        bound = vs.spec.get("gateways") or ["mesh"]
        for route in vs.spec.get("http") or []:
            matched = [g for match in route.get("match") or [] for g in match.get("gateways") or []]
            names = matched or bound
            if gateway_leg != any(g != "mesh" for g in names):
                continue
            for dest in route.get("route") or []:
                d = dest.get("destination") or {}
                port = (d.get("port") or {}).get("number", 80)
                clusters.add(f"outbound|{port}|{d.get('subset', '')}|{d.get('host')}")
    return clusters


def _patched_routes(m: Manifests, plugin: Document, hosts: list) -> list[dict]:
    """The route actions an EnvoyFilter HTTP_ROUTE MERGE patch gives the routes of `hosts` in the
    plugin's proxies (a patch matching the virtual host `<host>:<port>` that sets route.cluster,
    e.g. the x509 sidecar variant's route to its mTLS cluster): there they replace the cluster a
    VirtualService names. The identity directories are alternatives (one is applied, istio/README.md),
    so a route patch counts for the plugins of its own directory only."""
    found = []
    for ef, patch in m.merged(plugin, "HTTP_ROUTE"):
        if Path(ef.source).parent != Path(plugin.source).parent:
            continue
        vhost = (((patch.get("match") or {}).get("routeConfiguration") or {}).get("vhost") or {}).get("name", "")
        action = ((patch.get("patch") or {}).get("value") or {}).get("route") or {}
        if vhost.rpartition(":")[0] in hosts and action.get("cluster"):
            found.append({**action, "patch": ef})
    return found


def check_upstream_clusters(m: Manifests) -> list[Finding]:
    """Every WasmPlugin names the clusters its hosts' routes lead to in upstream_clusters, and only
    those: the filter then refuses to put a token on a request routed anywhere else (a route that a
    VirtualService from another namespace merged into the same virtual host, say)."""
    findings = []
    for plugin in m.kind("WasmPlugin"):
        config = plugin.spec.get("pluginConfig") or {}
        listed = config.get("upstream_clusters")
        hosts = config.get("hosts") or []
        patched = _patched_routes(m, plugin, hosts)
        expected = ({p["cluster"] for p in patched} if patched
                    else _route_clusters(m, hosts, _is_gateway_plugin(m, plugin)))
        problems = []
        if not listed:
            problems.append("pluginConfig.upstream_clusters is missing: tokens would go to whatever cluster a "
                            f"route names; list the routes' clusters {sorted(expected)}")
        else:
            stray = sorted(set(listed) - expected)
            if stray:
                problems.append(f"upstream_clusters {stray} are not where the routes of "
                                f"{config.get('hosts')} lead ({sorted(expected) or 'no route found'})")
        findings.append(_rule(RULE_UPSTREAM, not problems, plugin.ref, "; ".join(problems) or
                              f"tokens only to {sorted(listed or [])}"))
    return findings


def check_gateway_references(m: Manifests) -> list[Finding]:
    findings = []
    gateways = {(g.namespace, g.name) for g in m.kind("Gateway")}
    for vs in m.kind("VirtualService"):
        for key in _gateway_refs(vs):
            findings.append(Finding(key in gateways, f"{vs.ref} gateway {key[0]}/{key[1]}",
                                    "Gateway exists" if key in gateways else f"no Gateway {key[0]}/{key[1]} in istio/"))
        for route in vs.spec.get("http") or []:
            for dest in route.get("route") or []:
                d = dest.get("destination") or {}
                if d.get("subset"):
                    ok = any(s.get("name") == d["subset"] for dr in m.kind("DestinationRule")
                             if dr.spec.get("host") == d.get("host") for s in dr.spec.get("subsets") or [])
                    findings.append(Finding(ok, f"{vs.ref} destination {d.get('host')} subset {d['subset']}",
                                            "subset defined" if ok else "no DestinationRule defines this subset"))
    return findings


def check_selectors(m: Manifests) -> list[Finding]:
    findings = []
    for doc in m.kind("WasmPlugin") + m.kind("AuthorizationPolicy") + m.kind("Telemetry"):
        labels = _labels(doc.spec.get("selector"))
        if not labels:
            findings.append(Finding(False, doc.ref, "selector.matchLabels is empty: it would apply to every "
                                                    "workload in its namespace" + (
                                                        " (in the root namespace: the whole mesh)"
                                                        if doc.namespace == ROOT_NAMESPACE else "")))
        elif doc.kind == "WasmPlugin" and not _is_gateway_plugin(m, doc):
            client = bool(doc.spec.get("match")) and all((e or {}).get("mode") == "CLIENT"
                                                        for e in doc.spec.get("match") or [])
            findings.append(Finding(client, doc.ref, "selects application pods (sidecar, outbound)" if client else
                                    "a plugin for application sidecars needs match mode CLIENT (outbound only)"))
        else:
            matching = _plugin_gateways(m, doc)
            findings.append(Finding(bool(matching), doc.ref,
                                    f"selects the pods of {matching[0].ref}" if matching else
                                    f"selector {labels} matches no Gateway's selector in its namespace"))
    return findings


def check_namespaces(m: Manifests) -> list[Finding]:
    missing = [d for d in m.docs if istio_api(d.obj) and not (d.obj.get("metadata") or {}).get("namespace")]
    return [Finding(False, d.ref, "metadata.namespace must be explicit (selection depends on it)") for d in missing]


# --- caller rules -------------------------------------------------------------------------------

RULE_KEYS = {"name", "principals", "service_account_id", "identity_provider_id"}
CALLER_IDENTITIES = ("peer_certificate", "x-forwarded-client-cert")
_RULE_NAME = re.compile(r"^[a-z0-9_-]{1,64}$")
# Istio's workload SPIFFE ID: spiffe://<trust domain>/ns/<namespace>/sa/<service account>; a trust
# domain has lower-case letters, digits, '.', '-' and '_' (SPIFFE ID spec), a namespace is a DNS-1123
# label and a service account a DNS-1123 subdomain.
_TRUST_DOMAIN = r"[a-z0-9._-]+"
_NAMESPACE = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_MESH_ID = re.compile(rf"^spiffe://{_TRUST_DOMAIN}/ns/{_NAMESPACE}/sa/[a-z0-9](?:[-a-z0-9.]{{0,251}}[a-z0-9])?$")
# What may stand before a trailing '*': a whole namespace, or a service account name prefix in one.
_MESH_PREFIX = re.compile(rf"^spiffe://{_TRUST_DOMAIN}/ns/{_NAMESPACE}/(?:sa/[-a-z0-9.]*)?$")
_PRINCIPAL_NAMESPACE = re.compile(r"^[^/]+/ns/([^/]+)/")
_WHOLE_NAMESPACE = re.compile(r"^[^/]+/ns/[^/]+/$")


@dataclass(frozen=True)
class Caller:
    """A set of callers as Istio names them (the SPIFFE ID without `spiffe://`): one principal, or
    every principal that starts with `value` (a rule's trailing `*`)."""
    value: str
    prefix: bool = False

    @property
    def shown(self) -> str:
        return f"spiffe://{self.value}{'*' if self.prefix else ''}"

    @property
    def namespace(self) -> str | None:
        match = _PRINCIPAL_NAMESPACE.match(self.value)
        return match.group(1) if match else None

    @property
    def mesh_value(self) -> str:
        """The value as the mesh's principals can have it: every workload ID in a namespace goes on
        with `sa/`, so the prefix `<td>/ns/<ns>/` names the same callers as `<td>/ns/<ns>/sa/`."""
        return self.value + "sa/" if self.prefix and _WHOLE_NAMESPACE.match(self.value) else self.value

    def within(self, other: "Caller") -> bool:
        """Whether every caller of this set is in `other` (a rule principal that `other` matches first)."""
        if other.prefix:
            return self.mesh_value.startswith(other.mesh_value)
        return not self.prefix and self.value == other.value


def _filter_principal(pattern) -> Caller | None:
    """The filter's own syntax (src/callers.rs): non-empty printable ASCII, exact or a non-empty
    prefix and one trailing `*`."""
    if not isinstance(pattern, str) or not pattern or not all("!" <= c <= "~" for c in pattern):
        return None
    body, star = (pattern[:-1], True) if pattern.endswith("*") else (pattern, False)
    if not body or "*" in body:
        return None
    return Caller(body.removeprefix("spiffe://"), star)


def _principal_problem(where: str, pattern) -> tuple[Caller | None, str | None]:
    caller = _filter_principal(pattern)
    if caller is None:
        return None, (f"{where} {pattern!r} is refused by the filter: a principal is exact or a non-empty prefix "
                      "with one trailing '*'")
    if not pattern.startswith("spiffe://"):
        return None, (f"{where} {pattern} is not a SPIFFE ID: rules name the URI SAN of the caller's certificate, "
                      "spiffe://<trust domain>/ns/<namespace>/sa/<service account>, not the AuthorizationPolicy's "
                      "form without spiffe://")
    if caller.prefix and not _MESH_PREFIX.match(pattern[:-1]):
        return None, (f"{where} {pattern} must name a whole namespace before its '*' (spiffe://<trust domain>/ns/"
                      "<namespace>/*, or .../sa/<service account prefix>*): a prefix that ends inside a namespace "
                      "name or the trust domain spans namespaces, which the AuthorizationPolicy cannot fence")
    if not caller.prefix and not _MESH_ID.match(pattern):
        return None, (f"{where} {pattern} is not a mesh workload's SPIFFE ID (spiffe://<trust domain>/ns/<namespace>/"
                      "sa/<service account>), the URI SAN of the caller's Istio certificate")
    return caller, None


def plugin_callers(plugin: Document) -> list[tuple[str, str, Caller]]:
    """(rule name, field, caller) for every well-formed principal of the plugin's caller rules."""
    found = []
    for i, rule in enumerate((plugin.spec.get("pluginConfig") or {}).get("callers") or []):
        if not isinstance(rule, dict):
            continue
        for j, pattern in enumerate(rule.get("principals") or []):
            caller, _ = _principal_problem(f"callers[{i}].principals[{j}]", pattern)
            if caller:
                found.append((str(rule.get("name")), f"callers[{i}].principals[{j}]", caller))
    return found


def _has_callers(plugin: Document) -> bool:
    return "callers" in (plugin.spec.get("pluginConfig") or {})


def check_caller_rules(m: Manifests) -> list[Finding]:
    """Caller rules as the filter loads them (refused there with the field named, and so the whole
    plugin with FAIL_RELOAD), plus what only the mesh knows: each principal is a workload's SPIFFE ID
    or a prefix that names a whole namespace, and no principal is already matched by an earlier rule
    (first match wins, so it would never apply)."""
    findings = []
    for plugin in m.kind("WasmPlugin"):
        if not _has_callers(plugin):
            continue
        config = plugin.spec.get("pluginConfig") or {}
        rules, problems, names, earlier = config.get("callers"), [], set(), []
        if not isinstance(rules, list) or not rules:
            problems.append("callers must list at least one rule, or be left out")
            rules = []
        for i, rule in enumerate(rules):
            where = f"callers[{i}]"
            if not isinstance(rule, dict):
                problems.append(f"{where} must be a mapping")
                continue
            unknown = sorted(set(rule) - RULE_KEYS)
            if unknown:
                problems.append(f"{where} has unknown fields {unknown} (the filter refuses them)")
            name = rule.get("name")
            if not isinstance(name, str) or not _RULE_NAME.match(name):
                problems.append(f"{where}.name {name!r} must be 1 to 64 of a-z, 0-9, '_' and '-' (it names the "
                                "rule's counters)")
            elif name in names:
                problems.append(f"{where}.name {name!r} names an earlier rule too")
            names.add(name)
            for key in ("service_account_id", "identity_provider_id"):
                if (key == "service_account_id" or key in rule) and (not isinstance(rule.get(key), str)
                                                                     or not rule.get(key)):
                    problems.append(f"{where}.{key} must be a non-empty string")
            principals = rule.get("principals")
            if not isinstance(principals, list) or not principals:
                problems.append(f"{where}.principals must list at least one principal")
                continue
            mine = []
            for j, pattern in enumerate(principals):
                field_name = f"{where}.principals[{j}]"
                caller, problem = _principal_problem(field_name, pattern)
                if problem:
                    problems.append(problem)
                    continue
                first = next(((n, f) for n, f, c in earlier if caller.within(c)), None)
                if first:
                    problems.append(f"{field_name} {pattern} is matched first by {first[1]} (rule {first[0]}): "
                                    "first match wins, so it never applies")
                mine.append((str(name), field_name, caller))
            earlier += mine
        identity = config.get("caller_identity", "peer_certificate")
        if identity not in CALLER_IDENTITIES:
            problems.append(f"caller_identity {identity!r} must be one of {list(CALLER_IDENTITIES)}")
        findings.append(_rule(RULE_CALLERS, not problems, plugin.ref, "; ".join(problems) or
                              f"{len(rules)} rules ({', '.join(str(r.get('name')) for r in rules)}), "
                              f"{sum(len(r.get('principals') or []) for r in rules)} principals, first match wins"))
    return findings


def _caller_servers(m: Manifests, plugin: Document) -> list[tuple[Document, dict]]:
    """The Gateway servers that serve the plugin's hosts on the gateway it selects."""
    hosts = set((plugin.spec.get("pluginConfig") or {}).get("hosts") or [])
    return [(g, server) for g in _plugin_gateways(m, plugin) for server in g.spec.get("servers") or []
            if any(_server_host(h)[1] in hosts for h in server.get("hosts") or [])]


def check_caller_certificate(m: Manifests) -> list[Finding]:
    """Caller rules read the caller from the downstream peer certificate: on the egress gateway,
    whose Gateway server for the plugin's hosts terminates the callers' Istio mutual TLS, that is
    the calling sidecar's certificate (URI SAN = its SPIFFE ID). In an application's sidecar
    (outbound) the downstream is the application itself over plain HTTP: no certificate, every
    request refused. x-forwarded-client-cert is for a gateway behind another hop that terminates
    mutual TLS; where the gateway terminates it itself, the certificate is the caller."""
    findings = []
    for plugin in m.kind("WasmPlugin"):
        if not _has_callers(plugin):
            continue
        identity = (plugin.spec.get("pluginConfig") or {}).get("caller_identity", "peer_certificate")
        servers = _caller_servers(m, plugin)
        if not _is_gateway_plugin(m, plugin):
            problem = ("caller rules in an application's sidecar: its downstream is the application over plain "
                       "HTTP, with no peer certificate, so every request would be refused (403 caller_not_allowed); "
                       "put caller rules on the egress gateway")
        elif not servers:
            problem = "no Gateway server of the gateway it selects serves its hosts"
        else:
            modes = sorted({(s.get("tls") or {}).get("mode", "none") for _, s in servers})
            plain = [f"{g.ref} server {(s.get('port') or {}).get('name')}" for g, s in servers
                     if (s.get("tls") or {}).get("mode") not in ("ISTIO_MUTUAL", "MUTUAL")]
            if plain:
                problem = (f"{', '.join(plain)} does not require client certificates (tls.mode ISTIO_MUTUAL): "
                           "callers arrive without a peer certificate and are all refused")
            elif identity == "x-forwarded-client-cert":
                problem = (f"caller_identity x-forwarded-client-cert, but the gateway terminates the callers' mutual "
                           f"TLS itself ({', '.join(modes)}): read the peer certificate (caller_identity "
                           "peer_certificate), not a header another hop would have to set")
            else:
                problem = ""
        findings.append(_rule(RULE_CALLER_CERT, not problem, plugin.ref, problem or
                              f"the caller is the peer certificate of {', '.join(sorted({g.ref for g, _ in servers}))} "
                              f"({', '.join(sorted({(s.get('tls') or {}).get('mode') for _, s in servers}))}): "
                              "the calling sidecar's Istio certificate"))
    return findings


def _istio_matches(pattern: str, value: str) -> bool:
    """Istio's string match in AuthorizationPolicies: `*`, `*suffix`, `prefix*` or exact."""
    if pattern == "*":
        return bool(value)
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


def _istio_covers(pattern: str, caller: Caller) -> bool:
    """Whether an Istio pattern matches every principal of the caller set."""
    if not caller.prefix:
        return _istio_matches(pattern, caller.value)
    if pattern == "*":
        return True
    return pattern.endswith("*") and not pattern.startswith("*") and caller.mesh_value.startswith(pattern[:-1])


def _istio_may_match(pattern: str, caller: Caller) -> bool:
    """Whether an Istio pattern may match some principal of the caller set."""
    if not caller.prefix:
        return _istio_matches(pattern, caller.value)
    if pattern == "*" or pattern.startswith("*"):
        return True
    if pattern.endswith("*"):
        stem = pattern[:-1]
        return stem.startswith(caller.mesh_value) or caller.mesh_value.startswith(stem)
    return pattern.startswith(caller.mesh_value)


def _source_excludes(source: dict, caller: Caller) -> bool:
    """Whether an AuthorizationPolicy source surely matches no principal of the caller set. Its
    fields are ANDed, so one field that excludes the callers is enough; fields not modelled here
    (request principals, IP blocks) only narrow a source, so they never make it exclude more."""
    namespace = caller.namespace
    if any(_istio_covers(p, caller) for p in source.get("notPrincipals") or []):
        return True
    if "principals" in source and not any(_istio_may_match(p, caller) for p in source.get("principals") or []):
        return True
    if namespace and any(_istio_matches(n, namespace) for n in source.get("notNamespaces") or []):
        return True
    if namespace and "namespaces" in source and not any(_istio_matches(n, namespace)
                                                        for n in source.get("namespaces") or []):
        return True
    return False


def _rule_reaches(rule: dict, hosts: list) -> bool:
    """Whether an AuthorizationPolicy rule's `to` may match requests for these hosts."""
    targets = rule.get("to")
    if not targets:
        return True
    for target in targets:
        operation = (target or {}).get("operation") or {}
        if "hosts" in operation and not any(_istio_matches(p, h) for p in operation["hosts"] or [] for h in hosts):
            continue
        if hosts and all(any(_istio_matches(p, h) for p in operation.get("notHosts") or []) for h in hosts):
            continue
        return True
    return False


def _gateway_policies(m: Manifests, plugin: Document) -> list[Document]:
    gateways = _plugin_gateways(m, plugin)
    return [ap for ap in m.kind("AuthorizationPolicy") for g in gateways[:1]
            if ap.namespace in (g.namespace, ROOT_NAMESPACE)
            and _subset(_labels(ap.spec.get("selector")), _labels(g.spec.get("selector")))]


def _denied_by(policies: list[Document], caller: Caller, hosts: list) -> list[str]:
    """The DENY policies (and rule index) that may refuse some principal of the caller set."""
    refusing = []
    for ap in policies:
        if ap.spec.get("action", "ALLOW") != "DENY":
            continue
        for index, rule in enumerate(ap.spec.get("rules") or []):
            sources = [(s or {}).get("source") or {} for s in rule.get("from") or []]
            if _rule_reaches(rule, hosts) and (not sources or any(not _source_excludes(s, caller) for s in sources)):
                refusing.append(f"{ap.ref} rule[{index}]")
    return refusing


def _fence_admits(policies: list[Document], hosts: list) -> list[Caller]:
    """The principals a DENY policy's `notPrincipals` admit (the fence's own list)."""
    admitted = []
    for ap in policies:
        if ap.spec.get("action", "ALLOW") != "DENY":
            continue
        for rule in ap.spec.get("rules") or []:
            if not _rule_reaches(rule, hosts):
                continue
            for entry in rule.get("from") or []:
                for pattern in ((entry or {}).get("source") or {}).get("notPrincipals") or []:
                    if pattern.endswith("*") and not pattern.startswith("*") and pattern != "*":
                        admitted.append(Caller(pattern[:-1], True))
                    elif "*" not in pattern:
                        admitted.append(Caller(pattern))
    return admitted


def check_caller_fence(m: Manifests) -> list[Finding]:
    """The AuthorizationPolicy stays the outer fence: a DENY policy on the gateway that refuses a
    principal a caller rule names stops that team with 403 `RBAC: access denied` before the filter
    (phase STATS) sees it, so every principal the rules name must be admitted. Principals the fence
    admits but no rule names are shown: those callers get 403 caller_not_allowed from the filter.
    ALLOW policies are not modelled (the shipped fence is one DENY policy)."""
    findings = []
    for plugin in m.kind("WasmPlugin"):
        if not _has_callers(plugin) or not _is_gateway_plugin(m, plugin):
            continue
        hosts = (plugin.spec.get("pluginConfig") or {}).get("hosts") or []
        policies = _gateway_policies(m, plugin)
        callers = plugin_callers(plugin)
        problems = []
        if not any(ap.spec.get("action") == "DENY" for ap in policies):
            problems.append("no DENY AuthorizationPolicy on the gateway fences who may call "
                            f"{', '.join(hosts)}: every mesh workload reaches the caller rules")
        for name, where, caller in callers:
            refusing = _denied_by(policies, caller, hosts)
            if refusing:
                problems.append(f"{where} {caller.shown} (rule {name}) is refused by {', '.join(refusing)}: that team "
                                "gets 403 RBAC: access denied before the filter runs; admit "
                                f"{caller.value}{'*' if caller.prefix else ''} in its notPrincipals")
        unnamed = [a for a in _fence_admits(policies, hosts) if not any(a.within(c) for _, _, c in callers)]
        note = (f"; admitted but named by no rule (403 caller_not_allowed): "
                f"{', '.join(a.value + ('*' if a.prefix else '') for a in unnamed)}" if unnamed else "")
        findings.append(_rule(RULE_CALLER_FENCE, not problems, plugin.ref, "; ".join(problems) or
                              f"{', '.join(ap.ref for ap in policies)} admits every principal the rules name "
                              f"({', '.join(c.shown for _, _, c in callers)}){note}"))
    return findings


# --- X.509: the certificate is the credential --------------------------------------------------


def _x509_added_cluster(m: Manifests, plugin: Document, name: str, host_choices: set) -> str:
    """An EnvoyFilter cluster for the x509 source: mutual TLS that presents a certificate (the
    proxy's SDS secret or files), verifies the server against a CA bundle that is not the mesh
    root, and sends an OpenAI mTLS host as SNI to that host's port 443."""
    applicable = [p for ef, p in m.applicable(plugin, "CLUSTER") if (p["patch"].get("value") or {}).get("name") == name]
    if not applicable:
        return (f"no EnvoyFilter adds cluster {name} for the proxies this plugin selects, and it is not an Istio "
                "outbound|443||<host> cluster")
    cluster = applicable[0]["patch"]["value"]
    socket = cluster.get("transport_socket") or {}
    context = socket.get("typed_config") or {}
    if not str(context.get("@type", "")).endswith("UpstreamTlsContext"):
        return f"cluster {name} has no TLS transport socket (UpstreamTlsContext): it cannot present a certificate"
    common = context.get("common_tls_context") or {}
    sds = common.get("tls_certificate_sds_secret_configs") or []
    if not sds and not common.get("tls_certificates"):
        return (f"cluster {name} presents no client certificate (no tls_certificate_sds_secret_configs, e.g. Istio's "
                "SDS secret `default`, nor tls_certificates): OpenAI answers invalid_subject_token")
    for entry in sds:
        config = entry.get("sds_config") or {}
        if entry.get("name") == "default" and ("ads" not in config or config.get("resource_api_version") != "V3"):
            return (f"cluster {name} asks for SDS secret `default` without sds_config {{ads: {{}}, "
                    "resource_api_version: V3}}: istio-agent serves the workload certificate on the xDS stream")
    validation = common.get("validation_context") or {}
    validation_sds = (common.get("validation_context_sds_secret_config") or {}).get("name")
    if validation_sds == "ROOTCA" or (common.get("combined_validation_context") or {}).get(
            "validation_context_sds_secret_config", {}).get("name") == "ROOTCA":
        return (f"cluster {name} verifies the server against ROOTCA, the mesh root: OpenAI's certificate is from a "
                "public CA, so the handshake fails; use the system CA bundle (trusted_ca)")
    if not validation.get("trusted_ca") and not validation_sds:
        return f"cluster {name} does not verify OpenAI's server certificate (no validation_context.trusted_ca)"
    sni = context.get("sni")
    if sni not in host_choices:
        return f"cluster {name} sends SNI {sni!r}, must be one of {sorted(host_choices)}"
    sans = [((e.get("matcher") or {}).get("exact")) for e in validation.get("match_typed_subject_alt_names") or []]
    if validation.get("trusted_ca") and sans and sni not in sans:
        return f"cluster {name} accepts server SANs {sans}, not {sni}"
    addresses = [(a.get("socket_address") or {}) for a in _endpoint_addresses(cluster)]
    if not addresses or any((a.get("address"), a.get("port_value")) != (sni, 443) for a in addresses):
        return f"cluster {name} must connect to {sni}:443 (got {[(a.get('address'), a.get('port_value')) for a in addresses]})"
    how = f"SDS secret {sds[0].get('name')}" if sds else "tls_certificates"
    return f"ok:cluster {name} (EnvoyFilter): mutual TLS to {sni}:443 presenting {how}, server verified, SNI {sni}"


def _x509_outbound_cluster(m: Manifests, plugin: Document, cluster: str, host_choices: set) -> str:
    match = _OUTBOUND.match(cluster)
    port, host = int(match.group(1)), match.group(3)
    if host not in host_choices:
        return f"cluster {cluster} is for {host}, must be one of {sorted(host_choices)}"
    rules = [dr for dr in m.kind("DestinationRule") if dr.spec.get("host") == host and _visible(dr, plugin.namespace)]
    settings = [(dr, _tls_mode_for(dr, port) or {}) for dr in rules]
    mutual = [(dr, t) for dr, t in settings if t.get("mode") == "MUTUAL"]
    if not mutual:
        modes = sorted({t.get("mode", "none") for _, t in settings}) or ["no DestinationRule"]
        extra = (" (ISTIO_MUTUAL presents the mesh certificate but verifies OpenAI against the mesh root)"
                 if "ISTIO_MUTUAL" in modes else "")
        return (f"cluster {cluster} presents no client certificate: its TLS is {', '.join(modes)}{extra}; it needs a "
                "DestinationRule with tls.mode MUTUAL and credentialName (or an EnvoyFilter cluster with the SDS "
                "certificate)")
    dr, tls = mutual[0]
    if not (tls.get("credentialName") or tls.get("clientCertificate")):
        return f"{dr.ref} is MUTUAL without credentialName or clientCertificate"
    if tls.get("insecureSkipVerify"):
        return f"{dr.ref} sets insecureSkipVerify: the server certificate must be verified"
    if tls.get("sni") != host:
        return f"{dr.ref} must set sni {host} (got {tls.get('sni')!r})"
    return (f"ok:cluster {cluster}: {dr.ref} MUTUAL with "
            f"{'credentialName ' + tls['credentialName'] if tls.get('credentialName') else 'clientCertificate'}, sni {host}")


def _x509_api_rewrite(m: Manifests, plugin: Document, cluster: str) -> str | None:
    """The route to an mTLS API cluster sends Host = that mTLS host (OpenAI's mTLS API answers
    its own names only; the application still sends api.openai.com)."""
    hosts = (plugin.spec.get("pluginConfig") or {}).get("hosts") or []
    rewrites = [p.get("host_rewrite_literal") for p in _patched_routes(m, plugin, hosts) if p["cluster"] == cluster]
    for vs in m.kind("VirtualService"):
        if not set(hosts) & set(vs.spec.get("hosts") or []):
            continue
        for route in vs.spec.get("http") or []:
            for dest in route.get("route") or []:
                d = dest.get("destination") or {}
                if f"outbound|{(d.get('port') or {}).get('number', 80)}|{d.get('subset', '')}|{d.get('host')}" == cluster:
                    rewrites.append((route.get("rewrite") or {}).get("authority"))
    wrong = [r for r in rewrites if r not in MTLS_API_HOSTS]
    if not rewrites or wrong:
        return (f"the route to {cluster} must rewrite the Host to an mTLS API host ({', '.join(sorted(MTLS_API_HOSTS))}): "
                f"got {wrong or 'no route'}")
    return None


def check_x509_certificates(m: Manifests) -> list[Finding]:
    """The x509 source sends no subject token: OpenAI reads the identity from the client
    certificate of the token exchange's TLS handshake, and checks a certificate again on every API
    call. So the token endpoint cluster must originate mutual TLS to mtls.auth.openai.com with a
    certificate, and every cluster in upstream_clusters to an mTLS API host with one, with the
    route's Host rewritten to that host. The filter cannot see the certificate; a cluster without
    one fails only at the first exchange (invalid_subject_token, or a refused handshake)."""
    findings = []
    for plugin in m.kind("WasmPlugin"):
        config = plugin.spec.get("pluginConfig") or {}
        if (config.get("subject_token") or {}).get("source") != "x509":
            continue
        endpoint = config.get("token_endpoint") or {}
        authority = endpoint.get("authority", MTLS_AUTH_HOST)
        wanted = [("token_endpoint.cluster", endpoint.get("cluster"), {authority} if authority == MTLS_AUTH_HOST
                   else set())]
        wanted += [("upstream_clusters", c, MTLS_API_HOSTS) for c in config.get("upstream_clusters") or []]
        for where, cluster, hosts in wanted:
            subject = f"{plugin.ref} {where} {cluster}"
            if not hosts:
                findings.append(_rule(RULE_X509, False, subject, f"token_endpoint.authority {authority!r}: OpenAI's "
                                      f"X.509 token endpoint is {MTLS_AUTH_HOST}"))
                continue
            if not cluster:
                findings.append(_rule(RULE_X509, False, subject, "no cluster"))
                continue
            if _OUTBOUND.match(cluster):
                result = _x509_outbound_cluster(m, plugin, cluster, hosts)
            else:
                result = _x509_added_cluster(m, plugin, cluster, hosts)
            if result.startswith("ok:") and where == "upstream_clusters":
                problem = _x509_api_rewrite(m, plugin, cluster)
                if problem:
                    result = problem
            ok = result.startswith("ok:")
            findings.append(_rule(RULE_X509, ok, subject, result.removeprefix("ok:")))
    return findings


def cross_check(docs: list[Document], template: bool = False) -> list[Finding]:
    """Every cross-document check. `template` accepts the committed image placeholders (see
    check_image_pinned); without it they fail, as they must before `kubectl apply`."""
    m = Manifests(docs)
    return (check_namespaces(m) + check_plugin_config(m) + check_plugin_clusters(m)
            + check_gateway_references(m) + check_selectors(m)
            + check_phase(m) + check_fail_strategy(m) + check_gateway_plugin_match(m) + check_gateway_hosts(m)
            + check_root_selectors(m) + check_image_pinned(m, template) + check_tls_origination_export(m)
            + check_upstream_clusters(m) + check_caller_rules(m) + check_caller_certificate(m)
            + check_caller_fence(m) + check_x509_certificates(m))


# --- Envoy's view of the EnvoyFilter patches -----------------------------------------------------


def envoy_bootstrap(docs: list[Document], scratch: Path) -> dict:
    """A bootstrap holding every listener and cluster the EnvoyFilters ADD. Files they read are
    replaced by files under `scratch` (the pod's volumes do not exist here)."""
    m = Manifests(docs)
    listeners, clusters = [], []
    for kind, bucket in (("LISTENER", listeners), ("CLUSTER", clusters)):
        for _, patch in m.added(kind):
            bucket.append(copy.deepcopy(patch["patch"]["value"]))
    for listener in listeners:
        for body in _direct_response_bodies(listener):
            if "filename" in body:
                local = scratch / body["filename"].lstrip("/")
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_text("header.payload.signature")
                body["filename"] = str(local)
                if "watched_directory" in body:
                    body["watched_directory"]["path"] = str(local.parent)
    for cluster in clusters:
        # The proxy image's CA bundle: where this machine has none at that path, a bundle that
        # parses the same way (Envoy reads it when it builds the TLS context).
        validation = (((cluster.get("transport_socket") or {}).get("typed_config") or {})
                      .get("common_tls_context") or {}).get("validation_context") or {}
        trusted = validation.get("trusted_ca") or {}
        if "filename" in trusted and not Path(trusted["filename"]).exists():
            trusted["filename"] = _local_ca_bundle()
    bootstrap = {"static_resources": {"listeners": listeners, "clusters": clusters}}
    if '"ads"' in json.dumps(clusters):
        # SDS over ADS (Istio's secret `default`): in a proxy, istio-agent serves it on the xDS
        # stream of the bootstrap's xds-grpc cluster. Here a stand-in for that stream, never
        # contacted in --mode validate, and the node identity SDS requires.
        bootstrap["node"] = {"id": "sidecar~127.0.0.1~istio-validate.default~cluster.local", "cluster": "istio-validate"}
        bootstrap["dynamic_resources"] = {"ads_config": {
            "api_type": "GRPC", "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}]}}
        clusters.append({"name": "xds-grpc", "type": "STATIC", "connect_timeout": "1s",
                         "typed_extension_protocol_options": {
                             "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                                 "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                                 "explicit_http_config": {"http2_protocol_options": {}}}},
                         "load_assignment": {"cluster_name": "xds-grpc", "endpoints": [{"lb_endpoints": [
                             {"endpoint": {"address": {"pipe": {"path": str(scratch / "XDS")}}}}]}]}})
    return bootstrap


def _local_ca_bundle() -> str:
    for candidate in ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt",
                      "/etc/ssl/cert.pem"):
        if Path(candidate).exists():
            return candidate
    try:
        import certifi
        return certifi.where()
    except ImportError:
        return "/etc/ssl/certs/ca-certificates.crt"


def find_envoy() -> str | None:
    beside_python = Path(sys.executable).parent / "envoy"
    return str(beside_python) if beside_python.exists() else shutil.which("envoy")


def envoy_check(docs: list[Document], envoy: str) -> list[Finding]:
    """One Envoy per set of proxies: the EnvoyFilters with the same namespace and workload selector
    are what one proxy receives together."""
    groups: dict[tuple, list[Document]] = defaultdict(list)
    for ef in Manifests(docs).kind("EnvoyFilter"):
        groups[(ef.namespace, tuple(sorted(_labels(ef.spec.get("workloadSelector")).items())))].append(ef)
    findings = []
    for (namespace, labels), filters in sorted(groups.items()):
        subject = f"EnvoyFilter patches for {namespace} {dict(labels)} ({', '.join(f.label for f in filters)})"
        with tempfile.TemporaryDirectory(prefix="istio-validate-") as tmp:
            bootstrap = envoy_bootstrap(filters, Path(tmp))
            count = sum(len(v) for v in bootstrap["static_resources"].values()) - ("dynamic_resources" in bootstrap)
            config = Path(tmp) / "bootstrap.json"
            config.write_text(json.dumps(bootstrap))
            proc = subprocess.run([envoy, "--mode", "validate", "-c", str(config), "--log-level", "error",
                                   "--use-dynamic-base-id"], capture_output=True, text=True, timeout=120,
                                  stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            findings.append(Finding(False, subject, f"Envoy rejects them: {(proc.stdout + proc.stderr).strip()[-2000:]}"))
        else:
            findings.append(Finding(True, subject, f"Envoy loads the {count} added listeners/clusters (--mode validate)"))
    return findings


# --- CLI ----------------------------------------------------------------------------------------


def load_catalog(crds: Path | None) -> CrdCatalog | None:
    path = crds or DEFAULT_CRDS
    if not path.exists():
        if crds is not None:
            raise SystemExit(f"error: {crds} not found")
        return None
    return CrdCatalog(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.istio_validate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--crds", type=Path, help=f"Istio CRDs (default: {DEFAULT_CRDS})")
    parser.add_argument("--envoy", help="Envoy binary for checking EnvoyFilter patches (default: found on PATH)")
    parser.add_argument("--template", action="store_true",
                        help="accept the committed image placeholders (all-zero sha256, <org>): for checking the "
                             "repository's istio/ itself, never before kubectl apply")
    parser.add_argument("paths", nargs="*", type=Path, default=[ISTIO_DIR], help="files or directories (default: istio/)")
    args = parser.parse_args(argv)

    catalog = load_catalog(args.crds)
    if catalog is None:
        print(f"skipped: ../shared/istio not found ({DEFAULT_CRDS}): schema checks skipped, cross-checks still run")
    docs = collect_documents(args.paths)
    if not docs:
        print("FAIL  no YAML documents found in " + ", ".join(map(str, args.paths)))
        return 1
    results = [validate_document(doc, catalog) for doc in docs]
    findings = cross_check(docs, template=args.template)
    envoy = args.envoy or find_envoy()
    if any(d.kind == "EnvoyFilter" for d in docs):
        if envoy:
            findings.extend(envoy_check(docs, envoy))
        else:
            print("skipped: no envoy binary: EnvoyFilter patches not loaded by Envoy")
    for result in results:
        print(result.line())
    for finding in findings:
        print(finding.line())
    unevaluated = [u for r in results for u in r.unevaluated]
    failed = sum(r.status == "FAIL" for r in results) + sum(not f.ok for f in findings)
    counts = {s: sum(r.status == s for r in results) for s in ("OK", "BASIC", "SKIP", "FAIL")}
    print(f"{len(results)} documents ({', '.join(f'{v} {k}' for k, v in counts.items() if v)}), "
          f"{len(findings)} cross-checks ({sum(not f.ok for f in findings)} failed), "
          f"{len(unevaluated)} CEL rules not evaluated")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
