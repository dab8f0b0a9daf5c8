"""Developer sessions: `nox -s tests` (the suite), `lint`, `bench`, `bench_models`, `demo`."""

import os

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

# The pinned test environment (oracles, test tools, torch as the local CPU wheel): see constraints.txt.
CONSTRAINTS = ("-c", "constraints.txt")
# Shared 2-core machines: fixed thread counts keep timings and test runtimes stable.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "JAX_PLATFORMS": "cpu"}


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (slow checks deselected; pass `-- -m slow` to run them)."""
    session.install(*CONSTRAINTS, "-e", ".[test]")
    # Only for CLIP's real BPE vocabulary file (never imported); its deps would pull a torchvision
    # built for another torch, which breaks `import transformers`.
    session.install(*CONSTRAINTS, "--no-deps", "open_clip_torch")
    workers = os.environ.get("PYTEST_WORKERS", "2")
    session.run("pytest", "-n", workers, "-q", *session.posargs, env=THREAD_ENV)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint + format check."""
    session.install(*CONSTRAINTS, "ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def bench(session: nox.Session) -> None:
    """Scheduler step benchmark against diffusers (prints ratios; see benchmarks/RESULTS.md)."""
    session.install(*CONSTRAINTS, "-e", ".[test]")
    session.run("python", "benchmarks/scheduler_step.py", *session.posargs, env=THREAD_ENV)


@nox.session
def bench_models(session: nox.Session) -> None:
    """SD-1.5-config UNet forward and checkpoint load vs diffusers (slow: minutes; see benchmarks/RESULTS.md)."""
    session.install(*CONSTRAINTS, "-e", ".[test]")
    session.run("python", "benchmarks/models.py", *session.posargs, env=THREAD_ENV)


@nox.session
def demo(session: nox.Session) -> None:
    """The scheduler demo on numpy, torch and jax."""
    session.install(*CONSTRAINTS, "-e", ".[all]")
    session.run("python", "-m", "diffusion_core.demo", *session.posargs, env=THREAD_ENV)


@nox.session
def compat_oracle(session: nox.Session) -> None:
    """diffusion_core.flax.compat against diffusers 0.39, the last release with Flax (constraints-compat.txt).

    Its own environment: diffusers 0.39 with transformers 4.x (5.x dropped the Flax CLIP) and no torch;
    runs the tests marked ``compat_oracle`` (tests/flax_compat/test_oracle_039.py).
    """
    compat = ("-c", "constraints-compat.txt")
    session.install(*compat, "--no-deps", "-e", ".")
    session.install(*compat, "diffusers", "transformers", "jax", "jaxlib", "flax", "optax", "scipy", "numpy")
    session.install(*compat, "array-api-compat", "safetensors", "pillow", "tqdm", "msgpack", "pytest")
    # only for CLIP's BPE vocabulary file (tests/tokenizer_fixtures.py), never imported
    session.install(*compat, "--no-deps", "open_clip_torch")
    env = {**THREAD_ENV, "DIFFUSION_CORE_COMPAT_ORACLE": "1"}
    session.run(
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        "compat_oracle",
        "tests/flax_compat/test_oracle_039.py",
        *session.posargs,
        env=env,
    )
