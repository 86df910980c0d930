"""The OpenAPI schema's error answers, documented once for every operation.

drf-spectacular documents the answers a view declares and nothing else, but every view can
also answer with the errors that DRF and FedLens's middleware give on their own: a refused
credential (401), a missing right (403), an unknown object (404), a refused body or query
(400), a body over the size limit (413), a conflict with the object's state (409), a
throttle (429). Each of them is a JSON object with a `detail` message, or, for a 400, the
fields to fix with their messages (flproject/api_errors.py, training/api/errors.py).
"""

from typing import Any

ERROR_COMPONENT = "Error"
ERROR_SCHEMA = {
    "type": "object",
    "description": "What was wrong and what to do: `detail`, or each field to fix with its "
    "messages.",
    "properties": {"detail": {"type": "string"}},
    "additionalProperties": True,
}
ERROR_DESCRIPTIONS = {
    "400": "The body or the query needs fixing; the answer names the fields.",
    "401": "No valid credential: sign in, or send a valid token.",
    "403": "The credential may not do this.",
    "404": "No such object, or not one you may see.",
    "409": "The object's state does not allow this now.",
    "413": "The body is larger than this server accepts.",
    "429": "Too many requests: wait for the number of seconds in Retry-After.",
}
WRITING_METHODS = frozenset({"post", "put", "patch", "delete"})
# Answered before any credential is asked for.
ANONYMOUS_PATHS = frozenset({"/api/auth/token/", "/api/site/enrol/"})


def errors_of(path: str, method: str, operation: dict[str, Any]) -> list[str]:
    codes = ["400", "429"]
    if path not in ANONYMOUS_PATHS:
        codes += ["401", "403"]
    query = {parameter["name"] for parameter in operation.get("parameters", [])}
    if "{" in path or "page" in query:  # an unknown object, or a page past the last
        codes.append("404")
    if method in WRITING_METHODS:
        codes += ["409", "413"]
    return codes


def document_error_responses(result: dict[str, Any], generator, request, public) -> dict:
    """drf-spectacular postprocessing hook (SPECTACULAR_SETTINGS["POSTPROCESSING_HOOKS"])."""
    result.setdefault("components", {}).setdefault("schemas", {})[ERROR_COMPONENT] = ERROR_SCHEMA
    reference = {"$ref": f"#/components/schemas/{ERROR_COMPONENT}"}
    for path, operations in result.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            for code in errors_of(path, method, operation):
                responses.setdefault(
                    code,
                    {
                        "description": ERROR_DESCRIPTIONS[code],
                        "content": {"application/json": {"schema": reference}},
                    },
                )
            if "{" not in path:
                allow_empty_filters(operation)
    return result


def allow_empty_filters(operation: dict[str, Any]) -> None:
    """A list's choice filter left empty means "any" (django-filter, as an HTML form sends
    an unset select): the schema says so by listing "" among the choices."""
    for parameter in operation.get("parameters", []):
        schema = parameter.get("schema", {})
        if parameter.get("in") == "query" and "enum" in schema and "" not in schema["enum"]:
            schema["enum"] = [*schema["enum"], ""]
