"""A finished run served: as an MLflow model (the pyfunc wrapper, registering, loading, MLflow's
server) and, for language models, over the OpenAI API (openai/)."""
