"""The serving fleet: a controller with the OpenAI API, workers that register with it."""
