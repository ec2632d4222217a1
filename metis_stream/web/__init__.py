"""The web layer: a thin translation of HTTP and websocket routes onto the job service."""
