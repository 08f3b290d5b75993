"""Fixtures: stand-ins and Envoy gateways, started as few times as the tests allow.

- `standins` (session): every stand-in, shared; faults, counters and logs are reset after each test.
- `module_path` (session): the built filter; fails (does not skip) with "run `make build`" if missing.
- `gateway_for` (module): `gateway_for(source, **stack_kwargs)`, one Stack per distinct arguments
  per test module. The gateway's token cache lives as long as the test module: use distinct
  subjects per test, or `make_stack`.
- `make_stack` (function): `make_stack(source, **stack_kwargs)`, a fresh Stack (cold cache) stopped
  after the test.
Stack arguments: see tests/harness/stack.py (filter_config, filter_settings, log_level, overrides of
tools.envoy_config.render).
"""

from __future__ import annotations

import json
import os

import pytest

from tests.harness import ModuleMissing, Stack
from tests.harness import module_path as find_module
from tests.standins import Standins


@pytest.fixture(scope="session")
def module_path():
    try:
        return find_module()
    except ModuleMissing as missing:
        pytest.fail(str(missing), pytrace=False)


@pytest.fixture(scope="session")
def standins(tmp_path_factory):
    running = Standins.start_all(tmp_path_factory.mktemp("standins"))
    yield running
    running.stop_all()


@pytest.fixture(autouse=True)
def _reset_standins(request):
    """Shared stand-ins start every test clean: no faults left over, counters from zero."""
    if "standins" not in request.fixturenames:
        yield
        return
    shared = request.getfixturevalue("standins")
    shared.reset()
    yield
    shared.reset()
    for server in shared.servers():
        if not server.running:
            server.start()  # a test that stopped a stand-in to simulate an outage
    if not os.path.exists(shared.token_dir.path):
        shared.token_dir.rotate()


def _start(source, workdir, standins, kwargs) -> Stack:
    return Stack(source, workdir, standins=standins, **kwargs).start()


@pytest.fixture(scope="module")
def gateway_for(request, tmp_path_factory, standins, module_path):
    stacks: dict = {}

    def get(source: str, **kwargs) -> Stack:
        key = (source, json.dumps(kwargs, sort_keys=True, default=repr))
        if key not in stacks:
            workdir = tmp_path_factory.mktemp(f"gateway-{source}")
            stacks[key] = _start(source, workdir, standins, kwargs)
        return stacks[key]

    yield get
    for stack in stacks.values():
        stack.stop()


@pytest.fixture
def make_stack(tmp_path, standins, module_path):
    stacks: list = []

    def make(source: str, **kwargs) -> Stack:
        stack = _start(source, tmp_path / f"stack-{len(stacks)}", standins, kwargs)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()
