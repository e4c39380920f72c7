"""Serving: the OpenAI-compatible completions API and the GPT-2 Explorer (see app.create_app)."""
