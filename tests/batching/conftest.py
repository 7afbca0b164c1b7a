import pytest


@pytest.fixture
def anyio_backend() -> str:
    """The batcher is built on asyncio (the service runs under uvicorn's asyncio loop)."""
    return "asyncio"
