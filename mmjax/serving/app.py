"""The HTTP server of `python -m mmjax.serve`: OpenAI's chat-completions API over the slots
engine (continuous batching), a web chat page, health and Prometheus metrics.

    POST /v1/chat/completions   text and image_url parts; stream=true as server-sent events
    GET  /v1/models             the one model served
    GET  /health                200 while the decode loop runs (503 once it has failed)
    GET  /metrics               Prometheus text: queue, live slots, tokens/s, time to first token
    GET  /                      the chat page (plain HTML + JS, no build step, no CDN)

Every bad request is answered in OpenAI's error shape ({"error": {"message", "type",
"param", "code"}}) with a 4xx status, and the server goes on serving; a full queue is 429
with Retry-After; a client that goes away frees its slot.

FastAPI and uvicorn are the `serve` extra (pip install 'mmjax[serve]'): imported where the
app is built, so the rest of mmjax runs without them.
"""

import asyncio
import json
import time
from importlib import resources

from mmjax.inference.load import Loaded
from mmjax.inference.slots import Job, QueueFull, SlotEngine, TooLong
from mmjax.serving import chat_api
from mmjax.serving.chat_api import APIError, Limits

MAX_BODY = 64 << 20  # bytes of one request body


def page() -> str:
    return (resources.files("mmjax.serving") / "page.html").read_text()


def metrics_text(stats: dict, model_id: str) -> str:
    """Prometheus' text format of `SlotEngine.stats()`."""
    ttft = sorted(stats["ttft"])

    def q(p):
        return ttft[min(len(ttft) - 1, int(p * len(ttft)))] if ttft else 0.0

    label = f'{{model="{model_id}"}}'
    lines = [
        "# HELP mmjax_queue_length Requests waiting for a decode slot.",
        "# TYPE mmjax_queue_length gauge", f"mmjax_queue_length{label} {stats['queue']}",
        "# HELP mmjax_live_slots Decode slots holding a request.",
        "# TYPE mmjax_live_slots gauge", f"mmjax_live_slots{label} {stats['live']}",
        "# HELP mmjax_slots Decode slots in all.",
        "# TYPE mmjax_slots gauge", f"mmjax_slots{label} {stats['slots']}",
        "# HELP mmjax_tokens_per_second Tokens generated per second, last 10 seconds.",
        "# TYPE mmjax_tokens_per_second gauge",
        f"mmjax_tokens_per_second{label} {stats['tokens_per_second']:.3f}",
        "# HELP mmjax_generated_tokens_total Tokens generated.",
        "# TYPE mmjax_generated_tokens_total counter",
        f"mmjax_generated_tokens_total{label} {stats['tokens_generated']}",
        "# HELP mmjax_requests_total Requests finished (any way).",
        "# TYPE mmjax_requests_total counter",
        f"mmjax_requests_total{label} {stats['requests_done']}",
        "# HELP mmjax_time_to_first_token_seconds Time to first token, last 1000 requests.",
        "# TYPE mmjax_time_to_first_token_seconds summary",
        *(f'mmjax_time_to_first_token_seconds{{model="{model_id}",quantile="{p}"}} {q(p):.6f}'
          for p in (0.5, 0.9, 0.99)),
        f"mmjax_time_to_first_token_seconds_sum{label} {sum(ttft):.6f}",
        f"mmjax_time_to_first_token_seconds_count{label} {len(ttft)}",
    ]
    return "\n".join(lines) + "\n"


class Bridge:
    """A job's tokens and end, from the scheduler's thread into the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def on_token(self, token: int) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ("token", token))

    def on_done(self, result) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ("done", result))


class TextStream:
    """The reply's text as tokens arrive, holding back what could still become a stop string
    (a stop string never reaches the client) or a partial character."""

    def __init__(self, tokenizer, stops):
        self.tokenizer, self.stops = tokenizer, tuple(stops)
        self.ids: list[int] = []
        self.sent = ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        # an undecodable byte sequence may still become a character with the next token
        text = text.split("\ufffd")[0]
        hold = max((len(s) - 1 for s in self.stops), default=0)
        return self._send(text[:len(text) - hold] if hold else text)

    def finish(self, final: str) -> str:
        return self._send(final) if final.startswith(self.sent) else ""

    def _send(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        new, self.sent = text[len(self.sent):], text
        return new


def build_app(m: Loaded, slots: SlotEngine, model_id: str, limits: Limits = Limits(),
              api_key: str | None = None):
    """The FastAPI app serving `m` through `slots` (started and stopped with the app)."""
    # the serve extra, imported here: the rest of mmjax runs without FastAPI
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse

    async def lifespan(app):
        if slots._thread is None:
            slots.start()
        yield
        await asyncio.to_thread(slots.stop, True)  # drain what is live, then end

    app = FastAPI(title="mmjax", lifespan=lifespan, docs_url=None, redoc_url=None)

    def error(e: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    def authorised(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if got != f"Bearer {api_key}":
            raise APIError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                           type="invalid_request_error", code="invalid_api_key")

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error(e)

    @app.exception_handler(404)
    async def _not_found(request, e):
        return error(APIError(404, f"no route {request.method} {request.url.path}",
                              code="not_found"))

    @app.exception_handler(405)
    async def _not_allowed(request, e):
        return error(APIError(405, f"{request.method} is not allowed on {request.url.path}",
                              code="method_not_allowed"))

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page()

    @app.get("/health")
    async def health():
        if slots.error is not None:
            return JSONResponse({"status": "error", "error": str(slots.error)}, 503)
        s = slots.stats()
        return {"status": "ok", "model": model_id, "live": s["live"], "queue": s["queue"],
                "max_new_tokens": limits.max_new_tokens, "max_images": limits.max_images}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return metrics_text(slots.stats(), model_id)

    @app.get("/v1/models")
    async def models(request: Request):
        authorised(request)
        return {"object": "list", "data": [{"id": model_id, "object": "model",
                                            "created": int(time.time()), "owned_by": "mmjax"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorised(request)
        too_large = APIError(413, f"the request body is over {MAX_BODY} bytes",
                             code="request_too_large")
        if int(request.headers.get("content-length") or 0) > MAX_BODY:  # before reading it
            raise too_large
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise too_large
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON ({e})") from None
        # decoding images is work: off the event loop
        call = await asyncio.to_thread(chat_api.parse, body, m, limits, model_id)
        bridge = Bridge(asyncio.get_running_loop())
        try:
            job = slots.submit(call.request, call.sampling, call.seed, bridge.on_token,
                               bridge.on_done)
        except QueueFull as e:
            raise APIError(429, f"the server is busy ({e}); retry shortly",
                           type="rate_limit_error", code="queue_full") from None
        except TooLong as e:
            raise APIError(400, str(e), param="messages",
                           code="context_length_exceeded") from None
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        except RuntimeError as e:
            raise APIError(503, str(e), type="server_error", code="unavailable") from None
        prompt_tokens = len(call.request.ids)
        cid = chat_api.completion_id()
        if call.stream:
            return StreamingResponse(_stream(job, bridge, call, cid, prompt_tokens),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _whole(request, job, bridge, call, cid, prompt_tokens)

    async def _whole(request, job: Job, bridge: Bridge, call, cid, prompt_tokens):
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(bridge.queue.get(), 0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        slots.cancel(job)
                        return JSONResponse({}, status_code=499)
                    continue
                if kind == "done":
                    break
        except asyncio.CancelledError:
            slots.cancel(job)
            raise
        if isinstance(value, BaseException):
            raise APIError(500, f"generation failed: {value}", type="server_error")
        return chat_api.completion(cid, call.model, value.text.lstrip(), value.finish,
                                   prompt_tokens,
                                   len(value.token_ids))

    async def _stream(job: Job, bridge: Bridge, call, cid, prompt_tokens):
        def event(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        text = TextStream(m.tokenizer, call.sampling.stop)
        finished = False
        try:
            yield event(chat_api.chunk(cid, call.model, {"role": "assistant", "content": ""}))
            while True:
                # what has arrived since the last chunk goes out as one (a decode call
                # brings several tokens at once)
                items = [await bridge.queue.get()]
                while not bridge.queue.empty():
                    items.append(bridge.queue.get_nowait())
                new = "".join(text.add(v) for kind, v in items if kind == "token")
                if new:
                    yield event(chat_api.chunk(cid, call.model, {"content": new}))
                ends = [v for kind, v in items if kind == "done"]
                if not ends:
                    continue
                finished, value = True, ends[0]
                if isinstance(value, BaseException):
                    yield event(APIError(500, f"generation failed: {value}",
                                         type="server_error").body())
                    break
                rest = text.finish(value.text.lstrip())
                if rest:
                    yield event(chat_api.chunk(cid, call.model, {"content": rest}))
                yield event(chat_api.chunk(cid, call.model, {}, value.finish))
                if call.include_usage:
                    yield event(chat_api.chunk(
                        cid, call.model, {}, usage_=chat_api.usage(
                            prompt_tokens, len(value.token_ids)), choices=False))
                break
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or the stream ended): the slot is freed
            if not finished:
                slots.cancel(job)

    return app
