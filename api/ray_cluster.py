"""The Ray cluster a job runs on: the ``ray=`` argument of `build_index`, `Index.dump`, `Index.find_label_noise`
and the CLI's ``--ray ADDRESS``, checked by name and connected here (the only module that starts or joins Ray).

Values:
- ``None``: no Ray; the job runs in this process.
- ``"local"``: start a Ray instance on this machine with its cores, bound to 127.0.0.1, without the dashboard; it
  is shut down when the job ends.
- ``"auto"``: join the running cluster, as Ray's own ``address="auto"`` (``RAY_ADDRESS`` or the local one).
- ``"HOST:PORT"`` or ``"ray://HOST:PORT"``: that cluster (the GCS address of ``ray start --head``, or a Ray
  client server).

When this process is already connected (``ray.init`` called by the caller, a test's cluster), that connection is
used whatever the value names, and left open. Ray is an optional extra: without it any value but None is refused
with how to install it.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import Any

RAY_INSTALL = "pip install '.[ray]'"
RAY_VALUES = "None, 'local', 'auto', 'HOST:PORT' or 'ray://HOST:PORT'"
_HOST_PORT = re.compile(r"^(ray://)?([A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})$")
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""Without it Ray resolves even 127.0.0.1 to the machine's own address; set for every local instance started."""


class RayNotInstalledError(ImportError):
    """``ray=`` was given but Ray is not installed (an optional extra)."""


def check_ray(ray: Any) -> str | None:
    """The ``ray=`` value, checked by name before anything is written.

    Raises:
        ValueError: Not one of None, "local", "auto", "HOST:PORT", "ray://HOST:PORT" (port 1..65535).
    """
    if ray is None or ray in ("local", "auto"):
        return ray
    if isinstance(ray, str):
        m = _HOST_PORT.match(ray.strip())
        if m and 1 <= int(m.group(3)) <= 65535:
            return ray.strip()
    raise ValueError(f"ray must be {RAY_VALUES}, got {ray!r}")


def import_ray() -> Any:
    """The ``ray`` module, or a clear error saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise RayNotInstalledError(
            f"ray=... needs Ray, an optional extra that is not installed here ({e}); install it with {RAY_INSTALL}"
        ) from None
    return ray


def start_local(num_cpus: int | None = None) -> Any:
    """Starts a Ray instance on this machine bound to 127.0.0.1 (no dashboard) with `num_cpus` CPUs (None: the
    machine's cores) and connects this process to it; returns the ``ray`` module."""
    ray = import_ray()
    os.environ.update(LOOPBACK_ENV)
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
    )
    return ray


@contextlib.contextmanager
def ray_session(ray: Any) -> Iterator[bool]:
    """Connects to the cluster ``ray`` names for the duration of a job; yields whether the job is distributed.

    A local instance this call starts (or a connection it opens) is shut down on exit; an existing connection of
    this process is used and left open.
    """
    address = check_ray(ray)
    if address is None:
        yield False
        return
    mod = import_ray()
    if mod.is_initialized():
        yield True
        return
    if address == "local":
        start_local()
    else:
        mod.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        yield True
    finally:
        mod.shutdown()


__all__ = ["RAY_INSTALL", "RayNotInstalledError", "check_ray", "import_ray", "ray_session", "start_local"]
