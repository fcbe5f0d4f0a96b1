"""``python -m pipelines.deploy``: serve the flow as deployment ``local`` of ``train-ntu120``.

Run it from the project root against a Prefect server (``prefect server start``, or ``make up``, which
also starts this process); it registers the deployment and runs each requested flow run in a
subprocess in this directory until stopped (Ctrl-C)::

    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m pipelines.deploy &
    prefect deployment run train-ntu120/local --watch
    prefect deployment run train-ntu120/local --param epochs=2 --param 'streams=["joint"]' --watch

It serves one flow run at a time: two runs would start DVC commands on the same workspace at once.
"""

from __future__ import annotations

import sys

from prefect.settings import get_current_settings
from prefect.types.entrypoint import EntrypointType

from pipelines.flow import train_ntu120

DEPLOYMENT = "local"


def main() -> int:
    api_url = get_current_settings().api.url
    if not api_url:
        print(
            "pipelines.deploy: no Prefect server configured. Start one (`prefect server start`, or "
            "`make up`) and set PREFECT_API_URL=http://127.0.0.1:4200/api",
            file=sys.stderr,
        )
        return 2
    train_ntu120.serve(
        name=DEPLOYMENT,
        limit=1,
        tags=["dvc", "ntu120"],
        description="The DVC pipeline of this checkout, run in the serving process's directory.",
        # Imported as pipelines.flow (not loaded from its file path), so its package imports work.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
