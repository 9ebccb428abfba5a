"""The ASGI app of `recsys serve` (``uvicorn serving.asgi:app``), configured from RECSYS_* variables."""

from core.settings import get_settings
from serving.app import create_app

app = create_app(get_settings())
