"""`python -m feddale_coordinator`: serve the coordinator on FEDDALE_HOST:FEDDALE_PORT (8000)."""

from feddale.service.observability import setup_logging
from feddale.service.server import serve
from feddale.service.settings import load_settings

from feddale_coordinator.app import create_app
from feddale_coordinator.settings import Settings


def main() -> None:
    settings = load_settings(Settings)
    setup_logging("coordinator", settings.log_level, settings.log_format)
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
