"""Reading and writing what `score` and `interpolate` add to the wire: interpolate's two endpoints, score's
per-input records, and an interpolation as a one-row PNG strip.

interpolate's endpoints come as JSON `inputs` (two images, in any form `encode` takes) or `z` (two latent
vectors), or as one .npy array: two images, or two latents with `latent=true` in the query string.
score answers JSON `{"scores": [{"elbo", "iwae", "kl", "recon_error", "anomaly": {"score", "threshold",
"is_anomaly"}}, ...], "k", "seed"}` (`anomaly` absent when the model has no background model), or a .npy
structured array with one record per input: elbo, iwae, kl, recon_error (float64) and, with a background
model, anomaly_score (float64) and is_anomaly (bool); the threshold in `X-Anomaly-Threshold`, the seed in
`X-Seed`.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image
from starlette.requests import Request
from starlette.responses import Response

from service.arrays import images_from_npy, json_type, latents_from_npy, parse_images, parse_latents, read_npy
from service.errors import InvalidInput, UnsupportedMedia
from service.grid import as_uint8, channels_last, tile
from service.media import JSON, NPY, PNG, content_type
from service.operations import F32, Score
from service.parse_pool import ParsePool
from service.requests import Images, Latents, parse_json_object, parse_params
from service.responses import GRID_FILL, GRID_PADDING, json_response, npy_bytes
from service.schemas import InterpolateParams

ENDS = 2


async def read_endpoints(
    request: Request, images: Images, latents: Latents
) -> tuple[InterpolateParams, F32, bool]:
    """interpolate's parameters, its two endpoints, and whether they are latents (else images); large JSON
    bodies are parsed in the app's ParsePool, as every operation's are."""
    body = await request.body()
    media = content_type(request.headers)
    query = dict(request.query_params) if request.scope["query_string"] else {}
    pool: ParsePool = request.app.state.parse_pool
    if media != NPY and pool.offloads(len(body)):
        return await pool.run(parse_endpoints, body, media, query, images, latents)
    return parse_endpoints(body, media, query, images, latents)


def parse_endpoints(
    body: bytes, media: str, query: dict[str, str], images: Images, latents: Latents
) -> tuple[InterpolateParams, F32, bool]:
    if media == NPY:
        params = parse_params(InterpolateParams, query, from_query=True)
        array = read_npy(body)
        field = "z" if params.latent else "inputs"
        _two(array.shape[0] if array.ndim else 0, field)
        if params.latent:
            return params, latents_from_npy(array, latents.dim, ENDS), True
        return params, images_from_npy(array, images.shape, images.value_range, ENDS), False
    if media not in ("", JSON):
        raise UnsupportedMedia(
            f"Content-Type {media!r} is not read here; send application/json or application/x-npy",
            field="body",
        )
    data = {key: value for key, value in parse_json_object(body).items() if value is not None}  # null: absent
    if "inputs" in data and "z" in data:
        raise InvalidInput(
            "give the endpoints as inputs (two images) or z (two latents), not both", field="z"
        )
    if "inputs" not in data and "z" not in data:
        raise InvalidInput("field required: inputs (two images) or z (two latent vectors)", field="inputs")
    latent = "z" in data
    field = "z" if latent else "inputs"
    value = data.pop(field)
    if data.get("latent", latent) != latent:
        raise InvalidInput(f"latent is for .npy bodies; this JSON body gives {field}", field="latent")
    params = parse_params(InterpolateParams, data)
    if query:
        from_query = parse_params(InterpolateParams, query, from_query=True).model_dump(exclude_unset=True)
        params = parse_params(InterpolateParams, {**params.model_dump(exclude_unset=True), **from_query})
    if not isinstance(value, list):
        raise InvalidInput(f"expected a list of two, got {json_type(value)}", field=field)
    _two(len(value), field)
    if latent:
        return params, parse_latents(value, latents.dim, ENDS), True
    return params, parse_images(value, images.shape, images.value_range, ENDS, images.max_png_bytes), False


def _two(count: int, field: str) -> None:
    if count != ENDS:
        what = "latent vectors" if field == "z" else "images"
        raise InvalidInput(f"expected exactly 2 {what} (the endpoints), got {count}", field=field)


def score_record(result: Score) -> np.ndarray:
    """score's results as a structured array, one record per input."""
    bounds = result.bounds
    fields: list[tuple[str, Any]] = [(name, np.float64) for name in ("elbo", "iwae", "kl", "recon_error")]
    if result.anomaly is not None:
        fields += [("anomaly_score", np.float64), ("is_anomaly", np.bool_)]
    record = np.empty(len(bounds.elbo), dtype=fields)
    record["elbo"], record["iwae"], record["kl"] = bounds.elbo, bounds.iwae, bounds.kl
    record["recon_error"] = bounds.recon_error
    return record


def score_response(media: str, result: Score, threshold: float | None, k: int, seed: int) -> Response:
    flagged = None
    if result.anomaly is not None and threshold is not None:
        flagged = result.anomaly > threshold
    if media == NPY:
        record = score_record(result)
        headers = {"X-Seed": str(seed)}
        if flagged is not None:
            record["anomaly_score"], record["is_anomaly"] = result.anomaly, flagged
            headers["X-Anomaly-Threshold"] = repr(threshold)
        return Response(npy_bytes(record), media_type=NPY, headers=headers)
    bounds = result.bounds
    scores: list[dict[str, Any]] = [
        {"elbo": elbo, "iwae": iwae, "kl": kl, "recon_error": error}
        for elbo, iwae, kl, error in zip(
            bounds.elbo.tolist(),
            bounds.iwae.tolist(),
            bounds.kl.tolist(),
            bounds.recon_error.tolist(),
            strict=True,
        )
    ]
    if result.anomaly is not None and flagged is not None:
        for item, value, is_anomaly in zip(scores, result.anomaly.tolist(), flagged.tolist(), strict=True):
            item["anomaly"] = {"score": value, "threshold": threshold, "is_anomaly": is_anomaly}
    return json_response({"scores": scores, "k": k, "seed": seed})


def strip_response(images: F32) -> Response:
    """The images side by side in one row, GRID_PADDING gray pixels between them."""
    pixels = channels_last(as_uint8(images))
    strip = tile(pixels, len(pixels), GRID_PADDING, GRID_FILL)
    buffer = io.BytesIO()
    Image.fromarray(strip).save(buffer, format="PNG", compress_level=1)
    headers = {"X-Grid-Rows": "1", "X-Grid-Cols": str(len(pixels))}
    return Response(buffer.getvalue(), media_type=PNG, headers=headers)
