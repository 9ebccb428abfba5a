.PHONY: demo test bootstrap bench

# The main job, end to end: installs, starts local services, simulates traffic into Kafka and reads it back.
demo: bootstrap
	./scripts/demo.sh

# Every test, against real Kafka and Redis started by the fixtures.
test: bootstrap
	uv run pytest -q --durations=15

bootstrap:
	./scripts/bootstrap.sh

bench: bootstrap
	uv run python -m bench
