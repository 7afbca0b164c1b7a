"""The app's lifespan: what start-up builds is kept out of the cyclic garbage collector while serving."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from service.app import create_app
from tests.service.conftest import make_settings

pytestmark = pytest.mark.anyio


def tracked(obj: object) -> bool:
    """Whether the cyclic collector scans `obj` (frozen objects are not among gc.get_objects())."""
    return any(o is obj for o in gc.get_objects())


async def test_startup_objects_are_frozen_out_of_the_collector_while_serving(model_dir: Path) -> None:
    """The lifespan freezes what start-up made (gc.freeze), so full collections under load stay short."""
    app = create_app(make_settings(model_dir))
    registry = app.state.registry
    assert tracked(registry)
    async with app.router.lifespan_context(app):
        assert not tracked(registry)
    assert tracked(registry)
