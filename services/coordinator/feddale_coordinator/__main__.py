"""`python -m feddale_coordinator`: serve the coordinator on FEDDALE_HOST:FEDDALE_PORT (8000)."""

from feddale.service.observability import setup_logging
from feddale.service.server import serve

from feddale_coordinator.app import create_app
from feddale_coordinator.settings import Settings


def main() -> None:
    setup_logging("coordinator")
    serve(create_app(Settings.from_env()), default_port=8000)


if __name__ == "__main__":
    main()
