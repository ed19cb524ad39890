"""Sampler throughput against the physical limit and against gymnasium's AsyncVectorEnv.

These rates are measured in one run, on the same environments:

* the sampler's env steps/s (a 64-64 MLP Gaussian or categorical policy, episodes to the horizon);
* the raw single-process env rate: one environment stepped with pre-drawn random actions;
* for a multi-process backend, the sampler's own worker code run in as many plain processes side
  by side, with no messages and no calling process (what the backend's communication costs);
* a hand-written baseline: ``gymnasium.vector.AsyncVectorEnv`` over as many environments as the
  sampler runs, with one batched torch policy forward per step in the calling process.

``efficiency = steps_per_s / (raw_steps_per_s * min(num_workers, cores))``: 1.0 is the physical
limit of perfectly parallel stepping with zero policy and communication cost.

Run ``python -m experiments.bench.sampler --env halfcheetah-vel --backend process --workers 2``; the
last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from functools import partial
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from envs.base import Task, TaskDistribution
from metarl.policies import make_policy
from metarl.rollout import make_sampler
from metarl.rollout.worker import EpisodeSpec, RolloutWorker


def _make_distribution(env_name: str) -> TaskDistribution:
    import envs

    return envs.make(env_name)


def _random_actions(space: gym.Space, num: int, rng: np.random.Generator) -> list[Any]:
    if isinstance(space, gym.spaces.Discrete):
        return [int(a) for a in rng.integers(space.start, space.start + space.n, num)]
    if not isinstance(space, gym.spaces.Box):
        raise TypeError(
            f"action space {space} is not supported; expected a Box or a Discrete space"
        )
    return list(rng.uniform(space.low, space.high, (num, *space.shape)).astype(space.dtype))


def raw_env_rate(
    distribution: TaskDistribution, task: Task, horizon: int, seconds: float, num_envs: int = 1
) -> float:
    """Env steps/s of ``num_envs`` environments stepped in turn in this process with pre-drawn
    random actions (one environment: the single-env rate; as many as a worker holds: the same
    stepping with that many environments' state competing for the caches).

    Episodes are reset at termination, truncation or the horizon, as the sampler does.
    """
    envs_ = [distribution.make_env(task) for _ in range(num_envs)]
    actions = _random_actions(distribution.action_space, 4096, np.random.default_rng(0))
    for i, env in enumerate(envs_):
        env.reset(seed=i)
    t = [0] * num_envs
    steps, episode = 0, num_envs
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(max(1, 256 // num_envs)):
            for i, env in enumerate(envs_):
                _, _, terminated, truncated, _ = env.step(actions[steps % len(actions)])
                steps, t[i] = steps + 1, t[i] + 1
                if terminated or truncated or t[i] >= horizon:
                    episode += 1
                    env.reset(seed=episode)
                    t[i] = 0
    elapsed = time.perf_counter() - start
    for env in envs_:
        env.close()
    return steps / elapsed


def _raw_rate_child(
    distribution: TaskDistribution,
    task: Task,
    horizon: int,
    seconds: float,
    num_envs: int,
    barrier: Any,
    results: Any,
) -> None:
    barrier.wait()
    results.put(raw_env_rate(distribution, task, horizon, seconds, num_envs))


def raw_parallel_rate(
    distribution: TaskDistribution,
    task: Task,
    horizon: int,
    seconds: float,
    num_envs: int,
    num_processes: int,
) -> float:
    """Summed env steps/s of ``num_processes`` processes each running :func:`raw_env_rate` over
    ``num_envs`` environments at the same time (started together at a barrier): what parallel
    stepping with no policy and no communication reaches on this machine's cores together."""
    rates = _side_by_side(
        _raw_rate_child,
        [(distribution, task, horizon, seconds, num_envs)] * num_processes,
    )
    return float(sum(rates))


def _side_by_side(target: Any, arguments: list[tuple]) -> list[Any]:
    """Runs ``target(*args, barrier, results)`` for each ``args`` in its own spawned process,
    all released together at a barrier; returns what each put on ``results``."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(len(arguments)), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, results)) for args in arguments]
    for p in procs:
        p.start()
    out = [results.get() for _ in procs]
    for p in procs:
        p.join()
    return out


def _worker_rate_child(
    distribution: TaskDistribution,
    task: Task,
    horizon: int,
    seconds: float,
    num_envs: int,
    policy: Any,
    params: dict,
    barrier: Any,
    results: Any,
) -> None:
    torch.set_num_threads(1)  # as a process worker
    worker = RolloutWorker(distribution, max_envs=num_envs)
    episodes = [EpisodeSpec(task, 0, e, 0, 0, 0) for e in range(num_envs)]
    worker.run(policy, [params], episodes, horizon)  # builds the environments
    barrier.wait()
    steps, start, call = 0.0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        call += 1
        episodes = [EpisodeSpec(task, 0, e, 0, 0, call) for e in range(num_envs)]
        steps += float(worker.run(policy, [params], episodes, horizon)["mask"].sum())
    results.put((steps, time.perf_counter() - start))
    worker.close()


def worker_parallel_rate(
    distribution: TaskDistribution,
    tasks: list[Task],
    horizon: int,
    seconds: float,
    num_envs: int,
    policy: Any,
    params: dict,
) -> float:
    """Summed env steps/s of one plain process per task in ``tasks``, each running the sampler's
    own worker code (:class:`~metarl.rollout.worker.RolloutWorker`, ``num_envs`` episodes of its
    task per call) at the same time: every per-step cost of sampling, with no messages between
    processes and no calling process. The process backend against it is the backend's own cost."""
    counts = _side_by_side(
        _worker_rate_child,
        [(distribution, t, horizon, seconds, num_envs, policy, params) for t in tasks],
    )
    return float(sum(steps / elapsed for steps, elapsed in counts))


def gym_async_rate(
    distribution: TaskDistribution, tasks: list[Task], policy: Any, params: dict, seconds: float
) -> float:
    """Env steps/s of ``AsyncVectorEnv`` over one env per task in ``tasks``, one policy forward per step."""
    vec = gym.vector.AsyncVectorEnv([partial(distribution.make_env, t) for t in tasks])
    space = distribution.action_space
    rng = np.random.default_rng(0)
    obs, _ = vec.reset(seed=0)
    steps = 0
    try:
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            noise = policy.sample_noise(rng, len(tasks))
            with torch.no_grad():
                actions, _ = policy.act(
                    params,
                    torch.as_tensor(obs, dtype=torch.float32).reshape(len(tasks), -1),
                    torch.from_numpy(noise),
                )
            actions = actions.numpy()
            if isinstance(space, gym.spaces.Box):
                actions = np.clip(actions, space.low, space.high)
            elif isinstance(space, gym.spaces.Discrete):
                actions = actions + space.start
            obs, *_ = vec.step(actions)
            steps += len(tasks)
        elapsed = time.perf_counter() - start
    finally:
        vec.close()
    return steps / elapsed


def sampler_rate(
    distribution: TaskDistribution,
    backend: str,
    num_workers: int,
    envs_per_worker: int,
    horizon: int,
    seconds: float,
    policy: Any,
    params: dict,
) -> tuple[float, float]:
    """Env steps/s of the sampler (``num_workers`` tasks, ``envs_per_worker`` episodes each, per
    call) and the calling process's CPU seconds per wall second over the same calls."""
    tasks = distribution.sample(num_workers, np.random.default_rng(0))
    with make_sampler(
        distribution,
        backend,
        num_workers=num_workers,
        envs_per_worker=envs_per_worker,
        horizon=horizon,
    ) as sampler:
        sampler.sample(policy, params, tasks, envs_per_worker)  # builds the environments
        steps = 0.0
        start, cpu_start = time.perf_counter(), time.process_time()
        while time.perf_counter() - start < seconds:
            steps += float(sampler.sample(policy, params, tasks, envs_per_worker).mask.sum())
        wall = time.perf_counter() - start
        return steps / wall, (time.process_time() - cpu_start) / wall


def bench_sampler(
    env_name: str,
    backend: str = "process",
    num_workers: int = 2,
    seconds: float = 10.0,
    envs_per_worker: int = 32,
    horizon: int | None = None,
    distribution: TaskDistribution | None = None,
    with_baseline: bool = True,
    baseline_max_envs: int = 16,
) -> dict[str, Any]:
    """Measures the sampler, the raw env rate and the AsyncVectorEnv baseline in one run.

    Args:
        env_name: registered family (``envs.make``); ignored when ``distribution`` is given.
        backend: ``"serial"``, ``"process"`` or ``"ray"``.
        num_workers: sampler workers.
        seconds: measuring time of the sampler and of the baseline (the raw rate gets half).
        envs_per_worker: environments (episodes) per worker per call.
        horizon: episode length; ``None`` uses the family's horizon.
        distribution: a ready distribution instead of ``envs.make(env_name)``.
        with_baseline: also measure the AsyncVectorEnv baseline.
        baseline_max_envs: cap on the baseline's environments (one process each), so that it is
            not swamped by hundreds of processes on a small machine.

    Returns:
        ``steps_per_s``, ``raw_steps_per_s``, ``efficiency``, ``gym_async_steps_per_s``,
        ``speedup_vs_gym_async`` and the settings used.
    """
    dist = distribution if distribution is not None else _make_distribution(env_name)
    horizon = int(horizon or dist.horizon)
    policy = make_policy(dist.observation_space, dist.action_space, hidden_sizes=(64, 64))
    params = policy.init_params(0)
    cores = len(os.sched_getaffinity(0))
    task = dist.sample(1, np.random.default_rng(1))[0]
    raw = raw_env_rate(dist, task, horizon, seconds / 2)
    raw_many = raw_env_rate(dist, task, horizon, seconds / 2, num_envs=envs_per_worker)
    parallel = min(num_workers, cores)
    raw_parallel = (
        raw_many
        if parallel == 1
        else raw_parallel_rate(dist, task, horizon, seconds / 2, envs_per_worker, parallel)
    )
    rate, parent_cpu = sampler_rate(
        dist, backend, num_workers, envs_per_worker, horizon, seconds, policy, params
    )
    if backend != "serial" and parallel > 1:
        tasks = dist.sample(num_workers, np.random.default_rng(0))[:parallel]  # the sampler's tasks
        worker_parallel = worker_parallel_rate(
            dist, tasks, horizon, seconds / 2, envs_per_worker, policy, params
        )
    result: dict[str, Any] = {
        "env": env_name if distribution is None else dist.name,
        "backend": backend,
        "num_workers": num_workers,
        "envs_per_worker": envs_per_worker,
        "horizon": horizon,
        "cores": cores,
        "steps_per_s": rate,
        "raw_steps_per_s": raw,
        "efficiency": rate / (raw * min(num_workers, cores)),
        "raw_many_steps_per_s": raw_many,
        "efficiency_vs_many": rate / (raw_many * min(num_workers, cores)),
        "raw_parallel_steps_per_s": raw_parallel,
        "efficiency_vs_parallel": rate / raw_parallel,
        "parent_cpu_share": parent_cpu,
    }
    if backend != "serial" and parallel > 1:
        result["worker_parallel_steps_per_s"] = worker_parallel
        result["efficiency_vs_workers"] = rate / worker_parallel
    if with_baseline:
        num_envs = min(num_workers * envs_per_worker, baseline_max_envs)
        baseline = gym_async_rate(
            dist, dist.sample(num_envs, np.random.default_rng(2)), policy, params, seconds
        )
        result.update(
            gym_async_num_envs=num_envs,
            gym_async_steps_per_s=baseline,
            speedup_vs_gym_async=rate / baseline,
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="halfcheetah-vel")
    parser.add_argument("--backend", default="process", choices=["serial", "process", "ray"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--envs-per-worker", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--horizon", type=int, default=None)
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args(argv)
    result = bench_sampler(
        args.env,
        args.backend,
        args.workers,
        args.seconds,
        args.envs_per_worker,
        args.horizon,
        with_baseline=not args.no_baseline,
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
