"""Connecting to Ray: join a cluster when an address is given, else start a local instance."""

from __future__ import annotations

import logging
import os
import socket

import ray

from ribfrac_ray.config import RayConfig

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# Ray 2.60 on Linux gives a local instance the machine's IP address and binds its
# GCS, raylet and worker servers to all interfaces. With this variable at "0"
# (Ray's default on macOS and Windows, where it means "no multi-node clusters")
# Ray uses 127.0.0.1 as the node address, and those servers bind there.
LOOPBACK_ONLY_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_ray(config: RayConfig, include_dashboard: bool = False) -> None:
    """Connect this process to Ray once; later calls reuse the connection.

    An address from the config or ``RAY_ADDRESS`` (as set inside ``ray job submit``)
    joins that cluster. Otherwise a local instance starts with ``num_cpus`` logical
    CPUs (0: all cores) and its dashboard on where ``include_dashboard`` or
    ``config.include_dashboard`` asks for it. Its
    node address is 127.0.0.1, so every server it starts binds there (see
    :func:`use_loopback_address`). The dashboard serves Ray's State API, which Ray
    Train needs to free a run's placement group when the run's process is killed,
    as Tune does to trials that it stops.
    """
    if ray.is_initialized():
        return

    address = config.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        logger.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return

    include_dashboard = include_dashboard or config.include_dashboard
    kwargs: dict = {"include_dashboard": include_dashboard, "dashboard_host": LOOPBACK, "log_to_driver": True}
    if include_dashboard:
        port = _free_port()
        kwargs["dashboard_port"] = port
        # Ray processes look the State API up through this variable; without it
        # they fail where several Ray instances run on one machine.
        kwargs["runtime_env"] = {"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://{LOOPBACK}:{port}"}}
    if config.num_cpus > 0:
        kwargs["num_cpus"] = config.num_cpus
    if config.object_store_mb > 0:
        kwargs["object_store_memory"] = config.object_store_mb * 1024 * 1024
    use_loopback_address()
    logger.info("starting a local Ray instance (%s)", {k: v for k, v in kwargs.items() if k != "log_to_driver"})
    ray.init(**kwargs)


def use_loopback_address() -> None:
    """Make Ray instances started from this process use 127.0.0.1 as their node address.

    Ray reads the variable when it is imported, so this also sets the constant that
    this process has already read. Processes that Ray starts inherit the variable.
    """
    from ray._private import ray_constants

    os.environ[LOOPBACK_ONLY_VARIABLE] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def current_node_id() -> str:
    """Return the Ray node id of this process, or "" outside a Ray worker or driver."""
    if not ray.is_initialized():
        return ""
    return ray.get_runtime_context().get_node_id()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]
