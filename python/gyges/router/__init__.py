"""HTTP router for multi-host Gyges deployments (``python -m gyges.router``).

Modules: ``policy`` (pure placement functions), ``need`` (token-need estimate), ``status``
(worker /gyges/status and the aggregate), ``workers`` (registry, health checks), ``proxy``
(forwarding and retries), ``app`` (aiohttp application), ``__main__`` (CLI).
"""
