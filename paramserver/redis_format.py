"""What the Redis backend stores in its servers: key names, the applied marker, log entries, scripts.

Layout (keys start with the namespace, ``ps`` by default):

* every shard: ``ps:b:<table>:<bucket>`` HASH id -> packed row (vector + optimizer state).
  Many rows per hash keep Redis' compact listpack encoding, which is what holds memory per
  row near the raw bytes (one key per row costs ~1.5x). ``ps:applied`` is the last version
  this shard applied; ``ps:log:<version>:<writer>`` holds the rows this shard got in that
  version (a string with a TTL of the log retention): the delta log behind roll-forward,
  ``changed_since``, incremental snapshots and replicas.
* shard 0 (the coordinator) also holds ``ps:version`` (last committed version), ``ps:commits``
  (a stream: version -> writer token and commit time, trimmed to the retention),
  ``ps:floor`` (the log is complete after this version), ``ps:lock`` and ``ps:layout``, and
  ``ps:stages`` (a set: the names of the staging areas).
* a staging area ``name`` is a store of its own under the namespace ``ps:stage:<name>``, on the
  same servers: rows a training job wrote that no reader of ``ps`` sees until they are promoted.

Pure encodings, no I/O: the store protocol that reads and writes them is ``redis_store``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

COMMIT_LUA = """
-- KEYS: lock, version, commits, floor   ARGV: token, version, now, source_time, retention_s
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('PSLOCK the push lock was lost before commit (push took longer than the lock lease)')
end
local cur = tonumber(redis.call('GET', KEYS[2]) or '0')
local v = tonumber(ARGV[2])
if cur >= v then
  return redis.error_reply('PSVERSION version ' .. v .. ' is not newer than the committed ' .. cur)
end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('XADD', KEYS[3], ARGV[2] .. '-0', 'tok', ARGV[1], 't', ARGV[3], 'src_t', ARGV[4])
-- retention: drop commits older than retention_s, a few per commit, never the newest
local cutoff = tonumber(ARGV[3]) - tonumber(ARGV[5])
local old = redis.call('XRANGE', KEYS[3], '-', '+', 'COUNT', 64)
local floor = nil
local keep = nil
for i = 1, #old - 1 do
  local fields = old[i][2]
  local t = nil
  for j = 1, #fields, 2 do if fields[j] == 't' then t = tonumber(fields[j + 1]) end end
  if t == nil or t >= cutoff then break end
  floor = old[i][1]
  keep = old[i + 1][1]
end
if floor then
  redis.call('XTRIM', KEYS[3], 'MINID', keep)
  redis.call('SET', KEYS[4], string.match(floor, '^(%d+)'))
end
return 1
"""

UNLOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Keys:
    """The key names of one namespace (see the layout above)."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.applied = f"{namespace}:applied"
        self.version = f"{namespace}:version"
        self.commits = f"{namespace}:commits"
        self.lock = f"{namespace}:lock"
        self.layout = f"{namespace}:layout"
        self.floor = f"{namespace}:floor"
        self.all_buckets = f"{namespace}:b:*"
        self.all_logs = f"{namespace}:log:*"
        self.stages = f"{namespace}:stages"

    def stage_namespace(self, name: str) -> str:
        """The namespace of the staging area ``name``: its keys never match this namespace's patterns."""
        return f"{self.namespace}:stage:{name}"

    def bucket_prefix(self, table: str) -> bytes:
        """The start of every bucket key of ``table``; the bucket number follows as 4 big-endian bytes."""
        return f"{self.namespace}:b:{table}:".encode()

    def bucket(self, table: str, bucket: int) -> bytes:
        return self.bucket_prefix(table) + int(bucket).to_bytes(4, "big")

    def buckets_of(self, table: str) -> str:
        """A SCAN pattern matching every bucket of ``table``."""
        return f"{self.namespace}:b:{table}:*"

    def log(self, version: int, token: bytes) -> bytes:
        """The log entry of one shard for ``version``, written by the writer holding ``token``."""
        return b"%b:log:%d:%b" % (self.namespace.encode(), version, token)


def parse_applied(value: bytes | None) -> tuple[int, int | None]:
    """A shard's ``applied`` value: (last complete version, version being applied or None)."""
    if not value:
        return 0, None
    done, sep, pending = value.partition(b">")
    return int(done), (int(pending) if sep else None)


def applying_marker(done: int, pending: int) -> bytes:
    """The ``applied`` value while ``pending`` is being applied on top of ``done`` (readers wait or finish it)."""
    return b"%d>%d" % (done, pending)


def applied_marker(version: int) -> bytes:
    """The ``applied`` value once ``version`` is applied completely."""
    return b"%d" % version


def pack_entry(tables: list[tuple[str, np.ndarray, np.ndarray]]) -> bytes:
    """One shard's rows of one version: per table, name length, name, row count, row size, ids, rows."""
    parts = []
    for name, ids, data in tables:
        encoded = name.encode()
        parts += [
            len(encoded).to_bytes(2, "little"),
            encoded,
            len(ids).to_bytes(4, "little"),
            data.shape[1].to_bytes(4, "little"),
            ids.astype("<i8").tobytes(),
            data.tobytes(),
        ]
    return b"".join(parts)


def unpack_entry(blob: bytes) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """The (table, ids, rows) of a log entry written by ``pack_entry``."""
    pos = 0
    while pos < len(blob):
        size = int.from_bytes(blob[pos : pos + 2], "little")
        name = blob[pos + 2 : pos + 2 + size].decode()
        pos += 2 + size
        n = int.from_bytes(blob[pos : pos + 4], "little")
        row_bytes = int.from_bytes(blob[pos + 4 : pos + 8], "little")
        pos += 8
        ids = np.frombuffer(blob, "<i8", count=n, offset=pos).astype(np.int64)
        pos += 8 * n
        yield name, ids, np.frombuffer(blob, np.uint8, count=n * row_bytes, offset=pos).reshape(n, row_bytes)
        pos += n * row_bytes
