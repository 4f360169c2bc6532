"""``cai serve``: an OpenAI-compatible server over any `Backend`.

Serves a model (usually the SL-CAI or RL-CAI model a run just trained) to anything that speaks
the OpenAI API: the ``openai`` client, chat UIs, evaluation harnesses, and cai's own
``openai_http`` backend on other machines. Three layers, each its own module:

- `cai.serve.engine`: the model side. A `Batcher` gathers plain requests from many clients into
  shared ``backend.generate`` calls; an `HFRunner` decodes token by token (streaming, log-probs,
  ``echo``) through `HFBackend.stream`. It blocks, and knows nothing of HTTP.
- `cai.serve.schemas` and `cai.serve.app`: the HTTP API, typed request models and ASGI routes.
- `cai.serve.server`: uvicorn, in the foreground (``cai serve``) or in a background thread (tests).

The HTTP layer is FastAPI on uvicorn rather than our own ``http.server`` code: a well-kept ASGI
stack that handles HTTP/1.1 framing, keep-alive, client disconnects and graceful shutdown for us;
pydantic validates every request body against a typed model, so a bad field is refused with a
message naming it; and streams are async, so a client that goes away is noticed mid-stream and its
decoding stopped.
"""
