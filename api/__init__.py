"""The REST API: a thin FastAPI layer (validation, auth, HTTP mapping) over the service."""

from api.app import create_app
from api.settings import Settings

__all__ = ["Settings", "create_app"]
