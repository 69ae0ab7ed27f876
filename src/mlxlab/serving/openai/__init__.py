"""Language-model runs served over the OpenAI API (chat completions, completions, /v1/models,
streaming) by mlx-lm's server: served.py loads the models and holds their common base once,
server.py puts mlx-lm's server over them, checks.py is what a request passes first (the key,
the body's size, the fields) and errors.py the error object every refusal is."""
