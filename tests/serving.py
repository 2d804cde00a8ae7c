"""The server helpers moved into the package (deploy/local.py); re-exported so tests keep importing
them from here."""

from deploy.local import BENTOML, PROJECT, bentoml_serve, free_port, server_process, wait_ready  # noqa: F401
