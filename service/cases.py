"""GET /models and GET/DELETE /cases/{id}: a small Starlette app mounted beside the BentoML API,
because BentoML's @api routes are POST and take no path parameters. It reaches the models and
indexes through the running service; ``?model=NAME`` picks the index (default: the default model)."""

from __future__ import annotations

import bentoml
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bentoml.exceptions import BentoMLException

from medcl.index.schema import CaseMetadata


def _case_id(request: Request) -> str | None:
    value = request.path_params["case_id"]
    try:
        CaseMetadata(id=value)
    except ValueError:
        return None
    return value


async def get_case(request: Request) -> Response:
    case_id = _case_id(request)
    if case_id is None:
        return JSONResponse({"error": "not a case id (letters, digits and _.:-, at most 128)"}, status_code=400)
    try:
        _, index = bentoml.get_current_service().index_for(request.query_params.get("model"), "cases")
    except BentoMLException as e:
        return JSONResponse({"error": str(e)}, status_code=int(e.error_code))
    record = await run_in_threadpool(index.get, case_id)
    if record is None:
        return JSONResponse({"error": f"no case {case_id}"}, status_code=404)
    return Response(record.model_dump_json(), media_type="application/json")


async def delete_case(request: Request) -> Response:
    case_id = _case_id(request)
    if case_id is None:
        return JSONResponse({"error": "not a case id (letters, digits and _.:-, at most 128)"}, status_code=400)
    service = bentoml.get_current_service()
    try:
        name, index = service.index_for(request.query_params.get("model"), "cases")
    except BentoMLException as e:
        return JSONResponse({"error": str(e)}, status_code=int(e.error_code))
    removed = await run_in_threadpool(index.delete, case_id)
    if not removed:
        return JSONResponse({"error": f"no case {case_id}"}, status_code=404)
    service.update_index_gauge(name)
    return JSONResponse({"deleted": case_id})


async def list_models(request: Request) -> Response:
    """Name, version, task, classes, input size, provider and card metrics of every served model."""
    models = await run_in_threadpool(bentoml.get_current_service().models_info)
    return JSONResponse({"models": [m.model_dump() for m in models]})


async def reload_models(request: Request) -> Response:
    """Re-resolve every model (store aliases) and switch to changed versions without dropping requests.
    Admin scope (service/middleware.py)."""
    try:
        changes = await run_in_threadpool(bentoml.get_current_service().reload)
    except Exception as e:  # noqa: BLE001 - a model service that cannot load: say so, keep serving the old version
        return JSONResponse({"error": f"reload failed, still serving the previous versions: {e}"}, status_code=503)
    return JSONResponse({"changes": changes})


extra_app = Starlette(routes=[Route("/models", list_models, methods=["GET"]),
                              Route("/models/reload", reload_models, methods=["POST"]),
                              Route("/cases/{case_id}", get_case, methods=["GET"]),
                              Route("/cases/{case_id}", delete_case, methods=["DELETE"])])
