"""Where actors live: Ray (the default) or this process (`--local`, for debugging and fast tests).

Both backends offer the same four verbs — `actor`, `call`, `wait`, `get` — so the meta-iteration
(metarl.distributed.iteration, driven by the run loop in metarl.distributed.run) is written once. With Ray, calls return ObjectRefs that are handed to other calls
without passing through the driver (theta and theta' travel by reference); locally, calls run
at once and return their values wrapped the same way.

A call names its method by the method itself, `backend.call(worker, TaskWorker.adapt, ...)`, not by
a string: a misspelt method fails where it is written (and in tests/test_rules.py, which checks
every call site), never as a task dropped at run time. The actor answers with its own method of
that name, so subclasses (the bench's actors) keep their overrides.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable


def method_name(method: Callable[..., Any]) -> str:
    """The name an actor call goes by, read off the method itself (TaskWorker.adapt -> 'adapt')."""
    if isinstance(method, str) or not callable(method):
        raise TypeError(f"backend.call takes the actor's method itself (e.g. TaskWorker.adapt), not {method!r}")
    return method.__name__


@dataclass
class LocalRef:
    value: Any = None
    error: BaseException | None = None


class LocalBackend:
    """Runs every actor in this process, every call immediately."""

    name = "local"

    def actor(self, cls: type, *args: Any, num_cpus: float = 0, num_gpus: float = 0, restarts: int = 0,
              name: str | None = None, kwargs: dict[str, Any] | None = None) -> Any:
        return cls(*args, **(kwargs or {}))

    @staticmethod
    def _resolve(x: Any) -> Any:
        if isinstance(x, LocalRef):
            if x.error is not None:
                raise x.error
            return x.value
        return x

    def call(self, actor: Any, method: Callable[..., Any], *args: Any, num_returns: int = 1) -> Any:
        bound = getattr(actor, method_name(method))  # an actor without it fails here, as with Ray
        try:
            out = bound(*(self._resolve(a) for a in args))
        except Exception as e:  # the error surfaces where the result is read, as with Ray
            err = e
            return LocalRef(error=err) if num_returns == 1 else tuple(LocalRef(error=err) for _ in range(num_returns))
        if num_returns == 1:
            return LocalRef(out)
        return tuple(LocalRef(v) for v in out)

    def put(self, x: Any) -> LocalRef:
        return LocalRef(x)

    def wait(self, refs: list[Any], timeout: float | None) -> tuple[list[Any], list[Any]]:
        return list(refs), []

    def get(self, ref: Any, timeout: float | None = None) -> Any:
        return [self._resolve(r) for r in ref] if isinstance(ref, list) else self._resolve(ref)

    def kill(self, actor: Any) -> None:
        pass

    def node_cpus(self) -> list[float]:
        return [float(os.cpu_count() or 1)]

    def node_memory(self) -> list[float]:
        return [float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))]

    def shutdown(self) -> None:
        pass


class RayBackend:
    """Ray actors with restart enabled; fractional CPUs and GPUs as the config asks."""

    name = "ray"

    def __init__(self, address: str = "", num_cpus: int = 0):
        import ray

        self.ray = ray
        address = address or os.environ.get("RAY_ADDRESS", "")
        self.attached = bool(address)
        if ray.is_initialized():
            self.owns_ray = False
        elif address:
            ray.init(address=address, log_to_driver=True)
            self.owns_ray = False
        else:
            # a local Ray binds to loopback only: node address and dashboard (when enabled)
            ray.init(address="local", num_cpus=num_cpus or None, include_dashboard=False, dashboard_host="127.0.0.1",
                     _node_ip_address="127.0.0.1",
                     log_to_driver=True, configure_logging=True, logging_level="WARNING")
            self.owns_ray = True

    def resources(self) -> dict[str, float]:
        return dict(self.ray.cluster_resources())

    def node_cpus(self) -> list[float]:
        return [n["Resources"].get("CPU", 0.0) for n in self.ray.nodes() if n["Alive"]]

    def node_memory(self) -> list[float]:
        """Bytes of memory Ray may hand to tasks and actors, node by node."""
        return [n["Resources"].get("memory", 0.0) for n in self.ray.nodes() if n["Alive"]]

    def actor(self, cls: type, *args: Any, num_cpus: float = 0, num_gpus: float = 0, restarts: int = 0,
              name: str | None = None, kwargs: dict[str, Any] | None = None) -> Any:
        remote_cls = self.ray.remote(cls)
        opts: dict[str, Any] = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=restarts, max_task_retries=0)
        if name:
            opts["name"] = name
        return remote_cls.options(**opts).remote(*args, **(kwargs or {}))

    def call(self, actor: Any, method: Callable[..., Any], *args: Any, num_returns: int = 1) -> Any:
        return getattr(actor, method_name(method)).options(num_returns=num_returns).remote(*args)

    def put(self, x: Any) -> Any:
        return self.ray.put(x)

    def wait(self, refs: list[Any], timeout: float | None) -> tuple[list[Any], list[Any]]:
        if not refs:
            return [], []
        return self.ray.wait(list(refs), num_returns=len(refs), timeout=timeout)

    def get(self, ref: Any, timeout: float | None = None) -> Any:
        return self.ray.get(ref, timeout=timeout)

    def kill(self, actor: Any) -> None:
        """Kill a hung actor; Ray restarts it (max_restarts) for the next iteration."""
        self.ray.kill(actor, no_restart=False)

    def shutdown(self) -> None:
        if self.owns_ray:
            self.ray.shutdown()
