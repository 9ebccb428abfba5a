"""A local Kafka (KRaft, broker and controller in one process) on 127.0.0.1, for the demo, tests and benches.

Its jars come from Maven Central once into ``<cache_dir>/kafka/<version>`` (``ensure_kafka_jars``);
``start_kafka`` formats the storage on first start and runs the broker as a managed service of
``local_services.services`` (PID file, log, idempotent start, ``services.stop``).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

from core.procs import LOCALHOST
from core.settings import Settings
from local_services import services

KAFKA_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.recsys</groupId><artifactId>kafka-runtime</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{version}</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId><version>2.0.16</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId><version>2.24.3</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>2.24.3</version></dependency>
  </dependencies>
</project>
"""

LOG4J2_PROPERTIES = """status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.state.name = state.change.logger
logger.state.level = WARN
logger.controller.name = org.apache.kafka.controller
logger.controller.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""

KAFKA_READY_LINE = "Kafka Server started"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_kafka_jars(cache_dir: Path, version: str) -> Path:
    """Fetch Apache Kafka ``version`` and its runtime jars from Maven Central once; returns the libs folder."""
    home = cache_dir.resolve() / "kafka" / version
    libs = home / "libs"
    stamp = home / ".complete"
    with _file_lock(cache_dir / "kafka" / f".{version}.lock"):
        if stamp.exists():
            return libs
        if not shutil.which("mvn") or not shutil.which("java"):
            raise services.ServiceError("Kafka needs Java 17+ and Maven (`mvn`) on PATH to fetch its jars")
        home.mkdir(parents=True, exist_ok=True)
        (home / "pom.xml").write_text(KAFKA_POM.format(version=version))
        shutil.rmtree(libs, ignore_errors=True)
        done = subprocess.run(
            [
                "mvn",
                "-q",
                "-B",
                "-f",
                str(home / "pom.xml"),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={libs}",
                "-DincludeScope=runtime",
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0 or not any(libs.glob(f"kafka_2.13-{version}.jar")):
            output = (done.stdout + done.stderr)[-3000:]
            raise services.ServiceError(f"fetching Kafka {version} with Maven failed:\n{output}")
        # kafka pulls slf4j-api 1.7 transitively; the log4j2 binding needs 2.x
        for old in libs.glob("slf4j-api-1.*.jar"):
            old.unlink()
        stamp.write_text(version)
    return libs


def _kafka_properties(port: int, controller_port: int, log_dir: Path, partitions: int) -> str:
    return "\n".join(
        [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@{LOCALHOST}:{controller_port}",
            f"listeners=PLAINTEXT://{LOCALHOST}:{port},CONTROLLER://{LOCALHOST}:{controller_port}",
            f"advertised.listeners=PLAINTEXT://{LOCALHOST}:{port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            f"log.dirs={log_dir}",
            f"num.partitions={partitions}",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=4",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=true",
            "delete.topic.enable=true",
            "message.max.bytes=2097152",
            "log.retention.hours=168",
            "",
        ]
    )


def start_kafka(
    run_dir: Path,
    cache_dir: Path,
    version: str,
    port: int,
    controller_port: int,
    name: str = "kafka",
    partitions: int = 4,
    timeout: float = 90.0,
    heap: str = "512m",
) -> dict:
    """Start one KRaft broker+controller on 127.0.0.1:``port`` (idempotent)."""
    record = services.recorded_alive(run_dir, name)
    if record and services.port_open(record["port"]):
        return record
    for taken in (port, controller_port):
        if record is None and services.port_open(taken):
            raise services.ServiceError(
                f"port {taken} is already taken by another process; pick another with RECSYS_KAFKA_PORT"
            )
    libs = ensure_kafka_jars(cache_dir, version)
    run_dir = run_dir.resolve()
    home = run_dir / "data" / name
    log_dir = home / "logs"
    home.mkdir(parents=True, exist_ok=True)
    props = home / "server.properties"
    props.write_text(_kafka_properties(port, controller_port, log_dir, partitions))
    log4j = home / "log4j2.properties"
    log4j.write_text(LOG4J2_PROPERTIES)
    java = shutil.which("java")
    if java is None:
        raise services.ServiceError("Kafka needs Java 17+ on PATH")
    classpath = f"{libs}/*"
    if not (log_dir / "meta.properties").exists():
        cluster_id = "-"
        while cluster_id.startswith("-"):  # a leading "-" would be read as an option by kafka-storage
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        done = subprocess.run(
            [
                java,
                f"-Dlog4j2.configurationFile={log4j}",
                "-cp",
                classpath,
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id,
                "-c",
                str(props),
                "--ignore-formatted",
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise services.ServiceError(f"formatting Kafka storage failed:\n{(done.stdout + done.stderr)[-3000:]}")
    marker = str(props)
    cmd = [
        java,
        f"-Xmx{heap}",
        f"-Xms{heap}",
        "-XX:+UseG1GC",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={log4j}",
        "-cp",
        classpath,
        "kafka.Kafka",
        str(props),
    ]
    log_file = services.log_file_of(run_dir, name)
    offset = log_file.stat().st_size if log_file.exists() else 0
    record = services.spawn(run_dir, name, cmd, port, marker)

    def ready() -> bool:
        if not services.port_open(port):
            return False
        with open(log_file, "rb") as handle:
            handle.seek(offset)
            return KAFKA_READY_LINE.encode() in handle.read()

    services.wait_until(ready, timeout, f"kafka {name}", log_file, record["pid"])
    return record


def start_configured_kafka(s: Settings) -> dict:
    """Start the broker the settings describe (RECSYS_KAFKA_PORT, RECSYS_KAFKA_VERSION, ...) under the run dir."""
    return start_kafka(
        s.local.run_dir,
        s.local.cache_dir,
        s.local.kafka_version,
        s.local.kafka_port,
        s.local.kafka_controller_port,
        partitions=s.kafka.topic_partitions,
        timeout=s.local.service_start_timeout_s,
    )


def start_scratch_kafka(run_dir: Path, name: str, timeout: float = 120.0) -> str:
    """A broker of the settings' Kafka version on free ports under ``run_dir`` (benchmarks); returns its bootstrap."""
    s = Settings()
    port, controller_port = services.free_port(), services.free_port()
    print(f"starting Kafka on {LOCALHOST}:{port} ...", flush=True)
    start_kafka(run_dir, s.local.cache_dir, s.local.kafka_version, port, controller_port, name=name, timeout=timeout)
    return f"{LOCALHOST}:{port}"
