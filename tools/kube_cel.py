"""Kubernetes CEL library functions for cel-python.

The Kubernetes API server evaluates a CRD's `x-kubernetes-validations` rules with cel-go plus
the Kubernetes extension libraries (strings, lists, regex, URLs, IP addresses, CIDRs). cel-python
implements standard CEL only; this module supplies the Kubernetes extensions as cel-python
functions, with the semantics (and error texts) of the Kubernetes implementation, so that rules
using them are evaluated instead of skipped.

    functions = kube_cel.FUNCTIONS       # pass to celpy.Environment().program(ast, functions=...)
    kube_cel.function_names(ast)         # names a compiled rule calls, to find unsupported ones

Not provided: the `format` library (`format.dns1123Label()...`, needs CEL optionals), `quantity`,
`semver` and `authorizer`. Rules calling them are reported by the caller as not evaluable.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import lark
import re2
from celpy import celtypes
from celpy.evaluation import CELEvalError, base_functions

# Names cel-python treats as macros rather than functions.
MACROS = frozenset({"has", "all", "exists", "exists_one", "map", "filter", "reduce", "min", "dyn"})


def _error(message: str) -> CELEvalError:
    return CELEvalError(message, ValueError, (message,))


# --- Go net/url, as used by the Kubernetes URL library ----------------------------------------

_CTL = re.compile(r"[\x00-\x1f\x7f]")
_HEX = "0123456789abcdefABCDEF"


@dataclass(frozen=True)
class KubeURL:
    """A parsed URL (Go's url.URL fields that the CEL library exposes)."""

    scheme: str
    opaque: str
    host: str
    path: str
    raw_path: str
    raw_query: str

    def __str__(self) -> str:
        return f"{self.scheme}:{self.opaque}" if self.opaque else f"{self.scheme}://{self.host}{self.path}"


def _should_escape(c: str, mode: str) -> bool:
    if c.isascii() and c.isalnum():
        return False
    if mode == "host" and c in "!$&'()*+,;=:[]<>\"":
        return False
    if c in "-_.~":
        return False
    if c in "$&+,/:;=?@":
        if mode == "path":
            return c == "?"
        if mode == "userinfo":
            return c in "@/?:"
        if mode == "query":
            return True
    return True


def _unescape(s: str, mode: str) -> str:
    out = bytearray()
    i = 0
    while i < len(s):
        c = s[i]
        if c == "%":
            if i + 2 >= len(s) or s[i + 1] not in _HEX or s[i + 2] not in _HEX:
                raise ValueError(f"invalid URL escape {s[i:i + 3]!r}")
            if mode == "host" and int(s[i + 1], 16) < 8 and s[i:i + 3] != "%25":
                raise ValueError(f"invalid URL escape {s[i:i + 3]!r}")
            out.append(int(s[i + 1:i + 3], 16))
            i += 3
            continue
        if mode == "host" and c.isascii() and _should_escape(c, mode):
            raise ValueError(f"invalid character {c!r} in host name")
        out += (" " if c == "+" and mode == "query" else c).encode()
        i += 1
    return out.decode("utf-8", errors="surrogateescape")


def _escape_path(path: str) -> str:
    out = []
    for byte in path.encode("utf-8", errors="surrogateescape"):
        c = chr(byte)
        out.append(f"%{byte:02X}" if byte >= 0x80 or _should_escape(c, "path") else c)
    return "".join(out)


def _valid_encoded_path(s: str) -> bool:
    for c in s:
        if c in "!$&'()*+,;=:@[]%":
            continue
        if _should_escape(c, "path"):
            return False
    return True


def _valid_optional_port(port: str) -> bool:
    return port == "" or (port[0] == ":" and all(ch in "0123456789" for ch in port[1:]))


def _parse_host(host: str) -> str:
    if host.startswith("["):
        end = host.rfind("]")
        if end < 0:
            raise ValueError("missing ']' in host")
        if not _valid_optional_port(host[end + 1:]):
            raise ValueError(f"invalid port {host[end + 1:]!r} after host")
        return host
    colon = host.rfind(":")
    if colon != -1 and not _valid_optional_port(host[colon:]):
        raise ValueError(f"invalid port {host[colon:]!r} after host")
    return _unescape(host, "host")


def _parse_authority(authority: str) -> str:
    at = authority.rfind("@")
    if at < 0:
        return _parse_host(authority)
    host = _parse_host(authority[at + 1:])
    userinfo = authority[:at]
    if any(not (c.isascii() and c.isalnum()) and c not in "-._:~!$&'()*+,;=%@" for c in userinfo):
        raise ValueError("net/url: invalid userinfo")
    _unescape(userinfo, "userinfo")
    return host


def _go_scheme(raw: str) -> tuple[str, str]:
    for i, c in enumerate(raw):
        if c.isascii() and c.isalpha():
            continue
        if c.isascii() and (c.isdigit() or c in "+-."):
            if i == 0:
                return "", raw
            continue
        if c == ":":
            if i == 0:
                raise ValueError("missing protocol scheme")
            return raw[:i], raw[i + 1:]
        return "", raw
    return "", raw


def go_parse_url(raw: str, via_request: bool) -> KubeURL:
    """Go's url.ParseRequestURI (via_request) or url.Parse without the fragment."""
    if _CTL.search(raw):
        raise ValueError("net/url: invalid control character in URL")
    if raw == "" and via_request:
        raise ValueError("empty url")
    if raw == "*":
        return KubeURL("", "", "", "*", "", "")
    scheme, rest = _go_scheme(raw)
    scheme = scheme.lower()
    raw_query = ""
    if rest.endswith("?") and rest.count("?") == 1:
        rest = rest[:-1]
    else:
        rest, _, raw_query = rest.partition("?")
    if not rest.startswith("/"):
        if scheme:
            return KubeURL(scheme, rest, "", "", "", raw_query)
        if via_request:
            raise ValueError("invalid URI for request")
        if ":" in rest.split("/", 1)[0]:
            raise ValueError("first path segment in URL cannot contain colon")
    host = ""
    if (scheme or (not via_request and not rest.startswith("///"))) and rest.startswith("//"):
        authority, slash, tail = rest[2:].partition("/")
        rest = slash + tail
        host = _parse_authority(authority)
    path = _unescape(rest, "path")
    raw_path = "" if _escape_path(path) == rest else rest
    return KubeURL(scheme, "", host, path, raw_path, raw_query)


def _split_host_port(host: str) -> tuple[str, str]:
    colon = host.rfind(":")
    port = ""
    if colon != -1 and _valid_optional_port(host[colon:]):
        host, port = host[:colon], host[colon + 1:]
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def cel_url(value):
    if not isinstance(value, str):
        raise TypeError("url() takes a string")
    try:
        go_parse_url(value, via_request=True)
        return go_parse_url(value.split("#", 1)[0], via_request=False)
    except ValueError as exc:
        return _error(f"URL parse error during conversion from string: {exc}")


def cel_is_url(value):
    if not isinstance(value, str):
        raise TypeError("isURL() takes a string")
    try:
        go_parse_url(value, via_request=True)
    except ValueError:
        return celtypes.BoolType(False)
    return celtypes.BoolType(True)


def _url_getter(fn):
    def getter(u):
        if not isinstance(u, KubeURL):
            raise TypeError("not a URL")
        return fn(u)

    return getter


def _escaped_path(u: KubeURL) -> str:
    if u.raw_path and _valid_encoded_path(u.raw_path):
        return u.raw_path
    return "*" if u.path == "*" else _escape_path(u.path)


def _query(u: KubeURL):
    result: dict = {}
    for pair in u.raw_query.split("&"):
        if not pair or ";" in pair:
            continue
        key, _, val = pair.partition("=")
        try:
            key, val = _unescape(key, "query"), _unescape(val, "query")
        except ValueError:
            continue
        result.setdefault(key, []).append(val)
    return celtypes.MapType({celtypes.StringType(k): celtypes.ListType([celtypes.StringType(v) for v in vs])
                             for k, vs in result.items()})


# --- IP addresses and CIDRs (Kubernetes ip and cidr libraries) --------------------------------


@dataclass(frozen=True)
class KubeIP:
    address: ipaddress.IPv4Address | ipaddress.IPv6Address

    def __str__(self) -> str:
        return str(self.address)


@dataclass(frozen=True)
class KubeCIDR:
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    prefix: int

    def __str__(self) -> str:
        return f"{self.address}/{self.prefix}"

    @property
    def network(self):
        return ipaddress.ip_network(f"{self.address}/{self.prefix}", strict=False)


def _parse_ip(text: str):
    """netip.ParseAddr as Kubernetes uses it: no zones, no IPv4-mapped IPv6 addresses."""
    if "%" in text:
        raise ValueError("IPv6 zones are not supported")
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        raise ValueError("IPv4-mapped IPv6 addresses are not supported")
    return address


def _parse_cidr(text: str) -> KubeCIDR:
    address_text, slash, bits = text.partition("/")
    if not slash or not bits.isdigit() or (len(bits) > 1 and bits[0] == "0"):
        raise ValueError("invalid prefix length")
    address = _parse_ip(address_text)
    if int(bits) > address.max_prefixlen:
        raise ValueError("prefix length out of range")
    return KubeCIDR(address, int(bits))


def cel_is_ip(value):
    try:
        _parse_ip(str(value))
    except ValueError:
        return celtypes.BoolType(False)
    return celtypes.BoolType(True)


def cel_ip(value):
    if isinstance(value, KubeCIDR):
        return KubeIP(value.address)
    try:
        return KubeIP(_parse_ip(str(value)))
    except ValueError as exc:
        return _error(f"IP Address {str(value)!r} parse error during conversion from string: {exc}")


def cel_is_cidr(value):
    try:
        _parse_cidr(str(value))
    except ValueError:
        return celtypes.BoolType(False)
    return celtypes.BoolType(True)


def cel_cidr(value):
    try:
        return _parse_cidr(str(value))
    except ValueError as exc:
        return _error(f"network address parse error during conversion from string: {exc}")


def _as_ip(value):
    return value.address if isinstance(value, KubeIP) else _parse_ip(str(value))


def _as_cidr(value) -> KubeCIDR:
    return value if isinstance(value, KubeCIDR) else _parse_cidr(str(value))


def _ip_predicate(test):
    def predicate(ip):
        if not isinstance(ip, KubeIP):
            raise TypeError("not an IP address")
        return celtypes.BoolType(test(ip.address))

    return predicate


def _is_global_unicast(address) -> bool:
    # Go's IsGlobalUnicast: private ranges count as global unicast.
    if address.version == 4 and address == ipaddress.IPv4Address("255.255.255.255"):
        return False
    return not (address.is_unspecified or address.is_loopback or address.is_multicast
                or address.is_link_local)


def cel_contains_ip(cidr, ip):
    try:
        return celtypes.BoolType(_as_ip(ip) in _as_cidr(cidr).network)
    except ValueError as exc:
        return _error(str(exc))


def cel_contains_cidr(cidr, other):
    try:
        outer, inner = _as_cidr(cidr), _as_cidr(other)
    except ValueError as exc:
        return _error(str(exc))
    return celtypes.BoolType(inner.network.version == outer.network.version
                             and inner.network.subnet_of(outer.network))


def cel_masked(cidr):
    network = _as_cidr(cidr).network
    return KubeCIDR(network.network_address, network.prefixlen)


# --- strings extension library (cel-go ext.Strings, as enabled by Kubernetes) -----------------


def _index_out_of_range(index) -> CELEvalError:
    return _error(f"index out of range: {index}")


def cel_char_at(s, index):
    if not 0 <= index <= len(s):
        return _index_out_of_range(index)
    return celtypes.StringType(s[index:index + 1])


def cel_index_of(target, item, offset=None):
    if isinstance(target, (list, tuple)):  # lists library
        for i, element in enumerate(target):
            if element == item:
                return celtypes.IntType(i)
        return celtypes.IntType(-1)
    start = 0 if offset is None else int(offset)
    if not 0 <= start <= len(target):
        return _index_out_of_range(start)
    return celtypes.IntType(target.find(item, start))


def cel_last_index_of(target, item, offset=None):
    if isinstance(target, (list, tuple)):
        for i in range(len(target) - 1, -1, -1):
            if target[i] == item:
                return celtypes.IntType(i)
        return celtypes.IntType(-1)
    end = len(target) if offset is None else int(offset)
    if not 0 <= end <= len(target):
        return _index_out_of_range(end)
    return celtypes.IntType(target.rfind(item, 0, end + len(item)))


def cel_lower_ascii(s):
    return celtypes.StringType("".join(c.lower() if c.isascii() else c for c in s))


def cel_upper_ascii(s):
    return celtypes.StringType("".join(c.upper() if c.isascii() else c for c in s))


def cel_replace(s, old, new, count=-1):
    return celtypes.StringType(s.replace(old, new, int(count) if count >= 0 else -1))


def cel_split(s, sep, limit=-1):
    limit = int(limit)
    if limit == 0:
        return celtypes.ListType([])
    if sep == "":
        parts = list(s) if limit < 0 else list(s[:limit - 1]) + ([s[limit - 1:]] if len(s) >= limit else [])
    else:
        parts = s.split(sep) if limit < 0 else s.split(sep, limit - 1)
    return celtypes.ListType([celtypes.StringType(p) for p in parts])


def cel_substring(s, start, end=None):
    end = len(s) if end is None else int(end)
    start = int(start)
    if not 0 <= start <= len(s):
        return _index_out_of_range(start)
    if not 0 <= end <= len(s):
        return _index_out_of_range(end)
    if start > end:
        return _error(f"invalid substring range. start: {start}, end: {end}")
    return celtypes.StringType(s[start:end])


def cel_trim(s):
    return celtypes.StringType(s.strip())


def cel_join(items, sep=""):
    return celtypes.StringType(sep.join(str(i) for i in items))


# --- lists and regex libraries -----------------------------------------------------------------


def cel_is_sorted(items):
    return celtypes.BoolType(all(items[i] <= items[i + 1] for i in range(len(items) - 1)))


def cel_sum(items):
    if not items:
        return celtypes.IntType(0)
    total = items[0]
    for item in items[1:]:
        total = total + item
    return total


def cel_find(s, pattern):
    try:
        match = re2.search(pattern, s)
    except re2.error as exc:
        return _error(f"regex compile error: {exc}")
    return celtypes.StringType(match.group(0) if match else "")


def cel_find_all(s, pattern, limit=-1):
    try:
        found = [m.group(0) for m in re2.finditer(pattern, s)]
    except re2.error as exc:
        return _error(f"regex compile error: {exc}")
    if limit >= 0:
        found = found[:int(limit)]
    return celtypes.ListType([celtypes.StringType(f) for f in found])


# --- conversions with cel-go's error texts (Kubernetes reports these verbatim) -----------------


def cel_int(value):
    if isinstance(value, str):
        try:
            return celtypes.IntType(int(value, 10))
        except ValueError:
            return _error("type conversion error from 'string' to 'int'")
    return base_functions["int"](value)


def cel_duration(value):
    if isinstance(value, str):
        try:
            return celtypes.DurationType(value)
        except (ValueError, TypeError):
            return _error("type conversion error from 'string' to 'google.protobuf.Duration'")
    return base_functions["duration"](value)


def _keep_first_error(combine):
    """cel-go returns the first operand's error when neither side decides `&&`/`||`;
    cel-python replaces both with a generic overload error, which hides the cause."""

    def operator(x, y):
        if isinstance(x, CELEvalError) and not isinstance(y, celtypes.BoolType):
            return x
        if isinstance(y, CELEvalError) and not isinstance(x, celtypes.BoolType):
            return y
        return combine(x, y)

    return operator


FUNCTIONS = {
    "_&&_": _keep_first_error(celtypes.logical_and),
    "_||_": _keep_first_error(celtypes.logical_or),
    # URLs
    "url": cel_url,
    "isURL": cel_is_url,
    "getScheme": _url_getter(lambda u: celtypes.StringType(u.scheme)),
    "getHost": _url_getter(lambda u: celtypes.StringType(u.host)),
    "getHostname": _url_getter(lambda u: celtypes.StringType(_split_host_port(u.host)[0])),
    "getPort": _url_getter(lambda u: celtypes.StringType(_split_host_port(u.host)[1])),
    "getEscapedPath": _url_getter(lambda u: celtypes.StringType(_escaped_path(u))),
    "getQuery": _url_getter(_query),
    # IP addresses and CIDRs
    "isIP": cel_is_ip,
    "ip": cel_ip,
    "isCIDR": cel_is_cidr,
    "cidr": cel_cidr,
    "family": lambda ip: celtypes.IntType(_as_ip(ip).version),
    "isUnspecified": _ip_predicate(lambda a: a.is_unspecified),
    "isLoopback": _ip_predicate(lambda a: a.is_loopback),
    "isLinkLocalMulticast": _ip_predicate(
        lambda a: a in (ipaddress.ip_network("224.0.0.0/24") if a.version == 4 else ipaddress.ip_network("ff02::/16"))),
    "isLinkLocalUnicast": _ip_predicate(lambda a: a.is_link_local),
    "isGlobalUnicast": _ip_predicate(_is_global_unicast),
    "containsIP": cel_contains_ip,
    "containsCIDR": cel_contains_cidr,
    "prefixLength": lambda c: celtypes.IntType(_as_cidr(c).prefix),
    "masked": cel_masked,
    # strings
    "charAt": cel_char_at,
    "indexOf": cel_index_of,
    "lastIndexOf": cel_last_index_of,
    "lowerAscii": cel_lower_ascii,
    "upperAscii": cel_upper_ascii,
    "replace": cel_replace,
    "split": cel_split,
    "substring": cel_substring,
    "trim": cel_trim,
    "join": cel_join,
    # lists and regex
    "isSorted": cel_is_sorted,
    "sum": cel_sum,
    "find": cel_find,
    "findAll": cel_find_all,
    # conversions
    "int": cel_int,
    "duration": cel_duration,
}

# Every name a rule may call: standard CEL (cel-python) plus this library.
SUPPORTED = frozenset(base_functions) | frozenset(FUNCTIONS) | MACROS


def function_names(ast: lark.Tree) -> set[str]:
    """The function and method names a compiled rule calls."""
    names = set()
    for node in ast.iter_subtrees():
        if node.data == "ident_arg":
            names.add(str(node.children[0]))
        elif node.data == "member_dot_arg":
            names.add(str(node.children[1]))
    return names


def uses_old_self(ast: lark.Tree) -> bool:
    """True for transition rules (they compare with `oldSelf` and only run on updates)."""
    return any(isinstance(tok, lark.Token) and tok == "oldSelf" for tok in ast.scan_values(lambda v: True))
