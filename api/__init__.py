"""The REST API: a thin FastAPI layer (validation, auth, HTTP mapping) over the service."""

from hpsearch.api.app import create_app
from hpsearch.api.settings import Settings

__all__ = ["Settings", "create_app"]
