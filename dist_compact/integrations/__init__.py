"""Integrations with other libraries (diffusers, yunchang, deepspeed, xfuser); each imported lazily."""
