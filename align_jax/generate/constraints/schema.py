"""The JSON-schema subset that constrained generation supports, as one regular expression.

Supported: object (properties, required, additionalProperties), array (items, minItems,
maxItems), string (enum, minLength, maxLength, pattern), integer and number (minimum, maximum;
exclusiveMinimum/exclusiveMaximum for integers), boolean, null, enum and const of any JSON
value, and `type` as a list (a union). Annotations (title, description, default, examples,
$schema, $comment) are ignored. Any other keyword is refused with one line naming it and its
JSON path: a schema that we cannot enforce is an error, never a silently looser constraint.

The regex (Rust `regex` syntax, for outlines-core) matches a subset of the texts that validate:
  - properties come in the schema's order; optional ones may be left out, no others appear;
  - whitespace is tight: at most one space after ':' and ',' (what `json.dumps` writes) and
    none elsewhere, so a small model cannot pad forever;
  - numbers with bounds have no exponent; integers and numbers are canonical (no leading zeros).
Bounded numbers compile to exact decimal range expressions (outlines-core's own schema
compiler ignores minimum and maximum, which is one reason this module exists).
"""

from __future__ import annotations

import decimal
import json

_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$comment",
                          "$id"})
_BY_TYPE = {
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "minItems", "maxItems"},
    "string": {"enum", "minLength", "maxLength", "pattern"},
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "number": {"minimum", "maximum"},
    "boolean": set(),
    "null": set(),
}
_COMMON = {"type", "enum", "const"} | _ANNOTATIONS

# One JSON string character: anything but '"', '\' and control characters, or an escape.
STRING_CHAR = r'(?:[^"\\\x00-\x1F]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'
_SAFE = r'[^"\\\x00-\x1F]'
STRING = f'"{STRING_CHAR}*"'
INTEGER = r"(?:0|-?[1-9][0-9]*)"
NUMBER = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
COLON, COMMA = ": ?", ", ?"


def escape(text: str) -> str:
    """A Rust-regex literal for `text`: ASCII punctuation as \\x{..}, everything else as is."""
    return "".join(c if c.isalnum() or c == " " or ord(c) > 127 else f"\\x{{{ord(c):02X}}}"
                   for c in text)


def literal(value) -> str:
    """The regex of one JSON value written compactly (an enum or const member)."""
    return escape(json.dumps(value, ensure_ascii=False, separators=(", ", ": ")))


def _fail(path: str, message: str):
    raise ValueError(f"json_schema at {path}: {message}")


def schema_regex(schema, path: str = "$") -> str:
    """Checks `schema` against the supported subset and returns its regex.

    Args:
      schema: a JSON schema (dict; `true` is refused: it allows any value).
      path: the JSON path of `schema` in the document (for error messages).
    Returns:
      A Rust-syntax regex whose matches are JSON texts that validate against the schema.
    Raises:
      ValueError naming the path and the unsupported keyword or the bad value.
    """
    if not isinstance(schema, dict):
        _fail(path, f"expected a schema object, got {json.dumps(schema)[:60]}")
    for key in ("enum", "const"):
        if key in schema:
            values = schema[key] if key == "enum" else [schema[key]]
            if not isinstance(values, list) or not values:
                _fail(path, f"'{key}' must be a non-empty list" if key == "enum" else "bad const")
            extra = set(schema) - _COMMON
            if extra:
                _fail(path, f"keyword '{sorted(extra)[0]}' next to '{key}' is not supported")
            return "(?:" + "|".join(literal(v) for v in values) + ")"
    kind = schema.get("type")
    if kind is None:
        unknown = sorted(set(schema) - _COMMON)
        if unknown:
            _fail(path, f"keyword '{unknown[0]}' is not supported without a 'type'")
        _fail(path, "a schema needs 'type', 'enum' or 'const'")
    kinds = kind if isinstance(kind, list) else [kind]
    if not kinds or any(k not in _BY_TYPE for k in kinds):
        _fail(path, f"type {json.dumps(kind)} is not supported (supported: "
                    f"{', '.join(_BY_TYPE)})")
    allowed = _COMMON.union(*(_BY_TYPE[k] for k in kinds))
    for key in schema:
        if key not in allowed:
            _fail(f"{path}", f"keyword '{key}' is not supported for type {json.dumps(kind)}")
    parts = [_TYPED[k](schema, path) for k in kinds]
    return parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")"


def _object(schema, path):
    props = schema.get("properties", {})
    if not isinstance(props, dict):
        _fail(path, "'properties' must be an object")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        _fail(path, "'required' must be a list of property names")
    missing = [r for r in required if r not in props]
    if missing:
        _fail(path, f"required property '{missing[0]}' is not in 'properties'")
    extra = schema.get("additionalProperties", False)
    if not isinstance(extra, bool):
        # Only the declared properties are generated; a schema for others cannot be enforced.
        _fail(f"{path}.additionalProperties", "only true or false is supported")
    items = [(escape(json.dumps(k, ensure_ascii=False)) + COLON
              + schema_regex(v, f"{path}.properties.{k}"), k in required)
             for k, v in props.items()]

    # rest[(i, first)]: properties i.. given that none (first) or some were written before.
    n = len(items)
    rest = {(n, True): "", (n, False): ""}
    for i in range(n - 1, -1, -1):
        kv, req = items[i]
        after, after_first = rest[(i + 1, False)], rest[(i + 1, True)]
        if req:
            rest[(i, False)], rest[(i, True)] = COMMA + kv + after, kv + after
        else:
            rest[(i, False)] = f"(?:{COMMA}{kv})?{after}"
            rest[(i, True)] = (f"(?:{kv}{after}|{after_first})" if after_first
                               else f"(?:{kv}{after})?")
    return r"\{" + rest[(0, True)] + r"\}"


def _count(schema, path, lo_key, hi_key):
    lo, hi = schema.get(lo_key, 0), schema.get(hi_key)
    for key, v in ((lo_key, lo), (hi_key, hi)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            _fail(path, f"'{key}' must be a non-negative integer")
    if hi is not None and hi < lo:
        _fail(path, f"'{hi_key}' ({hi}) is below '{lo_key}' ({lo}): no value satisfies it")
    return lo, hi


def _array(schema, path):
    if "items" not in schema:
        _fail(path, "an array needs 'items' (a schema for its elements)")
    if isinstance(schema["items"], list):
        _fail(f"{path}.items", "tuple-style 'items' lists are not supported")
    item = schema_regex(schema["items"], f"{path}.items")
    lo, hi = _count(schema, path, "minItems", "maxItems")
    if hi == 0:
        return r"\[\]"
    more_lo, more_hi = max(lo - 1, 0), None if hi is None else hi - 1
    more = f"(?:{COMMA}{item}){{{more_lo},{'' if more_hi is None else more_hi}}}"
    body = item + more
    return r"\[" + (body if lo > 0 else f"(?:{body})?") + r"\]"


def _string(schema, path):
    if "enum" in schema:
        return schema_regex({"enum": schema["enum"]}, path)
    lo, hi = _count(schema, path, "minLength", "maxLength")
    if "pattern" in schema:
        if "minLength" in schema or "maxLength" in schema:
            _fail(path, "'pattern' together with 'minLength'/'maxLength' is not supported")
        return '"' + json_string_pattern(schema["pattern"], f"{path}.pattern") + '"'
    if lo == 0 and hi is None:
        return STRING
    return f'"{STRING_CHAR}{{{lo},{"" if hi is None else hi}}}"'


def json_string_pattern(pattern, path: str) -> str:
    """A JSON-schema `pattern` (matched anywhere in the decoded string) as a regex over the
    string's JSON encoding: characters it would match that JSON must escape (quote,
    backslash, control characters) are removed from its classes, and an unanchored end is
    padded with any string characters."""
    if not isinstance(pattern, str):
        _fail(path, "'pattern' must be a string")
    body, start, end = pattern, False, False
    if body.startswith("^"):
        body, start = body[1:], True
    if body.endswith("$") and not body.endswith("\\$"):
        body, end = body[:-1], True
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c == "\\":
            if i + 1 >= len(body):
                _fail(path, f"pattern {pattern!r} ends with a lone backslash")
            nxt = body[i + 1]
            j = i + 2
            if nxt in "pPxu" and j < len(body) and body[j] == "{":
                j = body.index("}", j) + 1
            elif nxt == "x":
                j = i + 4
            esc = body[i:j]
            if nxt in "sSdDwWpP":
                out.append(f"[{esc}&&{_SAFE}]")
            elif nxt in "ntrfb" and len(esc) == 2:
                out.append(escape("\\" + nxt) if nxt != "b" else esc)
            elif nxt in '"\\':
                out.append(escape(json.dumps(nxt)[1:-1]))
            else:
                out.append(esc)
            i = j
        elif c == "[":
            j, depth = i + 1, 1
            while j < len(body) and depth:
                if body[j] == "\\":
                    j += 1
                elif body[j] == "[":
                    depth += 1
                elif body[j] == "]" and j > i + 1 and body[j - 1] != "[":
                    depth -= 1
                j += 1
            if depth:
                _fail(path, f"pattern {pattern!r} has an unclosed character class")
            out.append(f"[{body[i:j]}&&{_SAFE}]")
            i = j
        elif c == ".":  # any character but a newline, escaped where JSON needs it
            out.append(r'(?:[^"\\\x00-\x1F]|\\["\\/])')
            i += 1
        elif c == '"':
            out.append(escape('\\"'))
            i += 1
        elif c in "^$":
            _fail(path, f"pattern {pattern!r}: anchors are supported only at its start and end")
        else:
            out.append(c)
            i += 1
    pad = f"{STRING_CHAR}*"
    return ("" if start else pad) + "(?:" + "".join(out) + ")" + ("" if end else pad)


def _bound(schema, path, key):
    v = schema.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        _fail(path, f"'{key}' must be a number")
    try:
        return decimal.Decimal(repr(v)) if isinstance(v, float) else decimal.Decimal(v)
    except decimal.InvalidOperation:
        _fail(path, f"'{key}' must be a finite number")


def _integer(schema, path):
    lo, hi = _bound(schema, path, "minimum"), _bound(schema, path, "maximum")
    xlo, xhi = _bound(schema, path, "exclusiveMinimum"), _bound(schema, path, "exclusiveMaximum")
    lo = None if lo is None else int(lo.to_integral_value(decimal.ROUND_CEILING))
    hi = None if hi is None else int(hi.to_integral_value(decimal.ROUND_FLOOR))
    if xlo is not None:
        x = int(xlo.to_integral_value(decimal.ROUND_FLOOR)) + 1
        lo = x if lo is None else max(lo, x)
    if xhi is not None:
        x = int(xhi.to_integral_value(decimal.ROUND_CEILING)) - 1
        hi = x if hi is None else min(hi, x)
    if lo is None and hi is None:
        return INTEGER
    if lo is not None and hi is not None and lo > hi:
        _fail(path, f"no integer lies between the minimum {lo} and the maximum {hi}")
    return integer_range(lo, hi)


def _number(schema, path):
    lo, hi = _bound(schema, path, "minimum"), _bound(schema, path, "maximum")
    if lo is None and hi is None:
        return NUMBER
    if lo is not None and hi is not None and lo > hi:
        _fail(path, f"the minimum {lo} is above the maximum {hi}")
    return number_range(lo, hi)


_TYPED = {"object": _object, "array": _array, "string": _string, "integer": _integer,
          "number": _number, "boolean": lambda s, p: "(?:true|false)", "null": lambda s, p: "null"}


# ----------------------------------------------------------------------------- numeric ranges


def _digits_ge(s: str) -> str:
    """Digit strings of len(s) that are >= s."""
    if not s:
        return ""
    d = int(s[0])
    alts = [s[0] + _digits_ge(s[1:])] if len(s) > 1 else [s[0]]
    if d < 9:
        alts.append(f"[{d + 1}-9][0-9]{{{len(s) - 1}}}")
    return "(?:" + "|".join(alts) + ")"


def _digits_le(s: str) -> str:
    """Digit strings of len(s) that are <= s."""
    if not s:
        return ""
    d = int(s[0])
    alts = [s[0] + _digits_le(s[1:])] if len(s) > 1 else [s[0]]
    if d > 0:
        alts.append(f"[0-{d - 1}][0-9]{{{len(s) - 1}}}")
    return "(?:" + "|".join(alts) + ")"


def _same_length(x: str, y: str) -> str:
    """Digit strings of one length between x and y (x <= y)."""
    k = 0
    while k < len(x) and x[k] == y[k]:
        k += 1
    if k == len(x):
        return x
    p, dx, dy, n = x[:k], int(x[k]), int(y[k]), len(x) - k - 1
    alts = [p + str(dx) + _digits_ge(x[k + 1:]), p + str(dy) + _digits_le(y[k + 1:])]
    if dy - dx > 1:
        alts.append(f"{p}[{dx + 1}-{dy - 1}][0-9]{{{n}}}")
    return "(?:" + "|".join(alts) + ")"


def natural_range(a: int, b: int | None) -> str:
    """Canonical decimal integers n (no leading zeros) with a <= n <= b (b None: no bound)."""
    alts = []
    top = len(str(a)) if b is None else len(str(b))
    for n in range(len(str(a)), top + 1):
        lo = max(a, 0 if n == 1 else 10 ** (n - 1))
        hi = 10 ** n - 1 if b is None else min(b, 10 ** n - 1)
        if lo <= hi:
            alts.append(_same_length(str(lo), str(hi)))
    if b is None:
        alts.append(f"[1-9][0-9]{{{len(str(a))},}}")
    return "(?:" + "|".join(alts) + ")"


def integer_range(lo: int | None, hi: int | None) -> str:
    """JSON integers in [lo, hi] (either bound may be None)."""
    alts = []
    if hi is None or hi >= 0:
        alts.append(natural_range(max(lo or 0, 0) if lo is not None else 0, hi))
    if lo is None or lo < 0:
        # -n for n in [max(1, -hi), -lo]
        alts.append("-" + natural_range(max(1, -hi) if hi is not None else 1,
                                        None if lo is None else -lo))
    return "(?:" + "|".join(alts) + ")"


def _split(x: decimal.Decimal) -> tuple[int, str]:
    """(integer part, fraction digits without trailing zeros) of x >= 0."""
    text = format(x, "f")
    whole, _, frac = text.partition(".")
    return int(whole), frac.rstrip("0")


def _fraction(lo: str, hi: str | None) -> tuple[bool, str | None]:
    """Fractions .D with 0.lo <= 0.D <= 0.hi (hi None: below 1): (whether no fraction at all
    is allowed, regex of the non-empty digit strings D or None)."""
    empty_ok = lo == ""
    if hi is None and not lo:
        return True, "[0-9]+"
    if hi == "":  # at most 0: only zeros, and only when the lower bound is 0
        return empty_ok, "0+" if empty_ok else None
    groups: dict[tuple, list[int]] = {}
    l0 = int(lo[0]) if lo else 0
    h0 = 9 if hi is None else int(hi[0])
    for d in range(l0, h0 + 1):
        lo_rest = lo[1:] if lo and d == l0 else ""
        hi_rest = hi[1:] if hi is not None and d == h0 else None
        groups.setdefault((lo_rest, hi_rest), []).append(d)
    alts = []
    for (lo_rest, hi_rest), ds in groups.items():
        ok, more = _fraction(lo_rest, hi_rest)
        if more is None and not ok:
            continue
        cls = str(ds[0]) if len(ds) == 1 else f"[{ds[0]}-{ds[-1]}]"
        alts.append(cls + ("" if more is None else f"(?:{more})?" if ok else f"(?:{more})"))
    return empty_ok, ("(?:" + "|".join(alts) + ")") if alts else None


def _magnitude(a: decimal.Decimal, b: decimal.Decimal | None) -> str:
    """Canonical non-negative decimals x (no exponent) with a <= x <= b."""
    ai, af = _split(a)
    bi, bf = (None, None) if b is None else _split(b)

    def with_fraction(whole: str, lo: str, hi: str | None) -> str | None:
        empty_ok, digits = _fraction(lo, hi)
        if digits is None:
            return whole if empty_ok else None
        return whole + (f"(?:\\.{digits})?" if empty_ok else f"\\.{digits}")

    alts = []
    if bi is not None and ai == bi:
        alts.append(with_fraction(str(ai), af, bf))
    else:
        alts.append(with_fraction(str(ai), af, None))
        if bi is None or bi - ai > 1:
            alts.append(natural_range(ai + 1, None if bi is None else bi - 1)
                        + r"(?:\.[0-9]+)?")
        if bi is not None:
            alts.append(with_fraction(str(bi), "", bf))
    alts = [x for x in alts if x]
    return "(?:" + "|".join(alts) + ")"


def number_range(lo: decimal.Decimal | None, hi: decimal.Decimal | None) -> str:
    """JSON numbers (no exponent) in [lo, hi] (either bound may be None)."""
    zero = decimal.Decimal(0)
    alts = []
    if hi is None or hi >= 0:
        alts.append(_magnitude(max(lo, zero) if lo is not None else zero, hi))
    if lo is None or lo < 0:
        alts.append("-" + _magnitude(max(-hi, zero) if hi is not None else zero,
                                     None if lo is None else -lo))
    return "(?:" + "|".join(alts) + ")"


def generic_json_regex(depth: int = 3) -> str:
    """Any JSON object nested at most `depth` levels (response_format json_object): a regular
    language needs a nesting bound."""
    scalar = f"(?:{STRING}|{NUMBER}|true|false|null)"
    value = scalar
    for _ in range(depth - 1):
        obj = rf"\{{(?:{STRING}{COLON}{value}(?:{COMMA}{STRING}{COLON}{value})*)?\}}"
        arr = rf"\[(?:{value}(?:{COMMA}{value})*)?\]"
        value = f"(?:{scalar}|{obj}|{arr})"
    return rf"\{{(?:{STRING}{COLON}{value}(?:{COMMA}{STRING}{COLON}{value})*)?\}}"
