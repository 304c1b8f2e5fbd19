"""The steering playground: a page served by `unisteer serve` at `/playground`.

Pick loaded updates, set m with a slider (and/or a list of values), and see the plain model and each m side by
side, streamed token by token from the server's own `/v1/chat/completions` (or `/v1/completions`): the same
process, batching engine and auth as any client. Where an update's folder holds a fitted sweep
(`UPDATE/sweep/summary.json`, as `us.fit` / `unisteer fit` write it), its preference and utility curves are
drawn with the current m marked (`GET /v1/updates/{name}/sweep`).

Auth: the page, its script and stylesheet are static files shipped in the package (`serving/static/`, no CDN,
no build step) and hold no data — no model, update or server name — so they are served without a key. Every
piece of data comes from `/v1/...`, which needs `Authorization: Bearer KEY` when the server has a key: the page
asks for the key (kept in the tab's sessionStorage) and sends it with each request. The page's
Content-Security-Policy allows scripts, styles and connections to this origin only, and every model output and
name is written with `textContent`, never parsed as HTML.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from ..files import read_json
from .protocol import ApiError

SWEEP_FOLDER = "sweep"
SWEEP_SUMMARY = "summary.json"
_STATIC = {"playground.html": "text/html; charset=utf-8", "playground.js": "text/javascript; charset=utf-8",
           "playground.css": "text/css; charset=utf-8"}
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def static_file(name: str) -> bytes:
    """A file of the page, read from the installed package."""
    return resources.files("unisteer.serving").joinpath("static", name).read_bytes()


def update_paths(directory: str | Path | None, names: Mapping[str, Any]) -> dict[str, Path]:
    """Where each update loaded by `load_updates_dir(directory)` lives (a folder, or a .safetensors file)."""
    if directory is None:
        return {}
    directory = Path(directory)
    paths = {}
    for name in names:
        folder = directory / name
        paths[name] = folder if folder.is_dir() else directory / f"{name}.safetensors"
    return paths


def sweep_curves(name: str, path: Path | None) -> dict[str, Any] | None:
    """The preference / utility curves of `name` from the fitted sweep in its folder (None: there is none).

    The sweep's own curves of the update by name, else the only update of a one-update sweep; the split is
    test where there is one (else dev, else the first); the variant is the sweep's."""
    if path is None or not path.is_dir():
        return None
    summary_path = path / SWEEP_FOLDER / SWEEP_SUMMARY
    if not summary_path.is_file():
        return None
    summary = read_json(summary_path)
    curves = summary.get("curves")
    if not isinstance(curves, dict) or not curves:
        return None
    config = (summary.get("sweep") or {}).get("config") or {}
    variant = config.get("variant", "sum")
    keys = [tuple(key.split("/")) for key in curves]
    keys = [k for k in keys if len(k) == 3 and k[2] == variant]
    swept = sorted({k[0] for k in keys})
    source = name if name in swept else (swept[0] if len(swept) == 1 else None)
    if source is None:
        return None
    splits = [k[1] for k in keys if k[0] == source]
    split = next((s for s in ("test", "dev") if s in splits), splits[0])
    pair = curves["/".join((source, split, variant))]

    def curve(data: dict[str, Any]) -> dict[str, list[Any]]:
        aggregates = data.get("aggregates", [])
        return {"m": list(data.get("m", [])), "mean": [a.get("mean") for a in aggregates],
                "ci_low": [a.get("ci_low") for a in aggregates], "ci_high": [a.get("ci_high") for a in aggregates]}

    return {"update": name, "swept_as": source, "split": split, "variant": variant,
            "preference": curve(pair.get("preference", {})), "utility": curve(pair.get("utility", {}))}


def add_playground(app: FastAPI, state: Any, paths: Mapping[str, Path]) -> None:
    """Mount `/playground` (static, open) and `GET /v1/updates/{name}/sweep` (behind the API key like all /v1)."""

    def page(name: str) -> Response:
        return Response(static_file(name), media_type=_STATIC[name], headers=_HEADERS)

    @app.get("/playground", include_in_schema=False)
    async def playground() -> Response:
        return page("playground.html")

    @app.get("/playground/{file_name}", include_in_schema=False)
    async def playground_file(file_name: str) -> Response:
        if file_name not in _STATIC:
            raise ApiError(404, f"/playground/{file_name}: no such file", error_type="not_found_error")
        return page(file_name)

    @app.get("/v1/updates/{name}/sweep")
    async def update_sweep(name: str) -> JSONResponse:
        if name not in state.updates:
            raise ApiError(404, f"update {name!r} is not served here", param="name", code="model_not_found")
        curves = sweep_curves(name, paths.get(name))
        if curves is None:
            raise ApiError(404, f"update {name!r}: its folder holds no fitted sweep ({SWEEP_FOLDER}/{SWEEP_SUMMARY})",
                           param="name", code="sweep_not_found")
        return JSONResponse(curves)
