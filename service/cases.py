"""GET and DELETE /cases/{id}: a small Starlette app mounted beside the BentoML API, because
BentoML's @api routes take no path parameters. It reaches the index through the running service."""

from __future__ import annotations

import bentoml
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

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
    record = await run_in_threadpool(bentoml.get_current_service().index.get, case_id)
    if record is None:
        return JSONResponse({"error": f"no case {case_id}"}, status_code=404)
    return Response(record.model_dump_json(), media_type="application/json")


async def delete_case(request: Request) -> Response:
    case_id = _case_id(request)
    if case_id is None:
        return JSONResponse({"error": "not a case id (letters, digits and _.:-, at most 128)"}, status_code=400)
    service = bentoml.get_current_service()
    removed = await run_in_threadpool(service.index.delete, case_id)
    if not removed:
        return JSONResponse({"error": f"no case {case_id}"}, status_code=404)
    service.update_index_gauge()
    return JSONResponse({"deleted": case_id})


cases_app = Starlette(routes=[Route("/cases/{case_id}", get_case, methods=["GET"]),
                              Route("/cases/{case_id}", delete_case, methods=["DELETE"])])
