# Over 400 lines: one backend contract tested on the serial, process and Ray samplers with shared fixtures; the cases are listed once and run on each.
"""The sampler on toy task families whose trajectories are known in advance.

The toy environment is a 1-D point ``x += 0.1 * a`` whose task fixes when it terminates,
truncates, reports success, raises or hangs, so masks, success flags and failures can be checked
against the task itself rather than against earlier output of the sampler.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from envs.base import Task, TaskDistribution
from metarl.policies import make_policy
from metarl.rollout import WorkerError, make_sampler
from metarl.types import Trajectories

HORIZON = 12


def toy_task(goal: float = 0.0, **overrides: int) -> Task:
    """A toy task; ``length``/``truncate`` end the episode after that many steps (-1: never),
    ``success_at`` reports success 1.0 only at that step (-1: reports 0 always, -2: no report),
    ``fail_at``/``hang_at`` raise or hang at that step (-1: never)."""
    params = dict(length=-1, truncate=-1, success_at=-2, fail_at=-1, hang_at=-1)
    params.update(overrides)
    return Task.make("toy", goal=goal, **params)


class ToyEnv(gym.Env):
    def __init__(self, task: Task, discrete: bool, delay_s: float, marker: str = "") -> None:
        self.task = task
        self.delay_s = delay_s
        self.marker = marker  # touched as MARKER.PID at every step: "this worker is stepping"
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
        if discrete:
            self.action_space = gym.spaces.Discrete(3, start=-1)
        else:
            self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def _obs(self) -> np.ndarray:
        return np.array([self.x, self.task["goal"], self.t], dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x = float(self.np_random.uniform(-1.0, 1.0))
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        task = self.task
        if self.t == task["fail_at"]:
            raise ValueError(f"toy failure at step {self.t}")
        if self.t == task["hang_at"]:
            time.sleep(3600)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.marker:
            Path(f"{self.marker}.{os.getpid()}").touch()
        self.x += 0.1 * float(np.asarray(action).reshape(-1)[0])
        info = {} if task["success_at"] == -2 else {"success": float(self.t == task["success_at"])}
        self.t += 1
        terminated = self.t == task["length"]
        truncated = self.t == task["truncate"]
        return self._obs(), -abs(self.x - task["goal"]), terminated, truncated, info


class ToyDistribution(TaskDistribution):
    name = "toy"
    horizon = HORIZON
    observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)

    def __init__(self, discrete: bool = False, delay_s: float = 0.0, marker: str = "") -> None:
        self.discrete = discrete
        self.delay_s = delay_s
        self.marker = marker
        self.action_space = ToyEnv(toy_task(), discrete, 0.0).action_space

    def sample(self, n: int, rng: np.random.Generator) -> list[Task]:
        return [toy_task(float(g)) for g in rng.uniform(-1.0, 1.0, n)]

    def make_env(self, task: Task) -> gym.Env:
        return ToyEnv(task, self.discrete, self.delay_s, self.marker)

    def set_task(self, env: gym.Env, task: Task) -> None:
        env.unwrapped.task = task


def _policy_and_params(dist: TaskDistribution, seed: int = 0):
    policy = make_policy(dist.observation_space, dist.action_space, hidden_sizes=(8, 8))
    return policy, policy.init_params(seed)


def _assert_same(a: Trajectories, b: Trajectories) -> None:
    for name, x, y in zip(Trajectories._fields, a, b, strict=True):
        assert torch.equal(x.nan_to_num(-9.0), y.nan_to_num(-9.0)), f"field {name} differs"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _kill_when_stepping(pid: int, marker: str, timeout_s: float = 300.0) -> threading.Thread:
    """SIGKILLs worker ``pid`` as soon as it steps an env of the next sampler call (its marker
    file appears), from a thread: an event, not a guessed delay, so a busy machine cannot make
    the kill land after the call has ended."""
    path = Path(f"{marker}.{pid}")
    path.unlink(missing_ok=True)

    def kill() -> None:
        deadline = time.monotonic() + timeout_s
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


# ---------------------------------------------------------------- shapes, masks, success


def test_masks_follow_termination_and_truncation():
    dist = ToyDistribution()
    tasks = [
        toy_task(length=3),
        toy_task(length=HORIZON + 5),
        toy_task(truncate=5),
        toy_task(length=1),
    ]
    policy, params = _policy_and_params(dist)
    with make_sampler(dist, envs_per_worker=3) as sampler:
        traj = sampler.sample(policy, params, tasks, episodes_per_task=2)
    assert traj.obs.shape == (4, 2, HORIZON, 3) and traj.next_obs.shape == (4, 2, HORIZON, 3)
    assert traj.actions.shape == (4, 2, HORIZON, 1) and traj.rewards.shape == (4, 2, HORIZON)
    expected_lengths = torch.tensor([3, HORIZON, 5, 1]).float()[:, None].expand(4, 2)
    assert torch.equal(traj.mask.sum(-1), expected_lengths)
    assert torch.equal(
        traj.mask, (traj.obs[..., 2] < expected_lengths[..., None]).float() * traj.mask
    )
    assert torch.equal(
        traj.terminated.sum(-1), torch.tensor([1.0, 0.0, 0.0, 1.0])[:, None].expand(4, 2)
    )
    assert traj.terminated[0, :, 2].eq(1).all() and traj.terminated[3, :, 0].eq(1).all()
    dead = traj.mask == 0
    assert (
        traj.obs[dead].eq(0).all()
        and traj.rewards[dead].eq(0).all()
        and traj.log_probs[dead].eq(0).all()
    )
    # Steps recorded in order: the toy obs carries its own step counter.
    steps = torch.arange(HORIZON).float().expand(4, 2, HORIZON)
    assert torch.equal(traj.obs[..., 2] * traj.mask, steps * traj.mask)
    assert torch.equal(
        traj.next_obs[..., :-1, :][traj.mask[..., 1:] == 1],
        traj.obs[..., 1:, :][traj.mask[..., 1:] == 1],
    )
    assert not traj.obs.requires_grad and traj.obs.dtype == torch.float32


def test_fixed_horizon_rewards_log_probs_and_task_vectors():
    dist = ToyDistribution()
    tasks = dist.sample(3, np.random.default_rng(0))
    policy, params = _policy_and_params(dist)
    params = {k: v.requires_grad_() for k, v in params.items()}
    with make_sampler(dist, seed=3) as sampler:
        traj = sampler.sample(policy, params, tasks, episodes_per_task=4)
    assert traj.mask.eq(1).all()
    goals = torch.tensor([t["goal"] for t in tasks])[:, None, None]
    torch.testing.assert_close(traj.rewards, -(traj.next_obs[..., 0] - goals).abs())
    moved = traj.next_obs[..., 0] - traj.obs[..., 0]
    torch.testing.assert_close(moved, 0.1 * traj.actions[..., 0].clamp(-1, 1), atol=1e-6, rtol=0)
    recomputed = policy.log_prob(params, traj.obs, traj.actions)
    torch.testing.assert_close(traj.log_probs, recomputed.detach(), atol=1e-5, rtol=1e-5)
    assert not traj.log_probs.requires_grad
    assert torch.equal(traj.task, torch.from_numpy(np.stack([t.vector() for t in tasks])))
    assert traj.success.isnan().all()


def test_success_is_any_success_in_the_episode_and_nan_without_report():
    dist = ToyDistribution()
    tasks = [
        toy_task(success_at=2),
        toy_task(success_at=-1),
        toy_task(),
        toy_task(success_at=6, length=4),
    ]
    policy, params = _policy_and_params(dist)
    with make_sampler(dist) as sampler:
        success = sampler.sample(policy, params, tasks, episodes_per_task=2).success
    assert success.shape == (4, 2)
    assert success[0].eq(1).all() and success[1].eq(0).all() and success[3].eq(0).all()
    assert success[2].isnan().all()


def test_discrete_actions_reach_the_env_with_the_space_offset():
    dist = ToyDistribution(discrete=True)
    policy, params = _policy_and_params(dist)
    with make_sampler(dist) as sampler:
        traj = sampler.sample(policy, params, [toy_task(length=5), toy_task()], episodes_per_task=3)
    assert traj.actions.shape == (2, 3, HORIZON) and traj.actions.dtype == torch.int64
    assert set(traj.actions[traj.mask == 1].tolist()) <= {0, 1, 2}
    moved = traj.next_obs[..., 0] - traj.obs[..., 0]
    torch.testing.assert_close(
        moved * traj.mask, 0.1 * (traj.actions - 1).float() * traj.mask, atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        traj.log_probs, policy.log_prob(params, traj.obs, traj.actions) * traj.mask
    )


class _ThreadCountingDistribution(ToyDistribution):
    """Records torch's intra-op thread count at every env step."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[int] = set()

    def make_env(self, task: Task) -> gym.Env:
        env = super().make_env(task)
        step, seen = env.step, self.seen

        def counting_step(action):
            seen.add(torch.get_num_threads())
            return step(action)

        env.step = counting_step
        return env


def test_serial_sampling_runs_on_one_thread_and_restores_the_setting():
    dist = _ThreadCountingDistribution()
    policy, params = _policy_and_params(dist)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with make_sampler(dist) as sampler:
            sampler.sample(policy, params, [toy_task(length=3)], episodes_per_task=2)
        assert dist.seen == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _constant_action_params(policy, value: float):
    """Parameters whose action is ``value`` whatever the observation (noise scaled to nothing)."""
    params = {k: torch.zeros_like(v) for k, v in policy.init_params(0).items()}
    params["out.bias"] = torch.full_like(params["out.bias"], value)
    params["log_std"] = torch.full_like(params["log_std"], -40.0)
    return params


@pytest.mark.parametrize("backend", ["serial", "process"])
def test_per_task_params_are_honoured(backend):
    dist = ToyDistribution()
    policy, _ = _policy_and_params(dist)
    values = [0.5, -0.25, 0.75, 0.5]
    params = [_constant_action_params(policy, v) for v in values]
    tasks = dist.sample(4, np.random.default_rng(1))
    with make_sampler(dist, backend=backend, num_workers=2, envs_per_worker=2) as sampler:
        traj = sampler.sample(policy, params, tasks, episodes_per_task=3)
    for i, value in enumerate(values):
        torch.testing.assert_close(traj.actions[i], torch.full((3, HORIZON, 1), value))
        torch.testing.assert_close(
            traj.next_obs[i, ..., 0] - traj.obs[i, ..., 0], torch.full((3, HORIZON), 0.1 * value)
        )
    with pytest.raises(ValueError, match="3 parameter dicts for 4 tasks"):
        make_sampler(dist).sample(policy, params[:3], tasks, 1)


# ---------------------------------------------------------------- determinism across backends


def _mixed_tasks() -> list[Task]:
    return [
        toy_task(0.3, length=4),
        toy_task(-0.2),
        toy_task(0.8, truncate=7, success_at=3),
        toy_task(0.1, length=9),
    ]


def test_serial_and_process_identical_for_any_worker_layout():
    dist = ToyDistribution()
    policy, params = _policy_and_params(dist)
    other = {k: v * 0.5 for k, v in params.items()}
    per_task = [params, other, params, other]
    tasks = _mixed_tasks()
    with make_sampler(dist, seed=11) as serial:
        expected = [serial.sample(policy, per_task, tasks, 5) for _ in range(2)]
    for num_workers, envs_per_worker in [(1, 3), (2, None), (3, 2)]:
        with make_sampler(
            dist, "process", num_workers=num_workers, envs_per_worker=envs_per_worker, seed=11
        ) as sampler:
            for want in expected:
                _assert_same(sampler.sample(policy, per_task, tasks, 5), want)
    assert not torch.equal(expected[0].obs, expected[1].obs), "each call must draw fresh seeds"


def test_state_dict_resumes_the_random_stream():
    dist = ToyDistribution()
    policy, params = _policy_and_params(dist)
    tasks = dist.sample(2, np.random.default_rng(2))
    with make_sampler(dist, seed=5) as first:
        first.sample(policy, params, tasks, 2)
        state = first.state_dict()
        wanted = first.sample(policy, params, tasks, 2)
    with make_sampler(dist, seed=5) as resumed:
        resumed.load_state_dict(state)
        _assert_same(resumed.sample(policy, params, tasks, 2), wanted)
    with pytest.raises(ValueError, match="seed=5"):
        make_sampler(dist, seed=6).load_state_dict(state)


# ---------------------------------------------------------------- faults and process hygiene


def test_killed_worker_raises_worker_error_then_sampler_recovers(tmp_path):
    dist = ToyDistribution(delay_s=0.004, marker=str(tmp_path / "stepping"))
    policy, params = _policy_and_params(dist)
    tasks = _mixed_tasks()
    with make_sampler(dist, "process", num_workers=2, envs_per_worker=2, timeout_s=20) as sampler:
        sampler.sample(policy, params, tasks, 1)
        victim = sampler.backend.pids[1]
        timer = _kill_when_stepping(victim, dist.marker)
        start = time.monotonic()
        with pytest.raises(WorkerError, match="worker 1 .*tasks \\[2, 3\\].*SIGKILL") as info:
            sampler.sample(policy, params, tasks, 6)
        timer.join()
        assert time.monotonic() - start < 20 and info.value.worker == 1
        assert not _alive(victim)
        recovered = sampler.sample(policy, params, tasks, 2)
    with make_sampler(ToyDistribution()) as serial:
        serial.load_state_dict({"seed": 0, "num_calls": 2})
        _assert_same(recovered, serial.sample(policy, params, tasks, 2))


def test_restart_recollects_the_killed_workers_share(tmp_path):
    policy, params = _policy_and_params(ToyDistribution())
    tasks = _mixed_tasks()
    with make_sampler(ToyDistribution(), seed=7) as serial:
        serial.sample(policy, params, tasks, 1)
        expected = serial.sample(policy, params, tasks, 6)
    slow = ToyDistribution(delay_s=0.004, marker=str(tmp_path / "stepping"))
    with make_sampler(
        slow, "process", num_workers=2, envs_per_worker=2, seed=7, on_failure="restart"
    ) as sampler:
        sampler.sample(policy, params, tasks, 1)
        victim = sampler.backend.pids[0]
        timer = _kill_when_stepping(victim, slow.marker)
        traj = sampler.sample(policy, params, tasks, 6)
        timer.join()
        assert sampler.backend.pids[0] != victim
    _assert_same(traj, expected)


def test_hung_worker_times_out_and_env_errors_name_the_task():
    dist = ToyDistribution()
    policy, params = _policy_and_params(dist)
    with make_sampler(dist, "process", num_workers=2, timeout_s=2.0) as sampler:
        start = time.monotonic()
        with pytest.raises(WorkerError, match="worker 1 .*tasks \\[1\\].*no episode finished within timeout_s=2"):
            sampler.sample(policy, params, [toy_task(), toy_task(hang_at=3)], 1)
        assert time.monotonic() - start < 30.0  # timeout_s bounds it, not the hang (a loose bound: busy CI)
        with pytest.raises(
            WorkerError,
            match="task 1 .*episode 0 \\(caused by ValueError: toy failure at step 2\\)",
        ):
            sampler.sample(policy, params, [toy_task(), toy_task(fail_at=2)], 1)
        assert sampler.sample(policy, params, [toy_task(), toy_task()], 1).mask.eq(1).all()
        pids = sampler.backend.pids
    assert not any(_alive(pid) for pid in pids)


def test_timeout_bounds_a_workers_silence_not_its_share():
    # Each worker's share, 40 episodes one after another at 0.12 s each (sleeps: at least 4.8 s
    # whatever the machine), runs past timeout_s=2; it completes because episodes keep ending.
    dist = ToyDistribution(delay_s=0.01)
    policy, params = _policy_and_params(dist)
    tasks = [toy_task(0.3), toy_task(-0.4)]
    with make_sampler(dist, "process", num_workers=2, envs_per_worker=1, timeout_s=2.0, seed=3) as sampler:
        start = time.monotonic()
        traj = sampler.sample(policy, params, tasks, 40)
        assert time.monotonic() - start > 4.8
    with make_sampler(ToyDistribution(), seed=3) as serial:
        _assert_same(traj, serial.sample(policy, params, tasks, 40))


def test_no_child_survives_close_or_interpreter_exit(tmp_path: Path):
    dist = ToyDistribution()
    policy, params = _policy_and_params(dist)
    sampler = make_sampler(dist, "process", num_workers=2)
    sampler.sample(policy, params, [toy_task()], 2)
    pids = sampler.backend.pids
    assert all(_alive(pid) for pid in pids)
    sampler.close()
    sampler.close()
    assert not any(_alive(pid) for pid in pids)
    assert not any(p.pid in pids for p in __import__("multiprocessing").active_children())

    script = tmp_path / "leave_open.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_rollout import ToyDistribution, toy_task, _policy_and_params\n"
        "from metarl.rollout import make_sampler\n"
        "if __name__ == '__main__':\n"
        "    dist = ToyDistribution()\n"
        "    policy, params = _policy_and_params(dist)\n"
        "    sampler = make_sampler(dist, 'process', num_workers=2)\n"
        "    sampler.sample(policy, params, [toy_task()], 2)\n"
        "    print(*sampler.backend.pids)\n"
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True
    )
    orphans = [int(p) for p in out.stdout.split()]
    assert len(orphans) == 2
    deadline = time.monotonic() + 120  # PDEATHSIG ends them at once; this only bounds a failure
    while any(_alive(p) for p in orphans) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in orphans)


def test_bad_arguments_fail_early_with_the_value():
    dist = ToyDistribution()
    with pytest.raises(ValueError, match="backend='threads'"):
        make_sampler(dist, backend="threads")
    with pytest.raises(ValueError, match="on_failure='retry'"):
        make_sampler(dist, on_failure="retry")
    with pytest.raises(ValueError, match="num_workers=0"):
        make_sampler(dist, "process", num_workers=0)
    policy = make_policy(gym.spaces.Box(-1, 1, (5,)), dist.action_space)
    with pytest.raises(ValueError, match="obs_dim=5"):
        make_sampler(dist).sample(policy, policy.init_params(0), [toy_task()], 1)


# ---------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_runtime():
    ray = pytest.importorskip(
        "ray", reason="Ray is not installed; pip install 'metarl[ray]' to run the Ray backend tests"
    )
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        configure_logging=False,
        runtime_env={
            "env_vars": {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
        },
    )
    yield ray
    ray.shutdown()


def test_ray_matches_serial_and_survives_a_killed_actor(ray_runtime, tmp_path):
    dist = ToyDistribution(delay_s=0.004, marker=str(tmp_path / "stepping"))
    policy, params = _policy_and_params(dist)
    tasks = _mixed_tasks()
    with make_sampler(ToyDistribution(), seed=4) as serial:
        expected = [serial.sample(policy, params, tasks, k) for k in (2, 6, 6, 6)]
    with make_sampler(
        dist, "ray", num_workers=2, envs_per_worker=2, seed=4, timeout_s=30
    ) as sampler:
        _assert_same(sampler.sample(policy, params, tasks, 2), expected[0])
        victim = sampler.backend.pids[1]
        timer = _kill_when_stepping(victim, dist.marker)
        with pytest.raises(WorkerError, match="worker 1 .*tasks \\[2, 3\\]"):
            sampler.sample(policy, params, tasks, 6)
        timer.join()
        _assert_same(sampler.sample(policy, params, tasks, 6), expected[2])
        sampler.backend.on_failure = "restart"
        victim = sampler.backend.pids[0]
        timer = _kill_when_stepping(victim, dist.marker)
        _assert_same(sampler.sample(policy, params, tasks, 6), expected[3])
        timer.join()


def test_worker_error_survives_pickling():
    import pickle

    from metarl.rollout.sampler import WorkerError

    error = pickle.loads(pickle.dumps(WorkerError(1, [0, 2], "exit code -9")))
    assert (error.worker, error.tasks, error.cause) == (1, [0, 2], "exit code -9")
    assert "rollout worker 1 failed while collecting tasks [0, 2]: exit code -9" in str(error)
