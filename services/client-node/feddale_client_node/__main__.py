"""`python -m feddale_client_node`: serve /v1/detect (FEDDALE_PORT, 8002) and run the agent."""

from feddale.service.observability import setup_logging
from feddale.service.server import serve

from feddale_client_node.app import create_app
from feddale_client_node.settings import Settings


def main() -> None:
    setup_logging("client-node")
    serve(create_app(Settings.from_env()), default_port=8002)


if __name__ == "__main__":
    main()
