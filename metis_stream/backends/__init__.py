"""Backends: the job database and the event log with publish/subscribe.

``memory`` is the embedded default (one process); ``redis`` is for production.
"""
