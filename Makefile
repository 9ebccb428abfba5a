.PHONY: demo test test-fast lint bootstrap bench images deploy deploy-down

# The main job, end to end: installs, starts local services, simulates traffic into Kafka and reads it back.
demo: bootstrap
	./scripts/demo.sh

# Every check and every test, against real Kafka, Redis, MLflow, Airflow started by the fixtures (CI runs this).
test: bootstrap lint
	uv run pytest -q --durations=15

# Unit tests only (no services started), for the edit-test loop; `make lint` runs the checks alone.
test-fast: bootstrap
	uv run pytest -q -m "not integration and not slow"

# Layering contracts (import-linter), lint and format (ruff), types (mypy).
lint:
	uv run lint-imports
	uv run ruff check .
	uv run ruff format --check .
	uv run mypy

bootstrap:
	./scripts/bootstrap.sh

bench: bootstrap
	uv run python -m bench

# The images of docker/compose.yaml built with podman (a debootstrap base; no registry is reachable here).
images:
	./scripts/build-images.sh

# The compose stack up with podman-compose, every service healthy, the URLs printed (README "Deployment").
deploy:
	./scripts/deploy.sh up

# The stack down: its containers and volumes removed (the images stay).
deploy-down:
	./scripts/deploy.sh down
