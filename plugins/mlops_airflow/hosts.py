"""The hostname a task instance records (Airflow's ``core.hostname_callable``).

Several Celery workers of the production profile share one machine; each is started with
``MLOPS_WORKER_NAME`` so the tasks it runs say which worker ran them. Without it: the FQDN,
as Airflow's default.
"""

from __future__ import annotations

import os
import socket

WORKER_ENV = "MLOPS_WORKER_NAME"


def worker_hostname() -> str:
    return os.environ.get(WORKER_ENV) or socket.getfqdn()
