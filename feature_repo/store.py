"""The Feast loader: one way to open the feature store, write encoded rows and read them back.

Imports Feast (and, through it, torch: ~10 s), so import this module lazily, never on a
hot start-up path. The configuration is built in code from explicit arguments (the
stream worker and serving pass their RECSYS_* settings), so the data of tests and of
several deployments never mix; ``feature_store.yaml`` mirrors the SQLite default for
the ``feast`` command line.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

# isort: off
from feature_repo import feast_env  # noqa: F401 - before Feast (its metrics side effect)

# isort: on
from feast import FeatureStore, RepoConfig
from feast.data_source import PushMode
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import _mmh3
from feast.infra.online_stores.redis import RedisOnlineStoreConfig
from feast.infra.online_stores.sqlite import SqliteOnlineStoreConfig
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value
from feast.repo_config import RegistryConfig

from feature_repo import features as defs
from feature_repo.spec import SPEC, EncodedEntity

Entity = Literal["user", "item"]
REPO_PATH = Path(__file__).resolve().parent
KEY_SERIALIZATION_VERSION = 3  # how Feast encodes entity keys in the online store (RedisOnlineReader reads it too)


def redis_connection_string(url: str) -> str:
    """Feast's Redis store takes ``host:port,db=N[,username=U][,password=P]`` rather than a redis:// URL.

    The URL's credentials go along (a password-protected online store); Feast splits the string at
    commas, so a user or password holding one is refused here rather than misread there.
    """
    if not url.startswith("redis://"):
        return url
    parsed = urlsplit(url)
    hostport = parsed.netloc.rpartition("@")[2]
    parts = [hostport, f"db={parsed.path.lstrip('/') or 0}"]
    for name, value in (("username", parsed.username), ("password", parsed.password)):
        if value:
            value = unquote(value)
            if "," in value:
                raise ValueError(f"the Feast online store's Redis {name} must not contain a comma (Feast splits at it)")
            parts.append(f"{name}={value}")
    return ",".join(parts)


def repo_config(data_dir: Path, online_store: str = "sqlite", redis_url: str | None = None) -> RepoConfig:
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    if online_store == "redis":
        if not redis_url:
            raise ValueError("the Redis online store needs a Redis URL (RECSYS_FEAST_REDIS_URL or RECSYS_REDIS_URL)")
        online: Any = RedisOnlineStoreConfig(connection_string=redis_connection_string(redis_url))
    elif online_store == "sqlite":
        online = SqliteOnlineStoreConfig(path=str(data_dir / "online.db"))
    else:
        raise ValueError(f"unknown online store {online_store!r}; expected sqlite or redis")
    return RepoConfig(
        project=defs.PROJECT,
        provider="local",
        registry=RegistryConfig(path=str(data_dir / "registry.db"), cache_ttl_seconds=0),
        online_store=online,
        offline_store={"type": "file"},
        entity_key_serialization_version=KEY_SERIALIZATION_VERSION,
        repo_path=str(REPO_PATH),
    )


def open_store(
    data_dir: Path, online_store: str = "sqlite", redis_url: str | None = None, apply: bool = True
) -> FeatureStore:
    """The feature store of ``data_dir``; with ``apply`` the definitions are registered first (idempotent)."""
    store = FeatureStore(config=repo_config(data_dir, online_store, redis_url), repo_path=str(REPO_PATH))
    if apply:
        objects = defs.build(Path(data_dir))
        store.apply(list(objects.values()))
    return store


def rows_frame(
    entity: Entity, encoded: Sequence[EncodedEntity], event_times: Sequence[float], created: float | None = None
) -> pd.DataFrame:
    """One row per encoded entity, columns as the feature views declare them."""
    created_at = datetime.fromtimestamp(created, UTC) if created else datetime.now(UTC)
    data: dict[str, list[Any]] = {defs.JOIN_KEYS[entity]: [e.entity_id for e in encoded]}
    for feature in SPEC.sparse:
        if feature.entity == entity:
            data[defs.sparse_column(feature.name)] = [list(e.sparse[feature.name]) for e in encoded]
    for dense_feature in SPEC.dense:
        if dense_feature.entity == entity:
            data[defs.dense_column(dense_feature.name)] = [float(e.dense[dense_feature.name]) for e in encoded]
    data[defs.TIMESTAMP_FIELD] = [datetime.fromtimestamp(t, UTC) for t in event_times]
    data[defs.CREATED_FIELD] = [created_at] * len(encoded)
    return pd.DataFrame(data)


def push_online(store: FeatureStore, entity: Entity, frame: pd.DataFrame) -> None:
    """One push of a whole batch to the online store."""
    if len(frame):
        store.push(f"{entity}_push", frame, to=PushMode.ONLINE)


def write_offline(data_dir: Path, entity: Entity, frame: pd.DataFrame) -> list[Path]:
    """Append a batch to the offline store: one parquet file per event date (hive-style ``date=`` folders)."""
    if not len(frame):
        return []
    written = []
    dates = frame[defs.TIMESTAMP_FIELD].dt.strftime("%Y-%m-%d")
    for date, part in frame.groupby(dates):
        folder = defs.offline_dir(data_dir, entity) / f"date={date}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"part-{uuid.uuid4().hex}.parquet"
        tmp = path.with_suffix(".tmp")
        # write then rename: a reader never sees half a file, a crash leaves only a .tmp behind
        pq.write_table(pa.Table.from_pandas(part.reset_index(drop=True), preserve_index=False), tmp)
        tmp.rename(path)
        written.append(path)
    return written


def _decode(entity: Entity, entity_id: str, row: dict[str, Any]) -> EncodedEntity | None:
    sparse: dict[str, list[int]] = {}
    dense: dict[str, float] = {}
    for feature in SPEC.sparse:
        if feature.entity == entity:
            value = row.get(defs.sparse_column(feature.name))
            if value is None:
                return None
            sparse[feature.name] = [int(v) for v in value]
    for dense_feature in SPEC.dense:
        if dense_feature.entity == entity:
            value = row.get(defs.dense_column(dense_feature.name))
            if value is None:
                return None
            dense[dense_feature.name] = float(value)
    return EncodedEntity(entity, entity_id, sparse, dense)


def read_online(store: FeatureStore, entity: Entity, ids: Iterable[str]) -> dict[str, EncodedEntity | None]:
    """Latest encoded features of each id from the online store (None: never pushed)."""
    ids = list(dict.fromkeys(ids))
    if not ids:
        return {}
    key = defs.JOIN_KEYS[entity]
    refs = [f"{entity}_features:{c}" for c in defs.columns(entity)]
    result = store.get_online_features(features=refs, entity_rows=[{key: i} for i in ids]).to_dict()
    out: dict[str, EncodedEntity | None] = {}
    for n, entity_id in enumerate(result[key]):
        out[entity_id] = _decode(entity, entity_id, {c: result[c][n] for c in defs.columns(entity)})
    return out


def historical(store: FeatureStore, entity_df: pd.DataFrame) -> pd.DataFrame:
    """Point-in-time join: for each row (user_id and/or item_id, event_timestamp), the features valid then."""
    refs = []
    for entity, key in defs.JOIN_KEYS.items():
        if key in entity_df.columns:
            refs += [f"{entity}_features:{c}" for c in defs.columns(entity)]
    return store.get_historical_features(entity_df=entity_df, features=refs).to_df()


class RedisOnlineReader:
    """The Redis online store read directly: the keys, fields and values Feast's Redis store writes, without its SDK.

    ``FeatureStore.get_online_features`` spends most of a small read in Python (resolving
    feature references against the registry, building protos, a response object, ``to_dict``);
    serving reads the same hashes with one HMGET per entity in one pipeline. The encoding is
    Feast's own, called from Feast (``serialize_entity_key`` at this repo's
    ``entity_key_serialization_version``, ``_mmh3`` of ``<view>:<column>`` per field, ``ValueProto``
    values), so it stays what the stream worker's pushes wrote; tests/serving/test_direct_features.py
    checks that every value equals what ``get_online_features`` returns, on a real Redis. Feature view
    versioning is off in this repo (``repo_config``), so the view's name is the hash field prefix; the
    regular online path applies no TTL, nor does this one.
    """

    def __init__(self, redis_url: str, timeout_s: float) -> None:
        import redis

        self.client = redis.Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.columns = {entity: defs.columns(entity) for entity in defs.JOIN_KEYS}
        self._fields = {
            entity: [_mmh3(f"{entity}_features:{column}") for column in columns]
            for entity, columns in self.columns.items()
        }
        self._suffix = defs.PROJECT.encode()

    def key(self, entity: Entity, entity_id: str) -> bytes:
        proto = EntityKey(join_keys=[defs.JOIN_KEYS[entity]], entity_values=[Value(string_val=entity_id)])
        return serialize_entity_key(proto, entity_key_serialization_version=KEY_SERIALIZATION_VERSION) + self._suffix

    def read(self, wanted: dict[Entity, Sequence[str]]) -> dict[Entity, list[dict[str, Any] | None]]:
        """Per entity kind, the columns of each id in order (None: nothing stored), in one round trip."""
        with self.client.pipeline(transaction=False) as pipe:
            for entity, ids in wanted.items():
                for entity_id in ids:
                    pipe.hmget(self.key(entity, entity_id), self._fields[entity])  # type: ignore[arg-type]  # bytes keys are fine (Feast writes them)
            replies = pipe.execute()
        out: dict[Entity, list[dict[str, Any] | None]] = {}
        at = 0
        for entity, ids in wanted.items():
            columns = self.columns[entity]
            rows: list[dict[str, Any] | None] = []
            for raw in replies[at : at + len(ids)]:
                if all(v is None for v in raw):
                    rows.append(None)
                    continue
                row: dict[str, Any] = {}
                for column, value in zip(columns, raw):
                    proto = Value()
                    if value:
                        proto.ParseFromString(value)
                    kind = proto.WhichOneof("val")
                    if kind is None:
                        row[column] = None
                    elif kind.endswith("_list_val"):
                        row[column] = list(getattr(proto, kind).val)
                    else:
                        row[column] = getattr(proto, kind)
                rows.append(row)
            out[entity] = rows
            at += len(ids)
        return out

    def close(self) -> None:
        self.client.close()
