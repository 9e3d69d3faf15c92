"""The OpenAPI 3.1 description of ``cnnforge serve``'s routes, with a model's limits."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnforge.deploy.serve_requests import TOP_K_DIGITS
from cnnforge.deploy.serve_v2 import MODEL, MODEL_VERSION
from cnnforge.deploy.v2_protocol import model_spec
from cnnforge.deploy.v2_rest import HEADER_LENGTH

if TYPE_CHECKING:
    from cnnforge.deploy.serve_service import Service


def openapi_document(service: Service, name: str) -> dict[str, Any]:
    """The OpenAPI 3.1 description of the routes, with this model's limits (``name``: its name
    in the ``/v2`` routes)."""
    error = {"$ref": "#/components/schemas/Error"}
    json_error = {"content": {"application/json": {"schema": error}}}
    binary = {"type": "string", "format": "binary"}
    return {
        "openapi": "3.1.0",
        "info": {"title": f"cnnforge serve: {Path(service.classifier.model).name}"},
        "components": {
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "string"}}},
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/predict": {
                "post": {
                    "summary": "Top-k labels of one or several images",
                    "parameters": [
                        {
                            "name": "top_k",
                            "in": "query",
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": 10**TOP_K_DIGITS - 1,
                                "default": 5,
                            },
                        }
                    ],
                    "requestBody": {
                        "description": f"At most {service.max_batch} images and "
                        f"{service.max_body:,} bytes in all",
                        "content": {
                            "multipart/form-data": {
                                "schema": {"type": "object", "additionalProperties": binary}
                            },
                            "image/*": {"schema": binary},
                            "application/octet-stream": {"schema": binary},
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "{predictions: [{image, top: [{label, probability}]}]}"
                            "; served with --reject-unknown or --min-confidence, each also has "
                            "label (unknown below the confidence), unknown, min_confidence"
                        },
                        **{
                            code: {"description": why, **json_error}
                            for code, why in (
                                ("400", "malformed request, no image, bad top_k"),
                                ("401", "missing or wrong token"),
                                ("408", "no body byte for the body timeout"),
                                ("413", "body over the limit, or too many images"),
                                (
                                    "415",
                                    "content type not accepted, or an image in a format other "
                                    "than PNG, JPEG, BMP, GIF, TIFF, WebP",
                                ),
                                ("422", "an image that does not decode or is over the pixel limit"),
                                ("500", "an unexpected failure (logged)"),
                                ("503", "queue full; retry after Retry-After seconds"),
                            )
                        },
                    },
                }
            },
            "/health": {"get": {"summary": "Liveness (no token needed)", "security": []}},
            "/metadata": {"get": {"summary": "Classes, input, precision, metrics, limits"}},
            "/metrics": {"get": {"summary": "Prometheus text format"}},
            "/openapi.json": {"get": {"summary": "This description"}},
            **_v2_paths(service, name, json_error),
        },
    }


def _v2_paths(service: Service, name: str, json_error: dict) -> dict[str, Any]:
    """The Open Inference Protocol's routes (KServe v2, Triton's REST API)."""
    spec = model_spec(service, name)
    tensors = ", ".join(f"{t.name} ({'/'.join(t.accepts)} {t.shape})" for t in spec.inputs)
    infer = {
        "post": {
            "summary": f"Inference on {name!r}: one input of {tensors}; outputs as JSON or "
            f"binary data (Triton's binary tensor data extension: {HEADER_LENGTH}); "
            "parameters.classification: k gives 'value:index:label' strings",
            "requestBody": {
                "description": f"At most {service.max_batch} images and {service.max_body:,} "
                "bytes in all",
                "content": {
                    "application/json": {"schema": {"type": "object"}},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            "responses": {
                "200": {"description": "{model_name, model_version, outputs: [...]}"},
                **{
                    code: {"description": why, **json_error}
                    for code, why in (
                        ("400", "a tensor of the wrong name, datatype, shape or byte count"),
                        ("404", "another model's name or version"),
                        ("413", "body over the limit"),
                        ("503", "queue full; retry after Retry-After seconds"),
                    )
                },
            },
        }
    }
    model = {"get": {"summary": "Model metadata: inputs and outputs, datatypes, shapes"}}
    ready = {"get": {"summary": "Model readiness"}}
    paths: dict[str, Any] = {
        "/v2": {"get": {"summary": "Server metadata: name, version, extensions"}},
        "/v2/health/live": {"get": {"summary": "Liveness (no token needed)", "security": []}},
        "/v2/health/ready": {"get": {"summary": "Readiness (no token needed)", "security": []}},
        "/v2/repository/index": {"post": {"summary": "The served model (Triton's index)"}},
    }
    for base in (MODEL, MODEL_VERSION):
        paths |= {base: model, f"{base}/ready": ready, f"{base}/infer": infer}
    return paths
