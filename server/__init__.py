"""stream-serve: the aiohttp app and the OpenAI protocol over an Engine."""
