"""Backends: the job database and the event log with publish/subscribe.

``contract`` says what a backend does; ``memory`` is the embedded default (one
process), ``redis`` is for production. ``hub`` fans events out to this process's
watchers and ``follow`` turns any backend into the stream every watcher reads.
"""
