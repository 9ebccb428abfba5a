"""The one use of aiokafka's private API outside the stream worker, pinned to the version it was written for.

aiokafka has no public way to refresh a consumer's cluster metadata (``topics()`` fetches it into a
separate object), so a topic created a moment ago looks absent until the next periodic refresh.
``tests/core/test_aiokafka_private.py`` fails when the installed aiokafka differs from ``PINNED`` or no
longer has what this file calls. (The Faust worker's overrides live in ``streaming/faust_overrides.py``.)
"""

from __future__ import annotations

from typing import Any

PINNED = "0.14.0"


async def refresh_metadata(consumer: Any) -> None:
    """Fetch the cluster metadata into ``consumer`` now (``AIOKafkaConsumer``)."""
    await consumer._client.force_metadata_update()  # noqa: SLF001 - aiokafka has no public refresh
