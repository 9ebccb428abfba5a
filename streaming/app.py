"""The stream worker's Faust app, built from the environment's settings: ``faust -A streaming.app worker -l info``.

The one module of the room that reads the environment itself (an entry point, as Faust's CLI
wants a module-level app); ``recsys stream worker`` builds the same app with ``create_app``
from the settings it has loaded.
"""

from __future__ import annotations

from core.settings import get_settings
from streaming.factory import create_app

app, worker = create_app(get_settings())
