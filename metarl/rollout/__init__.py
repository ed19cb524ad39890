"""Vectorised rollout workers: ``make_sampler(distribution, backend=...)`` and its backends.

Example::

    policy = make_policy(dist.observation_space, dist.action_space)
    with make_sampler(dist, backend="process", num_workers=2) as sampler:
        trajectories = sampler.sample(policy, params, tasks, episodes_per_task=20)

Backends: ``"serial"`` (in process), ``"process"`` (persistent worker processes) and ``"ray"``
(Ray actors; needs the ``ray`` extra). All three return identical trajectories for one seed.
"""

from __future__ import annotations

from envs.base import TaskDistribution
from metarl.rollout.sampler import Backend, Sampler, WorkerError
from metarl.rollout.worker import EpisodeError, EpisodeSpec, RolloutWorker

__all__ = ["Sampler", "WorkerError", "EpisodeError", "EpisodeSpec", "RolloutWorker", "make_sampler"]

_BACKENDS = ("serial", "process", "ray")
_ON_FAILURE = ("raise", "restart")


def _check_args(
    backend: str, num_workers: int, envs_per_worker: int | None, timeout_s: float, on_failure: str
) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; use one of {_BACKENDS}")
    if num_workers < 1:
        raise ValueError(f"num_workers={num_workers} must be at least 1")
    if envs_per_worker is not None and envs_per_worker < 1:
        raise ValueError(
            f"envs_per_worker={envs_per_worker} must be at least 1, or None for one env per episode"
        )
    if not timeout_s > 0:
        raise ValueError(
            f"timeout_s={timeout_s} must be positive (seconds a worker may go without finishing an episode)"
        )
    if on_failure not in _ON_FAILURE:
        raise ValueError(f"on_failure={on_failure!r} is unknown; use one of {_ON_FAILURE}")


def make_sampler(
    distribution: TaskDistribution,
    backend: str = "serial",
    num_workers: int = 1,
    envs_per_worker: int | None = None,
    horizon: int | None = None,
    seed: int = 0,
    timeout_s: float = 900.0,
    on_failure: str = "raise",
    address: str | None = None,
    start_method: str = "forkserver",
) -> Sampler:
    """Builds a sampler; use it as a context manager or call ``close()``.

    Args:
        distribution: the task family whose environments the workers build (picklable for the
            ``process`` and ``ray`` backends).
        backend: ``"serial"``, ``"process"`` or ``"ray"``.
        num_workers: worker processes or actors (ignored by ``serial``).
        envs_per_worker: environments each worker keeps; ``None`` keeps one per episode of its share.
        horizon: steps per episode ``T``; ``None`` uses ``distribution.horizon``.
        seed: root of every episode's seed.
        timeout_s: ``process``: the longest a worker may go without finishing an episode (the
            first call's environment building included); ``ray``: the longest an actor may take
            for its share of one call. Past it the worker is killed and reported.
        on_failure: ``"raise"`` a :class:`WorkerError`, or ``"restart"`` the worker and re-collect
            its share (the same seeds give the same episodes).
        address: Ray cluster address (``ray`` backend only); ``None`` starts Ray locally.
        start_method: ``"forkserver"`` or ``"spawn"`` (``process`` backend only).

    Returns:
        A :class:`Sampler`.
    """
    _check_args(backend, num_workers, envs_per_worker, timeout_s, on_failure)
    impl: Backend
    if backend == "serial":
        from metarl.rollout.serial import SerialBackend

        impl = SerialBackend(distribution, envs_per_worker)
    elif backend == "process":
        from metarl.rollout.process import ProcessBackend

        impl = ProcessBackend(
            distribution, num_workers, envs_per_worker, timeout_s, on_failure, start_method
        )
    else:
        try:
            from metarl.rollout.ray_backend import RayBackend
        except ImportError as exc:
            raise ImportError(
                "backend='ray' needs Ray; install it with pip install 'metarl[ray]' (or 'ray>=2.9')"
            ) from exc
        impl = RayBackend(
            distribution, num_workers, envs_per_worker, timeout_s, on_failure, address
        )
    return Sampler(distribution, impl, horizon, seed)
