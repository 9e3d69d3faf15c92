"""The OpenAPI 3.1 description of ``cnnforge serve``'s routes, with a model's limits."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnforge.deploy.serve_requests import TOP_K_DIGITS

if TYPE_CHECKING:
    from cnnforge.deploy.serve_service import Service


def openapi_document(service: Service) -> dict[str, Any]:
    """The OpenAPI 3.1 description of the routes, with this model's limits."""
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
        },
    }
