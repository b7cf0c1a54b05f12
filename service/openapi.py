"""The OpenAPI document (``GET /docs.json``) as the service really answers.

BentoML describes its ``@api`` routes only, with its own error classes (``InvalidArgument`` with an
optional ``detail``...) and the multipart form alone. Completed here:

- every error response is ``Error``: ``{"error": message, "request_id": id}`` (the one shape the
  request middleware gives every 4xx and 5xx), with the refusals each route really has (401, 403,
  408, 413, 504) listed beside BentoML's;
- the JSON form of each image route (``images_base64`` instead of multipart files) beside the
  multipart one;
- the routes of the small Starlette app (``GET /models``, ``POST /models/reload``,
  ``GET``/``DELETE /cases/{case_id}``), which BentoML does not know about;
- the bearer-key security scheme.

Applied by patching BentoML's view of the document (``serve_complete_openapi``), pinned to
bentoml==1.4.39 like service/hardening.py.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from pydantic import BaseModel

ERROR = {"type": "object", "title": "Error", "required": ["error", "request_id"],
         "properties": {"error": {"type": "string", "description": "What is wrong, in one sentence"},
                        "request_id": {"type": "string", "description": "Also in the X-Request-ID header and the "
                                                                        "service's request log"}}}
_ERRORS = {"400": "Bad Request: the input is invalid (the message says how)",
           "401": "No API key, or not a valid one", "403": "The key lacks the scope this route needs",
           "404": "No such model or case", "408": "The request body did not arrive in time (MEDCL_BODY_TIMEOUT_S)",
           "409": "Conflict: a case id that exists, or vectors of another model version",
           "413": "Above a limit (body bytes, images, pixels, vectors, search hits)",
           "500": "Internal error (the service log has the traceback)", "503": "Overloaded or a model not ready; retry",
           "504": "The request ran past MEDCL_REQUEST_TIMEOUT_S and was stopped"}
_API_ERRORS = ("400", "401", "403", "404", "408", "413", "500", "503", "504")
_EXTRA_ERRORS = {"/models": ("401", "500"), "/models/reload": ("401", "403", "503"),
                 "/cases/{case_id}": ("400", "401", "403", "404")}


def _error_responses(codes: tuple[str, ...]) -> dict[str, Any]:
    return {code: {"description": _ERRORS[code],
                   "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            for code in codes}


def _schema_of(model: type[BaseModel], schemas: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema of ``model`` with its nested models added to ``schemas``; returns a $ref."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub in schema.pop("$defs", {}).items():
        schemas.setdefault(name, sub)
    schemas.setdefault(model.__name__, schema)
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def complete(doc: dict[str, Any], model_info: type[BaseModel], case_record: type[BaseModel]) -> dict[str, Any]:
    doc = json.loads(json.dumps(doc))  # plain JSON types (BentoML's keys include ints)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["Error"] = ERROR
    for name in ("InvalidArgument", "NotFound", "InternalServerError"):
        schemas.pop(name, None)
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                "description": "Authorization: Bearer KEY (`medcl keys new`)"}}
    for path, item in doc.get("paths", {}).items():
        for method, op in item.items():
            if path in ("/healthz", "/livez", "/readyz", "/metrics"):
                op["security"] = []
                continue
            op["security"] = [{"bearer": []}]
            responses = {str(code): r for code, r in op.get("responses", {}).items()
                         if not str(code).startswith(("4", "5"))}
            responses.update(_error_responses(_API_ERRORS if method == "post" else ("400", "401", "404")))
            op["responses"] = responses
            content = op.get("requestBody", {}).get("content", {})
            form = content.get("multipart/form-data", {}).get("schema")
            if form and "application/json" not in content:
                as_json = copy.deepcopy(form)
                as_json.get("properties", {}).pop("images", None)
                content["application/json"] = {"schema": as_json}
    paths = doc.setdefault("paths", {})
    info_ref = _schema_of(model_info, schemas)
    record_ref = _schema_of(case_record, schemas)
    case_id = [{"name": "case_id", "in": "path", "required": True,
                "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"}},
               {"name": "model", "in": "query", "required": False, "schema": {"type": "string"},
                "description": "Whose case index (default: the default model's)"}]
    secured = [{"bearer": []}]
    paths["/models"] = {"get": {
        "summary": "Every served model: name, version, task, classes, input size, provider, card metrics",
        "security": secured,
        "responses": {"200": {"description": "The served models", "content": {"application/json": {"schema": {
            "type": "object", "required": ["models"],
            "properties": {"models": {"type": "array", "items": info_ref}}}}}},
            **_error_responses(_EXTRA_ERRORS["/models"])}}}
    paths["/models/reload"] = {"post": {
        "summary": "Re-resolve every model (store aliases) and switch to changed versions (admin scope)",
        "security": secured,
        "responses": {"200": {"description": "What changed", "content": {"application/json": {"schema": {
            "type": "object", "required": ["changes"],
            "properties": {"changes": {"type": "array", "items": {"type": "object"}}}}}}},
            **_error_responses(_EXTRA_ERRORS["/models/reload"])}}}
    paths["/cases/{case_id}"] = {
        "get": {"summary": "One indexed case", "security": secured, "parameters": case_id,
                "responses": {"200": {"description": "The case",
                                      "content": {"application/json": {"schema": record_ref}}},
                              **_error_responses(_EXTRA_ERRORS["/cases/{case_id}"])}},
        "delete": {"summary": "Delete one case (write scope)", "security": secured, "parameters": case_id,
                   "responses": {"200": {"description": "Deleted", "content": {"application/json": {"schema": {
                       "type": "object", "required": ["deleted"], "properties": {"deleted": {"type": "string"}}}}}},
                       **_error_responses(_EXTRA_ERRORS["/cases/{case_id}"])}}}
    return doc


def serve_complete_openapi(model_info: type[BaseModel], case_record: type[BaseModel]) -> None:
    from _bentoml_impl.server.app import ServiceAppFactory
    from starlette.responses import JSONResponse

    if getattr(ServiceAppFactory.openapi_spec_view, "__medcl_patched__", False):
        return
    cache: dict[int, dict[str, Any]] = {}

    async def openapi_spec_view(self, req):
        key = id(self.service)
        if key not in cache:  # the routes and their schemas do not change while the service runs
            cache[key] = complete(self.service.openapi_spec.asdict(), model_info, case_record)
        return JSONResponse(cache[key])

    openapi_spec_view.__medcl_patched__ = True
    ServiceAppFactory.openapi_spec_view = openapi_spec_view
