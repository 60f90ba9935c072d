"""One request's engine outputs on their way to the client, as one JSON body or a stream of SSE
chunks: what chat and text completions share (metrics, the request timeout, a client leaving,
errors after the 200). Each endpoint's subclass writes its own OpenAI shapes."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from server import openai_format as fmt
from server.async_engine import EngineDeadError
from server.errors import APIError, bad_request

logger = logging.getLogger(__name__)


async def _client_gone(request: Request) -> None:
    """Returns once the client disconnects: its body is read, so the next ASGI message is that."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Answer:
    """`num_completions`: every completion the request asked for (n per prompt); the ones that did
    not finish count as aborted when the answer closes."""

    def __init__(self, request_id: str, state, arrival: float, num_completions: int, num_prompt_tokens: int):
        self.request_id = request_id
        self.created = int(time.time())
        self.model = state.served_model_name
        self.metrics = state.metrics
        self.arrival = arrival
        self.num_completions = num_completions
        self.num_prompt_tokens = num_prompt_tokens
        self.timeout_s = state.config.server.request_timeout_s
        self.last_token_time: float | None = None
        self.num_finished = 0

    async def json_body(self, outputs: AsyncIterator) -> dict:
        """The whole answer's JSON, from `self.observed(outputs)`."""
        raise NotImplementedError

    def chunks(self, outputs: AsyncIterator) -> AsyncIterator[str]:
        """The answer's SSE chunks, from `self.observed(outputs)`, without [DONE]."""
        raise NotImplementedError

    def _observe(self, output) -> None:
        now = time.monotonic()
        m = self.metrics
        if self.last_token_time is None:
            m.time_to_first_token.observe(now - self.arrival)
        else:
            m.inter_token_latency.observe(now - self.last_token_time)
        self.last_token_time = now
        if output.queue_time_s is not None:
            m.request_queue_time.observe(output.queue_time_s)
        m.generation_tokens.inc(len(output.new_token_ids))
        if output.finished:
            m.e2e_request_latency.observe(now - self.arrival)
            m.finished(output.finish_reason)
            self.num_finished += 1

    def _close(self) -> None:
        """Completions that did not finish (client gone, timeout, engine stopped) count as aborted, as
        vLLM's request_success_total{finished_reason="abort"} does."""
        for _ in range(self.num_completions - self.num_finished):
            self.metrics.finished("abort")
        self.num_finished = self.num_completions

    async def observed(self, outputs: AsyncIterator) -> AsyncIterator:
        """`outputs` under the request timeout, with metrics; closed (aborting what is left) at the
        end. An engine error becomes an APIError: the response, or a stream's error event."""
        try:
            async with asyncio.timeout(self.timeout_s):
                async for output in outputs:
                    self._observe(output)
                    yield output
        except TimeoutError as err:
            raise APIError(408, f"request timed out after {self.timeout_s} s", code="timeout") from err
        except EngineDeadError as err:
            raise APIError(500, str(err), code="engine_dead") from err
        except ValueError as err:
            raise bad_request(str(err)) from err
        finally:
            await outputs.aclose()
            self._close()

    async def collect(self, outputs: AsyncIterator, request: Request) -> JSONResponse:
        """The whole answer, unless the client leaves first: then its sequences are aborted (closing
        `outputs` does it) instead of generating to max_tokens for no one, as vLLM does."""
        gather = asyncio.create_task(self.json_body(outputs))
        gone = asyncio.create_task(_client_gone(request))
        try:
            await asyncio.wait({gather, gone}, return_when=asyncio.FIRST_COMPLETED)
            if gone.done() and gone.exception() is not None:  # the connection cannot be watched: just answer
                await asyncio.wait({gather})
        finally:
            gone.cancel()
            if not gather.done():  # the client left (or this handler was cancelled)
                gather.cancel()
        try:
            return JSONResponse(await gather)
        except asyncio.CancelledError:  # nginx's 499: nobody reads it, the access log and metrics do
            return JSONResponse(APIError(499, "client closed the request").body(), status_code=499)

    async def stream(self, outputs: AsyncIterator) -> AsyncIterator[str]:
        """The SSE body: the subclass's chunks, then [DONE]. An error after the 200 is one error event."""
        rid = self.request_id
        try:
            async for piece in self.chunks(outputs):
                yield piece
        except APIError as err:
            yield f"data: {json.dumps(err.body())}\n\n"
        except Exception:  # noqa: BLE001 -- the 200 is sent: the stream must still end with an error and [DONE]
            logger.exception("stream %s failed", rid)
            error = APIError(500, f"internal error (request id {rid})", code="internal_error")
            yield f"data: {json.dumps(error.body())}\n\n"
        finally:
            await outputs.aclose()
            self._close()
        yield fmt.DONE
