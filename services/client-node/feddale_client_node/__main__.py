"""`python -m feddale_client_node`: serve /v1/detect (FEDDALE_PORT, 8002) and run the agent."""

from feddale.service.observability import setup_logging
from feddale.service.server import serve
from feddale.service.settings import load_settings

from feddale_client_node.app import create_app
from feddale_client_node.settings import Settings


def main() -> None:
    settings = load_settings(Settings)
    setup_logging("client-node", settings.log_level, settings.log_format)
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
