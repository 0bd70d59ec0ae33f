"""`python -m feddale_detector`: serve /v1/detect on FEDDALE_HOST:FEDDALE_PORT (8001)."""

from feddale.service.http_common import serve, setup_logging

from feddale_detector.app import create_app
from feddale_detector.settings import Settings


def main() -> None:
    setup_logging("detector")
    serve(create_app(Settings.from_env()), default_port=8001)


if __name__ == "__main__":
    main()
