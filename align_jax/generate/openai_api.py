"""OpenAI's wire format for the HTTP server: request bodies, errors, streamed deltas.

Bodies are validated strictly (no type coercion), with one clear message naming the bad field.
Unknown fields (what newer clients send) are dropped and reported to the caller, which warns;
with `strict` they are rejected (400). Errors have OpenAI's shape
{"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import json
from typing import Literal

import pydantic
from fastapi.responses import JSONResponse

# Most deltas one streamed row is cut into (each costs a decode of the row's prefix).

_INT32_MAX = 2**31 - 1  # sampling settings are int32/float32 arrays on the device


class _Body(pydantic.BaseModel):
    # Unknown fields fail validation; parse_body drops them (reporting them) unless strict.
    model_config = pydantic.ConfigDict(extra="forbid")


class _StreamOptions(_Body):
    include_usage: bool = False


class _JSONSchemaFormat(_Body):
    name: str | None = None
    description: str | None = None
    schema_: dict | None = pydantic.Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    """OpenAI's response_format: text (no constraint), json_object or json_schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: _JSONSchemaFormat | None = None


class StructuredOutputs(_Body):
    """vLLM's structured_outputs (the newer name of its guided_* fields); one of them."""

    json_: dict | str | None = pydantic.Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    json_object: bool | None = None


class SamplingFields(_Body):
    """Fields shared by completion and chat bodies (top_k, min_p, repetition_penalty are
    extensions, as in vLLM)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = pydantic.Field(1.0, ge=0.0, le=1e4, allow_inf_nan=False)
    top_p: float = pydantic.Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = pydantic.Field(0, ge=-1, le=_INT32_MAX)
    min_p: float = pydantic.Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    repetition_penalty: float = pydantic.Field(1.0, gt=0.0, le=1e4, allow_inf_nan=False)
    stop: str | list[str] | None = None
    # jax.random takes int64 seeds; a seed beyond that is a client bug, not a seed.
    seed: int | None = pydantic.Field(None, ge=-2**63, le=2**63 - 1)
    n: int = pydantic.Field(1, ge=1, le=128)  # choices per prompt
    stream: bool = False
    stream_options: _StreamOptions | None = None
    user: str | None = None
    presence_penalty: float = pydantic.Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = pydantic.Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    # {token id (a string, as JSON keys are): bias in -100..100}, checked in validation.py.
    logit_bias: dict[str, float] | None = None
    # Structured generation: OpenAI's response_format, vLLM's guided_* and structured_outputs.
    response_format: ResponseFormat | None = None
    guided_choice: list[str] | None = None
    guided_regex: str | None = None
    guided_json: dict | str | None = None
    structured_outputs: StructuredOutputs | None = None


class CompletionRequest(SamplingFields):
    """Body of POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = pydantic.Field(None, ge=0, le=20)  # top alternatives per token
    best_of: int | None = None
    suffix: str | None = None


class _TextPart(_Body):
    type: Literal["text"]
    text: str


class _Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]
    name: str | None = None


class ChatRequest(SamplingFields):
    """Body of POST /v1/chat/completions."""

    messages: list[_Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = pydantic.Field(None, ge=0, le=20)


class TokenizeRequest(_Body):
    """Body of POST /tokenize (vLLM's shape): a prompt or messages."""

    model: str | None = None
    prompt: str | None = None
    messages: list[_Message] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Body):
    """Body of POST /detokenize (vLLM's shape): token ids -> {"prompt": text}."""

    model: str | None = None
    tokens: list[int]


class APIError(Exception):
    """An error answered to the client in OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type,
                                       "param": self.param, "code": self.code}},
                            status_code=self.status, headers=self.headers)


def _is_type_tag(part) -> bool:
    # pydantic names the member of a union it tried ("str", "list[int]") inside `loc`.
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


# An unknown field inside these changes what is generated (e.g. structured_outputs.grammar):
# it is a 400 even when unknown fields are otherwise ignored.
_NEVER_IGNORED = frozenset(("response_format", "structured_outputs"))


def parse_body(model: type[pydantic.BaseModel], raw: bytes, *, strict: bool = True):
    """Validates a JSON body strictly -> (request, names of the unknown fields dropped).

    Args:
      model: the body's pydantic model.  raw: the body.
      strict: reject unknown fields (400) instead of dropping them (those inside
        response_format or structured_outputs are always rejected).
    Raises:
      APIError(400) naming the first bad field.
    """
    if not raw.strip():
        raise APIError(400, "request body is empty; expected a JSON object", code="invalid_json")
    try:
        return model.model_validate_json(raw, strict=True), []
    except pydantic.ValidationError as e:
        errors = e.errors(include_url=False)
        unknown = [err["loc"] for err in errors if err["type"] == "extra_forbidden"]
        if strict or not unknown or any(loc[0] in _NEVER_IGNORED for loc in unknown):
            raise _body_error(errors) from None
    # The rare path: drop the unknown fields and validate again (other errors still count).
    data = json.loads(raw)
    names = []
    for loc in unknown:
        path = [x for x in loc if not _is_type_tag(x)]
        names.append(".".join(str(x) for x in path))
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        parent.pop(path[-1], None)
    try:
        return model.model_validate_json(json.dumps(data), strict=True), sorted(set(names))
    except pydantic.ValidationError as e:
        raise _body_error(e.errors(include_url=False)) from None


def _body_error(errors: list) -> APIError:
    """APIError(400) for pydantic's errors, naming the first bad field."""
    err = errors[0]
    if err["type"] == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {err['msg']}",
                        code="invalid_json")
    parts = [x for x in err["loc"] if not _is_type_tag(x)]
    loc = ".".join(str(x) for x in parts)
    what = {"extra_forbidden": "unknown field", "missing": "missing required field"}.get(
        err["type"])
    tags = [x for x in err["loc"] if _is_type_tag(x)]
    if not loc:
        msg = f"request body: {err['msg']}"
    elif what:
        msg = f"{what} {loc!r}"
    elif tags:  # a union: every member failed
        kinds = sorted({str(t) for x in errors for t in x["loc"] if _is_type_tag(t)})
        msg = f"field {loc!r} has the wrong type; expected one of {', '.join(kinds)}"
    else:
        msg = f"field {loc!r}: {err['msg']}"
    return APIError(400, msg, param=loc or None, code=err["type"])


def sse(obj) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def message_dicts(messages: list[_Message]) -> list[dict]:
    """Plain {role, content} dicts for the chat template (text parts joined, developer = system)."""
    out = []
    for m in messages:
        content = m.content if isinstance(m.content, str) else "".join(
            p.text for p in m.content)
        out.append({"role": "system" if m.role == "developer" else m.role,
                    "content": content})
    return out
