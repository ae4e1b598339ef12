"""Serving a model over HTTP: OpenAI's chat-completions API and a chat page."""
