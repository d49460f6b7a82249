"""The resilience drills, on private PostgreSQL and RabbitMQ servers: each
breaks a dependency under load and checks that callers got fast, typed
errors, that calls succeed again without a restart, and that every
acknowledged registration is stored exactly once.

About six minutes, so outside the default run:
``scripts/test -m drill tests/test_resilience.py``. ``scripts/drills``
runs the same drills and records their figures in docs/resilience.md.
"""

import pytest

from drills import scenarios

pytestmark = pytest.mark.drill


@pytest.fixture(scope="module")
def env():
    with scenarios.environment() as environment:
        yield environment


def test_a_stopped_database_fails_calls_fast_and_loses_nothing(env):
    assert scenarios.database_stopped(env).failures == []


def test_a_database_that_stops_answering_holds_no_worker_past_the_deadline(env):
    assert scenarios.database_stalled(env).failures == []


def test_paused_database_backends_hold_no_worker_past_the_deadline(env):
    assert scenarios.backends_paused(env).failures == []


def test_a_restarted_broker_is_reconnected_to_without_a_restart(env):
    assert scenarios.broker_restarted(env).failures == []


def test_a_crashed_broker_is_reconnected_to_without_a_restart(env):
    assert scenarios.broker_crashed(env).failures == []


def test_a_killed_service_answers_redeliveries_without_duplicates(env):
    assert scenarios.service_killed(env).failures == []


def test_fifty_slow_searches_on_fifty_workers_never_exhaust_the_pool(env):
    assert scenarios.many_slow_searches(env).failures == []


def test_a_flood_of_malformed_requests_is_refused_and_others_served(env):
    assert scenarios.malformed_flood(env).failures == []
