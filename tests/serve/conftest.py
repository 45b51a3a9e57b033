"""A real `mtpx serve` app (uvicorn on a free loopback port, in a thread) over the tiny test checkpoint."""
from __future__ import annotations

import threading
import time

import pytest

import mtpx
from mtpx.serve.app import Server
from mtpx.engine.params import SpecConfig

API_KEY = "test-key-123"


class LiveServer:
    def __init__(self, server: Server):
        import uvicorn
        self.server = server
        config = uvicorn.Config(server.build(), host="127.0.0.1", port=0, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=2)
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, name="uvicorn-test", daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.uvicorn.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        port = self.uvicorn.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def client(self, api_key: str = "unused", **kw):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60, **kw)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="session")
def serve_llm(dense_ckpt):
    return mtpx.LLM(dense_ckpt)


@pytest.fixture(scope="session")
def live(dense_ckpt):
    """Speculation on with a fixed draft length, so batched verify, partial acceptance and per-sequence rollback run
    in every round (the random tiny model rejects most drafts)."""
    server = Server(mtpx.LLM(dense_ckpt), model_name="tiny",
                    spec=SpecConfig(spec_type="mtp", spec_draft_n_max=3, spec_draft_policy="fixed"))
    s = LiveServer(server)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def keyed(dense_ckpt):
    s = LiveServer(Server(mtpx.LLM(dense_ckpt), model_name="tiny", api_key=API_KEY))
    yield s
    s.stop()
