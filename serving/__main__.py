"""``python -m serving``: uvicorn on ``NTU_SERVE_HOST``:``NTU_SERVE_PORT`` (127.0.0.1:8000 by default)."""

from __future__ import annotations

import uvicorn

from .app import create_app
from .settings import Settings


def main() -> None:
    settings = Settings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port)


if __name__ == "__main__":
    main()
